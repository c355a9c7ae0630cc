//! The applier end to end on real directories: confinement, staging,
//! commits, preservation, durability.

use super::commit::{system_sync, SyncCall, FLUSH_EVERY_FILES, FSYNC_EACH_MAX, IN_MEMORY_AHEAD_MIN, LINK_AHEAD_MIN};
use super::stage::{IN_MEMORY_SIZE_MAX, UNNAMED_SIZE_MAX};
use super::*;
use crate::proto::UndoWhy;
use serde_bytes::ByteBuf;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn applier(root: &Path) -> Applier {
    Applier::new(
        vec![WatchRoot {
            name: "w".into(),
            root: root.to_path_buf(),
            excludes: Excludes::new(&["ex/".into()]).unwrap(),
            cache: HashCache::default(),
            cache_path: None,
        }],
        None,
    )
    .unwrap()
}

/// An applier of one watch `w` at `<dir>/root`, no excludes, keeping the
/// peers' agreement in `<dir>/ledger` and what it preserves under
/// `<dir>/diverged/<session>`.
fn applier_with_divergence(dir: &Path, session: &str) -> (Applier, Divergence) {
    let div = Divergence {
        ledgers: Arc::new(Mutex::new(Ledgers::new(dir.join("ledger")))),
        dir: dir.join("diverged").join(session),
    };
    let a = Applier::new(
        vec![WatchRoot {
            name: "w".into(),
            root: dir.join("root"),
            excludes: Excludes::new(&[]).unwrap(),
            cache: HashCache::default(),
            cache_path: None,
        }],
        Some(div.clone()),
    )
    .unwrap();
    (a, div)
}

fn meta() -> Meta {
    Meta {
        mode: 0o640,
        mtime: 1_600_000_000,
        mtime_nsec: 5,
        uid: 0,
        gid: 0,
    }
}

fn send_file(a: &mut Applier, rel: &str, data: &[u8]) {
    send_file_with(a, rel, data, meta());
}

fn send_file_with(a: &mut Applier, rel: &str, data: &[u8], meta: Meta) {
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: rel.into(),
        meta,
        size: data.len() as u64,
        hash: ContentHash::of(data),
        delta_base: None,
    })
    .unwrap();
    // Small files in tiny frames (to test reassembly), large ones in 64.
    for c in data.chunks(3.max(data.len() / 64)) {
        a.apply(Op::FileData(ByteBuf::from(c.to_vec()))).unwrap();
    }
    a.apply(Op::FileEnd).unwrap();
}

/// Files, directories, metadata and removals through a link below the
/// root are refused, and nothing outside is touched.
#[test]
fn nothing_goes_through_a_link_below_the_root() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), b"keep").unwrap();
    fs::set_permissions(outside.path().join("victim"), fs::Permissions::from_mode(0o600)).unwrap();
    let before = fs::metadata(outside.path().join("victim")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
    let mut a = applier(d.path());
    send_file(&mut a, "link/new", b"x");
    send_file(&mut a, "link/victim", b"replaced");
    a.apply(Op::Dir {
        watch: "w".into(),
        path: "link/dir".into(),
        meta: Meta { mode: 0o755, ..meta() },
    })
    .unwrap();
    a.apply(Op::SetMeta {
        watch: "w".into(),
        path: "link/victim".into(),
        meta: Meta { mode: 0o666, ..meta() },
    })
    .unwrap();
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "link/victim".into(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), 5, "{:?}", r.failed);
    let names: Vec<_> = fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
    let after = fs::metadata(outside.path().join("victim")).unwrap();
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    assert_eq!(after.mode(), before.mode());
    assert_eq!(after.mtime(), before.mtime());
    // The link itself may be replaced: it is a name in the root.
    send_file(&mut a, "link", b"now a file");
    assert!(a.commit().unwrap().failed.is_empty());
    assert_eq!(fs::read(d.path().join("link")).unwrap(), b"now a file");
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
}

/// A watch root replaced by a link to another directory: nothing is
/// written there, and the manifest is refused.
#[test]
fn a_root_replaced_by_a_link_is_not_used() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), b"keep").unwrap();
    let root = d.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut a = applier(&root);
    send_file(&mut a, "before", b"x");
    assert!(a.commit().unwrap().failed.is_empty());
    fs::rename(&root, d.path().join("root.old")).unwrap();
    std::os::unix::fs::symlink(outside.path(), &root).unwrap();
    send_file(&mut a, "victim", b"replaced");
    send_file(&mut a, "new", b"x");
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "victim".into(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), 3, "{:?}", r.failed);
    assert!(r.failed[0].why.to_string().contains("symbolic link"), "{:?}", r.failed);
    assert!(a.manifest("w").is_err());
    let names: Vec<_> = fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    // And a fresh applier refuses it from the start.
    drop(a);
    let mut a = applier(&root);
    send_file(&mut a, "new", b"x");
    assert_eq!(a.commit().unwrap().failed.len(), 1);
    assert!(!outside.path().join("new").exists());
}

