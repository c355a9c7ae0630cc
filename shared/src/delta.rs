//! Signatures, deltas and patching, on top of `fast_rsync`, plus memory maps.
//!
//! fast_rsync's signatures use MD4; callers always check the patched result
//! against the sender's BLAKE3 hash, and patching is limited to the size the
//! sender announced, because a delta from the wire is untrusted input.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Deref;

use fast_rsync::{Signature, SignatureOptions};

/// Files at least this large that exist on the receiver go as deltas.
pub const DELTA_MIN_SIZE: u64 = 64 * 1024;

/// Whether a file of `new` bytes should go as a delta against the receiver's
/// copy of `old` bytes: both large enough, and of comparable size (a delta
/// against a much smaller or larger base is mostly literal data, and the
/// rolling search over it costs more than sending it whole).
pub fn worth_a_delta(old: u64, new: u64) -> bool {
    old >= DELTA_MIN_SIZE && new >= DELTA_MIN_SIZE && new <= old.saturating_mul(2) && old <= new.saturating_mul(2)
}

/// Bytes of the MD4 strong hash kept per block.
const STRONG_LEN: u32 = 8;

/// The signature block length for a file of `size` bytes: rsync's rule
/// (the square root, a multiple of 8, between 700 and 128 KiB).
pub fn block_len(size: u64) -> u32 {
    if size <= 700 * 700 {
        return 700;
    }
    let root = (size as f64).sqrt() as u64;
    (root & !7).clamp(700, 128 * 1024) as u32
}

/// A delta operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The signature bytes are not a valid signature.
    #[error("bad signature: {0}")]
    Signature(String),
    /// Computing the delta failed.
    #[error("cannot compute the delta: {0}")]
    Diff(String),
    /// The delta is malformed or would exceed the announced size.
    #[error("cannot apply the delta: {0}")]
    Apply(String),
}

/// Inputs smaller than this are signed and diffed on the calling thread.
const PARALLEL_MIN: usize = 8 << 20;

/// The most data one thread diffs in one piece. Each piece's delta is held in
/// memory until the pieces before it are written, so this bounds the memory a
/// diff of mostly new content can take (one piece per thread).
const PIECE_MAX: usize = 32 << 20;

/// How a large signature or diff is split across threads.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    /// Threads working at once, the caller's included.
    pub threads: usize,
    /// The largest piece one thread takes.
    pub piece_max: usize,
}

impl Split {
    /// The machine's cores, up to four, for inputs of at least 8 MiB; one
    /// thread otherwise.
    pub fn for_len(len: usize) -> Split {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Split {
            threads: if len < PARALLEL_MIN { 1 } else { cores.min(4) },
            piece_max: PIECE_MAX,
        }
    }

    /// The length of each piece of `len` bytes: a whole number of blocks.
    fn piece_len(self, len: usize, block: usize) -> usize {
        let share = len.div_ceil(self.threads.max(1)).min(self.piece_max).max(1);
        share.div_ceil(block) * block
    }
}

/// The serialized signature of `base`.
pub fn signature(base: &[u8], block_len: u32) -> Vec<u8> {
    signature_with(base, block_len, Split::for_len(base.len()))
}

/// [`signature`], split as given. Each block's entry depends on that block
/// alone, so pieces that are whole numbers of blocks are signed on their own
/// and their entries joined: the result is the same bytes.
pub fn signature_with(base: &[u8], block_len: u32, split: Split) -> Vec<u8> {
    let opts = SignatureOptions {
        block_size: block_len.max(1),
        crypto_hash_size: STRONG_LEN,
    };
    if split.threads <= 1 {
        return Signature::calculate(base, opts).into_serialized();
    }
    let piece = split.piece_len(base.len(), opts.block_size as usize);
    let mut out = Vec::new();
    for round in base.chunks(piece * split.threads) {
        let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
            let workers: Vec<_> = round
                .chunks(piece)
                .skip(1)
                .map(|p| s.spawn(move || Signature::calculate(p, opts).into_serialized()))
                .collect();
            let first = Signature::calculate(&round[..piece.min(round.len())], opts).into_serialized();
            std::iter::once(first)
                .chain(
                    workers
                        .into_iter()
                        .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                )
                .collect()
        });
        for part in parts {
            let body = if out.is_empty() { 0 } else { SIGNATURE_HEADER };
            out.extend_from_slice(part.get(body..).unwrap_or_default());
        }
    }
    out
}

/// Bytes before the first block entry of a serialized signature: magic,
/// block length, strong hash length.
const SIGNATURE_HEADER: usize = 12;

