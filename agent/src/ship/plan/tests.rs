//! Tests of the `plan` module.

use super::*;
use warmspare_shared::manifest::{ContentHash, Meta};

#[test]
fn top_most_drops_descendants() {
    let v = [
        "a/b".to_string(),
        "a".to_string(),
        "ab".to_string(),
        "c/d".to_string(),
        "c/d/e".to_string(),
    ];
    assert_eq!(top_most(v.iter()), ["a", "ab", "c/d"]);
}
fn entry(path: &str, kind: char) -> Entry {
    let kind = match kind {
        'd' => EntryKind::Dir,
        'f' => EntryKind::File {
            size: 1,
            hash: ContentHash::default(),
        },
        'g' => EntryKind::File {
            size: 2,
            hash: ContentHash([1; 32]),
        },
        _ => EntryKind::Symlink { target: "t".into() },
    };
    Entry {
        path: path.into(),
        kind,
        meta: Meta::default(),
    }
}

fn removal(path: &str, deletion: bool, files: u64) -> Removal {
    Removal {
        path: path.into(),
        deletion,
        files,
    }
}

/// Each case: the prefix, the local tree, the paths this node could not
/// read, the peer's tree (path and kind: d, f or g for files of other
/// content, l for a link), and the removals expected.
#[test]
fn removals_cover_deletions_type_changes_and_unknown_paths() {
    type Tree<'a> = &'a [(&'a str, char)];
    type Case<'a> = (&'a str, Tree<'a>, &'a [&'a str], Tree<'a>, Vec<Removal>);
    let cases: &[Case] = &[
        ("", &[], &[], &[], vec![]),
        // The same tree: nothing to remove.
        (
            "",
            &[("a", 'd'), ("a/x", 'f')],
            &[],
            &[("a", 'd'), ("a/x", 'f')],
            vec![],
        ),
        // Other content in a file's place is replaced, not removed.
        ("", &[("x", 'f')], &[], &[("x", 'g')], vec![]),
        // A file gone here is a deletion.
        ("", &[], &[], &[("x", 'f')], vec![removal("x", true, 1)]),
        // A directory gone: only its top is removed; its files are counted.
        (
            "",
            &[],
            &[],
            &[("a", 'd'), ("a/b", 'd'), ("a/b/x", 'f'), ("a/y", 'f'), ("ab", 'f')],
            vec![removal("a", true, 2), removal("ab", true, 1)],
        ),
        // A link where the peer has a directory: a type change, not a deletion.
        (
            "",
            &[("a", 'l')],
            &[],
            &[("a", 'd'), ("a/x", 'f')],
            vec![removal("a", false, 1)],
        ),
        // A directory where the peer has a file.
        ("", &[("x", 'd')], &[], &[("x", 'f')], vec![removal("x", false, 1)]),
        // What this node cannot read is kept on the peer, with all below it.
        (
            "",
            &[],
            &["a"],
            &[("a", 'd'), ("a/x", 'f'), ("b", 'f')],
            vec![removal("b", true, 1)],
        ),
        (
            "",
            &[("a", 'd')],
            &["a/s"],
            &[("a", 'd'), ("a/s", 'f'), ("a/t", 'f')],
            vec![removal("a/t", true, 1)],
        ),
        // Only the prefix is compared: `certs-2` and `certs.old` sort
        // between `certs` and `certs/a` and are left alone.
        (
            "certs",
            &[("certs", 'd')],
            &[],
            &[("certs", 'd'), ("certs-2", 'f'), ("certs.old", 'f'), ("certs/a", 'f')],
            vec![removal("certs/a", true, 1)],
        ),
        // The prefix itself gone.
        (
            "certs",
            &[],
            &[],
            &[("certs", 'd'), ("certs/a", 'f')],
            vec![removal("certs", true, 1)],
        ),
    ];
    for (i, (prefix, local, unknown, peer, want)) in cases.iter().enumerate() {
        let entries: Vec<Entry> = local.iter().map(|(p, k)| entry(p, *k)).collect();
        let remote: Remote = peer
            .iter()
            .map(|(p, k)| ((*p).into(), Held::of(&entry(p, *k))))
            .collect();
        assert_eq!(&removals("w", prefix, &entries, unknown, &remote), want, "case {i}");
        // A scan's entries come sorted; out of order, the same removals.
        let reversed: Vec<Entry> = entries.into_iter().rev().collect();
        assert_eq!(
            &removals("w", prefix, &reversed, unknown, &remote),
            want,
            "case {i} reversed"
        );
    }
}

/// An entry from `path kind[marks]`. Kinds: `d` a directory, `f` and
/// `g` small files of other content, `B` and `C` files large enough for
/// a delta, of other content, `l` and `m` links to other targets. Marks:
/// `+` another mode, `~` another mtime, `^` another owner.
fn spec(s: &str) -> Entry {
    let (path, k) = s.split_once(' ').expect("path and kind");
    let mut chars = k.chars();
    let big = delta::DELTA_MIN_SIZE * 2;
    let file = |size, byte| EntryKind::File {
        size,
        hash: ContentHash([byte; 32]),
    };
    let kind = match chars.next() {
        Some('d') => EntryKind::Dir,
        Some('f') => file(1, 0),
        Some('g') => file(2, 1),
        Some('B') => file(big, 2),
        Some('C') => file(big + 1, 3),
        Some('l') => EntryKind::Symlink { target: "t".into() },
        Some('m') => EntryKind::Symlink { target: "u".into() },
        other => panic!("no kind {other:?}"),
    };
    let mut meta = Meta::default();
    for mark in chars {
        match mark {
            '+' => meta.mode = 0o600,
            '~' => meta.mtime = 1,
            '^' => meta.uid = 1,
            other => panic!("no mark {other:?}"),
        }
    }
    Entry {
        path: path.into(),
        kind,
        meta,
    }
}

/// Steps as the table writes them.
fn render(steps: &[Step], removals: &[Removal], entries: &[Entry]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::Remove(i) => format!("rm {}", removals[*i].path),
            Step::Dir(i) => format!("dir {}", entries[*i].path),
            Step::Symlink(i) => format!("link {}", entries[*i].path),
            Step::SetMeta(i) => format!("meta {}", entries[*i].path),
            Step::File { entry, base: None } => format!("file {}", entries[*entry].path),
            Step::File { entry, base: Some(b) } => format!("delta {} {b}", entries[*entry].path),
            Step::Parent { path, entry: Some(i) } => {
                assert_eq!(&entries[*i].path, path, "a parent's entry is its own");
                format!("parent {path}")
            }
            Step::Parent { path, entry: None } => format!("parent {path} (stat)"),
        })
        .collect()
}