#[test]
fn a_directory_replaced_by_a_link_in_the_same_batch_is_checked_again() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    fs::create_dir(d.path().join("sub")).unwrap();
    // The first file makes `sub` an open directory of the batch.
    send_file(&mut a, "sub/one", b"1");
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "sub".into(),
    })
    .unwrap();
    a.apply(Op::Symlink {
        watch: "w".into(),
        path: "sub".into(),
        target: outside.path().display().to_string(),
        meta: meta(),
    })
    .unwrap();
    send_file(&mut a, "sub/two", b"2");
    let r = a.commit().unwrap();
    assert!(r.failed.iter().any(|f| f.path == "sub/two"), "{:?}", r.failed);
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn whole_file_is_invisible_until_commit() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    send_file(&mut a, "f", b"hello world");
    assert!(!d.path().join("f").exists());
    let r = a.commit().unwrap();
    assert_eq!(r.applied, 1);
    assert!(r.failed.is_empty());
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"hello world");
    let md = fs::metadata(d.path().join("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(md.mtime(), 1_600_000_000);
    assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
}

#[test]
fn a_large_commit_places_every_file_and_the_last_version_of_a_path_sent_twice() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    // Enough files for the commit to link on two threads; "d3/again"
    // comes early and late, so one copy is in each half.
    let n = LINK_AHEAD_MIN * 2;
    send_file(&mut a, "d3/again", b"first");
    for i in 0..n {
        send_file(&mut a, &format!("d{}/f{i}", i % 7), format!("file {i}").as_bytes());
    }
    send_file(&mut a, "d3/again", b"second");
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(r.diverged.is_empty(), "{:?}", r.diverged);
    for i in 0..n {
        let got = fs::read(d.path().join(format!("d{}/f{i}", i % 7))).unwrap();
        assert_eq!(got, format!("file {i}").as_bytes());
    }
    assert_eq!(fs::read(d.path().join("d3/again")).unwrap(), b"second");
    assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
}

#[test]
fn in_memory_files_that_cannot_be_made_at_commit_are_reported_and_the_rest_placed() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    // Enough in-memory files for two threads; the second half's directory
    // disappears before the commit makes them.
    let n = IN_MEMORY_AHEAD_MIN * 2;
    for i in 0..n {
        let dir = if i < n / 2 { "kept" } else { "gone" };
        send_file(&mut a, &format!("{dir}/f{i}"), format!("file {i}").as_bytes());
    }
    fs::remove_dir(d.path().join("gone")).unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), n / 2, "{:?}", r.failed);
    assert!(r.failed.iter().all(|f| f.path.starts_with("gone/")));
    assert_eq!(r.applied, (n / 2) as u64);
    for i in 0..n / 2 {
        assert_eq!(
            fs::read(d.path().join(format!("kept/f{i}"))).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
    assert!(!d.path().join("gone").exists());
}

#[test]
fn a_batch_flushed_early_still_appears_only_at_commit() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    // Files too large to be kept in memory are written as they arrive.
    let n = FLUSH_EVERY_FILES + 3;
    let body = |i: usize| {
        let mut b = format!("content {i}").into_bytes();
        b.resize(IN_MEMORY_SIZE_MAX as usize + 1, b'.');
        b
    };
    for i in 0..n {
        send_file(&mut a, &format!("f{i}"), &body(i));
    }
    assert!(a.flusher.thread.is_some(), "the flusher was never asked to start");
    assert!(!d.path().join("f0").exists());
    let r = a.commit().unwrap();
    assert_eq!(r.applied, n as u64);
    assert!(r.failed.is_empty());
    for i in 0..n {
        assert_eq!(fs::read(d.path().join(format!("f{i}"))).unwrap(), body(i));
    }
    assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
}

