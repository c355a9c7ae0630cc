//! Entry points for the fuzzers in `fuzz/` and for the tests that replay
//! their corpus and crash reproducers.
//!
//! Each function takes arbitrary bytes, feeds them to a decoder that reads
//! what a peer or a file on disk can hand us, and panics only when an
//! invariant breaks (a decoded message that does not encode back to itself,
//! a delta that writes past its limit, a peer path that leaves its root).
//! Errors from the decoders themselves are the expected outcome.

use std::future::Future;
use std::path::{Component, Path};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::manifest::{self, HashCache};
use crate::proto::{self, FrameReader, Reply, Request};
use crate::{delta, ledger, relpath};

/// Polls a future over an in-memory reader, which never waits.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Checks that a decoded message encodes to bytes that decode to the same
/// encoding (a stable round trip, which also holds for NaN fields).
fn round_trips<T>(msg: &T)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de>,
{
    let Ok(once) = proto::encode(msg) else {
        // Over the frame cap once re-encoded: the writer refuses it too.
        return;
    };
    let again: T = match proto::decode(&once) {
        Ok(m) => m,
        Err(e) => panic!("a decoded message does not decode after encoding: {e}"),
    };
    let twice = match proto::encode(&again) {
        Ok(b) => b,
        Err(e) => panic!("a round-tripped message does not encode: {e}"),
    };
    assert_eq!(once, twice, "encoding is not stable across a round trip");
}

/// The frame decoder: `data` is a byte stream from a peer, read as framed
/// requests until it ends or fails, then as one request body and one reply
/// body.
pub fn frames(data: &[u8]) {
    let mut reader = FrameReader::new(data);
    while let Ok(Some(req)) = ready(reader.recv::<Request>()) {
        round_trips(&req);
    }
    if let Ok(req) = proto::decode::<Request>(data) {
        round_trips(&req);
    }
    if let Ok(reply) = proto::decode::<Reply>(data) {
        round_trips(&reply);
    }
}

/// The manifest decoders: `data` as a reply body carrying a peer's manifest,
/// and as the persisted hash cache and sync ledger.
pub fn manifests(data: &[u8]) {
    if let Ok(Reply::ManifestPart { entries, .. }) = proto::decode::<Reply>(data) {
        if manifest::check_peer_entries(&entries).is_ok() {
            let root = Path::new("/nonexistent/warmspare-root");
            for e in &entries {
                assert!(
                    root.join(&e.path)
                        .strip_prefix(root)
                        .is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_)))),
                    "{:?} is not a plain relative path",
                    e.path
                );
                assert!(relpath::confine(root, &e.path).is_ok());
            }
        }
    }
    let cache = HashCache::from_bytes(data);
    assert!(cache.len() <= data.len(), "more cache entries than input bytes");
    let map = ledger::Ledger::decode(data);
    assert!(map.len() <= data.len(), "more ledger entries than input bytes");
}

/// Delta application with the announced-size limit: the first four bytes
/// give the base length and the limit, then come the base and the delta.
/// A second pass computes a real delta from the base to the rest and checks
/// that applying it gives the rest back.
pub fn delta_apply(data: &[u8]) {
    let [a, b, c, d, rest @ ..] = data else {
        return;
    };
    let base_len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let limit = usize::from(u16::from_le_bytes([*c, *d]));
    let (base, patch) = rest.split_at(base_len);
    // Whether it applies or fails part-way, it never writes past the limit.
    let mut out = Vec::new();
    let _ = delta::apply(base, patch, &mut out, limit);
    assert!(
        out.len() <= limit,
        "a delta wrote {} bytes past a limit of {limit}",
        out.len()
    );

    let block = u32::from(*a % 64) + 1;
    let sig = delta::signature(base, block);
    let mut patch = Vec::new();
    if let Err(e) = delta::diff(&sig, rest, &mut patch) {
        panic!("diff against our own signature failed: {e}");
    }
    let mut back = Vec::new();
    if let Err(e) = delta::apply(base, &patch, &mut back, rest.len()) {
        panic!("our own delta does not apply: {e}");
    }
    assert_eq!(back, rest, "our own delta does not give the new content back");
    // And the signature bytes themselves, as a peer could send them.
    let mut sink = Vec::new();
    let _ = delta::diff(patch.as_slice(), base, &mut sink);
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    /// Replays every kept corpus input and crash reproducer of the fuzzers.
    #[test]
    fn fuzz_corpus_and_reproducers_replay() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 3] = [
            ("frames", super::frames),
            ("manifests", super::manifests),
            ("delta_apply", super::delta_apply),
        ];
        let mut replayed = 0;
        for (name, run) in targets {
            for dir in [root.join("corpus").join(name), root.join("regressions").join(name)] {
                let Ok(rd) = fs::read_dir(&dir) else { continue };
                for f in rd.flatten() {
                    // A running fuzzer may remove an input while we list them.
                    let Ok(data) = fs::read(f.path()) else { continue };
                    run(&data);
                    replayed += 1;
                }
            }
        }
        assert!(replayed > 0, "no corpus found under {}", root.display());
    }
}
