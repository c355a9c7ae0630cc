//! The shipped monitoring: Prometheus alert rules (checked and unit-tested
//! with the real promtool) and the Grafana dashboard, whose queries may use
//! only metrics a live agent exports.

use std::collections::BTreeSet;

use std::process::Command;
use std::time::Duration;

use warmspare_tests::{converge, http_get, require, wait_until, workspace, write_file, TestCluster};

/// Every `warmspare_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("warmspare_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_pass_promtool() {
    let promtool = require("promtool", "prometheus");
    let ws = workspace();
    for args in [
        vec!["check", "rules", "docs/monitoring/warmspare.rules.yml"],
        vec!["test", "rules", "tests/monitoring/warmspare.rules.test.yml"],
    ] {
        let out = Command::new(&promtool).args(&args).current_dir(&ws).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn dashboard_and_rules_use_only_metrics_the_agent_exports() {
    let ws = workspace();
    let dashboard = std::fs::read_to_string(ws.join("docs/monitoring/warmspare-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<String> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "only {} queries in the dashboard", exprs.len());
    let rules = std::fs::read_to_string(ws.join("docs/monitoring/warmspare.rules.yml")).unwrap();
    let mut used = metric_names(&exprs.join("\n"));
    used.extend(metric_names(&rules));

    // A live pair, with a job so that job metrics have samples too.
    let c = TestCluster::pair(
        "\n[[job]]\nname = \"stamp\"\nschedule = \"0 0 0 1 1 *\"\ndump = \"date\"\nrestore = \"true\"\n",
    );
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let _b = c.start("b");
    let _a = c.start("a");
    write_file(&ra.join("one"), b"1", 0o644);
    converge(&ra, &rb, Duration::from_secs(60));
    let mut exported = BTreeSet::new();
    for node in ["a", "b"] {
        let port = c.node(node).http_port;
        wait_until("metrics", Duration::from_secs(60), || {
            http_get(port, "/metrics").is_some()
        });
        let (_, body) = http_get(port, "/metrics").unwrap();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                exported.insert(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    }
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the rules use metrics the agent does not export: {missing:?} (exported: {exported:?})"
    );
    assert!(used.len() >= 10, "only {used:?}");
}
