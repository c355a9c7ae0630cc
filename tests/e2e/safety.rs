//! The spare's copy survives mistakes on the active: a missing watch root,
//! a mass deletion, a stale active restarted alone.

use std::fs;
use std::time::Duration;

use warmspare_tests::{
    converge, http_get, http_status, output_text, read, snapshot, wait_until, write_file, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

fn files(c: &TestCluster, node: &str, n: usize) {
    for i in 0..n {
        write_file(
            &c.ca(node).join(format!("signed/host{i:02}.pem")),
            format!("cert {i}").as_bytes(),
            0o644,
        );
    }
}

fn held_deletions(c: &TestCluster) -> Option<u64> {
    let s = c.node_status("a");
    s["links"]
        .as_array()?
        .iter()
        .find(|l| l["watch"] == "ca" && l["peer"] == "b")?["deletions_held"]
        .as_u64()
}

#[test]
fn a_missing_watch_root_stops_shipping_and_the_passive_keeps_everything() {
    let c = TestCluster::pair("");
    files(&c, "a", 20);
    let _b = c.start("b");
    let mut a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    let before = snapshot(&c.ca("b"));

    // The CA directory goes away while the active is stopped (an unmounted
    // file system, a typo, an `mv` would all look the same).
    a.terminate();
    let moved = c.ca("a").with_file_name("ca.old");
    fs::rename(c.ca("a"), &moved).unwrap();
    a.restart();
    c.wait_linked("a", LIMIT);
    wait_until("a reports the missing root", LIMIT, || {
        c.node_status("a")["watches"][0]["root_error"]
            .as_str()
            .is_some_and(|e| e.contains("missing"))
    });
    assert!(!c.ca("a").exists(), "the active created its watch root");
    assert_eq!(snapshot(&c.ca("b")), before, "the passive lost files");
    // Metrics, health detail and the cluster warnings say so.
    let port = c.node("a").http_port;
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    assert!(metrics.contains("warmspare_watch_root_ok{watch=\"ca\"} 0"), "{metrics}");
    let (_, detail) = http_get(port, "/_status").unwrap();
    assert!(detail.contains("\"root_ok\":false"), "{detail}");
    let table = output_text(&c.ctl(&["status"]));
    assert!(table.contains("watch ca is not shipped"), "{table}");
    // `check` fails, naming the watch.
    let (code, text) = c.check("a", &[]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("FAILED: watch ca"), "{text}");

    // The operator accepts an empty root: the guard still keeps the
    // passive's files, which would all go.
    let out = c.ctl(&["resync", "--watch", "ca", "--accept-root"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(c.ca("a").is_dir());
    wait_until("the removals held", LIMIT, || held_deletions(&c) == Some(20));
    assert_eq!(snapshot(&c.ca("b")), before, "the passive lost files");
    assert!(c.node_status("a")["watches"][0]["root_error"].is_null());

    // The real CA comes back, with one more certificate: shipping resumes.
    fs::remove_dir(c.ca("a")).unwrap();
    fs::rename(&moved, c.ca("a")).unwrap();
    write_file(&c.ca("a").join("signed/late.pem"), b"late", 0o644);
    let out = c.ctl(&["resync", "--watch", "ca"]);
    assert!(out.status.success(), "{}", output_text(&out));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("nothing held", LIMIT, || held_deletions(&c) == Some(0));
}

#[test]
fn a_root_on_another_file_system_is_not_shipped_until_accepted() {
    let c = TestCluster::pair("");
    files(&c, "a", 3);
    let _b = c.start("b");
    let mut a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    a.terminate();
    // The device recorded for the root no longer matches (as after a
    // mount point lost its file system).
    let roots = c.node("a").root.join("var/lib/warmspare/roots.json");
    let mut seen: serde_json::Value = serde_json::from_slice(&fs::read(&roots).unwrap()).unwrap();
    seen["ca"] = serde_json::json!(seen["ca"].as_u64().unwrap() ^ 0xff);
    fs::write(&roots, serde_json::to_vec(&seen).unwrap()).unwrap();
    write_file(&c.ca("a").join("signed/new.pem"), b"new", 0o644);
    a.restart();
    c.wait_linked("a", LIMIT);
    wait_until("a reports the file system change", LIMIT, || {
        c.node_status("a")["watches"][0]["root_error"]
            .as_str()
            .is_some_and(|e| e.contains("another file system"))
    });
    assert!(
        read(&c.ca("b").join("signed/new.pem")).is_none(),
        "shipped from an unverified root"
    );
    let out = c.ctl(&["resync", "--watch", "ca", "--accept-root"]);
    assert!(out.status.success(), "{}", output_text(&out));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
}

#[test]
fn mass_deletions_are_held_until_the_operator_allows_them() {
    let c = TestCluster::pair("");
    // 5 files in signed/, 15 in old/.
    files(&c, "a", 5);
    for i in 0..15 {
        write_file(
            &c.ca("a").join(format!("old/host{i:02}.pem")),
            format!("old {i}").as_bytes(),
            0o644,
        );
    }
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);

    // A few removals are below the guard and replicate.
    for i in 0..2 {
        fs::remove_file(c.ca("a").join(format!("signed/host{i:02}.pem"))).unwrap();
    }
    converge(&c.ca("a"), &c.ca("b"), LIMIT);

    // Most of the watch goes at once (one rename out of it, so that it is
    // one batch): held, while additions and changes flow.
    fs::rename(c.ca("a").join("old"), c.dir.path().join("gone")).unwrap();
    write_file(&c.ca("a").join("signed/new.pem"), b"new", 0o644);
    write_file(&c.ca("a").join("signed/host04.pem"), b"changed", 0o644);
    wait_until("the addition and the change", LIMIT, || {
        read(&c.ca("b").join("signed/new.pem")).as_deref() == Some(&b"new"[..])
            && read(&c.ca("b").join("signed/host04.pem")).as_deref() == Some(&b"changed"[..])
    });
    wait_until("the removals held", LIMIT, || held_deletions(&c) == Some(15));
    // A full comparison holds them too.
    let out = c.ctl(&["resync", "--watch", "ca"]);
    assert!(out.status.success(), "{}", output_text(&out));
    std::thread::sleep(Duration::from_millis(500));
    wait_until("the removals still held", LIMIT, || held_deletions(&c) == Some(15));
    for i in 0..15 {
        assert!(
            c.ca("b").join(format!("old/host{i:02}.pem")).exists(),
            "old/host{i:02}.pem was removed on the passive"
        );
    }
    let table = output_text(&c.ctl(&["status"]));
    assert!(table.contains("deletions held"), "{table}");
    let (_, metrics) = http_get(c.node("a").http_port, "/metrics").unwrap();
    assert!(
        metrics.contains("warmspare_deletions_held{watch=\"ca\",peer=\"b\"} 15"),
        "{metrics}"
    );

    // The operator has looked, and releases them.
    let out = c.ctl(&["resync", "--watch", "ca", "--allow-deletes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("nothing held", LIMIT, || held_deletions(&c) == Some(0));
}

/// a was active and killed, b was promoted by a failover and stopped.
fn stale_a_alone(c: &TestCluster) -> (warmspare_tests::Agent, warmspare_tests::Agent) {
    files(c, "a", 3);
    let mut b = c.start("b");
    let mut a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    a.kill9();
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert!(out.status.success(), "{}", output_text(&out));
    b.terminate();
    a.restart();
    let port = c.node("a").http_port;
    wait_until("a answers 503, held", LIMIT, || {
        http_get(port, "/_status/check").is_some_and(|(code, body)| code == 503 && body.contains("held"))
    });
    (a, b)
}

#[test]
fn a_stale_active_restarted_alone_is_held_then_steps_down() {
    let c = TestCluster::pair("");
    let (_a, mut b) = stale_a_alone(&c);
    let s = c.node_status("a");
    assert!(
        s["held"]
            .as_str()
            .is_some_and(|h| h.contains("no peer has confirmed epoch 1")),
        "{s}"
    );
    let (_, metrics) = http_get(c.node("a").http_port, "/metrics").unwrap();
    assert!(metrics.contains("warmspare_active_held 1"), "{metrics}");
    assert!(metrics.contains("warmspare_is_active 0"), "{metrics}");
    // A change made on the stale node is not shipped when b comes back.
    write_file(&c.ca("a").join("signed/stale.pem"), b"stale", 0o644);
    b.restart();
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("b active, a passive", LIMIT, || {
        http_status(hb, "/_status/check") == Some(200) && http_status(ha, "/_status/check") == Some(503)
    });
    let s = c.node_status("a");
    assert_eq!(s["role"]["epoch"], 2, "{s}");
    assert_eq!(s["role"]["active"], "b", "{s}");
    assert!(s["held"].is_null(), "{s}");
    converge(&c.ca("b"), &c.ca("a"), LIMIT);
    assert!(read(&c.ca("b").join("signed/stale.pem")).is_none());
}

#[test]
fn failover_force_promotes_a_held_lone_node() {
    let c = TestCluster::pair("");
    let (_a, mut b) = stale_a_alone(&c);
    let out = c.ctl(&["failover", "--to", "a", "--force"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let ha = c.node("a").http_port;
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    // b may be at a higher epoch than a knows (it is: 2), so a skips ahead.
    let s = c.node_status("a");
    assert_eq!(s["role"]["epoch"], 101, "{s}");
    assert_eq!(s["role"]["active"], "a", "{s}");
    assert!(s["held"].is_null(), "{s}");
    // b returns at epoch 2, learns epoch 101 and follows a.
    write_file(&c.ca("a").join("signed/after.pem"), b"after", 0o644);
    b.restart();
    let hb = c.node("b").http_port;
    wait_until("b passive", LIMIT, || http_status(hb, "/_status/check") == Some(503));
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
}
