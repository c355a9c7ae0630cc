//! The store on real directories: keeping, listing, reading, pruning and
//! adopting after a restart.

use super::*;
use crate::manifest::ContentHash;
use std::fs;

const DAY: Duration = Duration::from_secs(86_400);

fn keep_file(r: &mut Recorder, dir: &Path, name: &str, data: &[u8]) -> Kept {
    fs::write(dir.join(name), data).unwrap();
    let d = File::open(dir).unwrap();
    let k = r
        .keep(&d, name, "ca", &format!("signed/{name}"), UndoWhy::Removed, |_| {
            Some(ContentHash::of(data))
        })
        .unwrap();
    fs::remove_file(dir.join(name)).unwrap();
    k
}

#[test]
fn keeps_records_lists_and_reads_back_with_metadata() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let store = Arc::new(Store::new(t.path().join("undo")));
    let mut r = Recorder::new(store.clone(), 7, 1 << 20);
    fs::write(root.join("a.pem"), b"cert a").unwrap();
    let f = File::open(root.join("a.pem")).unwrap();
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
    let d = File::open(&root).unwrap();
    let k = r
        .keep(&d, "a.pem", "ca", "signed/a.pem", UndoWhy::Replaced, |_| {
            Some(ContentHash::of(b"cert a"))
        })
        .unwrap();
    let Kept::Kept(id) = k else { panic!("{k:?}") };
    // Replaced after it was kept: the store still has the old content.
    fs::write(root.join("new"), b"other").unwrap();
    fs::rename(root.join("new"), root.join("a.pem")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", root.join("link")).unwrap();
    assert!(matches!(
        r.keep(&d, "link", "ca", "link", UndoWhy::Removed, |_| None),
        Ok(Kept::Kept(_))
    ));
    assert_eq!(
        r.keep(&d, "missing", "ca", "missing", UndoWhy::Removed, |_| None)
            .unwrap(),
        Kept::Nothing
    );
    // Nothing is listed before the commit records it.
    assert!(store.list(None).unwrap().is_empty());
    assert_eq!(r.commit(), 2);
    let list = store.list(None).unwrap();
    assert_eq!(list.len(), 2);
    let e = &list[0];
    assert_eq!((e.id, e.watch.as_str(), e.path.as_str()), (id, "ca", "signed/a.pem"));
    assert_eq!(
        (e.epoch, e.size, e.why, e.kind),
        (7, 6, UndoWhy::Replaced, UndoKind::File)
    );
    assert_eq!(e.hash, Some(ContentHash::of(b"cert a")));
    assert_eq!((e.meta.mode, e.meta.mtime), (0o640, 1_600_000_000));
    let (_, data, last) = store.read(id, 0, 4).unwrap();
    assert_eq!((data.as_slice(), last), (&b"cert"[..], false));
    let (_, data, last) = store.read(id, 4, 4).unwrap();
    assert_eq!((data.as_slice(), last), (&b" a"[..], true));
    let (l, data, _) = store.read(list[1].id, 0, 100).unwrap();
    assert_eq!((l.kind, data.as_slice()), (UndoKind::Symlink, &b"../elsewhere"[..]));
    assert_eq!(store.list(Some("other")).unwrap().len(), 0);
    assert_eq!(store.totals().unwrap(), (2, 6 + 12));
    // A fresh store (a restart) finds the same.
    let again = Store::new(t.path().join("undo"));
    assert_eq!(again.list(None).unwrap(), list);
}

#[test]
fn prunes_by_age_then_oldest_first_by_size() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let store = Arc::new(Store::new(t.path().join("undo")));
    let mut r = Recorder::new(store.clone(), 1, 1 << 20);
    let mut ids = Vec::new();
    for i in 0..5 {
        let Kept::Kept(id) = keep_file(&mut r, &src, &format!("f{i}"), &[b'x'; 100]) else {
            panic!()
        };
        ids.push(id);
    }
    r.commit();
    let before = pruned_total();
    let now = SystemTime::now();
    let limits = Limits {
        max_size: 1 << 30,
        max_age: DAY,
    };
    assert!(store.prune(&limits, now).unwrap().pruned.is_empty());
    let later = store.prune(
        &Limits {
            max_size: 250,
            max_age: 3 * DAY,
        },
        now,
    );
    let rep = later.unwrap();
    // 500 bytes, 250 allowed: the three oldest go.
    let gone: Vec<(u64, Reason)> = rep.pruned.iter().map(|p| (p.0, p.2)).collect();
    assert_eq!(
        gone,
        vec![(ids[0], Reason::Size), (ids[1], Reason::Size), (ids[2], Reason::Size)]
    );
    assert_eq!((rep.files_left, rep.bytes_left), (2, 200));
    assert!(!t.path().join("undo/files").join(ids[0].to_string()).exists());
    assert!(t.path().join("undo/files").join(ids[3].to_string()).exists());
    let left: Vec<u64> = store.list(None).unwrap().iter().map(|e| e.id).collect();
    assert_eq!(left, vec![ids[3], ids[4]]);
    let rep = store.prune(&limits, now + 2 * DAY).unwrap();
    assert_eq!(rep.pruned.iter().map(|p| p.2).collect::<Vec<_>>(), vec![Reason::Age; 2]);
    assert_eq!(store.totals().unwrap(), (0, 0));
    assert!(pruned_total() >= before + 5);
    // The index agrees after a restart.
    assert!(Store::new(t.path().join("undo")).list(None).unwrap().is_empty());
}

