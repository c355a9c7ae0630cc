//! Status and metrics under load: a walk of the watch trees for their file
//! counts must hold up neither replication (no lock that shippers and
//! receivers take is held over the walk) nor the status itself.
//!
//! The walk is held open with the test-only `WARMSPARE_TEST_HOLD_STATUS_WALK`
//! instead of being made slow with a large tree: held, it stands for a walk
//! of a tree of any size (before the first fix, 16 pollers of a
//! 100,000-file watch took 306 ms a request and held a new file up for
//! seconds; before the second, every status waited for the walk, and at
//! 1,000,000 files `warmsparectl` found no node answering within its 5 s),
//! and the test needs no clock. A new file must cross while a walk is held
//! on each node, status requests must answer meanwhile with the counts of
//! the walk before, and once the walks are let go the counts have the new
//! file.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warmspare_tests::{http_get, read, wait_until, TestCluster};

/// Files in the watch.
const FILES: usize = 1_000;
/// Concurrent pollers (half on each node, half of them on `/metrics`).
const POLLERS: usize = 8;

/// Phases of the test, as the pollers see them.
const BEFORE: usize = 0;
const HELD: usize = 1;
const RELEASED: usize = 2;

fn files_on(c: &TestCluster, node: &str) -> Option<u64> {
    let (_, m) = http_get(c.node(node).http_port, "/metrics")?;
    m.lines()
        .find_map(|l| l.strip_prefix("warmspare_watch_files{watch=\"ca\"} "))
        .and_then(|v| v.trim().parse().ok())
}

/// While this file exists, node `n`'s next status walk waits at it.
fn gate(c: &TestCluster, n: &str) -> PathBuf {
    c.dir.path().join(format!("hold-walk-{n}"))
}

/// This file exists while node `n`'s walk waits at its gate.
fn held(c: &TestCluster, n: &str) -> PathBuf {
    PathBuf::from(format!("{}.held", gate(c, n).display()))
}

/// Starts node `n` with its status walks held at its gate.
fn start_gated(c: &TestCluster, n: &str) -> warmspare_tests::Agent {
    let g = gate(c, n).display().to_string();
    c.start_with_env(n, &[("WARMSPARE_TEST_HOLD_STATUS_WALK", g.as_str())])
}

