//! `after_apply` on the receiver: off the acknowledgement path, one run at a
//! time per watch, bounded by `after_apply_timeout`, failures reported.

use std::fs;
use std::time::Duration;

use warmspare_tests::{http_get, processes_with_env, read, wait_until, write_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

/// b's `ca` watch as `warmsparectl status --json` reports it.
fn b_watch(c: &TestCluster) -> serde_json::Value {
    let v = c.status_json();
    v["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == "b"))
        .map(|n| n["status"]["watches"][0].clone())
        .unwrap_or_default()
}

#[test]
fn a_hung_after_apply_does_not_stop_replication() {
    // The hook never ends within the test: every later file must still
    // arrive, and the batches that land meanwhile make one more run, not a
    // pile of hooks.
    let c = TestCluster::pair("after_apply = \"echo run >> \\\"$WARMSPARE_PATH/../runs\\\"; sleep 600\"");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let runs = rb.parent().unwrap().join("runs");
    let mut b = c.start("b");
    let _a = c.start("a");
    write_file(&ra.join("first.pem"), b"first", 0o644);
    wait_until("first.pem on b", LIMIT, || {
        read(&rb.join("first.pem")).as_deref() == Some(b"first")
    });
    wait_until("the hook started", LIMIT, || runs.exists());
    for i in 0..5 {
        let name = format!("later-{i}.pem");
        write_file(&ra.join(&name), name.as_bytes(), 0o644);
        wait_until(&format!("{name} on b while the hook runs"), LIMIT, || {
            read(&rb.join(&name)).as_deref() == Some(name.as_bytes())
        });
    }
    let w = b_watch(&c);
    assert_eq!(w["after_apply"]["running"], true, "{w}");
    assert_eq!(w["after_apply"]["queued"], true, "{w}");
    assert_eq!(
        fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "runs of one watch never overlap"
    );
    // Shutdown cuts the hook off: its whole process group goes.
    let needle = format!("WARMSPARE_PATH={}", rb.display());
    assert!(!processes_with_env(&needle).is_empty(), "the hook should be running");
    let status = b.terminate();
    assert!(status.success(), "{status:?}");
    wait_until("no hook process left", LIMIT, || processes_with_env(&needle).is_empty());
}

#[test]
fn a_failing_or_timed_out_after_apply_shows_in_status_and_metrics() {
    let c =
        TestCluster::pair("after_apply = \"echo boom-$WARMSPARE_WATCH >&2; sleep 600\"\nafter_apply_timeout = \"1s\"");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let mut b = c.start("b");
    let _a = c.start("a");
    write_file(&ra.join("x.pem"), b"x", 0o644);
    wait_until("x.pem on b", LIMIT, || read(&rb.join("x.pem")).as_deref() == Some(b"x"));
    wait_until("the hook's failure in status", LIMIT, || {
        b_watch(&c)["after_apply"]["runs_failed"].as_u64() >= Some(1)
    });
    let w = b_watch(&c);
    let detail = w["after_apply"]["last"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(w["after_apply"]["last"]["ok"], false, "{w}");
    assert!(detail.contains("timed out after 1s"), "{detail}");
    assert!(detail.contains("boom-ca"), "the output's tail is kept: {detail}");
    // The killed group left no process behind.
    let needle = format!("WARMSPARE_PATH={}", rb.display());
    wait_until("the timed-out hook's processes gone", LIMIT, || {
        processes_with_env(&needle).is_empty()
    });
    let warnings = c.status_json()["warnings"].to_string();
    assert!(warnings.contains("after_apply"), "{warnings}");
    let (code, metrics) = http_get(c.node("b").http_port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("warmspare_after_apply_failed{watch=\"ca\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warmspare_after_apply_runs_total{watch=\"ca\",result=\"failed\"} 1")
            || metrics.contains("warmspare_after_apply_runs_total{watch=\"ca\",result=\"failed\"} 2"),
        "{metrics}"
    );
    assert!(b.log_text().contains("after_apply failed"), "the failure is logged");
    let _ = b.terminate();
}
