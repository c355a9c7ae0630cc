//! Tests of the `beneath` module.

use super::*;
use std::fs;

#[test]
fn a_root_that_is_a_link_is_refused() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("real")).unwrap();
    std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
    assert!(open_root(&d.path().join("real")).is_ok());
    let e = open_root(&d.path().join("link")).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    fs::write(d.path().join("file"), b"x").unwrap();
    assert!(open_root(&d.path().join("file")).is_err());
}

#[test]
fn no_link_is_followed_on_the_way_down_with_or_without_openat2() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("a/b")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("a/link")).unwrap();
    let root = open_root(d.path()).unwrap();
    for walk_only in [false, true] {
        if walk_only {
            NO_OPENAT2.store(true, Ordering::Relaxed);
        }
        assert!(open_dir(&root, "a/b").is_ok());
        assert!(open_dir(&root, "a/link").is_err());
        assert!(open_dir(&root, "a/link/x").is_err());
        assert!(open_dir(&root, "a/../..").is_err());
        assert!(make_dirs(&root, "a/link/new", 0o755).is_err());
        let made = make_dirs(&root, "a/new/deeper", 0o755).unwrap();
        drop(rfs::openat(&made, "f", OFlags::CREATE | OFlags::WRONLY, Mode::from_raw_mode(0o644)).unwrap());
        assert!(d.path().join("a/new/deeper/f").exists());
        fs::remove_dir_all(d.path().join("a/new")).unwrap();
    }
    NO_OPENAT2.store(false, Ordering::Relaxed);
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn remove_tree_removes_through_handles_and_not_through_links() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), b"keep").unwrap();
    fs::create_dir_all(d.path().join("t/a/b")).unwrap();
    fs::write(d.path().join("t/a/b/f"), b"x").unwrap();
    fs::write(d.path().join("t/g"), b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("t/a/link")).unwrap();
    let root = open_root(d.path()).unwrap();
    remove_tree(&root, "t").unwrap();
    assert!(!d.path().join("t").exists());
    assert!(outside.path().join("keep").exists());
    fs::write(d.path().join("file"), b"x").unwrap();
    remove_tree(&root, "file").unwrap();
    assert!(!d.path().join("file").exists());
}

#[test]
fn clean_temps_goes_deeper_than_path_max() {
    let d = tempfile::tempdir().unwrap();
    let root = open_root(d.path()).unwrap();
    let name = "d".repeat(200);
    let rel = vec![name.as_str(); 30].join("/");
    assert!(rel.len() > 4096);
    let deep = make_dirs(&root, &rel, 0o755).unwrap();
    create_private(&deep, ".warmspare-tmp.x.new.00000000").unwrap();
    create_private(&deep, "kept").unwrap();
    let done = clean_temps_at(&root);
    assert_eq!(done, Cleaned { removed: 1, skipped: 0 });
    assert!(stat(&deep, "kept").is_ok());
    assert!(stat(&deep, ".warmspare-tmp.x.new.00000000").is_err());
}

#[test]
fn opening_beneath_follows_no_link_and_reads_only_regular_files() {
    let d = tempfile::tempdir().unwrap();
    let (root, outside) = (d.path().join("root"), d.path().join("outside"));
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("sub/f"), b"inside").unwrap();
    std::fs::write(outside.join("f"), b"outside").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    std::os::unix::fs::symlink("sub/f", root.join("flink")).unwrap();
    let (f, md) = open_file_beneath(&root, "sub/f").unwrap();
    assert_eq!(md.len(), 6);
    assert_eq!(std::io::read_to_string(f).unwrap(), "inside");
    // A link anywhere on the way, a way out, a directory: refused.
    assert!(open_file_beneath(&root, "link/f").is_err());
    assert!(open_file_beneath(&root, "flink").is_err());
    assert!(open_file_beneath(&root, "../outside/f").is_err());
    assert!(open_file_beneath(&root, "sub").is_err());
    // A fifo: refused at once, not waited on for a writer.
    let fifo = root.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let err = open_file_beneath(&root, "fifo").unwrap_err();
    assert!(err.get_ref().is_some_and(|e| e.is::<NotRegular>()), "{err}");
    // The walk used without openat2 refuses the same.
    let dir = File::open(&root).unwrap();
    NO_OPENAT2.store(true, Ordering::Relaxed);
    let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK;
    let walked = open_beneath(&dir, "sub/f", flags);
    let through_link = open_beneath(&dir, "link/f", flags);
    let last_link = open_beneath(&dir, "flink", flags);
    let up = open_beneath(&dir, "../outside/f", flags);
    NO_OPENAT2.store(false, Ordering::Relaxed);
    assert_eq!(std::io::read_to_string(walked.unwrap()).unwrap(), "inside");
    assert!(through_link.is_err() && last_link.is_err() && up.is_err());
}