#[test]
fn received_files_get_their_mode_and_owner_whatever_the_new_file_had() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    // Write bits the usual umask (022) takes off a new file, another
    // owner when this process may give files away, and set-user-ID,
    // which giving a file away clears.
    let wanted = [
        ("plain", 0o640, 0, 0),
        ("group-writable", 0o666, 0, 0),
        ("setuid", 0o4755, 0, 0),
        ("given-away", 0o4750, 1234, 5678),
    ];
    for (name, mode, uid, gid) in wanted {
        send_file_with(
            &mut a,
            name,
            name.as_bytes(),
            Meta {
                mode,
                uid,
                gid,
                ..meta()
            },
        );
    }
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    for (name, mode, uid, gid) in wanted {
        let md = fs::metadata(d.path().join(name)).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{name}");
        if a.can_chown() {
            assert_eq!((md.uid(), md.gid()), (uid, gid), "{name}");
        }
    }
}

#[test]
fn small_files_wait_unnamed_and_large_ones_named() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let temps = || {
        fs::read_dir(d.path())
            .unwrap()
            .filter(|e| crate::relpath::is_temp_name(e.as_ref().unwrap().file_name().to_str().unwrap()))
            .count()
    };
    fs::write(d.path().join("old"), b"local").unwrap();
    // Directories alternate, so the open directory kept for the last
    // file is not the one the next file needs.
    send_file(&mut a, "sub/a", b"in sub");
    send_file(&mut a, "new", b"small and new");
    send_file(&mut a, "sub/b", b"in sub too");
    send_file(&mut a, "old", b"small, replacing");
    assert_eq!(temps(), 0, "small files are staged without a name");
    let big = vec![7u8; (UNNAMED_SIZE_MAX + 1) as usize];
    send_file(&mut a, "big", &big);
    assert_eq!(temps(), 1, "a large file is staged under a temporary name");
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(fs::read(d.path().join("new")).unwrap(), b"small and new");
    assert_eq!(fs::read(d.path().join("old")).unwrap(), b"small, replacing");
    assert_eq!(fs::read(d.path().join("big")).unwrap(), big);
    assert_eq!(fs::read(d.path().join("sub/a")).unwrap(), b"in sub");
    assert_eq!(fs::read(d.path().join("sub/b")).unwrap(), b"in sub too");
    assert_eq!(fs::metadata(d.path().join("new")).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(temps(), 0);
}

#[test]
fn bad_hash_and_oversize_are_caught() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "f".into(),
        meta: meta(),
        size: 3,
        hash: ContentHash::of(b"abc"),
        delta_base: None,
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(b"abd".to_vec()))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), 1);
    assert!(!d.path().join("f").exists());
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "g".into(),
        meta: meta(),
        size: 2,
        hash: ContentHash::of(b"ab"),
        delta_base: None,
    })
    .unwrap();
    assert!(a.apply(Op::FileData(ByteBuf::from(b"abc".to_vec()))).is_err());
    drop(a);
    assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
}

/// Bytes allocated to the file at `p`.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn holes_and_blocks_of_zeros_are_not_written() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let mib = 1 << 20;
    // 16 MiB: 10 bytes, a 6 MiB hole, 1 MiB of zeros sent as data with a
    // byte at its end, then a trailing hole.
    let mut content = vec![0u8; 16 * mib];
    content[..10].copy_from_slice(b"0123456789");
    content[7 * mib + 10 - 1] = 1;
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "sparse".into(),
        meta: meta(),
        size: content.len() as u64,
        hash: ContentHash::of(&content),
        delta_base: None,
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(content[..10].to_vec()))).unwrap();
    a.apply(Op::FileHole(6 * mib as u64)).unwrap();
    for part in content[6 * mib + 10..7 * mib + 10].chunks(crate::proto::CHUNK) {
        a.apply(Op::FileData(ByteBuf::from(part.to_vec()))).unwrap();
    }
    a.apply(Op::FileHole((9 * mib - 10) as u64)).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let path = d.path().join("sparse");
    assert!(fs::read(&path).unwrap() == content, "the content differs");
    // A block or two for each end of data, however the file system counts.
    assert!(allocated(&path) <= 64 * 1024, "{} bytes allocated", allocated(&path));

    // A delta against that file whose copies are mostly zeros: written sparse too.
    let mut new = content.clone();
    new[12 * mib..12 * mib + 5].copy_from_slice(b"hello");
    let (base, sig) = a.signature("w", "sparse", 64 * 1024).unwrap().unwrap();
    let mut dl = Vec::new();
    delta::diff(&sig, &new, &mut dl).unwrap();
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "sparse".into(),
        meta: meta(),
        size: new.len() as u64,
        hash: ContentHash::of(&new),
        delta_base: Some(base),
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(dl))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(fs::read(&path).unwrap() == new, "the delta's result differs");
    assert!(allocated(&path) <= 256 * 1024, "{} bytes allocated", allocated(&path));
}