#[test]
fn a_new_file_crosses_while_status_walks_are_held() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    for d in 0..FILES / 100 {
        let dir = ra.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}")).unwrap();
        }
    }
    let (gate, held, start) = (
        |n: &str| gate(&c, n),
        |n: &str| held(&c, n),
        |n: &str| start_gated(&c, n),
    );
    let _b = start("b");
    let _a = start("a");
    // Both nodes have counted their trees once: the counts of the walk
    // before the held one, which status shows while it is held.
    wait_until(
        "the initial sync, counted on both nodes",
        Duration::from_secs(300),
        || files_on(&c, "b") == Some(FILES as u64) && files_on(&c, "a") == Some(FILES as u64),
    );
    for n in ["a", "b"] {
        fs::write(gate(n), b"").unwrap();
    }

    // Pollers ask both nodes for /metrics and /_status without a pause; each
    // request notes the phase it started and ended in.
    let phase = Arc::new(AtomicUsize::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let answered_while_held = Arc::new(AtomicUsize::new(0));
    let wrong_while_held = Arc::new(AtomicUsize::new(0));
    let pollers: Vec<_> = (0..POLLERS)
        .map(|i| {
            let port = c.node(if i % 2 == 0 { "a" } else { "b" }).http_port;
            let path = if i % 4 < 2 { "/metrics" } else { "/_status" };
            let (phase, stop) = (phase.clone(), stop.clone());
            let (answered, wrong) = (answered_while_held.clone(), wrong_while_held.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let began = phase.load(Ordering::SeqCst);
                    let got = http_get(port, path);
                    let ended = phase.load(Ordering::SeqCst);
                    let Some((200, body)) = got else { continue };
                    if began == HELD && ended == HELD {
                        answered.fetch_add(1, Ordering::SeqCst);
                        // The counts of the walk before the held one.
                        let before = format!("warmspare_watch_files{{watch=\"ca\"}} {FILES}\n");
                        if path == "/metrics" && !body.contains(&before) {
                            wrong.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    // The counts are shared for 5 s: the first request after that starts a
    // walk (which waits at the gate) and waits for it at most 1 s; every
    // request after it finds that walk under way and waits as long.
    wait_until("a status walk held on a and on b", Duration::from_secs(120), || {
        held("a").exists() && held("b").exists()
    });
    phase.store(HELD, Ordering::SeqCst);

    // Before, each walk held the lock the shipper and the receiver take on
    // every batch: the file waited for the walks, here for ever.
    fs::write(ra.join("new.pem"), b"new").unwrap();
    wait_until(
        "new.pem on b while a status walk is held on a and on b",
        Duration::from_secs(120),
        || read(&rb.join("new.pem")).as_deref() == Some(&b"new"[..]),
    );
    assert!(
        held("a").exists() && held("b").exists(),
        "a walk was let go before the file crossed"
    );
    // Status answers while the walks are held, with the counts before them.
    let answered = || answered_while_held.load(Ordering::SeqCst);
    wait_until(
        "status requests answered while the walks are held",
        Duration::from_secs(60),
        || answered() >= POLLERS,
    );
    assert!(held("a").exists() && held("b").exists(), "a walk was let go");
    assert_eq!(
        wrong_while_held.load(Ordering::SeqCst),
        0,
        "a status answered while the walks were held had other counts than the walk before"
    );

    // Let go: the counts have the new file.
    phase.store(RELEASED, Ordering::SeqCst);
    for n in ["a", "b"] {
        fs::remove_file(gate(n)).unwrap();
    }
    wait_until("status of b counting the new file", Duration::from_secs(120), || {
        files_on(&c, "b") == Some(FILES as u64 + 1)
    });
    wait_until("the held walks ended", Duration::from_secs(120), || {
        !held("a").exists() && !held("b").exists()
    });
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        p.join().unwrap();
    }
}

/// `warmsparectl resync` asks each node only who is active (its hello says
/// so), never for a status: a status walks every watch tree to count its
/// files, which with 100,000 files was a quarter of the CPU the active spent
/// on the comparison that `resync` asks for, and as much on the passive.
/// Every walk is held here for as long as the test runs: before, `resync`
/// waited for the walks and found no node that answered (it failed).
#[test]
fn resync_walks_no_tree_to_find_the_active() {
    let c = TestCluster::pair("");
    let ra = c.ca("a");
    fs::create_dir_all(ra.join("d")).unwrap();
    fs::write(ra.join("d/f.pem"), b"f").unwrap();
    let (gate, held, start) = (
        |n: &str| gate(&c, n),
        |n: &str| held(&c, n),
        |n: &str| start_gated(&c, n),
    );
    let _b = start("b");
    let a = start("a");
    let compared = |a: &warmspare_tests::Agent| a.log_text().matches("compared in full").count();
    wait_until("the initial sync", Duration::from_secs(300), || {
        read(&c.ca("b").join("d/f.pem")).as_deref() == Some(&b"f"[..]) && compared(&a) >= 1
    });
    let before = compared(&a);
    for n in ["a", "b"] {
        fs::write(gate(n), b"").unwrap();
    }
    let out = c.ctl(&["resync"]);
    assert!(
        out.status.success(),
        "resync failed while status walks were held: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("a's comparison in full after resync", Duration::from_secs(120), || {
        compared(&a) > before
    });
    for n in ["a", "b"] {
        assert!(!held(n).exists(), "resync made {n} walk its tree");
        fs::remove_file(gate(n)).unwrap();
    }
}
