//! The supervisor: a task that stops is noticed, and shutdown is bounded and
//! leaves no command behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warmspare_tests::{bin, processes_with_env, wait_until, ClusterOptions, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_watcher_that_fails_makes_the_agent_exit_non_zero() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let mut a = c.start_with_env("a", &[("WARMSPARE_TEST_BREAK_WATCHER", "1")]);
    // Before, the watcher's failure was a log line and the node went on
    // saying "active" with nothing watching.
    wait_until("a to exit after its watcher failed", LIMIT, || !a.is_running());
    let status = a.terminate_wait();
    assert!(!status.success(), "{status:?}");
    let log = a.log_text();
    assert!(log.contains("the watcher of the active side stopped"), "{log}");
}

#[test]
fn shutdown_during_a_running_job_is_bounded_and_leaves_no_process() {
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\n\n[[job]]\nname = \"slow\"\nrun = \"sleep 600\"\ntimeout = \"1h\"\n",
            warmspare_tests::CA_WATCH
        ),
        ..Default::default()
    });
    // Marks the job's processes as this test's (the node env reaches them).
    let mark = format!("WARMSPARE_TEST_MARK={}", c.dir.path().display());
    let toml = std::fs::read_to_string(&c.file).unwrap().replace(
        "name = \"a\"\n",
        &format!(
            "name = \"a\"\nenv = {{ WARMSPARE_TEST_MARK = \"{}\" }}\n",
            c.dir.path().display()
        ),
    );
    warmspare_tests::write_cluster_file(&c.file, &toml);
    let _b = c.start("b");
    let mut a = c.start("a");
    wait_until("a active", LIMIT, || {
        warmspare_tests::http_status(c.node("a").http_port, "/_status/check") == Some(200)
    });
    let mut ctl = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&c.file)
        .arg("--key")
        .arg(&c.operator_key)
        .args(["run-job", "slow"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the job's sleep running", LIMIT, || {
        !processes_with_env(&mark).is_empty()
    });
    let t = Instant::now();
    a.signal("-TERM");
    // The unit gives the agent 30 s (TimeoutStopSec) before SIGKILL.
    wait_until("a to stop within its bound", Duration::from_secs(30), || {
        !a.is_running()
    });
    eprintln!(
        "MEASURE shutdown with a running job took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = a.terminate_wait();
    wait_until("no job process left", Duration::from_secs(10), || {
        processes_with_env(&mark).is_empty()
    });
    let _ = ctl.kill();
    let _ = ctl.wait();
}