#[test]
fn holes_past_the_announced_size_or_in_a_delta_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let begin = |size: u64, delta_base| Op::FileBegin {
        watch: "w".into(),
        path: "f".into(),
        meta: meta(),
        size,
        hash: ContentHash::of(&vec![0u8; size as usize]),
        delta_base,
    };
    assert!(a.apply(Op::FileHole(1)).is_err(), "a hole outside a file");
    a.apply(begin(100, None)).unwrap();
    a.apply(Op::FileHole(60)).unwrap();
    assert!(a.apply(Op::FileHole(41)).is_err());
    a.commit().unwrap();
    a.apply(begin(100, None)).unwrap();
    assert!(a.apply(Op::FileHole(u64::MAX)).is_err());
    a.commit().unwrap();
    send_file(&mut a, "f", &[0u8; 100_000]);
    a.commit().unwrap();
    let (base, _) = a.signature("w", "f", 700).unwrap().unwrap();
    a.apply(begin(100_000, Some(base))).unwrap();
    assert!(a.apply(Op::FileHole(10)).is_err());
    a.commit().unwrap();
    drop(a);
    assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
    assert_eq!(fs::read(d.path().join("f")).unwrap(), vec![0u8; 100_000]);
}

#[test]
fn delta_applies_against_current_file() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    send_file(&mut a, "big", &old);
    a.commit().unwrap();
    let mut new = old.clone();
    new[1000..1010].copy_from_slice(b"ABCDEFGHIJ");
    let (base, sig) = a.signature("w", "big", 700).unwrap().unwrap();
    assert_eq!(base, ContentHash::of(&old));
    let mut dl = Vec::new();
    delta::diff(&sig, &new, &mut dl).unwrap();
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "big".into(),
        meta: meta(),
        size: new.len() as u64,
        hash: ContentHash::of(&new),
        delta_base: Some(base),
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(dl))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(fs::read(d.path().join("big")).unwrap(), new);
}

/// The names in `dir` that start with `prefix`.
fn names_with(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A delta's result is written while its frames still arrive, not after
/// its end: the new temporary file fills before `FileEnd` (and no spool
/// of the delta is written). Its end then checks the whole and the commit
/// places it.
#[test]
fn a_delta_is_applied_as_its_frames_arrive() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let old = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    send_file(&mut a, "big", &old);
    a.commit().unwrap();
    let mut new = old.clone();
    new[3 << 20..(3 << 20) + 10].copy_from_slice(b"ABCDEFGHIJ");
    let (base, sig) = a.signature("w", "big", 4096).unwrap().unwrap();
    let mut dl = Vec::new();
    delta::diff_with(
        &sig,
        &new,
        &mut dl,
        delta::Split {
            threads: 1,
            piece_max: 1 << 30,
        },
    )
    .unwrap();
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "big".into(),
        meta: meta(),
        size: new.len() as u64,
        hash: ContentHash::of(&new),
        delta_base: Some(base),
    })
    .unwrap();
    // All but the last byte (the delta's end command).
    for c in dl[..dl.len() - 1].chunks(7) {
        a.apply(Op::FileData(ByteBuf::from(c.to_vec()))).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let written = || {
        names_with(d.path(), crate::relpath::TEMP_PREFIX)
            .iter()
            .filter(|n| n.contains(".new."))
            .map(|n| fs::metadata(d.path().join(n)).map_or(0, |m| m.len()))
            .max()
            .unwrap_or(0)
    };
    // All of it but what the writer's 256 KiB buffer may still hold.
    while written() < (new.len() - 256 * 1024) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the result was not written before the delta's end ({} bytes)",
            written()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        names_with(d.path(), crate::relpath::TEMP_PREFIX)
            .iter()
            .all(|n| !n.contains(".delta.")),
        "the delta was spooled"
    );
    a.apply(Op::FileData(ByteBuf::from(dl[dl.len() - 1..].to_vec())))
        .unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(
        fs::read(d.path().join("big")).unwrap() == new,
        "the delta's result differs"
    );
    assert!(names_with(d.path(), crate::relpath::TEMP_PREFIX).is_empty());
}

