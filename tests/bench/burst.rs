//! Scenario 8: bursts. A synced pair watches a small CA tree (one file for
//! every twenty of the burst); a writer then puts `n` certificate-sized
//! files in place as fast as it can, each written in a staging directory
//! beside the tree and renamed into one of scenario 1's 64 directories (as
//! a CA does), and deletes every third file it created, 64 files after
//! creating it (so most deletions remove a file the passive already has).
//! Measured: how long the writes took, and the time from the last write
//! until the passive's tree equals the active's.
//!
//! Convergence is polled with a cheap listing (names and sizes, the
//! replication's temporary files left out) of the passive's tree against
//! the active's, taken once after the last write; the moment is the end of
//! the first listing that matched, so the figure includes up to one
//! listing's time (printed). The trees are then compared in full, untimed.
//!
//! Anchors of the same run: lsyncd (`delay = 0`, rsync over the bench's
//! sshd) on the same burst into its own target, its tail after the last
//! write; and one `rsync -a --delete` of the final tree into an empty
//! directory, what a cron job would need once the burst is over.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warmspare_shared::relpath::is_temp_name;
use warmspare_tests::{converge, TestCluster};

use super::lsyncd::Lsyncd;
use super::{ca_tree, keep_logs, pair, pid_stats, settle, start_agent, Row, Sshd};

/// How many files later the writer deletes a file it created.
const LAG: usize = 64;

/// The longest a tail may take before the run gives up on it.
const TAIL_LIMIT: Duration = Duration::from_secs(300);

/// The burst sizes: `BENCH_BURST_FILES=N[,N...]`, or `default`.
pub fn sizes(default: &[usize]) -> Vec<usize> {
    std::env::var("BENCH_BURST_FILES")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// What one burst took.
struct Burst {
    /// From the first write until the last, in seconds.
    writing: f64,
    /// From the last write until the target equalled the source, in
    /// seconds; `None` when it did not within [`TAIL_LIMIT`].
    tail: Option<f64>,
    /// How long the listing that matched took, in seconds.
    listing: f64,
}

fn rel(i: usize) -> String {
    format!("signed/{:02}/burst{i:06}.example.com.pem", i % 64)
}

fn body(i: usize) -> Vec<u8> {
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        "MIIC".repeat(500 + i % 13)
    )
    .into_bytes()
}

/// Names and sizes of the files under `root`, without the replication's
/// temporary files.
fn listing(root: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if !is_temp_name(&e.file_name().to_string_lossy()) {
                let size = e.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
                let path = e.path();
                out.insert(path.strip_prefix(root).unwrap_or(&path).to_path_buf(), size);
            }
        }
    }
    out
}

