//! Framing and the bounds of replies, on real streams.

use super::*;
use crate::state::HistoryEntry;
use serde_bytes::ByteBuf;

#[test]
fn many_long_failures_fit_a_frame_and_ask_for_the_whole_watch() {
    // 4,000 failed ops (a whole commit) with 4 KiB paths: 16 MiB, four
    // times the frame cap, which ended the session and so replication.
    let failed: Vec<(String, String)> = (0..4000)
        .map(|i| {
            (
                format!("{i}/{}", "p".repeat(4096)),
                "No space left on device (os error 28)".to_string(),
            )
        })
        .collect();
    assert!(encode(&Reply::Committed {
        batch: 1,
        applied: 0,
        failed: failed.clone()
    })
    .is_err());
    let bounded = bound_failures(failed);
    let reply = Reply::Committed {
        batch: 1,
        applied: 0,
        failed: bounded.clone(),
    };
    assert!(encode(&reply).is_ok());
    let (root, why) = bounded.last().unwrap();
    assert!(root.is_empty() && why.contains("more change(s) failed"), "{why}");
    assert!(bounded.len() > 100);
    // Few failures pass as they are.
    let few = vec![("a".to_string(), "x".to_string())];
    assert_eq!(bound_failures(few.clone()), few);
}

#[test]
fn long_histories_keep_their_newest_entries() {
    let entry = |i: i64| HistoryEntry {
        time: i,
        epoch: i as u64,
        from: "a".into(),
        to: "b".into(),
        reason: "r".repeat(1000),
        by: "operator".into(),
    };
    let all: Vec<HistoryEntry> = (0..10_000).map(entry).collect();
    assert!(encode(&Reply::History(all.clone())).is_err());
    let kept = newest_that_fit(all, |n| HistoryEntry {
        reason: format!("{n} older entries left out"),
        ..entry(0)
    });
    assert!(encode(&Reply::History(kept.clone())).is_ok());
    assert!(kept[0].reason.ends_with("older entries left out"), "{}", kept[0].reason);
    assert_eq!(kept.last().unwrap().time, 9_999);
    let short: Vec<HistoryEntry> = (0..3).map(entry).collect();
    assert_eq!(newest_that_fit(short.clone(), |_| entry(-1)), short);
}

#[test]
fn roundtrip_and_trailing_bytes() {
    let r = Request::GetManifest { watch: "ca".into() };
    let body = encode(&r).unwrap();
    assert_eq!(decode::<Request>(&body).unwrap(), r);
    let mut longer = body.to_vec();
    longer.push(0);
    assert!(decode::<Request>(&longer).is_err());
    assert!(decode::<Request>(&body[..body.len() - 1]).is_err());
}

#[tokio::test]
async fn oversized_frame_is_refused() {
    let (a, b) = tokio::io::duplex(64);
    let mut w = tokio::io::BufWriter::new(a);
    let mut rd = FrameReader::new(b);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = w.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).await;
        let _ = w.flush().await;
    });
    assert!(rd.recv::<Request>().await.is_err());
}

#[tokio::test]
async fn frames_cross_a_stream() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut w = FrameWriter::new(a);
    let mut r = FrameReader::new(b);
    let op = Request::Op(Op::FileData(ByteBuf::from(vec![7u8; 1000])));
    w.send(&op).await.unwrap();
    w.send(&Request::Ping).await.unwrap();
    assert_eq!(r.recv::<Request>().await.unwrap(), Some(op));
    assert_eq!(r.recv::<Request>().await.unwrap(), Some(Request::Ping));
    drop(w);
    assert_eq!(r.recv::<Request>().await.unwrap(), None);
}

fn packed(frames: &[Request]) -> Request {
    let bodies: Vec<bytes::Bytes> = frames.iter().map(|r| encode(r).unwrap()).collect();
    let body = pack(&mut crate::compress::Packer::new().unwrap(), &bodies).unwrap();
    decode(&body).unwrap()
}

#[test]
fn packed_requests_expand_in_their_place() {
    let reqs = vec![
        Request::Op(Op::FileData(ByteBuf::from(b"-----BEGIN CERTIFICATE-----".repeat(40)))),
        Request::Op(Op::FileEnd),
        Request::Commit { batch: 7 },
    ];
    let batch = vec![Request::Ping, packed(&reqs), Request::Ping];
    let mut unpacker = crate::compress::Unpacker::new().unwrap();
    let out = expand(Some(&mut unpacker), batch).unwrap();
    let mut want = vec![Request::Ping];
    want.extend(reqs);
    want.push(Request::Ping);
    assert_eq!(format!("{out:?}"), format!("{want:?}"));
}

#[test]
fn a_packed_request_is_refused_where_none_may_be() {
    // The session did not agree on compression.
    let err = expand(None, vec![packed(&[Request::Ping])]).unwrap_err();
    assert!(err.to_string().contains("did not agree"), "{err}");
    // A packed frame inside a packed frame, or a hello.
    for inner in [packed(&[Request::Ping]), Request::Hello(hello())] {
        let mut unpacker = crate::compress::Unpacker::new().unwrap();
        let err = expand(Some(&mut unpacker), vec![packed(&[inner])]).unwrap_err();
        assert!(err.to_string().contains("holds a hello or another"), "{err}");
    }
    // More than a frame's worth of requests once expanded.
    let big = Request::Op(Op::FileData(ByteBuf::from(vec![b'x'; MAX_FRAME])));
    let mut packer = crate::compress::Packer::new().unwrap();
    let body = bincode::serde::encode_to_vec(&big, bincode::config::standard()).unwrap();
    let data = packer.pack(&[bytes::Bytes::from(body)]).unwrap();
    let mut unpacker = crate::compress::Unpacker::new().unwrap();
    let err = expand(Some(&mut unpacker), vec![Request::Packed(ByteBuf::from(data))]).unwrap_err();
    assert!(matches!(err, FrameError::Compress(_)), "{err}");
}

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
        node: "a".into(),
        epoch: 1,
        active: "a".into(),
        config_hash: String::new(),
        purpose: Purpose::Replicate,
        owners: false,
        compress: crate::compress::Compress::Always,
    }
}