/// A delta whose base changed on the receiver since its signature is not
/// applied: its frames are dropped, its end reports why, the receiver's
/// copy stays, and no temporary file is left. So is a malformed delta,
/// and one cut short by the end of the session.
#[test]
fn a_delta_on_a_changed_base_or_malformed_fails_and_leaves_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    send_file(&mut a, "big", &old);
    a.commit().unwrap();
    let mut new = old.clone();
    new[1000..1010].copy_from_slice(b"ABCDEFGHIJ");
    let (base, sig) = a.signature("w", "big", 700).unwrap().unwrap();
    let mut dl = Vec::new();
    delta::diff(&sig, &new, &mut dl).unwrap();
    let begin = |base| Op::FileBegin {
        watch: "w".into(),
        path: "big".into(),
        meta: meta(),
        size: new.len() as u64,
        hash: ContentHash::of(&new),
        delta_base: Some(base),
    };
    // The receiver's copy changes (same size) after the signature.
    let mut local = old.clone();
    local[0] ^= 1;
    fs::write(d.path().join("big"), &local).unwrap();
    a.apply(begin(base)).unwrap();
    a.apply(Op::FileData(ByteBuf::from(dl.clone()))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(
        r.failed.iter().any(|f| f.why.to_string().contains("base changed")),
        "{:?}",
        r.failed
    );
    assert_eq!(fs::read(d.path().join("big")).unwrap(), local);
    assert!(names_with(d.path(), crate::relpath::TEMP_PREFIX).is_empty());

    // A delta with a copy past the end of its base.
    let base = ContentHash::of(&local);
    let mut bad = dl[..4].to_vec();
    bad.extend_from_slice(&[0x54]);
    bad.extend_from_slice(&u64::MAX.to_be_bytes());
    bad.extend_from_slice(&8u64.to_be_bytes());
    bad.push(0);
    a.apply(begin(base)).unwrap();
    a.apply(Op::FileData(ByteBuf::from(bad))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert!(
        r.failed.iter().any(|f| f.why.to_string().contains("out of bounds")),
        "{:?}",
        r.failed
    );
    assert_eq!(fs::read(d.path().join("big")).unwrap(), local);

    // A delta whose session ends in its middle.
    a.apply(begin(base)).unwrap();
    a.apply(Op::FileData(ByteBuf::from(dl[..dl.len() / 2].to_vec())))
        .unwrap();
    drop(a);
    assert_eq!(fs::read(d.path().join("big")).unwrap(), local);
    assert!(names_with(d.path(), crate::relpath::TEMP_PREFIX).is_empty());
}

#[test]
fn differing_local_files_are_preserved_before_replacement() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let (mut a, div) = applier_with_divergence(d.path(), "2-now");
    fs::write(root.join("f"), b"signed while cut off").unwrap();
    fs::write(root.join("gone"), b"local only").unwrap();
    send_file(&mut a, "f", b"from the active");
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "gone".into(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.diverged.len(), 2, "{:?}", r.diverged);
    assert_eq!(fs::read(div.dir.join("w/f")).unwrap(), b"signed while cut off");
    assert_eq!(fs::read(div.dir.join("w/gone")).unwrap(), b"local only");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"from the active");
    // What the active shipped is agreed: replacing it again preserves nothing.
    send_file(&mut a, "f", b"newer");
    assert!(a.commit().unwrap().diverged.is_empty());
    // After a settled full comparison, files present are agreed too.
    fs::write(root.join("other"), b"same on both").unwrap();
    a.apply(Op::Settled {
        watch: "w".into(),
        except: vec![],
    })
    .unwrap();
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "other".into(),
    })
    .unwrap();
    assert!(a.commit().unwrap().diverged.is_empty());
}