#[test]
fn too_large_files_are_refused_by_default() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let store = Arc::new(Store::new(t.path().join("undo")));
    let mut r = Recorder::new(store.clone(), 1, 10);
    let before = refused_total();
    fs::write(src.join("big"), [0u8; 11]).unwrap();
    let d = File::open(&src).unwrap();
    let e = r
        .keep(&d, "big", "ca", "signed/big", UndoWhy::Removed, |_| None)
        .unwrap_err();
    assert!(matches!(e, NotKept::TooLarge { size: 11, max: 10 }), "{e:?}");
    assert!(e.to_string().contains("undo_max_size is 10"), "{e}");
    // Carried through an I/O error, the refusal is still told apart.
    let io = e.into_io();
    assert!(matches!(NotKept::of_io(&io), Some(NotKept::TooLarge { .. })), "{io}");
    assert!(refused_total() > before);
    drop(r);
    assert!(store.list(None).unwrap().is_empty());
}

#[test]
fn too_large_files_are_skipped_and_counted_when_the_operator_lets_them_go() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let store = Arc::new(Store::new(t.path().join("undo")));
    let mut r = Recorder::new(store.clone(), 1, 10).when_full(crate::config::UndoWhenFull::Replace);
    let before = skipped_total();
    assert_eq!(keep_file(&mut r, &src, "big", &[0u8; 11]), Kept::Skipped);
    assert!(matches!(keep_file(&mut r, &src, "ok", &[0u8; 10]), Kept::Kept(_)));
    drop(r);
    assert!(skipped_total() > before);
    let list = store.list(None).unwrap();
    assert_eq!(list.len(), 1, "dropping the recorder records what it kept");
    assert_eq!(list[0].path, "signed/ok");
}

#[test]
fn a_restart_adopts_unindexed_files_drops_lost_ones_and_skips_damage() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let dir = t.path().join("undo");
    let store = Arc::new(Store::new(dir.clone()));
    let mut r = Recorder::new(store.clone(), 3, 1 << 20);
    let Kept::Kept(a) = keep_file(&mut r, &src, "a", b"aaa") else {
        panic!()
    };
    let Kept::Kept(b) = keep_file(&mut r, &src, "b", b"bb") else {
        panic!()
    };
    r.commit();
    // Kept but never recorded (a crash before the commit).
    let Kept::Kept(c) = keep_file(&mut r, &src, "c", b"c") else {
        panic!()
    };
    std::mem::forget(r);
    fs::remove_file(dir.join("files").join(b.to_string())).unwrap();
    let mut idx = fs::OpenOptions::new()
        .append(true)
        .open(dir.join("index.jsonl"))
        .unwrap();
    idx.write_all(b"{not json\n").unwrap();
    idx.write_all(&vec![b'x'; 100_000]).unwrap();
    idx.write_all(b"\n").unwrap();
    fs::write(dir.join("files/not-a-number"), b"?").unwrap();
    let again = Store::new(dir.clone());
    let list = again.list(None).unwrap();
    let ids: Vec<(u64, UndoWhy)> = list.iter().map(|e| (e.id, e.why)).collect();
    assert_eq!(ids, vec![(a, UndoWhy::Removed), (c, UndoWhy::Unindexed)]);
    assert_eq!(again.totals().unwrap(), (2, 4));
    // New ids never reuse an old one.
    let mut r = Recorder::new(Arc::new(again), 3, 1 << 20);
    let Kept::Kept(d) = keep_file(&mut r, &src, "d", b"d") else {
        panic!()
    };
    assert!(d > c);
}

#[test]
fn reading_refuses_an_entry_whose_file_is_not_what_the_index_says() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let dir = t.path().join("undo");
    let store = Arc::new(Store::new(dir.clone()));
    let mut r = Recorder::new(store.clone(), 3, 1 << 20);
    let Kept::Kept(a) = keep_file(&mut r, &src, "a", b"aaa") else {
        panic!()
    };
    r.commit();
    // Swapped for a link to a file outside the store.
    fs::write(t.path().join("secret"), b"outside").unwrap();
    let p = dir.join("files").join(a.to_string());
    fs::remove_file(&p).unwrap();
    std::os::unix::fs::symlink(t.path().join("secret"), &p).unwrap();
    let e = store.read(a, 0, 100);
    assert!(e.is_err(), "{e:?}");
    assert!(store.read(a + 100, 0, 100).is_err());
}
