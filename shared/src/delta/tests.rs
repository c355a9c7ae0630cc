//! Tests of the `delta` module.

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
fn reading_in_rounds_gives_the_same_signature_and_a_correct_delta() {
    let base: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let block = block_len(base.len() as u64);
    let small = Split {
        threads: 2,
        piece_max: 200_000,
    };
    let sig = signature(&base, block);
    let read = signature_of_reader_with(&base[..], base.len(), block, small).unwrap();
    assert_eq!(read, sig);
    assert_eq!(signature_of_reader(&base[..], base.len() as u64, block).unwrap(), sig);
    // An empty input, and an input that ends before its announced length.
    assert_eq!(signature_of_reader(&[][..], 0, block).unwrap(), signature(&[], block));
    assert_eq!(
        signature_of_reader_with(&base[..1_000_000], base.len(), block, small).unwrap(),
        signature(&base[..1_000_000], block)
    );
    let mut new = base.clone();
    new[1_234_567..1_234_600].copy_from_slice(&[3; 33]);
    new.splice(2_000_000..2_000_000, [5u8; 777]);
    let mut delta = Vec::new();
    diff_reader_with(&sig, &new[..], new.len(), &mut delta, small).unwrap();
    // 8 rounds, each a few blocks of literal data at most.
    assert!(
        delta.len() < 12 * block as usize + 2_000,
        "delta of {} bytes",
        delta.len()
    );
    let mut out = Vec::new();
    apply(&base, &delta, &mut out, new.len()).unwrap();
    assert_eq!(out, new);
    // A shorter input than announced (a file truncated while read).
    let mut short = Vec::new();
    diff_reader_with(&sig, &new[..1_500_000], new.len(), &mut short, small).unwrap();
    let mut out = Vec::new();
    apply(&base, &short, &mut out, new.len()).unwrap();
    assert_eq!(out, new[..1_500_000]);
}

#[test]
fn applying_to_a_file_matches_applying_to_memory() {
    use std::io::Write as _;
    let base: Vec<u8> = (0..700_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&base).unwrap();
    let mut new = base.clone();
    new[10..20].copy_from_slice(b"0123456789");
    new.extend_from_slice(&[1u8; 100_000]);
    new.drain(300_000..301_000);
    let sig = signature(&base, 700);
    let mut delta = Vec::new();
    diff(&sig, &new, &mut delta).unwrap();
    let mut mem = Vec::new();
    apply(&base, &delta, &mut mem, new.len()).unwrap();
    let mut from_file = Vec::new();
    apply_file(&f, &delta[..], &mut from_file, new.len()).unwrap();
    assert_eq!(from_file, new);
    assert_eq!(mem, from_file);
    // The same refusals: over the limit, truncated, trailing data, bad magic.
    assert!(apply_file(&f, &delta[..], &mut Vec::new(), new.len() - 1).is_err());
    assert!(apply_file(&f, &delta[..delta.len() - 1], &mut Vec::new(), new.len()).is_err());
    let mut trailing = delta.clone();
    trailing.push(0);
    assert!(apply_file(&f, &trailing[..], &mut Vec::new(), new.len()).is_err());
    assert!(apply_file(&f, &b"nope"[..], &mut Vec::new(), new.len()).is_err());
    // A base truncated by someone else: an error, never a crash.
    f.set_len(1000).unwrap();
    assert!(apply_file(&f, &delta[..], &mut Vec::new(), new.len()).is_err());
    // Every corruption of the delta that fast_rsync refuses, this refuses too.
    for at in (4..delta.len()).step_by(97) {
        let mut bad = delta.clone();
        bad[at] ^= 0x55;
        let mut a = Vec::new();
        let mem_ok = apply(&base, &bad, &mut a, new.len()).is_ok();
        f.set_len(0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &base, 0).unwrap();
        let mut b = Vec::new();
        let file_ok = apply_file(&f, &bad[..], &mut b, new.len()).is_ok();
        assert_eq!(mem_ok, file_ok, "corruption at {at}");
        if mem_ok {
            assert_eq!(a, b);
        }
    }
}

#[test]
fn block_len_follows_rsync() {
    assert_eq!(block_len(10), 700);
    assert_eq!(block_len(256 << 20), 16384);
    assert_eq!(block_len(1 << 40), 128 * 1024);
}