#[test]
fn agreed_files_removed_or_replaced_are_kept_in_the_undo_store_and_diverged_ones_are_not() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let div = Divergence {
        ledgers: Arc::new(Mutex::new(Ledgers::new(d.path().join("ledger")))),
        dir: d.path().join("diverged/2-now"),
    };
    let store = Arc::new(crate::undo::Store::new(d.path().join("undo")));
    let mut a = Applier::new(
        vec![WatchRoot {
            name: "w".into(),
            root: root.clone(),
            excludes: Excludes::new(&[]).unwrap(),
            cache: HashCache::default(),
            cache_path: None,
        }],
        Some(div.clone()),
    )
    .unwrap()
    .with_undo(crate::undo::Recorder::new(store.clone(), 2, 1 << 20));
    // Agreed content: shipped by the active.
    send_file(&mut a, "f", b"version 1");
    send_file(&mut a, "tree/x", b"x1");
    send_file(&mut a, "tree/sub/y", b"y1");
    a.apply(Op::Symlink {
        watch: "w".into(),
        path: "l".into(),
        target: "f".into(),
        meta: meta(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.undo_kept, 0, "new files replace nothing");
    // A local change the ledger does not know: diverged, not undo.
    fs::write(root.join("tree/x"), b"local edit").unwrap();
    send_file(&mut a, "f", b"version 2");
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "tree".into(),
    })
    .unwrap();
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "l".into(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.diverged.len(), 1, "{:?}", r.diverged);
    assert_eq!(fs::read(div.dir.join("w/tree/x")).unwrap(), b"local edit");
    assert_eq!(r.undo_kept, 3);
    let list = store.list(Some("w")).unwrap();
    let got: Vec<(&str, UndoWhy, crate::proto::UndoKind)> =
        list.iter().map(|e| (e.path.as_str(), e.why, e.kind)).collect();
    assert_eq!(
        got,
        vec![
            ("tree/sub/y", UndoWhy::Removed, crate::proto::UndoKind::File),
            ("l", UndoWhy::Removed, crate::proto::UndoKind::Symlink),
            ("f", UndoWhy::Replaced, crate::proto::UndoKind::File),
        ]
    );
    for e in &list {
        assert_eq!(e.epoch, 2);
    }
    let f = list.iter().find(|e| e.path == "f").unwrap();
    assert_eq!(f.hash, Some(ContentHash::of(b"version 1")));
    assert_eq!((f.meta.mode, f.meta.mtime), (0o640, 1_600_000_000));
    assert_eq!(store.read(f.id, 0, 100).unwrap().1, b"version 1");
    let y = list.iter().find(|e| e.path == "tree/sub/y").unwrap();
    assert_eq!(store.read(y.id, 0, 100).unwrap().1, b"y1");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"version 2");
    assert!(!root.join("tree").exists());
}

/// A measurement, not a check: the undo store's cost when a commit
/// replaces or removes many small files.
#[test]
#[ignore = "a measurement: cargo test --release -p warmspare-shared --lib -- --ignored undo_cost --nocapture"]
fn undo_cost_of_replacing_and_removing_20000_small_files() {
    const N: usize = 20_000;
    let send = |a: &mut Applier, rel: &str, data: &[u8]| {
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: rel.into(),
            meta: meta(),
            size: data.len() as u64,
            hash: ContentHash::of(data),
            delta_base: None,
        })
        .unwrap();
        a.apply(Op::FileData(ByteBuf::from(data.to_vec()))).unwrap();
        a.apply(Op::FileEnd).unwrap();
    };
    for with_undo in [false, true, false, true] {
        let d = tempfile::tempdir().unwrap();
        let (mut a, _div) = applier_with_divergence(d.path(), "1-now");
        let store = Arc::new(crate::undo::Store::new(d.path().join("undo")));
        if with_undo {
            a = a.with_undo(crate::undo::Recorder::new(store.clone(), 1, 1 << 30));
        }
        let path = |i: usize| format!("d{:03}/cert{i:05}.pem", i % 100);
        let body = |i: usize, v: u8| format!("certificate {i} version {v} {}", "x".repeat(1500)).into_bytes();
        for i in 0..N {
            send(&mut a, &path(i), &body(i, 1));
            if i % 4000 == 3999 {
                assert!(a.commit().unwrap().failed.is_empty());
            }
        }
        a.commit().unwrap();
        let t = std::time::Instant::now();
        for i in 0..N {
            send(&mut a, &path(i), &body(i, 2));
            if i % 4000 == 3999 {
                assert!(a.commit().unwrap().failed.is_empty());
            }
        }
        a.commit().unwrap();
        let replaced = t.elapsed();
        let t = std::time::Instant::now();
        for dir in 0..100 {
            a.apply(Op::Remove {
                watch: "w".into(),
                path: format!("d{dir:03}"),
            })
            .unwrap();
        }
        assert!(a.commit().unwrap().failed.is_empty());
        let removed = t.elapsed();
        let kept = store.totals().unwrap().0;
        eprintln!(
            "undo {}: {N} files replaced in {replaced:.2?}, then removed (100 trees) in {removed:.2?}; {kept} kept",
            if with_undo { "on " } else { "off" }
        );
    }
}

#[test]
fn excluded_paths_are_not_written_and_remove_works() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    send_file(&mut a, "ex/secret", b"x");
    a.apply(Op::Dir {
        watch: "w".into(),
        path: "dir".into(),
        meta: Meta { mode: 0o755, ..meta() },
    })
    .unwrap();
    send_file(&mut a, "dir/f", b"y");
    a.apply(Op::Symlink {
        watch: "w".into(),
        path: "l".into(),
        target: "dir/f".into(),
        meta: meta(),
    })
    .unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), 1);
    assert!(!d.path().join("ex/secret").exists());
    assert_eq!(fs::read_link(d.path().join("l")).unwrap(), PathBuf::from("dir/f"));
    a.apply(Op::Remove {
        watch: "w".into(),
        path: "dir".into(),
    })
    .unwrap();
    a.commit().unwrap();
    assert!(!d.path().join("dir").exists());
    assert!(a
        .apply(Op::Remove {
            watch: "nope".into(),
            path: "dir".into()
        })
        .is_err());
}

