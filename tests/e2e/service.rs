//! The agent as a service: systemd notifications, reload, metrics.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, http_get, wait_until, write_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn notifies_systemd_ready_watchdog_and_stopping_and_exits_zero_on_sigterm() {
    let c = TestCluster::pair("");
    let sock_path = c.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut a = c.start_with_env(
        "a",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let read_until = |what: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + LIMIT;
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m| m.lines().any(|l| l == what)) {
            assert!(Instant::now() < deadline, "no {what} within {LIMIT:?}; got {seen:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        }
    };
    read_until("READY=1", &mut seen);
    assert!(seen.iter().any(|m| m.contains("STATUS=active at epoch 1")), "{seen:?}");
    let before = seen.len();
    // Watchdog pings at half of WATCHDOG_USEC: at least three more in a row.
    let deadline = Instant::now() + LIMIT;
    while seen[before..]
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "too few watchdog pings: {seen:?}");
        read_until("WATCHDOG=1", &mut seen);
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    let status = {
        a.signal("-TERM");
        read_until("STOPPING=1", &mut seen);
        a.terminate_wait()
    };
    assert_eq!(status.code(), Some(0), "{}", a.log_text());
}

#[test]
fn sighup_applies_a_valid_change_and_keeps_running_on_a_broken_file() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let b = c.start("b");
    let a = c.start("a");
    write_file(&ra.join("one"), b"1", 0o644);
    converge(&ra, &rb, LIMIT);
    let good = fs::read_to_string(&c.file).unwrap();

    fs::write(&c.file, good.replace("[[watch]]", "[[watch]]\nbogus_key = 1")).unwrap();
    a.signal("-HUP");
    wait_until("the refusal in the log", LIMIT, || {
        a.log_text().contains("reload refused")
    });
    assert!(a.log_text().contains("bogus_key"), "{}", a.log_text());
    write_file(&ra.join("two"), b"2", 0o644);
    converge(&ra, &rb, LIMIT);

    fs::write(
        &c.file,
        good.replace("debounce_ms = 0", "debounce_ms = 0\nexclude = [\"secret/\"]"),
    )
    .unwrap();
    a.signal("-HUP");
    b.signal("-HUP");
    wait_until("the reload in both logs", LIMIT, || {
        a.log_text().contains("cluster file reloaded") && b.log_text().contains("cluster file reloaded")
    });
    write_file(&ra.join("secret/key.pem"), b"never shipped", 0o600);
    write_file(&ra.join("three"), b"3", 0o644);
    wait_until("the file after the reload", LIMIT, || rb.join("three").exists());
    assert!(
        !rb.join("secret").exists(),
        "an excluded path was shipped after the reload"
    );
}

/// The metrics of one scrape, by name and labels.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = http_get(port, "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (format!("{}{{{}}}", s.metric, labels.join(",")), value)
        })
        .collect()
}

#[test]
fn metrics_parse_and_lag_rises_while_the_passive_is_down() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let mut b = c.start("b");
    let _a = c.start("a");
    write_file(&ra.join("one"), b"1", 0o644);
    converge(&ra, &rb, LIMIT);
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    let lag_s = "warmspare_replication_lag_seconds{peer=b,watch=ca}";
    let lag_b = "warmspare_replication_lag_bytes{peer=b,watch=ca}";
    wait_until("metrics with a success", LIMIT, || {
        scrape(ha).contains_key("warmspare_last_success_timestamp_seconds{peer=b,watch=ca}")
    });
    let m = scrape(ha);
    for name in [
        "warmspare_is_active{}",
        "warmspare_epoch{}",
        "warmspare_bytes_sent_total{}",
        "warmspare_diverged_files_total{}",
        lag_s,
        lag_b,
        "warmspare_peer_connected{peer=b}",
    ] {
        assert!(m.contains_key(name), "{name} missing from {m:#?}");
    }
    assert!(m.keys().any(|k| k.starts_with("warmspare_build_info{")), "{m:#?}");
    assert_eq!(m["warmspare_is_active{}"], 1.0);
    assert_eq!(m[lag_s], 0.0);
    assert!(m["warmspare_bytes_sent_total{}"] > 0.0);
    let mb = scrape(hb);
    assert_eq!(mb["warmspare_is_active{}"], 0.0);
    assert!(
        mb.contains_key("warmspare_last_success_timestamp_seconds{watch=ca}"),
        "{mb:#?}"
    );

    b.kill9();
    write_file(&ra.join("two"), &vec![7u8; 5000], 0o644);
    wait_until("lag to rise", LIMIT, || {
        let m = scrape(ha);
        m[lag_s] > 0.5 && m[lag_b] >= 5000.0 && m["warmspare_peer_connected{peer=b}"] == 0.0
    });
    let first = scrape(ha)[lag_s];
    wait_until("lag to keep rising", LIMIT, || scrape(ha)[lag_s] > first);
    b.restart();
    converge(&ra, &rb, LIMIT);
    wait_until("lag back to zero", LIMIT, || {
        let m = scrape(ha);
        m[lag_s] == 0.0 && m[lag_b] == 0.0 && m["warmspare_peer_connected{peer=b}"] == 1.0
    });
}

#[test]
fn an_idle_passive_in_sync_reports_a_recent_success_after_a_restart() {
    // Nothing changes after the first sync: the passive's last success must
    // still come back after its restart (from the full comparison the active
    // makes on reconnecting), or the "not replicating" alert fires on a
    // healthy idle pair.
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("one"), b"1", 0o644);
    let mut b = c.start("b");
    let _a = c.start("a");
    converge(&ra, &rb, LIMIT);
    let hb = c.node("b").http_port;
    let key = "warmspare_last_success_timestamp_seconds{watch=ca}";
    wait_until("a first success on the passive", LIMIT, || scrape(hb).contains_key(key));
    b.terminate();
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    b.restart();
    wait_until("a success after the restart, with nothing to apply", LIMIT, || {
        http_get(hb, "/metrics").is_some() && scrape(hb).get(key).is_some_and(|t| *t >= restarted.floor())
    });
    let status = c.status_json();
    let node_b = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node"] == "b"))
        .unwrap_or_else(|| panic!("no node b in {status:#}"));
    let text = node_b.to_string();
    assert!(
        text.contains("\"last_applied\":") && !text.contains("\"last_applied\":null"),
        "{node_b:#}"
    );
}
