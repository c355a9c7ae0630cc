use std::collections::BTreeMap;

use warmspare_shared::manifest::{ContentHash, Entry, EntryKind, Meta};

use super::*;

fn file(n: u8) -> Held {
    Held {
        kind: EntryKind::File {
            size: u64::from(n),
            hash: ContentHash([n; 32]),
        },
        meta: Meta::default(),
    }
}

/// Paths that sort around one another in the ways that matter: a name, the
/// same name with a character before `/` appended, and what is below it.
const PATHS: &[&str] = &[
    "a", "a!", "a!/x", "a/b", "a/b/c", "a/b!", "a/c", "a0", "ab", "b", "b/a", "b/a/a", "c", "c/d",
];

/// Everything the model says, checked against a plain map of the same
/// entries: lookups, the order of a whole iteration, every subtree.
fn agrees(m: &Remote, want: &BTreeMap<String, Held>, step: usize) {
    let all: Vec<(String, Held)> = m.iter().map(|(p, h)| (p.to_string(), h.clone())).collect();
    let all_want: Vec<(String, Held)> = want.iter().map(|(p, h)| (p.clone(), h.clone())).collect();
    assert_eq!(all, all_want, "step {step}: iteration");
    assert_eq!(m.values().count(), want.len(), "step {step}: values");
    for p in PATHS {
        assert_eq!(m.get(p), want.get(*p), "step {step}: get {p}");
        let sub: Vec<&str> = m.subtree(p).map(|(p, _)| p).collect();
        let sub_want: Vec<&str> = warmspare_shared::relpath::subtree(want, p)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(sub, sub_want, "step {step}: subtree {p}");
    }
    assert_eq!(m.subtree("").count(), want.len(), "step {step}: subtree of the top");
}

#[test]
fn agrees_with_a_plain_map_through_inserts_removals_and_compactions() {
    // A fixed pseudo-random sequence (xorshift), so a failure repeats.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let start: Vec<(Box<str>, Held)> = PATHS
        .iter()
        .step_by(2)
        .map(|p| (Box::from(*p), file(p.len() as u8)))
        .collect();
    let mut want: BTreeMap<String, Held> = start.iter().map(|(p, h)| (p.to_string(), h.clone())).collect();
    let mut m: Remote = start.into_iter().collect();
    agrees(&m, &want, 0);
    for step in 1..=2000 {
        let p = PATHS[next(PATHS.len())];
        match next(10) {
            0..=4 => {
                let h = file(next(250) as u8);
                m.insert(p.into(), h.clone());
                want.insert(p.to_string(), h);
            }
            5..=6 => {
                m.remove(p);
                want.remove(p);
            }
            7 => {
                m.remove_tree(p);
                want.retain(|k, _| !warmspare_shared::relpath::is_under(k, p));
            }
            8 => {
                m.compact();
                assert!(m.changes.is_empty(), "step {step}: compacted with changes left");
            }
            _ => {}
        }
        agrees(&m, &want, step);
    }
}

#[test]
fn the_last_of_a_repeated_path_wins() {
    let m: Remote = [("b", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5)]
        .into_iter()
        .map(|(p, n)| (Box::from(p), file(n)))
        .collect();
    let got: Vec<(&str, Held)> = m.iter().map(|(p, h)| (p, h.clone())).collect();
    assert_eq!(got, vec![("a", file(4)), ("b", file(3)), ("c", file(5))]);
}

#[test]
fn a_compacted_model_is_three_allocations_of_their_exact_size() {
    // Built one insert at a time, as an initial sync against an empty peer
    // builds it.
    let mut m = Remote::default();
    for i in 0..1000 {
        m.insert(format!("signed/{:02}/host{i:06}.pem", i % 64).into(), file(1));
    }
    m.remove("signed/00/host000000.pem");
    // Removing what only the changes hold leaves no trace.
    assert_eq!(m.changes.len(), 999);
    m.compact();
    assert!(m.changes.is_empty());
    assert_eq!(m.frozen.len(), 999);
    assert_eq!(m.frozen.text.capacity(), m.frozen.text.len());
    assert_eq!(m.frozen.ends.capacity(), 999);
    assert_eq!(m.frozen.held.capacity(), 999);
    assert!(m.get("signed/00/host000000.pem").is_none());
    assert!(m.get("signed/01/host000001.pem").is_some());
}

/// A manifest entry for the path `p` (a file whose size and hash are `n`).
fn listed(p: &str, n: u8) -> Entry {
    let h = file(n);
    Entry {
        path: p.to_string(),
        kind: h.kind,
        meta: h.meta,
    }
}

#[test]
fn a_manifest_sorted_or_not_makes_the_model_a_plain_map_would() {
    // Sorted and unique (what a peer's scan sends, the one-pass build),
    // then out of order, with repeats, and both: each against a plain map
    // filled in the order listed, so the last of a repeated path wins.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut sorted: Vec<Entry> = PATHS.iter().map(|p| listed(p, p.len() as u8)).collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(sorted.windows(2).all(|w| w[0].path < w[1].path));
    let mut cases: Vec<Vec<Entry>> = vec![Vec::new(), sorted.clone()];
    let mut reversed = sorted.clone();
    reversed.reverse();
    cases.push(reversed);
    let mut repeated = sorted.clone();
    repeated.insert(3, listed(&sorted[3].path, 200));
    cases.push(repeated);
    for _ in 0..200 {
        let n = next(2 * PATHS.len());
        cases.push(
            (0..n)
                .map(|_| listed(PATHS[next(PATHS.len())], next(250) as u8))
                .collect(),
        );
    }
    for (i, manifest) in cases.into_iter().enumerate() {
        let want: BTreeMap<String, Held> = manifest.iter().map(|e| (e.path.clone(), Held::of(e))).collect();
        let m = Remote::from_manifest(manifest);
        agrees(&m, &want, i);
        assert!(m.changes.is_empty(), "case {i}: built with changes");
        assert_eq!(m.frozen.len(), want.len(), "case {i}: frozen entries");
    }
}