/// A sync step whose directory and file-system syncs fail, as a disk
/// that reports a write-back error would.
fn failing_sync(call: SyncCall, file: &File) -> io::Result<()> {
    match call {
        SyncCall::FileData => system_sync(call, file),
        SyncCall::Dir | SyncCall::FileSystem => Err(io::Error::from_raw_os_error(libc::EIO)),
    }
}

#[test]
fn a_failed_directory_sync_fails_the_commit() {
    // A few files: each directory is fsynced on its own.
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    a.sync = failing_sync;
    send_file(&mut a, "signed/a.pem", b"a");
    let err = a.commit().expect_err("a commit whose directory sync failed");
    let text = format!("{err}");
    assert!(text.contains("cannot make the batch durable"), "{text}");
    assert_eq!(err.0.raw_os_error(), Some(libc::EIO), "{err:?}");
    // Many directories: one syncfs per file system, which fails too.
    let mut a = applier(d.path());
    a.sync = failing_sync;
    for i in 0..(FSYNC_EACH_MAX + 2) {
        send_file(&mut a, &format!("d{i}/x.pem"), b"x");
    }
    assert!(a.commit().is_err(), "a failed syncfs must fail the commit");
    // The same batch with a working disk commits.
    let mut a = applier(d.path());
    send_file(&mut a, "signed/b.pem", b"b");
    assert!(a.commit().unwrap().failed.is_empty());
}

#[test]
fn directories_made_on_the_way_put_their_parents_in_the_sync_set() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("old")).unwrap();
    let mut a = applier(d.path());
    send_file(&mut a, "old/new/deeper/f.pem", b"f");
    let set: Vec<&str> = a.dirs_to_sync.keys().map(|(_, rel)| rel.as_str()).collect();
    // Each new directory's entry lives in its parent: the root's and
    // old's entries for the new ones, and the file's own directory.
    for want in ["", "old", "old/new", "old/new/deeper"] {
        assert!(set.contains(&want), "{want:?} missing from {set:?}");
    }
    // A file in a directory that exists adds only that directory.
    a.commit().unwrap();
    send_file(&mut a, "old/g.pem", b"g");
    let set: Vec<&str> = a.dirs_to_sync.keys().map(|(_, rel)| rel.as_str()).collect();
    assert_eq!(set, vec!["old"]);
    a.commit().unwrap();
}

thread_local! {
    /// The devices the recording sync step was asked to `syncfs`.
    static SYNCED_FS: std::cell::RefCell<BTreeSet<u64>> = const { std::cell::RefCell::new(BTreeSet::new()) };
}

fn recording_sync(call: SyncCall, file: &File) -> io::Result<()> {
    if call == SyncCall::FileSystem {
        SYNCED_FS.with(|s| s.borrow_mut().insert(file.metadata().unwrap().dev()));
    }
    system_sync(call, file)
}

#[test]
fn a_large_commit_syncs_every_file_system_it_touched() {
    // Two watches on two file systems (a temp dir and /dev/shm).
    let disk = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) for a second file system");
    let devs: BTreeSet<u64> = [disk.path(), shm.path()]
        .iter()
        .map(|p| fs::metadata(p).unwrap().dev())
        .collect();
    assert_eq!(devs.len(), 2, "the two roots must be on different file systems");
    let root = |name: &str, path: &Path| WatchRoot {
        name: name.into(),
        root: path.to_path_buf(),
        excludes: Excludes::default(),
        cache: HashCache::default(),
        cache_path: None,
    };
    // Named so that the files and the directories of the batch list the
    // disk first: a sync of the first file system alone misses /dev/shm.
    let mut a = Applier::new(vec![root("a", disk.path()), root("b", shm.path())], None).unwrap();
    a.sync = recording_sync;
    for watch in ["a", "b"] {
        for i in 0..(FSYNC_EACH_MAX + 2) {
            let data = format!("{watch}{i}").into_bytes();
            a.apply(Op::FileBegin {
                watch: watch.into(),
                path: format!("d{i}/f"),
                meta: meta(),
                size: data.len() as u64,
                hash: ContentHash::of(&data),
                delta_base: None,
            })
            .unwrap();
            a.apply(Op::FileData(ByteBuf::from(data))).unwrap();
            a.apply(Op::FileEnd).unwrap();
        }
    }
    SYNCED_FS.with(|s| s.borrow_mut().clear());
    let r = a.commit().unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(SYNCED_FS.with(|s| s.borrow().clone()), devs);
    assert_eq!(fs::read(shm.path().join("d0/f")).unwrap(), b"b0");
}

