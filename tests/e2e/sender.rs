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
    assert!(caught > 0, "the agent was never seen reading the file: the test proved nothing");
    // Replication still works: the final content and a later small file arrive.
    let last = noise(len, 7);
    write_file(&big, &last, 0o644);
    write_file(&a_root.join("later.pem"), b"later\n", 0o644);
    wait_until("the later file", LIMIT, || read(&b_root.join("later.pem")).as_deref() == Some(&b"later\n"[..]));
    wait_until("the final content of big.bin", LIMIT, || {
        file_len(&b_root.join("big.bin")) == Some(len as u64) && read(&b_root.join("big.bin")).as_deref() == Some(&last[..])
    });
    assert!(a.is_running(), "the active agent died");
}
