//! Scenario 5: the footprint of the active agent watching a large tree
//! (its footprint while shipping is measured in scenario 1's rounds, in
//! `main`).
//!
//! For each tree size (`BENCH_IDLE_FILES=N[,N...]`, 100,000 by default):
//!
//! 1. the initial sync of a fresh tree of that many certificate-sized files
//!    (scenario 1's tree, larger), against `rsync -a` over ssh into an empty
//!    directory, one after the other (rsync first);
//! 2. the active's resident memory once its initial full comparison is over
//!    and it is idle, in `idle_runs` runs (`BENCH_IDLE_RUNS=N`): the agent
//!    that made the initial sync, then fresh agents, each started anew on the
//!    synced pair (which compare the trees in full, as after any restart);
//!    the table shows the largest, the output every run and what each is
//!    made of (`/proc/PID/smaps_rollup`);
//! 3. its CPU over `idle_secs` of idling (first run only;
//!    `BENCH_IDLE_SECS=N` sets another length);
//! 4. one full comparison of the unchanged tree (`warmsparectl resync`, the
//!    periodic safety net's work): the active's CPU time (utime + stime from
//!    `/proc/PID/stat` before and after, the end seen in its log) and its
//!    wall time, against a no-op `rsync -a --delete` of the same tree into
//!    rsync's copy.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, Agent, TestCluster};

use super::{arrived, ca_tree, pair, pid_stats, settle, start_agent, Row, Sizes, Sshd};

/// The resident memory target at 100,000 files, in MiB.
const TARGET_MIB: f64 = 48.0;

/// How long a fresh agent of the later runs idles before it is measured,
/// after its full comparison ended.
const SETTLE: Duration = Duration::from_secs(5);

/// The longest an initial sync or a full comparison may take.
const LIMIT: Duration = Duration::from_secs(3600);

