//! The receiver works only beneath its watch roots: a local user on the
//! passive who swaps a root or a directory for a symbolic link never gets
//! the agent (root) to create, change or remove anything outside.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warmspare_tests::{converge, noise, snapshot, wait_until, write_file, Snapshot, TestCluster};

const LIMIT: Duration = Duration::from_secs(120);

/// An outside directory a local user would like the agent to write to: a
/// few files, one of them private, and one named like a file of the watch.
fn make_victim(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    write_file(&dir.join("shadow"), b"root:secret\n", 0o600);
    write_file(&dir.join("ca.pem"), b"the victim's own ca.pem\n", 0o644);
    write_file(&dir.join("sub/keep"), b"keep\n", 0o640);
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Everything about `dir` that the agent must not change: its entries
/// (content, mode, mtime, owner) and its own mode and mtime.
fn victim_state(dir: &Path) -> (Snapshot, u32, i64, i64) {
    let md = fs::metadata(dir).unwrap();
    (snapshot(dir), md.mode(), md.mtime(), md.mtime_nsec())
}

/// The names of every file preserved under a node's diverged folder.
fn diverged_names(c: &TestCluster, node: &str) -> Vec<String> {
    let div = c.node(node).root.join("var/lib/warmspare/diverged");
    snapshot(&div).keys().cloned().collect()
}

#[test]
fn a_watch_root_replaced_by_a_link_on_the_passive_is_never_written_through() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("ca.pem"), b"the real ca.pem\n", 0o644);
    write_file(&a_root.join("signed/one.pem"), b"one\n", 0o644);
    let mut b = c.start("b");
    let mut a = c.start("a");
    converge(&a_root, &b_root, LIMIT);

    // A local user on b: `mv ca ca.old; ln -s /victim ca`.
    let victim = c.dir.path().join("victim");
    make_victim(&victim);
    let before = victim_state(&victim);
    fs::rename(&b_root, b_root.with_file_name("ca.old")).unwrap();
    std::os::unix::fs::symlink(&victim, &b_root).unwrap();

    // The active changes, adds and removes files.
    write_file(&a_root.join("ca.pem"), b"a new ca.pem\n", 0o644);
    write_file(&a_root.join("shadow"), b"from the active\n", 0o644);
    write_file(&a_root.join("signed/two.pem"), b"two\n", 0o644);
    fs::remove_file(a_root.join("signed/one.pem")).unwrap();

    // (Or, as a receiver that follows the link would, touches the victim.)
    wait_until("the passive refuses the replaced root", LIMIT, || {
        victim_state(&victim) != before
            || b.log_text().lines().any(|l| {
                l.contains("symbolic link or not a directory")
                    && (l.contains("refused a request") || l.contains("cannot apply"))
            })
    });
    assert_eq!(victim_state(&victim), before, "the victim directory changed");
    // Restarted with the link in place, it starts and still refuses.
    b.kill9();
    b.restart();
    write_file(&a_root.join("signed/three.pem"), b"three\n", 0o644);
    // Refused by the session (its manifest or its changes), not only by the
    // clean-up at start-up.
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("symbolic link or not a directory"))
            .filter(|l| l.contains("refused a request") || l.contains("cannot apply"))
            .count()
    };
    let seen = refusals(&b.log_text());
    wait_until("the restarted passive refuses the replaced root", LIMIT, || {
        refusals(&b.log_text()) > seen
    });
    assert!(b.is_running(), "the passive stopped:\n{}", b.log_text());
    assert!(a.is_running(), "the active stopped:\n{}", a.log_text());
    assert_eq!(victim_state(&victim), before, "the victim directory changed");
    assert!(
        diverged_names(&c, "b")
            .iter()
            .all(|n| !n.ends_with("shadow") && !n.ends_with("keep")),
        "a victim file was moved aside: {:?}",
        diverged_names(&c, "b")
    );
    // The real tree, moved away, was left alone too.
    assert_eq!(
        fs::read(b_root.with_file_name("ca.old").join("ca.pem")).unwrap(),
        b"the real ca.pem\n"
    );
}

