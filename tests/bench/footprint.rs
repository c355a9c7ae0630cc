//! Scenario 5: the footprint of the active agent watching a large tree
//! while idle (its footprint while shipping is measured in scenario 1's
//! rounds, in `main`).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, TestCluster};

use super::{ca_tree, pair, pid_stats, start_agent, Row, Sizes};

/// Scenario 5's idle half: a pair synced on `sizes.idle_files` files
/// (`BENCH_IDLE_FILES`), the active's resident memory and CPU over
/// `sizes.idle_secs`. Returns the pair, whose trees are deleted when the
/// run ends.
pub fn run(sizes: &Sizes, rows: &mut Vec<Row>) -> Vec<TestCluster> {
    let c = pair();
    let src = c.ca("a");
    // Profiling knobs (docs/benchmarks.md): another tree size, and a
    // wrapper for the active such as `valgrind --tool=massif`.
    let files = std::env::var("BENCH_IDLE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(sizes.idle_files);
    let wrapper = std::env::var("BENCH_WRAP_ACTIVE").unwrap_or_default();
    ca_tree(&src, files);
    let _b = start_agent(&c, "b", "");
    let a = start_agent(&c, "a", &wrapper);
    converge(&src, &c.ca("b"), Duration::from_secs(3600));
    let pid = a.pid().unwrap();
    let (_, cpu0) = pid_stats(pid);
    std::thread::sleep(Duration::from_secs(sizes.idle_secs));
    let (rss, cpu1) = pid_stats(pid);
    // Which part of it is the heap and which the mapped binary.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for l in status.lines().filter(|l| l.starts_with("Rss")) {
        println!("idle active: {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    if !wrapper.is_empty() {
        // A profiler writes its report when the agent exits cleanly.
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let gone = Instant::now() + Duration::from_secs(300);
        while Path::new(&format!("/proc/{pid}/exe")).exists() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    rows.push(Row {
        scenario: format!("5. idle, watching {files} files"),
        measure: "resident memory".into(),
        warmspare: rss as f64 / 1024.0,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "MiB",
        target: "< 64 MiB".into(),
    });
    rows.push(Row {
        scenario: format!("5. idle, watching {files} files"),
        measure: format!("CPU over {} s", sizes.idle_secs),
        warmspare: (cpu1 - cpu0) / sizes.idle_secs as f64 * 100.0,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "%",
        target: "near 0".into(),
    });
    // Deleting these 200,000 files now would slow scenario 6's file
    // creation for the next minute (see `forget_deletions`).
    vec![c]
}
