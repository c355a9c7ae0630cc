use super::*;

fn frames(bodies: &[&[u8]]) -> Vec<Bytes> {
    bodies.iter().map(|b| Bytes::copy_from_slice(b)).collect()
}

/// A certificate-like text: base64 lines between PEM markers, different
/// per `seed`.
fn pem(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    for _ in 0..25 {
        for _ in 0..64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            out.push(alphabet[(x >> 58) as usize]);
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn the_table_of_two_settings() {
    use Compress::*;
    for loopback in [false, true] {
        for other in [Auto, Always, Never] {
            assert!(!negotiate(Never, other, loopback), "never on the sender wins");
            assert!(!negotiate(other, Never, loopback), "never on the receiver wins");
        }
        assert!(negotiate(Always, Always, loopback));
        assert!(negotiate(Always, Auto, loopback));
        assert!(negotiate(Auto, Always, loopback));
    }
    assert!(
        negotiate(Auto, Auto, false),
        "auto compresses a link that leaves the machine"
    );
    assert!(!negotiate(Auto, Auto, true), "auto does not compress a loopback link");
}

#[test]
fn a_receiver_refuses_packed_frames_when_either_side_says_never() {
    use Compress::*;
    for (receiver, sender, ok) in [
        (Auto, Auto, true),
        (Always, Auto, true),
        (Auto, Always, true),
        (Never, Always, false),
        (Always, Never, false),
    ] {
        assert_eq!(accepted(receiver, sender), ok, "{receiver} receiving from {sender}");
        // What the receiver accepts covers whatever the sender may decide.
        if negotiate(sender, receiver, false) {
            assert!(accepted(receiver, sender));
        }
    }
}

#[test]
fn the_setting_parses_as_the_file_spells_it() {
    for c in [Compress::Auto, Compress::Always, Compress::Never] {
        assert_eq!(Compress::parse(c.as_str()), Some(c));
    }
    assert_eq!(Compress::parse("yes"), None);
    assert_eq!(Compress::parse("Auto"), None);
    assert_eq!(Compress::default(), Compress::Auto);
}

#[test]
fn the_probe_skips_compressed_formats_and_noise() {
    // Known formats, by their first bytes, however small.
    let gz = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0];
    assert!(!worth_compressing(&gz));
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend(std::iter::repeat_n(b'a', 8192));
    assert!(
        !worth_compressing(&zip),
        "a zip is skipped even when its head looks compressible"
    );
    assert!(!worth_compressing(b"\x89PNG\r\n\x1a\n"));
    assert!(!worth_compressing(b"\x28\xb5\x2f\xfd\x00"));
    // Random bytes with no known head: measured on the sample.
    assert!(!worth_compressing(&noise(SAMPLE, 7)));
    // Text is worth it, small or large.
    assert!(worth_compressing(&pem(1)));
    let sql: Vec<u8> = (0..2000)
        .flat_map(|i| format!("INSERT INTO t VALUES ({i}, 'name {i}', '2026-01-01');\n").into_bytes())
        .collect();
    assert!(worth_compressing(&sql[..SAMPLE]));
    // A small file of noise is not measured: the stream's history decides.
    assert!(worth_compressing(&noise(1000, 3)));
}

#[test]
fn frames_come_back_as_they_went_across_runs() {
    let mut packer = Packer::new().expect("packer");
    let mut unpacker = Unpacker::new().expect("unpacker");
    let runs = [
        frames(&[b"one", b"", &pem(1)]),
        frames(&[&noise(300_000, 9)]),
        frames(&[&pem(2), &pem(3), b"last"]),
    ];
    for run in &runs {
        let packed = packer.pack(run).expect("pack");
        let back = unpacker.unpack(&packed, 4 << 20).expect("unpack");
        assert_eq!(&back, run);
    }
}

#[test]
fn the_history_carries_over_between_runs() {
    // The same certificates, one run each: the stream sees the earlier ones
    // again; a fresh context per run would not.
    let certs: Vec<Vec<u8>> = (0..50).map(pem).collect();
    let mut stream = Packer::new().expect("packer");
    let mut streamed = 0;
    let mut alone = 0;
    for _ in 0..2 {
        for c in &certs {
            streamed += stream.pack(&frames(&[c])).expect("pack").len();
            alone += Packer::new().expect("packer").pack(&frames(&[c])).expect("pack").len();
        }
    }
    assert!(
        streamed * 10 < alone * 7,
        "the stream ({streamed} bytes) saves little over a context per run ({alone} bytes)"
    );
}

#[test]
fn a_bomb_is_refused_within_its_bound() {
    // 64 MiB of zeros compress to a few kilobytes.
    let zeros = Bytes::from(vec![0u8; 64 << 20]);
    let packed = Packer::new().expect("packer").pack(&[zeros]).expect("pack");
    assert!(packed.len() < 64 * 1024, "{} bytes", packed.len());
    let limit = 4 << 20;
    match Unpacker::new().expect("unpacker").unpack(&packed, limit) {
        Err(CompressError::TooLarge { limit: l }) => assert_eq!(l, limit),
        other => panic!("expected a refusal, got {:?}", other.map(|f| f.len())),
    }
}

#[test]
fn a_window_over_the_bound_is_refused() {
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG + 4))
        .expect("window");
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .expect("ldm");
    // Larger than the bound, or zstd shrinks the window to the content.
    let data = noise(16 << 20, 5);
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, &data).expect("compress");
    let err = Unpacker::new()
        .expect("unpacker")
        .unpack(&out, 64 << 20)
        .expect_err("a large window");
    assert!(matches!(err, CompressError::Zstd(_)), "{err}");
}

#[test]
fn garbage_and_cut_frames_are_errors() {
    let mut unpacker = Unpacker::new().expect("unpacker");
    assert!(unpacker.unpack(b"not zstd at all", 1 << 20).is_err());
    // A run whose last frame is cut: the length says more than follows.
    let mut cctx = CCtx::create();
    let mut out = Vec::with_capacity(1024);
    cctx.compress2(&mut out, b"\x00\x00\x01\x00abc").expect("compress");
    let err = Unpacker::new()
        .expect("unpacker")
        .unpack(&out, 1 << 20)
        .expect_err("cut");
    assert!(matches!(err, CompressError::Truncated), "{err}");
}