/// The first four bytes of a delta.
const DELTA_MAGIC: [u8; 4] = [0x72, 0x73, 0x02, 0x36];

/// The command that ends a delta.
const DELTA_END: u8 = 0;

/// Writes to `out` the delta that turns the signed file into `data`.
pub fn diff(signature_bytes: &[u8], data: &[u8], out: impl Write) -> Result<(), DeltaError> {
    diff_with(signature_bytes, data, out, Split::for_len(data.len()))
}

/// [`diff`], split as given. Large inputs are cut into pieces of whole blocks,
/// diffed on several threads, and the pieces' commands are joined in order
/// into one delta (a delta's commands carry no position of their own). A
/// match that would straddle two pieces is lost, so each cut costs at most
/// about one block of literal data.
pub fn diff_with(signature_bytes: &[u8], data: &[u8], mut out: impl Write, split: Split) -> Result<(), DeltaError> {
    let (sig, block) = parse_signature(signature_bytes)?;
    let index = sig.index();
    let one = |piece: &[u8], out: &mut dyn Write| {
        fast_rsync::diff(&index, piece, out).map_err(|e| DeltaError::Diff(e.to_string()))
    };
    if split.threads <= 1 {
        return one(data, &mut out);
    }
    let piece = split.piece_len(data.len(), block);
    let io = |e: io::Error| DeltaError::Diff(e.to_string());
    out.write_all(&DELTA_MAGIC).map_err(io)?;
    for round in data.chunks(piece * split.threads) {
        std::thread::scope(|s| {
            let workers: Vec<_> = round
                .chunks(piece)
                .skip(1)
                .map(|p| {
                    s.spawn(move || {
                        let mut buf = Vec::new();
                        one(p, &mut buf).map(|()| buf)
                    })
                })
                .collect();
            // The first piece of each round streams straight out.
            let mut first = Commands::new(&mut out);
            one(&round[..piece.min(round.len())], &mut first)?;
            first.finish()?;
            for w in workers {
                let buf = w
                    .join()
                    .map_err(|_| DeltaError::Diff("a diff thread panicked".into()))??;
                let mut rest = Commands::new(&mut out);
                rest.write_all(&buf).map_err(io)?;
                rest.finish()?;
            }
            Ok::<(), DeltaError>(())
        })?;
    }
    out.write_all(&[DELTA_END]).map_err(io)
}

/// Passes on the commands of one complete delta: drops its magic and holds
/// back its last byte, which must be the end command.
struct Commands<W> {
    out: W,
    skip: usize,
    held: Option<u8>,
}

impl<W: Write> Commands<W> {
    fn new(out: W) -> Commands<W> {
        Commands {
            out,
            skip: DELTA_MAGIC.len(),
            held: None,
        }
    }

    fn finish(self) -> Result<(), DeltaError> {
        if self.skip != 0 || self.held != Some(DELTA_END) {
            return Err(DeltaError::Diff("a piece's delta is not complete".into()));
        }
        Ok(())
    }
}