/// Failures are typed, and cross the wire as the same text as before they
/// were: an excluded path, a short file and a file whose content is not
/// the announced one.
#[test]
fn failures_say_why_in_types_and_keep_their_wire_text() {
    let d = tempfile::tempdir().unwrap();
    let mut a = applier(d.path());
    send_file(&mut a, "ex/skipped", b"x");
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "short".into(),
        meta: meta(),
        size: 4,
        hash: ContentHash::of(b"abcd"),
        delta_base: None,
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(b"ab".to_vec()))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    a.apply(Op::FileBegin {
        watch: "w".into(),
        path: "other".into(),
        meta: meta(),
        size: 4,
        hash: ContentHash::of(b"abcd"),
        delta_base: None,
    })
    .unwrap();
    a.apply(Op::FileData(ByteBuf::from(b"abce".to_vec()))).unwrap();
    a.apply(Op::FileEnd).unwrap();
    let r = a.commit().unwrap();
    assert_eq!(r.failed.len(), 3, "{:?}", r.failed);
    assert!(matches!(r.failed[0].why, FailReason::Excluded), "{:?}", r.failed);
    assert!(
        matches!(r.failed[1].why, FailReason::Size { got: 2, announced: 4 }),
        "{:?}",
        r.failed
    );
    assert!(matches!(r.failed[2].why, FailReason::Hash { .. }), "{:?}", r.failed);
    let wire: Vec<(String, String)> = r.failed.into_iter().map(Failure::into_wire).collect();
    assert_eq!(wire[0], ("ex/skipped".into(), "excluded on the receiver".into()));
    assert_eq!(wire[1], ("short".into(), "got 2 bytes, 4 were announced".into()));
    assert_eq!(wire[2].0, "other");
    assert_eq!(
        wire[2].1,
        format!(
            "content hash mismatch: got {}, announced {}",
            ContentHash::of(b"abce"),
            ContentHash::of(b"abcd")
        )
    );
    assert!(!d.path().join("short").exists() && !d.path().join("other").exists());
    let io = Failure::new("p", io::Error::from_raw_os_error(libc::ENOSPC)).into_wire();
    assert_eq!(io.1, io::Error::from_raw_os_error(libc::ENOSPC).to_string());
}

#[test]
fn a_long_save_of_the_state_waits_ten_times_as_long_before_the_next() {
    use std::time::Duration;
    // Small trees keep the fixed interval; a save of 0.8 s waits 8 s, so
    // saving stays under a tenth of a long batch at any tree size.
    assert_eq!(super::save_wait(Duration::from_millis(5)), super::STATE_SAVE_INTERVAL);
    assert_eq!(super::save_wait(Duration::from_millis(800)), Duration::from_secs(8));
    assert_eq!(super::save_wait(Duration::MAX), Duration::MAX);
}

#[test]
fn removals_and_replacements_forget_what_the_ledger_held_at_and_below_them() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let (mut a, div) = applier_with_divergence(d.path(), "2-now");
    for rel in ["d/a", "d/b", "f", "g", "e/x"] {
        send_file(&mut a, rel, rel.as_bytes());
    }
    a.commit().unwrap();
    let held = |rel: &str| div.ledgers.lock().unwrap().watch("w").get(rel).is_some();
    assert!(["d/a", "d/b", "f", "g", "e/x"].iter().all(|r| held(r)));
    let remove = |a: &mut Applier, path: &str| {
        a.apply(Op::Remove {
            watch: "w".into(),
            path: path.into(),
        })
        .unwrap()
    };
    // A file: its own entry goes, nothing else.
    remove(&mut a, "f");
    a.commit().unwrap();
    assert!(!held("f") && held("d/a") && held("g"));
    // A directory: everything below it.
    remove(&mut a, "d");
    a.commit().unwrap();
    assert!(!held("d/a") && !held("d/b") && held("g") && held("e/x"));
    // A directory replaced by a file: what was below it goes too.
    send_file(&mut a, "e", b"now a file");
    a.commit().unwrap();
    assert!(held("e") && !held("e/x"), "the ledger still holds e/x below the file e");
    assert_eq!(fs::read(root.join("e")).unwrap(), b"now a file");
}