/// A local user swaps a directory below the passive's root for a link to an
/// outside directory and back, thousands of times, while the active
/// replicates thousands of small files and a few large ones into it.
#[test]
fn a_directory_swapped_for_a_link_during_replication_never_leads_outside() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("ca.pem"), b"ca\n", 0o644);
    let mut b = c.start("b");
    let mut a = c.start("a");
    converge(&a_root, &b_root, LIMIT);

    // The victim also holds files named like those the active sends, which
    // a write through the link would replace.
    let victim = c.dir.path().join("victim");
    make_victim(&victim);
    for i in 0..10 {
        write_file(&victim.join(format!("f{i:04}.pem")), b"the victim's own\n", 0o600);
    }
    let before = victim_state(&victim);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let (root, victim) = (b_root.clone(), victim.clone());
        std::thread::spawn(move || {
            let d = root.join("d");
            while !stop.load(Ordering::Relaxed) {
                let n = swaps.fetch_add(1, Ordering::Relaxed);
                // `d` (a real directory once the first files arrived) is
                // moved aside and a link to the victim put in its place...
                let aside = root.join(format!("d.aside{n}"));
                let moved = fs::rename(&d, &aside).is_ok();
                if std::os::unix::fs::symlink(&victim, &d).is_ok() {
                    std::thread::yield_now();
                    let _ = fs::remove_file(&d);
                }
                // ... and back (unless the receiver made a new `d` meanwhile:
                // then that one is swapped next).
                if moved {
                    let _ = fs::rename(&aside, &d);
                }
            }
            // Leave `d` a real directory.
            if fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = fs::remove_file(&d);
            }
        })
    };

    let started = std::time::Instant::now();
    // Several thousand small files and a few large ones (one of 30 MB,
    // whose temporary file is written for a while) in that directory.
    for i in 0..3000 {
        write_file(
            &a_root.join(format!("d/f{i:04}.pem")),
            format!("file {i}\n").as_bytes(),
            0o644,
        );
    }
    write_file(&a_root.join("d/big.bin"), &noise(30 << 20, 1), 0o644);
    for i in 0..3 {
        write_file(&a_root.join(format!("d/large{i}.bin")), &noise(2 << 20, 10 + i), 0o644);
    }
    // Until the swapper has swapped thousands of times and the passive has
    // had the time to receive (or fail) everything.
    wait_until("thousands of swaps", LIMIT, || swaps.load(Ordering::Relaxed) >= 3000);
    eprintln!(
        "MEASURE race: {} swaps after {:?}",
        swaps.load(Ordering::Relaxed),
        started.elapsed()
    );
    // Files in `d` and in the directories it was moved aside to.
    let received = |root: &Path| {
        fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('d'))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| fs::read_dir(e.path()).map(|r| r.count()).unwrap_or(0))
            .sum::<usize>()
    };
    // And until the 30 MB file, whose temporary file is written for a
    // while, has been placed on the passive during the race (files that
    // meet the link fail and are sent again later).
    let placed = |root: &Path, name: &str| {
        fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('d'))
            .any(|e| e.path().join(name).is_file())
    };
    // (Or until the victim changed, which ends the test at once.) On a
    // loaded machine a file that meets the link is sent again only after its
    // back-off, so the race also ends after 90 s; the large file was being
    // written during it either way.
    let race_ends = std::time::Instant::now() + Duration::from_secs(90);
    let mut placed_during_race = false;
    while std::time::Instant::now() < race_ends {
        if victim_state(&victim) != before {
            break;
        }
        if placed(&b_root, "big.bin") && received(&b_root) >= 1000 {
            placed_during_race = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!(
        "MEASURE race: {} swaps, {} files on the passive during the race, large file placed during it: {placed_during_race}, {:?}",
        swaps.load(Ordering::Relaxed),
        received(&b_root),
        started.elapsed()
    );

    assert!(b.is_running(), "the passive stopped:\n{}", b.log_text());
    assert!(a.is_running(), "the active stopped:\n{}", a.log_text());
    assert_eq!(victim_state(&victim), before, "the victim directory changed");
    assert!(
        diverged_names(&c, "b")
            .iter()
            .all(|n| !n.ends_with("shadow") && !n.ends_with("keep")),
        "a victim file was moved aside: {:?}",
        diverged_names(&c, "b")
    );
}

/// A passive whose watch holds a tree deeper than `PATH_MAX`, with a
/// temporary file left deep inside by an interrupted run, starts.
#[test]
fn a_tree_deeper_than_path_max_does_not_stop_the_agent() {
    use warmspare_shared::beneath;
    let c = TestCluster::pair("");
    let b_root = c.ca("b");
    fs::create_dir_all(&b_root).unwrap();
    let name = "d".repeat(200);
    let rel = vec![name.as_str(); 25].join("/");
    assert!(rel.len() > 4096, "not deeper than PATH_MAX");
    let root = beneath::open_root(&b_root).unwrap();
    let deep = beneath::make_dirs(&root, &rel, 0o755).unwrap();
    let temp = ".warmspare-tmp.left.new.0000abcd";
    drop(beneath::create_private(&deep, temp).unwrap());
    drop(beneath::create_private(&deep, "kept.pem").unwrap());

    let mut b = c.start("b");
    wait_until("the agent starts", LIMIT, || {
        b.log_text().contains("agent started") || !b.is_running()
    });
    assert!(b.is_running(), "the agent did not start:\n{}", b.log_text());
    let log = b.log_text();
    let cleaned = beneath::stat(&deep, temp).is_err();
    let reported = log.contains("could not look for temporary files everywhere");
    assert!(
        cleaned || reported,
        "the deep temporary file was neither removed nor reported:\n{log}"
    );
    assert!(cleaned, "the deep temporary file was not removed:\n{log}");
    assert!(
        beneath::stat(&deep, "kept.pem").is_ok(),
        "a file that is not temporary was removed"
    );
}
