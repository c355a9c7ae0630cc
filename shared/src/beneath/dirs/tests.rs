//! Tests of the directory handles of a pass.

use std::fs;
use std::io::Read;

use super::*;

/// A root with `d/sub/f` ("inside") and, beside it, an outside directory
/// with `f` ("outside!"), `secret` and `deeper/`.
fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let (root, outside) = (t.path().join("root"), t.path().join("outside"));
    fs::create_dir_all(root.join("d/sub")).unwrap();
    fs::write(root.join("d/sub/f"), b"inside").unwrap();
    fs::write(root.join("d/f"), b"inside").unwrap();
    fs::create_dir_all(outside.join("deeper")).unwrap();
    fs::write(outside.join("f"), b"outside!").unwrap();
    fs::write(outside.join("secret"), b"outside!").unwrap();
    (t, root, outside)
}

#[test]
fn no_lookup_follows_a_link_or_leaves_the_root() {
    let (_t, root, outside) = tree();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    std::os::unix::fs::symlink("d/f", root.join("flink")).unwrap();
    let mut dirs = Dirs::at(&root);
    assert!(dirs.dir("link").is_err());
    assert!(dirs.dir("link/deeper").is_err());
    assert!(dirs.stat("link/secret").is_err());
    assert!(dirs.open_file("link/secret").is_err());
    assert!(dirs.dir("..").is_err() && dirs.stat("../outside/f").is_err() && dirs.stat("d/../..").is_err());
    // A link as the last component is looked at, never through.
    let st = dirs.stat("flink").unwrap();
    assert_eq!(rfs::FileType::from_raw_mode(st.st_mode), rfs::FileType::Symlink);
    assert!(dirs.open_file("flink").is_err());
    assert!(dirs
        .open_file("d")
        .is_err_and(|e| e.get_ref().is_some_and(|e| e.is::<NotRegular>())));
    let (mut f, md) = dirs.open_file("d/sub/f").unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!((s.as_str(), md.len()), ("inside", 6));
    // Nothing refused was kept.
    assert!(dirs.get("link").is_none() && dirs.get("link/deeper").is_none());
    assert_eq!(dirs.len(), 1, "d/sub alone");
    assert!(dirs.get("d/sub").is_some());
}

#[test]
fn a_directory_swapped_for_a_link_between_two_lookups_is_refused() {
    let (_t, root, outside) = tree();
    let mut dirs = Dirs::at(&root);
    assert_eq!(dirs.stat("d/sub/f").unwrap().st_size, 6);
    assert!(dirs.get("d/sub").is_some() && dirs.get("d").is_none());
    // `d` goes elsewhere in the root, and a link to outside takes its name.
    fs::rename(root.join("d"), root.join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    // Whatever was not open yet is looked up again from the root: refused.
    assert!(dirs.dir("d").is_err());
    assert!(dirs.stat("d/secret").is_err());
    assert!(dirs.open_file("d/secret").is_err());
    assert!(dirs.stat("d/f").is_err());
    assert!(dirs.dir("d/deeper").is_err());
    // The handle kept stays on the directory it was opened on (now
    // `moved/sub`), never on what the name now leads to.
    let (mut f, _) = dirs.open_file("d/sub/f").unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "inside");
    // Once the pass starts over, the name is looked up again, and refused.
    dirs.clear();
    assert!(dirs.stat("d/sub/f").is_err());
}

#[test]
fn handles_are_bounded() {
    let t = tempfile::tempdir().unwrap();
    for i in 0..10 {
        fs::create_dir_all(t.path().join(format!("a/{i}"))).unwrap();
        fs::write(t.path().join(format!("a/{i}/f")), b"x").unwrap();
    }
    let mut dirs = Dirs::at(t.path()).bounded(4);
    for round in 0..2 {
        for i in 0..10 {
            assert_eq!(dirs.stat(&format!("a/{i}/f")).unwrap().st_size, 1, "round {round}, {i}");
            assert!(dirs.len() <= 4, "{} handles open", dirs.len());
        }
    }
    // The same directory twice is one handle.
    dirs.clear();
    let (a, b) = (dirs.dir("a").unwrap(), dirs.dir("a").unwrap());
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(dirs.len(), 1);
    // Without a bound set, the default holds: one more than it starts over.
    let many = tempfile::tempdir().unwrap();
    for i in 0..=DIRS_MAX {
        fs::create_dir(many.path().join(i.to_string())).unwrap();
    }
    let mut dirs = Dirs::at(many.path());
    for i in 0..DIRS_MAX {
        dirs.dir(&i.to_string()).unwrap();
    }
    assert_eq!(dirs.len(), DIRS_MAX);
    dirs.dir(&DIRS_MAX.to_string()).unwrap();
    assert_eq!(dirs.len(), 1);
}

#[test]
fn a_missing_root_is_an_error_at_each_lookup_until_it_exists() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("later");
    let mut dirs = Dirs::at(&root);
    assert_eq!(dirs.stat("f").unwrap_err().kind(), io::ErrorKind::NotFound);
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), b"ab").unwrap();
    assert_eq!(dirs.stat("f").unwrap().st_size, 2);
}
