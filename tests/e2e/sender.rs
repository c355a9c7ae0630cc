//! The active side reading a live tree that other processes change under it:
//! truncations, swapped directories, special files, unreadable entries.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use warmspare_tests::{noise, read, wait_until, write_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(120);

/// Whether process `pid` has a file open whose path ends with `name`.
fn holds_open(pid: u32, name: &str) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().ends_with(name)))
}

/// Polls `cond` for at most `limit`; unlike `wait_until`, running out of
/// time is not a failure.
fn poll_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

fn file_len(p: &Path) -> Option<u64> {
    fs::symlink_metadata(p).ok().map(|m| m.len())
}

#[test]
fn a_large_file_truncated_while_hashed_and_shipped_never_kills_the_active() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let big = a_root.join("big.bin");
    let len: usize = 64 << 20;
    write_file(&big, &noise(len, 1), 0o644);
    let _b = c.start("b");
    let mut a = c.start("a");
    wait_until("the first copy of big.bin", LIMIT, || {
        file_len(&b_root.join("big.bin")) == Some(len as u64)
    });
    let pid = a.pid().unwrap();
    let mut caught = 0;
    for round in 0..12u64 {
        // Modified in place (same inode, mostly the same bytes: a delta),
        // then cut short while the agent reads it.
        let mut data = noise(len, 1);
        data[(round as usize * 4096)..(round as usize * 4096 + 64)].fill(round as u8);
        {
            use std::io::Write as _;
            let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
            f.write_all(&data).unwrap();
        }
        if poll_for(Duration::from_secs(10), || holds_open(pid, "big.bin")) {
            caught += 1;
        }
        let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.set_len((round + 1) * 4096).unwrap();
        f.set_len(len as u64).unwrap();
        assert!(a.is_running(), "the active agent died in round {round}");
    }
    eprintln!("MEASURE truncations while the agent held the file open: {caught} of 12");
    assert!(
        caught > 0,
        "the agent was never seen reading the file: the test proved nothing"
    );
    // Replication still works: the final content and a later small file arrive.
    let last = noise(len, 7);
    write_file(&big, &last, 0o644);
    write_file(&a_root.join("later.pem"), b"later\n", 0o644);
    wait_until("the later file", LIMIT, || {
        read(&b_root.join("later.pem")).as_deref() == Some(&b"later\n"[..])
    });
    wait_until("the final content of big.bin", LIMIT, || {
        file_len(&b_root.join("big.bin")) == Some(len as u64)
            && read(&b_root.join("big.bin")).as_deref() == Some(&last[..])
    });
    assert!(a.is_running(), "the active agent died");
}