/// Writes the burst of `n` files into `src` (staging each in `stage`) and
/// times its tail into `dst`.
fn burst(src: &Path, dst: &Path, stage: &Path, n: usize) -> Burst {
    fs::create_dir_all(stage).unwrap();
    for d in 0..64 {
        fs::create_dir_all(src.join(format!("signed/{d:02}"))).unwrap();
    }
    let tmp = stage.join("next.pem");
    let start = Instant::now();
    for i in 0..n {
        fs::write(&tmp, body(i)).unwrap();
        fs::rename(&tmp, src.join(rel(i))).unwrap();
        if i >= LAG && (i - LAG).is_multiple_of(3) {
            fs::remove_file(src.join(rel(i - LAG))).unwrap();
        }
    }
    for j in n.saturating_sub(LAG)..n {
        if j.is_multiple_of(3) {
            fs::remove_file(src.join(rel(j))).unwrap();
        }
    }
    let last = Instant::now();
    let writing = (last - start).as_secs_f64();
    // Cheap checks first, as polls that read both trees would compete with
    // the agents for the CPU: the last file created and the last deleted.
    let last_kept = (0..n).rev().find(|j| !j.is_multiple_of(3)).unwrap_or(0);
    let deadline = last + TAIL_LIMIT;
    while !dst.join(rel(last_kept)).exists() || (n > 0 && dst.join(rel(n - 1 - (n - 1) % 3)).exists()) {
        if Instant::now() > deadline {
            return Burst {
                writing,
                tail: None,
                listing: f64::NAN,
            };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let want = listing(src);
    loop {
        let t = Instant::now();
        let have = listing(dst);
        if have == want {
            return Burst {
                writing,
                tail: Some(last.elapsed().as_secs_f64()),
                listing: t.elapsed().as_secs_f64(),
            };
        }
        if Instant::now() > deadline {
            return Burst {
                writing,
                tail: None,
                listing: t.elapsed().as_secs_f64(),
            };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The load average over the last minute.
fn load() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Runs the scenario for each burst size in `counts`, adds its rows, and
/// returns the note for the table and the clusters (their trees are kept
/// until the run ends).
pub fn run(sshd: &Sshd, work: &Path, counts: &[usize], rows: &mut Vec<Row>) -> (String, Vec<TestCluster>) {
    let mut notes = String::new();
    let mut kept = Vec::new();
    for &n in counts {
        let base = (n / 20).max(10);
        let load_before = load();

        // warmspare: a synced pair, then the burst on the active's tree.
        let c = pair();
        let src = c.ca("a");
        ca_tree(&src, base);
        // Profilers for either side, as for scenario 1 (see benchmarks.md).
        let wrap_b = std::env::var("BENCH_WRAP_PASSIVE").unwrap_or_default();
        let wrap_a = std::env::var("BENCH_WRAP_ACTIVE").unwrap_or_default();
        let mut b = start_agent(&c, "b", &wrap_b);
        let mut a = start_agent(&c, "a", &wrap_a);
        converge(&src, &c.ca("b"), Duration::from_secs(600));
        let batches = |a: &warmspare_tests::Agent| a.log_text().matches("batch replicated").count();
        let batches_before = batches(&a);
        // Each agent's CPU time over the burst and its tail (NaN under a
        // wrapper, whose process is not the agent's).
        let cpu = |agent: &warmspare_tests::Agent, wrapped: bool| {
            agent
                .pid()
                .filter(|_| !wrapped)
                .map_or(f64::NAN, |pid| pid_stats(pid).1)
        };
        let cpu_before = (cpu(&a, !wrap_a.is_empty()), cpu(&b, !wrap_b.is_empty()));
        settle();
        let ws = burst(&src, &c.ca("b"), &c.dir.path().join("stage"), n);
        let cpu_used = (
            cpu(&a, !wrap_a.is_empty()) - cpu_before.0,
            cpu(&b, !wrap_b.is_empty()) - cpu_before.1,
        );
        converge(&src, &c.ca("b"), Duration::from_secs(120));
        let batches_burst = batches(&a) - batches_before;
        keep_logs(&format!("burst-{n}"), &a, &b);
        if !wrap_a.is_empty() || !wrap_b.is_empty() {
            // A profiler writes its report when the agent exits cleanly.
            for pid in [a.pid(), b.pid()].into_iter().flatten() {
                let _ = std::process::Command::new("pkill")
                    .args(["-TERM", "-P", &pid.to_string()])
                    .status();
            }
            a.terminate();
            b.terminate();
        }
        drop((a, b));
        println!(
            "burst of {n} files: warmspare wrote in {:.2} s, tail {} (listing {:.0} ms), {batches_burst} batches, \
             CPU of the active {:.2} s and of the passive {:.2} s",
            ws.writing,
            ws.tail.map_or("none".into(), |t| format!("{t:.3} s")),
            ws.listing * 1000.0,
            cpu_used.0,
            cpu_used.1
        );

        // The same burst under lsyncd.
        let lsrc = work.join(format!("burst-lsyncd-src-{n}"));
        ca_tree(&lsrc, base);
        let ldst = work.join(format!("burst-lsyncd-dst-{n}"));
        let ls = Lsyncd::start(sshd, work, &format!("burst-lsyncd-{n}"), &lsrc, &ldst).map(|l| {
            settle();
            let r = burst(&lsrc, &ldst, &work.join(format!("burst-lsyncd-stage-{n}")), n);
            drop(l);
            r
        });
        if let Some(l) = &ls {
            println!(
                "burst of {n} files: lsyncd's writer took {:.2} s, tail {}",
                l.writing,
                l.tail.map_or("none".into(), |t| format!("{t:.3} s"))
            );
        }

        // One rsync of the final tree into an empty directory.
        let rdst = work.join(format!("burst-rsync-{n}"));
        fs::create_dir_all(&rdst).unwrap();
        settle();
        let (rsync_s, _) = sshd.rsync(&src, &rdst, &[]);

        let scenario = format!("8. burst of {n} files, every third deleted");
        let (ls_tail, ls_writing) = ls
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |l| (l.tail.unwrap_or(f64::NAN), l.writing));
        for (measure, value, other, other_name, unit, target) in [
            (
                "tail after the last write",
                ws.tail.unwrap_or(f64::NAN),
                ls_tail,
                "lsyncd",
                "s",
                if n <= 20_000 { "<= 1 s" } else { "(report)" },
            ),
            (
                "tail after the last write",
                ws.tail.unwrap_or(f64::NAN),
                rsync_s,
                "one rsync of the final tree",
                "s",
                "",
            ),
            (
                "write duration",
                ws.writing,
                ls_writing,
                "same writer under lsyncd",
                "s",
                "",
            ),
            ("batches", batches_burst as f64, f64::NAN, "-", "batches", ""),
            ("CPU time of the active agent", cpu_used.0, f64::NAN, "-", "s", ""),
            ("CPU time of the passive agent", cpu_used.1, f64::NAN, "-", "s", ""),
        ] {
            rows.push(Row {
                scenario: scenario.clone(),
                measure: measure.into(),
                warmspare: value,
                best_other: other,
                other_name: other_name.into(),
                unit,
                target: target.into(),
            });
        }
        notes += &format!(
            "\n8. Burst of {n} files: load average {load_before} before, {} after.\n",
            load()
        );
        kept.push(c);
    }
    (notes, kept)
}
