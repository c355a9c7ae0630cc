//! Local changes on a passive: flagged at once, told apart from the
//! receiver's own writes, preserved when the active's version replaces them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, http_get, noise, wait_until, write_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

/// The `ca` watch's local changes as `node` reports them.
fn local_changes(c: &TestCluster, node: &str) -> serde_json::Value {
    let s = c.node_status(node);
    s["watches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "ca")
        .map(|w| w["local_changes"].clone())
        .unwrap()
}

/// The changes among the latest ones: (path, change, pending).
fn latest(lc: &serde_json::Value) -> Vec<(String, String, bool)> {
    lc["latest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["change"].as_str().unwrap().to_string(),
                c["pending"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn diverged(c: &TestCluster, node: &str) -> Vec<String> {
    c.node_status(node)["diverged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

fn certs(c: &TestCluster, node: &str, n: usize) {
    for i in 0..n {
        write_file(
            &c.ca(node).join(format!("signed/host{i:02}.pem")),
            format!("cert {i}").as_bytes(),
            0o644,
        );
    }
}

/// Waits until `node`'s passive watcher watches the `ca` root.
fn wait_watching(c: &TestCluster, agent: &warmspare_tests::Agent) {
    let _ = c;
    wait_until("the passive watcher watches the root", LIMIT, || {
        agent.log_text().contains("watching for local changes")
    });
}

#[test]
fn local_changes_on_a_passive_are_flagged_and_preserved_when_replaced() {
    let c = TestCluster::pair("");
    certs(&c, "a", 5);
    let b = c.start("b");
    let _a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_watching(&c, &b);
    assert_eq!(local_changes(&c, "b")["total"], 0, "{}", b.log_text());

    // The spare's own puppetserver signs a certificate; someone edits,
    // removes and chmods others.
    let started = Instant::now();
    write_file(&c.ca("b").join("signed/rogue.pem"), b"signed on the spare", 0o644);
    fs::write(c.ca("b").join("signed/host01.pem"), b"edited on the spare").unwrap();
    fs::remove_file(c.ca("b").join("signed/host02.pem")).unwrap();
    fs::set_permissions(c.ca("b").join("signed/host03.pem"), fs::Permissions::from_mode(0o600)).unwrap();
    let want = [
        ("signed/rogue.pem", "created"),
        ("signed/host01.pem", "modified"),
        ("signed/host02.pem", "removed"),
        ("signed/host03.pem", "metadata"),
    ];
    let deadline = Instant::now() + LIMIT;
    wait_until(
        "the passive flags the four local changes",
        LIMIT + Duration::from_secs(5),
        || {
            let lc = local_changes(&c, "b");
            if Instant::now() > deadline {
                let log = b.log_text();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
                panic!("{lc}\n{}", lines.join("\n"));
            }
            let seen = latest(&lc);
            lc["pending"] == 4
                && want
                    .iter()
                    .all(|(p, k)| seen.iter().any(|(sp, sk, pending)| sp == p && sk == k && *pending))
        },
    );
    eprintln!("flagged in {:?}", started.elapsed());
    // Status warns, metrics count, the log says it.
    let table = String::from_utf8_lossy(&c.ctl(&["status"]).stdout).to_string();
    assert!(table.contains("local change on a passive, will be replaced"), "{table}");
    let (_, metrics) = http_get(c.node("b").http_port, "/metrics").unwrap();
    assert!(
        metrics.contains("warmspare_passive_local_changes{watch=\"ca\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warmspare_passive_local_changes_total{watch=\"ca\"} 4"),
        "{metrics}"
    );
    let (_, public) = http_get(c.node("b").http_port, "/_status").unwrap();
    assert!(public.contains("\"local_changes\":4"), "{public}");
    assert!(!public.contains("rogue"), "the public status names a file: {public}");
    assert!(b.log_text().contains("local change on a passive, will be replaced"));
    // Nothing was replaced yet: the active has not compared since.
    assert_eq!(
        fs::read(c.ca("b").join("signed/rogue.pem")).unwrap(),
        b"signed on the spare"
    );

    // The active's next full comparison replaces them, keeping the new and
    // the edited certificate under diverged/.
    let out = c.ctl(&["resync", "--watch", "ca"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("the flags clear once replaced", LIMIT, || {
        local_changes(&c, "b")["pending"] == 0
    });
    let kept = diverged(&c, "b");
    for p in ["ca/signed/rogue.pem", "ca/signed/host01.pem"] {
        assert!(kept.iter().any(|d| d.ends_with(p)), "{p} not preserved: {kept:?}");
    }
    let lc = local_changes(&c, "b");
    assert_eq!(lc["total"], 4, "{lc}");
    assert!(latest(&lc).iter().all(|(_, _, pending)| !pending), "{lc}");
}

#[test]
fn the_receivers_own_writes_raise_no_flag() {
    let c = TestCluster::pair("");
    let b = c.start("b");
    let _a = c.start("a");
    c.wait_linked("a", LIMIT);
    wait_watching(&c, &b);
    // 500 files in 10 directories, a large one and a delta.
    for i in 0..500 {
        write_file(
            &c.ca("a").join(format!("d{}/f{i:03}.pem", i % 10)),
            format!("content {i}").as_bytes(),
            0o644,
        );
    }
    write_file(&c.ca("a").join("big.bin"), &noise(3 << 20, 1), 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    // Changes, removals, chmods, a tree removed and one directory replaced
    // by a file, a file changed in place (sent as a delta).
    for i in 0..50 {
        fs::write(c.ca("a").join(format!("d0/f{:03}.pem", i * 10)), format!("changed {i}")).unwrap();
        fs::set_permissions(
            c.ca("a").join(format!("d1/f{:03}.pem", i * 10 + 1)),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::remove_file(c.ca("a").join(format!("d2/f{:03}.pem", i * 10 + 2))).unwrap();
    }
    fs::remove_dir_all(c.ca("a").join("d3")).unwrap();
    fs::remove_dir_all(c.ca("a").join("d4")).unwrap();
    write_file(&c.ca("a").join("d4"), b"a file now", 0o644);
    let mut big = noise(3 << 20, 1);
    big[1 << 20..(1 << 20) + 100].copy_from_slice(&[7u8; 100]);
    fs::write(c.ca("a").join("big.bin"), &big).unwrap();
    converge(&c.ca("a"), &c.ca("b"), LIMIT);

    // One real local change shows the watcher is looking; it must be the only one.
    write_file(&c.ca("b").join("marker"), b"local", 0o644);
    let deadline = Instant::now() + LIMIT;
    wait_until("the marker flagged", LIMIT + Duration::from_secs(5), || {
        let lc = local_changes(&c, "b");
        if Instant::now() > deadline {
            let log = b.log_text();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            panic!("{lc}\n{}", lines.join("\n"));
        }
        latest(&lc).iter().any(|(p, _, _)| p == "marker")
    });
    let seen = latest(&local_changes(&c, "b"));
    assert!(seen.iter().any(|(p, k, _)| p == "marker" && k == "created"), "{seen:?}");
    // The active's next comparison removes it (more of the receiver's own
    // writes); the flag clears, and no other was ever raised.
    let out = c.ctl(&["resync", "--watch", "ca"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("the marker replaced", LIMIT, || local_changes(&c, "b")["pending"] == 0);
    let lc = local_changes(&c, "b");
    assert_eq!(
        lc["total"],
        1,
        "the receiver's own writes were flagged: {lc}\n{}",
        b.log_text()
    );
    assert_eq!(
        b.log_text()
            .matches("local change on a passive, will be replaced")
            .count(),
        1,
        "{}",
        b.log_text()
    );
}

#[test]
fn the_watcher_follows_the_role() {
    let c = TestCluster::pair("");
    certs(&c, "a", 3);
    let b = c.start("b");
    let a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_watching(&c, &b);
    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_linked("b", LIMIT);
    wait_until("a watches for local changes now", LIMIT, || {
        a.log_text().contains("watching for local changes")
    });
    // On the new active, a change is shipped, not flagged.
    write_file(&c.ca("b").join("signed/new.pem"), b"signed on the new active", 0o644);
    converge(&c.ca("b"), &c.ca("a"), LIMIT);
    // On the new passive, a local change is flagged.
    write_file(&c.ca("a").join("signed/late.pem"), b"late on the old active", 0o644);
    wait_until("the old active, now passive, flags a local change", LIMIT, || {
        latest(&local_changes(&c, "a"))
            .iter()
            .any(|(p, k, _)| p == "signed/late.pem" && k == "created")
    });
    assert_eq!(local_changes(&c, "b")["total"], 0, "{}", b.log_text());
}