/// The tree sizes: `BENCH_IDLE_FILES=N[,N...]`, or `default`.
pub fn sizes(default: usize) -> Vec<usize> {
    std::env::var("BENCH_IDLE_FILES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![default])
}

/// Scenario 5's idle half, at every size of [`sizes`]. Returns the pairs,
/// whose trees are deleted when the run ends.
pub fn run(sshd: &Sshd, work: &Path, sizes: &Sizes, rows: &mut Vec<Row>) -> Vec<TestCluster> {
    let runs = std::env::var("BENCH_IDLE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(sizes.idle_runs)
        .max(1);
    let idle_secs = std::env::var("BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(sizes.idle_secs);
    let mut kept = Vec::new();
    let mut curve: Vec<(usize, f64)> = Vec::new();
    for files in self::sizes(sizes.idle_files) {
        let (c, rss) = one_size(sshd, work, idle_secs, files, runs, rows);
        curve.push((files, rss));
        kept.push(c);
    }
    // The cost of one more file: the slope between successive sizes.
    for pair in curve.windows(2) {
        let ((n0, m0), (n1, m1)) = (pair[0], pair[1]);
        rows.push(Row {
            scenario: format!("5. idle, from {n0} to {n1} files"),
            measure: "resident memory per added file".into(),
            warmspare: (m1 - m0) * 1024.0 * 1024.0 / (n1 - n0) as f64,
            best_other: f64::NAN,
            other_name: "-".into(),
            unit: "B",
            target: String::new(),
        });
    }
    kept
}

/// What the active holds, from `/proc/PID/smaps_rollup`, in KiB: resident,
/// anonymous (heap, stacks), and file-backed (resident less anonymous).
fn rollup(pid: u32) -> (u64, u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (rss, anon) = (field("Rss:"), field("Anonymous:"));
    (rss, anon, rss.saturating_sub(anon))
}

/// Counts the full comparisons the active finished, from its log (which
/// says so at `info`; appended to across restarts), reading only what was
/// added since the last look: at debug level the log has a line per file
/// shipped. Read from the log rather than from `status`: a status request
/// walks the watched tree to count its files, which would add to the very
/// CPU time measured.
#[derive(Default)]
struct Comparisons {
    read: u64,
    seen: usize,
    /// An incomplete last line, kept for the next look.
    partial: String,
}

impl Comparisons {
    fn count(&mut self, a: &Agent) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = fs::File::open(&a.log) else {
            return self.seen;
        };
        let mut added = Vec::new();
        if f.seek(SeekFrom::Start(self.read)).is_ok() && f.read_to_end(&mut added).is_ok() {
            self.read += added.len() as u64;
            self.partial.push_str(&String::from_utf8_lossy(&added));
            let complete = self.partial.rfind('\n').map_or(0, |i| i + 1);
            self.seen += self.partial[..complete].matches("compared in full").count();
            self.partial.drain(..complete);
        }
        self.seen
    }

    /// Waits until the active has finished more than `before` full
    /// comparisons.
    fn wait_past(&mut self, a: &Agent, before: usize) {
        let deadline = Instant::now() + LIMIT;
        while self.count(a) <= before {
            assert!(Instant::now() < deadline, "timed out waiting for a full comparison");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The idle measurement of one tree size. Returns the pair and the largest
/// resident memory of the runs, in MiB.
fn one_size(
    sshd: &Sshd,
    work: &Path,
    idle_secs: u64,
    files: usize,
    runs: usize,
    rows: &mut Vec<Row>,
) -> (TestCluster, f64) {
    let c = pair();
    let src = c.ca("a");
    let made = Instant::now();
    ca_tree(&src, files);
    println!("idle {files}: tree written in {:.1} s", made.elapsed().as_secs_f64());
    // The anchor of the initial sync: rsync into an empty directory.
    let mirror = work.join(format!("rsync-idle-{files}"));
    fs::create_dir_all(&mirror).unwrap();
    settle();
    let (rsync_s, _) = sshd.rsync(&src, &mirror, &[]);
    settle();
    // Profiling knob (docs/benchmarks.md): a wrapper for the active such
    // as `valgrind --tool=massif` (first run only).
    let wrapper = std::env::var("BENCH_WRAP_ACTIVE").unwrap_or_default();
    let _b = start_agent(&c, "b", "");
    let start = Instant::now();
    let mut a = start_agent(&c, "a", &wrapper);
    arrived(&src, &c.ca("b"), files);
    let ws_s = start.elapsed().as_secs_f64();
    println!("idle {files}: initial sync rsync {rsync_s:.2} s, warmspare {ws_s:.2} s");
    converge(&src, &c.ca("b"), LIMIT);
    let mut done = Comparisons::default();
    done.wait_past(&a, 0);
    rows.push(Row {
        scenario: format!("5. initial sync, {files} files"),
        measure: "time".into(),
        warmspare: ws_s,
        best_other: rsync_s,
        other_name: "rsync".into(),
        unit: "s",
        target: "report".into(),
    });
    // Run 1: the agent that made the initial sync, idle.
    let pid = a.pid().unwrap();
    let (_, cpu0) = pid_stats(pid);
    std::thread::sleep(Duration::from_secs(idle_secs).max(Duration::from_millis(100)));
    let (_, cpu1) = pid_stats(pid);
    let mut mib = vec![sample(files, 1, pid)];
    // One full comparison of the unchanged tree, and a no-op rsync.
    let before = done.count(&a);
    let (_, cpu2) = pid_stats(pid);
    let t = Instant::now();
    let out = c.ctl(&["resync"]);
    assert!(out.status.success(), "resync: {}", String::from_utf8_lossy(&out.stderr));
    done.wait_past(&a, before);
    let full_wall = t.elapsed().as_secs_f64();
    let (_, cpu3) = pid_stats(pid);
    let (noop_s, _) = sshd.rsync(&src, &mirror, &["--delete"]);
    println!(
        "idle {files}: full comparison CPU {:.2} s, wall {full_wall:.2} s; no-op rsync {noop_s:.2} s",
        cpu3 - cpu2
    );
    mib.push(sample(files, 1, pid));
    if !wrapper.is_empty() {
        // A profiler writes its report when the agent exits cleanly.
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let gone = Instant::now() + Duration::from_secs(300);
        while Path::new(&format!("/proc/{pid}/exe")).exists() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Runs 2..: fresh agents on the synced pair.
    for run in 2..=runs {
        a.terminate();
        let before = done.count(&a);
        a = start_agent(&c, "a", "");
        done.wait_past(&a, before);
        std::thread::sleep(SETTLE);
        mib.push(sample(files, run, a.pid().unwrap()));
    }
    let worst = mib.iter().copied().fold(0.0, f64::max);
    let name = format!("5. idle, watching {files} files");
    let target = |t: &str| if files == 100_000 { t.to_string() } else { String::new() };
    rows.push(Row {
        scenario: name.clone(),
        measure: format!("resident memory, largest of {runs} run(s)"),
        warmspare: worst,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "MiB",
        target: target(&format!("<= {TARGET_MIB} MiB")),
    });
    rows.push(Row {
        scenario: name.clone(),
        measure: "resident memory per file".into(),
        warmspare: worst * 1024.0 * 1024.0 / files as f64,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "B",
        target: String::new(),
    });
    rows.push(Row {
        scenario: name.clone(),
        measure: format!("CPU over {} s", idle_secs),
        warmspare: (cpu1 - cpu0) / (idle_secs.max(1) as f64) * 100.0,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "%",
        target: "near 0".into(),
    });
    rows.push(Row {
        scenario: name.clone(),
        measure: "full comparison, unchanged: CPU of the active".into(),
        warmspare: cpu3 - cpu2,
        best_other: f64::NAN,
        other_name: "-".into(),
        unit: "s",
        target: if files == 100_000 {
            "<= 1 s".into()
        } else {
            "report".into()
        },
    });
    rows.push(Row {
        scenario: name,
        measure: "full comparison, unchanged: time".into(),
        warmspare: full_wall,
        best_other: noop_s,
        other_name: "no-op rsync".into(),
        unit: "s",
        target: String::new(),
    });
    (c, worst)
}

/// Prints and returns the resident memory of `pid` (MiB), with its parts.
fn sample(files: usize, run: usize, pid: u32) -> f64 {
    let (rss, anon, file) = rollup(pid);
    let (status_rss, _) = pid_stats(pid);
    let rss = if rss == 0 { status_rss } else { rss };
    println!(
        "idle {files}, run {run}: resident {:.2} MiB: anonymous {:.2} MiB, file-backed {:.2} MiB",
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    rss as f64 / 1024.0
}