struct Case<'a> {
    prefix: &'a str,
    local: &'a [&'a str],
    peer: &'a [&'a str],
    /// Owners compared.
    owners: bool,
    /// The deletion guard holds the deletions (type changes still go).
    hold: bool,
    want: &'a [&'a str],
}

const fn case<'a>(local: &'a [&'a str], peer: &'a [&'a str], want: &'a [&'a str]) -> Case<'a> {
    Case {
        prefix: "",
        local,
        peer,
        owners: false,
        hold: false,
        want,
    }
}

/// The order of what is sent, from the local scan and the model of the
/// peer, as `transfer` sends it.
#[test]
fn steps_remove_first_then_send_parents_before_contents_then_fix_parents() {
    let big = delta::DELTA_MIN_SIZE * 2;
    let delta_want = format!("delta x {big}");
    let delta_want = [delta_want.as_str()];
    let cases: &[Case] = &[
        case(&[], &[], &[]),
        // The same tree: nothing.
        case(&["a d", "a/x f", "l l"], &["a d", "a/x f", "l l"], &[]),
        // Into an empty peer: each directory before what is in it, and
        // the directories' metadata again once their contents are in.
        case(
            &["a d", "a/b d", "a/b/x f", "a/y f", "z f"],
            &[],
            &[
                "dir a",
                "dir a/b",
                "file a/b/x",
                "file a/y",
                "file z",
                "parent a",
                "parent a/b",
            ],
        ),
        // Removals first; a parent touched twice is fixed once, last.
        case(
            &["a d", "a/new f"],
            &["a d", "a/old f"],
            &["rm a/old", "file a/new", "parent a"],
        ),
        // A type change: removed, then sent as what it is now.
        case(&["a f"], &["a d", "a/x f"], &["rm a", "file a"]),
        // What the removal takes is gone from the model: sent again,
        // even a file the peer listed below its file `a`.
        case(
            &["a d", "a/x f"],
            &["a f", "a/x f"],
            &["rm a", "dir a", "file a/x", "parent a"],
        ),
        // Links: another target is sent again; an owner too (with
        // owners compared); a link's mode and mtime are not compared.
        case(&["d d", "d/l m"], &["d d", "d/l l"], &["link d/l", "parent d"]),
        case(&["l l~", "k l+"], &["l l", "k l"], &[]),
        Case {
            owners: true,
            ..case(&["l l^"], &["l l"], &["link l"])
        },
        // A file's metadata alone: its metadata, not its content.
        case(&["x f+"], &["x f"], &["meta x"]),
        case(&["x f~"], &["x f"], &["meta x"]),
        case(&["x f^"], &["x f"], &[]),
        Case {
            owners: true,
            ..case(&["x f^"], &["x f"], &["meta x"])
        },
        // A directory's mode: its metadata, and no parent (nothing in
        // the parent changed); its mtime alone is not compared.
        case(&["a d+", "a/x f"], &["a d", "a/x f"], &["dir a"]),
        case(&["a d~", "a/x f"], &["a d", "a/x f"], &[]),
        // Other content: whole when small or when the peer's file is
        // too small to diff against, otherwise a delta against it.
        case(&["x g"], &["x f"], &["file x"]),
        case(&["x B"], &["x f"], &["file x"]),
        case(&["x C"], &["x B"], &delta_want),
        // A link in a file's place: removed, no delta.
        case(&["x B"], &["x l"], &["rm x", "file x"]),
        // A prefix below the scan's top: its parent is read from the disk.
        Case {
            prefix: "certs/new",
            ..case(
                &["certs/new f"],
                &["certs d"],
                &["file certs/new", "parent certs (stat)"],
            )
        },
        // Deletions the guard holds go nowhere, their parents neither;
        // a type change still goes.
        case(&["a d"], &["a d", "a/x f"], &["rm a/x", "parent a"]),
        Case {
            hold: true,
            ..case(&["a d"], &["a d", "a/x f"], &[])
        },
        Case {
            hold: true,
            ..case(&["a l", "b d"], &["a d", "a/x f", "b d", "b/y f"], &["rm a", "link a"])
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let entries: Vec<Entry> = c.local.iter().map(|s| spec(s)).collect();
        let remote: Remote = c
            .peer
            .iter()
            .map(|s| {
                let e = spec(s);
                (e.path.clone().into_boxed_str(), Held::of(&e))
            })
            .collect();
        let mut planned = removals("w", c.prefix, &entries, &[], &remote);
        if c.hold {
            planned.retain(|r| !r.deletion);
        }
        let got = render(&steps(&planned, &entries, &remote, c.owners), &planned, &entries);
        assert_eq!(got, c.want, "case {i}");
    }
}