impl<W: Write> Write for Commands<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let skip = self.skip.min(buf.len());
        self.skip -= skip;
        let rest = &buf[skip..];
        if let Some((&last, body)) = rest.split_last() {
            if let Some(held) = self.held.replace(last) {
                self.out.write_all(&[held])?;
            }
            self.out.write_all(body)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Whether a delta of `data` against the signed file is likely to save
/// anything. Computing a delta over content that matches nothing costs far
/// more than sending it (the diff rolls byte by byte), so for large inputs
/// three probes (start, middle, end) are diffed first; when every probe comes
/// out almost all literal data, the content was rewritten and goes whole.
pub fn worth_diffing(signature_bytes: &[u8], data: &[u8]) -> Result<bool, DeltaError> {
    const PROBE: usize = 256 * 1024;
    if data.len() < 16 * PROBE {
        return Ok(true);
    }
    let (sig, _) = parse_signature(signature_bytes)?;
    let index = sig.index();
    let mid = data.len() / 2 - PROBE / 2;
    for at in [0, mid, data.len() - PROBE] {
        let mut out = Vec::with_capacity(PROBE + 1024);
        fast_rsync::diff(&index, &data[at..at + PROBE], &mut out).map_err(|e| DeltaError::Diff(e.to_string()))?;
        if out.len() < PROBE / 10 * 9 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Parses a signature from the peer, with its block length. fast_rsync
/// trusts the header's block and hash sizes, so they are checked first.
fn parse_signature(signature_bytes: &[u8]) -> Result<(Signature, usize), DeltaError> {
    let field = |at: usize| {
        signature_bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let block = match (field(4), field(8)) {
        (Some(block), Some(strong)) if block > 0 && block <= 1 << 24 && (1..=16).contains(&strong) => block,
        _ => return Err(DeltaError::Signature("bad block or hash size".into())),
    };
    let sig = Signature::deserialize(signature_bytes.to_vec()).map_err(|e| DeltaError::Signature(e.to_string()))?;
    Ok((sig, block as usize))
}

/// Applies `delta` to `base`, writing at most `limit` bytes to `out`.
pub fn apply(base: &[u8], delta: &[u8], out: &mut impl Write, limit: usize) -> Result<(), DeltaError> {
    fast_rsync::apply_limited(base, delta, out, limit).map_err(|e| DeltaError::Apply(e.to_string()))
}

/// A read-only view of a whole file: memory-mapped, or empty for an empty file.
pub struct Mapped {
    map: Option<memmap2::Mmap>,
}

impl Mapped {
    /// Maps `file` read-only.
    pub fn new(file: &File) -> io::Result<Mapped> {
        if file.metadata()?.len() == 0 {
            return Ok(Mapped { map: None });
        }
        // SAFETY: the map is read-only. The files mapped are the agent's own
        // temporary files, or files of a watched tree whose content is checked
        // against a BLAKE3 hash after use, so a concurrent writer can at worst
        // make that check fail; it cannot make us read outside the mapping.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Mapped { map: Some(map) })
    }
}

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_roundtrip_and_limit() {
        let base: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut new = base.clone();
        new[100_000..100_010].copy_from_slice(b"0123456789");
        let sig = signature(&base, block_len(base.len() as u64));
        let mut delta = Vec::new();
        diff(&sig, &new, &mut delta).unwrap();
        assert!(delta.len() < 10_000, "delta of {} bytes", delta.len());
        let mut out = Vec::new();
        apply(&base, &delta, &mut out, new.len()).unwrap();
        assert_eq!(out, new);
        let mut short = Vec::new();
        assert!(apply(&base, &delta, &mut short, new.len() - 1).is_err());
    }

    #[test]
    fn rewritten_content_is_not_worth_a_diff() {
        let base: Vec<u8> = (0..8_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sig = signature(&base, block_len(base.len() as u64));
        let mut edited = base.clone();
        edited[10..20].copy_from_slice(b"0123456789");
        edited.insert(4_000_000, b'x');
        assert!(worth_diffing(&sig, &edited).unwrap());
        let rewritten: Vec<u8> = base.iter().map(|b| b ^ 0x5a).collect();
        assert!(!worth_diffing(&sig, &rewritten).unwrap());
        // Small inputs are always diffed.
        assert!(worth_diffing(&sig, &rewritten[..100_000]).unwrap());
    }

    #[test]
    fn split_signatures_and_diffs_match_one_thread() {
        let base: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let block = block_len(base.len() as u64);
        let one = Split {
            threads: 1,
            piece_max: usize::MAX,
        };
        // Pieces that do not divide the input evenly, and more pieces than threads.
        let split = Split {
            threads: 3,
            piece_max: 250_000,
        };
        let sig = signature_with(&base, block, one);
        assert_eq!(signature_with(&base, block, split), sig);
        let mut new = base.clone();
        for at in [5_000, 700_000, 1_400_000, 2_999_000] {
            new[at..at + 100].copy_from_slice(&[7; 100]);
        }
        new.splice(1_000_000..1_000_000, [9u8; 4096]);
        let (mut whole, mut pieces) = (Vec::new(), Vec::new());
        diff_with(&sig, &new, &mut whole, one).unwrap();
        diff_with(&sig, &new, &mut pieces, split).unwrap();
        for delta in [&whole, &pieces] {
            let mut out = Vec::new();
            apply(&base, delta, &mut out, new.len()).unwrap();
            assert_eq!(out, new);
        }
        // Each of the 12 cuts loses at most about one block of matches.
        assert!(
            pieces.len() <= whole.len() + 12 * (block as usize + 16),
            "{} bytes in pieces, {} whole",
            pieces.len(),
            whole.len()
        );
    }

    #[test]
    fn block_len_follows_rsync() {
        assert_eq!(block_len(10), 700);
        assert_eq!(block_len(256 << 20), 16384);
        assert_eq!(block_len(1 << 40), 128 * 1024);
    }
}
