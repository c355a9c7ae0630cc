//! Dead, hung and returning peers: how soon the active sees a passive go,
//! and how soon it replicates again once the passive answers.
//!
//! `WARMSPARE_LIVENESS_ROUNDS=N` repeats the stop/continue and the
//! kill/restart cycles N times and prints every figure and a summary (the
//! figures in docs/reliability.md come from that); the assertions use
//! generous deadlines only.

use std::time::{Duration, Instant};

use warmspare_tests::{converge, http_get, wait_until, write_file, TestCluster};

/// Whether every link of node `name` is connected, from its `/_status`
/// (`None` when the node does not answer or has no link yet).
fn links_up(c: &TestCluster, name: &str) -> Option<bool> {
    let (code, body) = http_get(c.node(name).http_port, "/_status")?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let links = v["links"].as_array()?;
    if links.is_empty() {
        return None;
    }
    Some(links.iter().all(|l| l["connected"] == true))
}

fn wait_link(c: &TestCluster, up: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_until(
        &format!("a's link to b {}", if up { "up" } else { "down" }),
        limit,
        || links_up(c, "a") == Some(up),
    );
    start.elapsed()
}

fn summary(what: &str, v: &[Duration]) {
    let mut s: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    println!(
        "{what}: {} runs, median {:.2} s, worst {:.2} s, all {:?}",
        s.len(),
        s[s.len() / 2],
        s[s.len() - 1],
        s.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>()
    );
}

#[test]
fn a_stopped_or_restarted_passive_is_seen_down_and_reconnected() {
    let rounds: usize = std::env::var("WARMSPARE_LIVENESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let c = TestCluster::pair("");
    let (ca, cb) = (c.ca("a"), c.ca("b"));
    let mut b = c.start("b");
    let _a = c.start("a");
    write_file(&ca.join("first.pem"), b"first", 0o644);
    converge(&ca, &cb, Duration::from_secs(60));
    wait_link(&c, true, Duration::from_secs(60));

    let (mut detect, mut back, mut restart) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // A stopped process keeps its connections open and answers nothing.
        b.signal("-STOP");
        let stopped = wait_link(&c, false, Duration::from_secs(20));
        println!("round {round}: stopped passive seen down after {stopped:.2?}");
        detect.push(stopped);
        if round == 0 {
            // The reason is on the link, for the operator (b's own status
            // is out of reach while it is stopped).
            let v = c.status_json();
            let a = v["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["node"] == "a"))
                .cloned()
                .unwrap_or_default();
            let err = a["status"]["links"][0]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(err.contains("answered no ping"), "last_error: {err:?}\n{a:#}");
        }
        b.signal("-CONT");
        let resumed = wait_link(&c, true, Duration::from_secs(30));
        println!("round {round}: continued passive connected again after {resumed:.2?}");
        back.push(resumed);
        let name = format!("after-stop-{round}.pem");
        write_file(&ca.join(&name), name.as_bytes(), 0o644);
        converge(&ca, &cb, Duration::from_secs(60));

        // A killed one refuses connections until it is back.
        b.kill9();
        wait_link(&c, false, Duration::from_secs(20));
        b.restart();
        let restarted = wait_link(&c, true, Duration::from_secs(30));
        println!("round {round}: restarted passive connected again after {restarted:.2?}");
        restart.push(restarted);
        let name = format!("after-restart-{round}.pem");
        write_file(&ca.join(&name), name.as_bytes(), 0o644);
        converge(&ca, &cb, Duration::from_secs(60));
    }
    summary("stopped passive seen down (SIGSTOP to link down)", &detect);
    summary("stopped passive reconnected (SIGCONT to link up)", &back);
    summary("restarted passive reconnected (start to link up)", &restart);
}

#[test]
fn a_busy_passive_is_not_taken_for_dead() {
    // b's apply thread spends 8 s in every commit (a slow disk), longer
    // than the 5 s after which a peer that answers nothing is down. Its
    // async runtime still answers the probe, so a never shows the link
    // down and the files arrive over the same session.
    let c = TestCluster::pair("");
    let (ca, cb) = (c.ca("a"), c.ca("b"));
    let b = c.start_with_env("b", &[("WARMSPARE_TEST_SLOW_COMMIT_MS", "8000")]);
    let a = c.start("a");
    wait_link(&c, true, Duration::from_secs(60));
    let mut seen_down = false;
    for i in 0..2 {
        let name = format!("busy-{i}.pem");
        write_file(&ca.join(&name), name.as_bytes(), 0o644);
        wait_until(&format!("{name} on b"), Duration::from_secs(120), || {
            seen_down |= links_up(&c, "a") == Some(false);
            cb.join(&name).exists()
        });
    }
    let log = a.log_text();
    assert!(!seen_down, "a showed its link to the busy b down:\n{log}");
    for said in ["answered no ping", "did not answer"] {
        assert!(!log.contains(said), "a took the busy b for dead ({said:?}):\n{log}");
    }
    let b_log = b.log_text();
    assert_eq!(
        b_log.matches("replication session opened").count(),
        1,
        "a dialed b again while b was busy:\n{b_log}"
    );
}