/// The `last_error` of node `node`'s link(s), as `status --json` shows them.
fn link_errors(c: &TestCluster, node: &str) -> String {
    let v = c.status_json();
    v["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == node))
        .and_then(|n| n["status"]["links"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["last_error"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every regular file under `root` with its content.
fn all_files(root: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                out.push((e.path(), fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    out
}

#[test]
fn a_directory_swapped_for_a_link_never_leaks_an_outside_file() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    // A root-only file outside the watch, linked to by a relative target
    // that names nothing on the passive (where the link is replicated too).
    let outside = c.node("a").root.join("outside");
    let secret = b"OUTSIDE-SECRET-0123456789\n".repeat(100);
    write_file(&outside.join("secret.pem"), &secret, 0o600);
    let sub = a_root.join("sub");
    write_file(&sub.join("f0.pem"), b"public\n", 0o644);
    let _b = c.start("b");
    let mut a = c.start("a");
    wait_until("the first copy", LIMIT, || read(&b_root.join("sub/f0.pem")).is_some());
    let pid = a.pid().unwrap();
    let real = a_root.join("sub.real");
    let mut caught = 0;
    // The passive's copy may be replaced soon after (by the link), so it is
    // watched all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, b_root) = (stop.clone(), b_root.clone());
        std::thread::spawn(move || {
            let mut seen = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in ["sub/secret.pem", "sub.real/secret.pem"] {
                    if read(&b_root.join(p)).is_some_and(|d| d.starts_with(b"OUTSIDE-SECRET")) {
                        seen = true;
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            seen
        })
    };
    for round in 0..3 {
        // Two new files in `sub`: a large one, shipped first, and one named
        // like the outside secret. While the large one is read, a local user
        // swaps `sub` for a link to the outside directory: the shipper then
        // looks for `sub/secret.pem` through the link.
        // Both appear within a millisecond (the large one is written outside
        // the watch and renamed in), so that one batch holds both.
        let big = format!("big{round}.bin");
        let len = 32usize << 20;
        let stage = c.dir.path().join("stage");
        write_file(&stage.join(&big), &noise(len, round), 0o644);
        write_file(&sub.join("secret.pem"), format!("public {round}\n").as_bytes(), 0o644);
        fs::rename(stage.join(&big), sub.join(&big)).unwrap();
        if poll_for(Duration::from_secs(30), || holds_open(pid, &big)) {
            caught += 1;
        }
        fs::rename(&sub, &real).unwrap();
        std::os::unix::fs::symlink("../../outside", &sub).unwrap();
        assert!(sub.join("secret.pem").is_file());
        wait_until("the large file", LIMIT, || {
            file_len(&b_root.join("sub").join(&big)) == Some(len as u64)
                || file_len(&b_root.join("sub.real").join(&big)) == Some(len as u64)
        });
        wait_until("the link replicated", LIMIT, || {
            fs::symlink_metadata(b_root.join("sub")).is_ok_and(|m| m.file_type().is_symlink())
        });
        fs::remove_file(&sub).unwrap();
        fs::rename(&real, &sub).unwrap();
        wait_until("the directory back", LIMIT, || b_root.join("sub/f0.pem").is_file());
    }
    eprintln!("MEASURE swaps while the agent read the large file: {caught} of 3");
    assert!(
        caught > 0,
        "the agent was never seen reading the large file: the test proved nothing"
    );
    write_file(&a_root.join("later.pem"), b"later\n", 0o644);
    wait_until("the later file", LIMIT, || read(&b_root.join("later.pem")).is_some());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(!watcher.join().unwrap(), "the outside secret arrived on the passive");
    let shipped = format!("path=\"sub/secret.pem\" size={}", secret.len());
    assert!(
        !a.log_text().contains(&shipped),
        "the active shipped the outside secret"
    );
    // Nowhere on the passive (its tree, its diverged copies): the secret.
    for (p, data) in all_files(&c.node("b").root) {
        assert!(
            !data.windows(25).any(|w| w == b"OUTSIDE-SECRET-0123456789"),
            "the outside secret arrived on the passive at {}",
            p.display()
        );
    }
    assert!(a.is_running());
}

#[test]
fn a_fifo_swapped_in_for_a_file_hangs_nothing_and_is_reported() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let x = a_root.join("x.pem");
    let content = b"x content\n".repeat(10);
    write_file(&x, &content, 0o644);
    let _b = c.start("b");
    let mut a = c.start("a");
    wait_until("the first copy", LIMIT, || read(&b_root.join("x.pem")).is_some());
    // A regular file the shipper is told about, then a fifo in its place
    // (the same size there as on the peer: it is read before it is sent).
    // Each is made outside the watch and renamed over x.pem, so that the
    // path never goes missing (which would be a deletion to replicate).
    let stage = c.dir.path().join("stage");
    fs::create_dir_all(&stage).unwrap();
    let mkfifo = |p: &Path| {
        let status = std::process::Command::new("mkfifo").arg(p).status().unwrap();
        assert!(status.success());
    };
    for i in 0..300 {
        let data = format!("{i:09}\n").repeat(10);
        write_file(&stage.join("file"), data.as_bytes(), 0o644);
        fs::rename(stage.join("file"), &x).unwrap();
        if i % 10 == 0 {
            poll_for(Duration::from_millis(5), || false);
        }
        mkfifo(&stage.join("fifo"));
        fs::rename(stage.join("fifo"), &x).unwrap();
    }
    // Other files keep flowing.
    write_file(&a_root.join("later.pem"), b"later\n", 0o644);
    wait_until("the later file", LIMIT, || read(&b_root.join("later.pem")).is_some());
    // The fifo is reported, and the peer's last copy of x.pem is kept.
    wait_until("the fifo reported in status", LIMIT, || {
        let e = link_errors(&c, "a");
        e.contains("x.pem") && e.contains("cannot be read")
    });
    assert!(b_root.join("x.pem").is_file(), "the peer's copy of x.pem was removed");
    assert!(a.is_running());
}

#[test]
fn what_the_active_cannot_read_is_kept_on_the_passive() {
    use std::os::unix::fs::PermissionsExt;
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("locked/inner/deep.pem"), b"deep\n", 0o644);
    write_file(&a_root.join("locked/one.pem"), b"one\n", 0o644);
    write_file(&a_root.join("secret.pem"), b"secret\n", 0o644);
    write_file(&a_root.join("open.pem"), b"open\n", 0o644);
    // The active runs as an unprivileged user (root reads through chmod 000):
    // its whole node tree is that user's, and the way to it is open.
    let a_node = c.node("a").root.clone();
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&a_node)
        .status()
        .unwrap();
    assert!(chown.success());
    fs::set_permissions(c.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&c.file, fs::Permissions::from_mode(0o644)).unwrap();
    let _b = c.start("b");
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let mut a = c.start_wrapped("a", &[], &nobody);
    wait_until("the first copy", LIMIT, || {
        read(&b_root.join("locked/inner/deep.pem")).is_some()
    });
    wait_until("the first copy", LIMIT, || read(&b_root.join("open.pem")).is_some());
    // Unreadable to the active: a file and a directory.
    fs::set_permissions(a_root.join("secret.pem"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(a_root.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    // A full comparison (not a restart: the start-up's temp cleanup has its
    // own trouble with an unreadable directory) and an event.
    let out = c.ctl(&["resync"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    write_file(&a_root.join("later.pem"), b"later\n", 0o644);
    wait_until("the later file", LIMIT, || read(&b_root.join("later.pem")).is_some());
    wait_until("the unreadable paths reported in status", LIMIT, || {
        link_errors(&c, "a").contains("cannot be read")
    });
    // A change of a readable file still arrives; the unreadable ones stay.
    write_file(&a_root.join("open.pem"), b"open 2\n", 0o644);
    wait_until("the change", LIMIT, || {
        read(&b_root.join("open.pem")).as_deref() == Some(&b"open 2\n"[..])
    });
    assert_eq!(read(&b_root.join("secret.pem")).as_deref(), Some(&b"secret\n"[..]));
    assert_eq!(read(&b_root.join("locked/one.pem")).as_deref(), Some(&b"one\n"[..]));
    assert_eq!(
        read(&b_root.join("locked/inner/deep.pem")).as_deref(),
        Some(&b"deep\n"[..])
    );
    assert!(a.is_running());
    assert!(a.log_text().contains("cannot"), "no warning in the log");
}

#[test]
fn a_peer_that_answers_nothing_is_dropped_with_an_error_and_dialed_again() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("one.pem"), b"one\n", 0o644);
    let mut b = c.start("b");
    let mut a = c.start_with_env("a", &[("WARMSPARE_PEER_DEADLINE_MS", "3000")]);
    wait_until("the first copy", LIMIT, || read(&b_root.join("one.pem")).is_some());
    // The passive stops answering (connected, but its process is stopped).
    b.signal("-STOP");
    write_file(&a_root.join("two.pem"), b"two\n", 0o644);
    wait_until("the session dropped for want of an answer", LIMIT, || {
        a.log_text().contains("did not answer within 3 s")
    });
    b.signal("-CONT");
    wait_until("the change after the peer came back", LIMIT, || {
        read(&b_root.join("two.pem")).is_some()
    });
    assert!(a.is_running() && b.is_running());
}
