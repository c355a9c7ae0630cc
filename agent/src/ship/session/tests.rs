//! How a group of frames goes on the wire when the session compresses.

use serde_bytes::ByteBuf;
use warmspare_shared::compress::Unpacker;

use super::*;

fn frame(r: &Request) -> Bytes {
    proto::encode(r).unwrap()
}

fn decoded(frames: &[Bytes]) -> Vec<Request> {
    frames.iter().map(|f| proto::decode(f).unwrap()).collect()
}

#[test]
fn plain_frames_keep_their_place_between_packed_runs() {
    let reqs = [
        Request::Op(Op::FileEnd),
        Request::Op(Op::FileData(ByteBuf::from(vec![7u8; 1000]))),
        Request::Commit { batch: 1 },
        Request::Ping,
    ];
    let group = vec![
        (frame(&reqs[0]), true),
        (frame(&reqs[1]), false),
        (frame(&reqs[2]), true),
        (frame(&reqs[3]), true),
    ];
    let out = pack_group(&mut Packer::new().unwrap(), group).unwrap();
    let wire = decoded(&out);
    assert_eq!(wire.len(), 3, "{wire:?}");
    assert!(matches!(wire[0], Request::Packed(_)));
    assert_eq!(
        format!("{:?}", wire[1]),
        format!("{:?}", reqs[1]),
        "the plain frame goes as it is"
    );
    assert!(matches!(wire[2], Request::Packed(_)));
    let back = proto::expand(Some(&mut Unpacker::new().unwrap()), wire).unwrap();
    assert_eq!(format!("{back:?}"), format!("{reqs:?}"));
}

#[test]
fn a_packed_frame_stays_within_its_bound() {
    // Frames of 256 KiB: a run is cut before it passes PACK_MAX.
    let big = Request::Op(Op::FileData(ByteBuf::from(vec![1u8; 256 * 1024])));
    let group: Vec<(Bytes, bool)> = (0..40).map(|_| (frame(&big), true)).collect();
    let out = pack_group(&mut Packer::new().unwrap(), group).unwrap();
    let mut unpacker = Unpacker::new().unwrap();
    let mut total = 0;
    for f in decoded(&out) {
        let Request::Packed(data) = f else {
            panic!("expected packed frames")
        };
        let inner = unpacker.unpack(&data, proto::MAX_FRAME).unwrap();
        let raw: usize = inner.iter().map(|b| b.len() + 4).sum();
        assert!(raw <= proto::PACK_MAX, "{raw} bytes in one packed frame");
        total += inner.len();
    }
    assert_eq!(total, 40);
}
