//! Benchmarks: warmspare against rsync over ssh (and lsyncd) on loopback.
//!
//! `cargo run --release -p warmspare-tests --bin bench -- all` runs every
//! scenario at full size; `smoke` runs them at the smallest sizes (CI uses it
//! to check that the harness works). The run sets up a throwaway OpenSSH
//! server with its own keys and port, and a warmspare pair, in a temporary
//! directory; it prints one table and writes it as Markdown to
//! `target/bench/results.md`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic, missing_docs)]

use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distance::Emulation;
use warmspare_tests::faults::NetLink;

mod burst;
mod distance;
mod failover;
mod footprint;
mod large;
mod lsyncd;
mod relay;
mod scratch;
use warmspare_tests::{converge, free_port, read, write_file, Agent, ClusterOptions, TestCluster, CA_WATCH};

struct Sizes {
    files: usize,
    events: usize,
    big: usize,
    idle_files: usize,
    idle_secs: u64,
    /// Runs of scenario 5's idle measurement, each with a fresh agent.
    idle_runs: usize,
    /// Rounds of scenarios 1, 3 and 4 (the table shows the medians).
    rounds: usize,
    /// Rounds of scenario 7 (kill -9 of the active, failover through etcd).
    failovers: usize,
    /// Files of scenario 8's bursts, one burst per entry.
    bursts: &'static [usize],
}

const FULL: Sizes = Sizes {
    files: 20_000,
    events: 200,
    big: 256 << 20,
    idle_files: 100_000,
    idle_secs: 60,
    idle_runs: 5,
    rounds: 3,
    failovers: 10,
    bursts: &[20_000, 100_000],
};
const SMOKE: Sizes = Sizes {
    files: 200,
    events: 10,
    big: 4 << 20,
    idle_files: 1_000,
    idle_secs: 2,
    idle_runs: 1,
    rounds: 1,
    failovers: 1,
    bursts: &[300],
};

/// A throwaway sshd on loopback, with a client key that may log in.
struct Sshd {
    child: Child,
    host: String,
    port: u16,
    key: PathBuf,
    /// The relay in front of it, for scenario 6 (delay, rate, bytes).
    relay: Option<relay::Relay>,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        Sshd::start_at(dir, "127.0.0.1", None, None)
    }

    /// An sshd listening on `host`, inside the network namespace `netns` if
    /// given; with `relay` (and a namespace), reached through a relay of
    /// that shape on the same address and port in this namespace.
    fn start_at(dir: &Path, host_addr: &str, netns: Option<&str>, relay: Option<relay::Shape>) -> Sshd {
        fs::create_dir_all(dir).unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        let (host, key) = (dir.join("host_key"), dir.join("client_key"));
        for k in [&host, &key] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = free_port();
        let cfg = dir.join("sshd_config");
        fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress {host_addr}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                host.display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/sbin/sshd"]);
                c
            }
            None => Command::new("/usr/sbin/sshd"),
        };
        let child = cmd
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Sshd {
            child,
            host: host_addr.to_string(),
            port,
            key,
            relay: netns
                .zip(relay)
                .map(|(ns, shape)| relay::Relay::start_shaped(host_addr, port, ns, shape)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.ssh(&["true"]).status().unwrap().success() {
            assert!(Instant::now() < deadline, "sshd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn ssh_args(&self) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            self.port,
            self.key.display()
        )
    }

    fn ssh(&self, remote: &[&str]) -> Command {
        let args = self.ssh_args();
        let mut parts = args.split_whitespace();
        let mut c = Command::new(parts.next().unwrap());
        c.args(parts)
            .arg(&self.host)
            .args(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// `tar -C SRC -cf - . | ssh HOST 'tar -C DST -xf -'`: the raw copy
    /// stream, the ceiling of an initial sync; returns seconds.
    fn tar_stream(&self, src: &Path, dst: &Path) -> f64 {
        let start = Instant::now();
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(src)
            .args(["-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let remote = format!("tar -C {} -xf -", dst.display());
        let ok = self.ssh(&[&remote]).stdin(tar.stdout.take().unwrap()).status().unwrap();
        let tar_ok = tar.wait().unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert!(ok.success() && tar_ok.success(), "tar | ssh | tar failed");
        secs
    }

    /// `rsync -a --delete SRC/ DST/` over this sshd; returns (seconds, bytes sent).
    fn rsync(&self, src: &Path, dst: &Path, extra: &[&str]) -> (f64, u64) {
        let start = Instant::now();
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats", "-e", &self.ssh_args()])
            .args(extra)
            .arg(format!("{}/", src.display()))
            .arg(format!("{}:{}/", self.host, dst.display()))
            .output()
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "rsync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let sent = text
            .lines()
            .find(|l| l.starts_with("Total bytes sent:"))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().replace(',', "").parse().unwrap_or(0))
            .unwrap_or(0);
        (secs, sent)
    }
}

/// A pair with the product's defaults (no `debounce_ms`: the leading edge).
fn pair() -> TestCluster {
    pair_at(Vec::new())
}

/// A pair watching the CA directory, its nodes listening on `hosts`
/// (127.0.0.1 for a node not named).
fn pair_at(hosts: Vec<(&'static str, String)>) -> TestCluster {
    TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!("[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\n"),
        hosts,
        ..Default::default()
    })
}

/// A round's trees: a fresh CA tree of `files` files on `c`'s node a, and
/// an empty directory `work/<name>` for rsync to fill.
fn round_trees(c: &TestCluster, work: &Path, name: &str, files: usize) -> (PathBuf, PathBuf) {
    let src = c.ca("a");
    ca_tree(&src, files);
    let dst = work.join(name);
    fs::create_dir_all(&dst).unwrap();
    (src, dst)
}

/// Writes back every dirty page, so that no timed run pays for an earlier
/// one's writes.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Waits until files deleted before this run slow down creating new ones
/// less (only with `BENCH_FS=here`: a full run otherwise makes a fresh
/// file system with a journal, see `scratch`). On ext4 without a journal (as on the machine these figures come
/// from), the inode allocator passes over every free inode whose deletion
/// time is recent, reading its table block for each candidate, on every
/// allocation: "recent" is 60 s, or 360 s when that table block is dirty
/// (`RECENTCY_MIN` and `RECENTCY_DIRTY` in the kernel's `fs/ext4/ialloc.c`;
/// older kernels had 5 s for the first). With each round's trees deleted before
/// the next, warmspare's rounds took 1.76, 3.88 and 5.18 s against rsync's
/// 1.22-2.13 s, with 75% of the receiver's samples under `recently_deleted`
/// (`perf`). So nothing is deleted between timed runs (trees are kept until
/// the run ends), and a full run starts with `sync` and 65 s of quiet
/// (`BENCH_QUIET=SECONDS` sets another), which covers deletions whose table
/// blocks stay clean; those that a new file's inode dirties again count for
/// 360 s, so runs closer together than that still share some of the cost.
fn forget_deletions() {
    settle();
    let secs = std::env::var("BENCH_QUIET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(65);
    println!("waiting {secs} s so that earlier deletions slow down file creation less");
    std::thread::sleep(Duration::from_secs(secs));
}

fn ca_tree(root: &Path, n: usize) {
    for i in 0..n {
        let body = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "MIIB".repeat(500 + i % 13)
        );
        write_file(
            &root.join(format!("signed/{:02}/host{i:06}.example.com.pem", i % 64)),
            body.as_bytes(),
            0o644,
        );
    }
    write_file(&root.join("serial"), format!("{n:08X}\n").as_bytes(), 0o644);
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() && !warmspare_shared::relpath::is_temp_name(&e.file_name().to_string_lossy()) => {
                    n += 1
                }
                _ => {}
            }
        }
    }
    n
}

/// Returns once `dst` holds as many files as the [`ca_tree`] of `files`
/// files at `src`. The loop must not compete with the agents for the CPU
/// (a [`converge`] reads and hashes both whole trees at every poll): it
/// stats the last file in shipping order, and walks the tree only then.
/// The caller compares the trees in full afterwards, untimed.
fn arrived(src: &Path, dst: &Path, files: usize) {
    let want = count_files(src);
    let last_i = (0..files).rev().find(|i| i % 64 == 63).unwrap_or(0);
    let last = dst.join(format!("signed/63/host{last_i:06}.example.com.pem"));
    wait(Duration::from_secs(600), || last.exists());
    let deadline = Instant::now() + Duration::from_secs(600);
    while count_files(dst) != want {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// With `BENCH_KEEP_LOGS=DIR`, writes both agents' logs to
/// `DIR/<scenario>-a.log` and `DIR/<scenario>-b.log`.
/// Starts node `name` of `c` under `wrapper` (a profiler, or nothing), at
/// the agent's default log level: a user runs it at `info`, and a per-file
/// debug line costs the sender CPU that the receiver needs on a small
/// machine. `BENCH_LOG` sets another filter (`info,warmspare_agent=debug`
/// for the tests' level).
fn start_agent(c: &TestCluster, name: &str, wrapper: &str) -> Agent {
    let level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
    c.start_wrapped(
        name,
        &[("RUST_LOG", &level)],
        &wrapper.split_whitespace().collect::<Vec<_>>(),
    )
}

fn keep_logs(scenario: &str, a: &Agent, b: &Agent) {
    if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
        let _ = fs::create_dir_all(&dir);
        for (n, agent) in [("a", a), ("b", b)] {
            let _ = fs::write(Path::new(&dir).join(format!("{scenario}-{n}.log")), agent.log_text());
        }
    }
}

/// One round of scenario 1: a fresh tree, rsync into an empty directory and
/// a fresh warmspare pair, in the order `round` picks. Returns the seconds of
/// rsync and of warmspare, and the pair: the caller keeps its trees until the
/// end of the run (see [`forget_deletions`]).
/// What the active agent used while it shipped one round of scenario 1:
/// its peak resident memory (MiB) and CPU time (s) from its start until
/// the passive held every file.
struct Shipping {
    peak_mib: f64,
    cpu_s: f64,
}

/// One round of scenario 1: rsync's time, warmspare's time, what the active
/// agent used, and the pair (kept until the run ends).
/// The timed runs of one round of scenario 1, in seconds.
struct InitialRound {
    rsync: f64,
    warmspare: f64,
    /// `tar | ssh | tar` into an empty directory, after the other two.
    tar: f64,
}

fn initial_round(sshd: &Sshd, work: &Path, sizes: &Sizes, round: usize) -> (InitialRound, Shipping, TestCluster) {
    let c = pair();
    let (src, dst) = round_trees(&c, work, &format!("rsync-initial-{round}"), sizes.files);
    // Before each timed run, `sync`: warmspare makes what it applies durable
    // (syncfs for large batches) and must not also pay for writing back the
    // source tree or rsync's output, nor rsync for warmspare's.
    let rsync = || {
        settle();
        sshd.rsync(&src, &dst, &[]).0
    };
    let warmspare = || {
        settle();
        // Profilers for either side, as for scenario 5 (see benchmarks.md).
        let wrap_b = std::env::var("BENCH_WRAP_PASSIVE").unwrap_or_default();
        let wrap_a = std::env::var("BENCH_WRAP_ACTIVE").unwrap_or_default();
        let mut b1 = start_agent(&c, "b", &wrap_b);
        let start = Instant::now();
        let mut a1 = start_agent(&c, "a", &wrap_a);
        arrived(&src, &c.ca("b"), sizes.files);
        let ws = start.elapsed().as_secs_f64();
        // The agent started with the round, so all its CPU time is this
        // round's; its memory's high-water mark is the kernel's (VmHWM).
        let shipping = a1.pid().map_or(
            Shipping {
                peak_mib: f64::NAN,
                cpu_s: f64::NAN,
            },
            |pid| Shipping {
                peak_mib: peak_rss_kb(pid) as f64 / 1024.0,
                cpu_s: pid_stats(pid).1,
            },
        );
        converge(&src, &c.ca("b"), Duration::from_secs(120));
        keep_logs("initial", &a1, &b1);
        if !wrap_a.is_empty() || !wrap_b.is_empty() {
            // A profiler writes its report when the agent exits cleanly.
            for pid in [a1.pid(), b1.pid()].into_iter().flatten() {
                let _ = Command::new("pkill").args(["-TERM", "-P", &pid.to_string()]).status();
            }
            a1.terminate();
            b1.terminate();
        }
        (ws, shipping)
    };
    let (r, (w, shipping)) = in_turn(round, rsync, warmspare);
    let tar_dst = work.join(format!("tar-initial-{round}"));
    fs::create_dir_all(&tar_dst).unwrap();
    settle();
    let tar = sshd.tar_stream(&src, &tar_dst);
    let times = InitialRound {
        rsync: r,
        warmspare: w,
        tar,
    };
    (times, shipping, c)
}

/// Runs a round's two timed runs, rsync first in even rounds and warmspare
/// first in odd ones: whichever goes second creates its files where the
/// first has taken the fresh inodes (see [`forget_deletions`]).
fn in_turn<R, W>(round: usize, rsync: impl FnOnce() -> R, warmspare: impl FnOnce() -> W) -> (R, W) {
    if round.is_multiple_of(2) {
        let r = rsync();
        (r, warmspare())
    } else {
        let w = warmspare();
        (rsync(), w)
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One row of the results table.
struct Row {
    scenario: String,
    measure: String,
    warmspare: f64,
    best_other: f64,
    other_name: String,
    unit: &'static str,
    target: String,
}

/// The peak resident memory of process `pid` so far, in KiB (VmHWM).
fn peak_rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn pid_stats(pid: u32) -> (u64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (rss_kb, ticks / 100.0)
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let sizes = match which.as_str() {
        "all" => FULL,
        "smoke" => SMOKE,
        other => {
            eprintln!("usage: bench all|smoke (got {other:?})");
            std::process::exit(2);
        }
    };
    for tool in ["rsync", "ssh-keygen", "/usr/sbin/sshd"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            eprintln!("{tool} is missing: apt-get install rsync openssh-server lsyncd");
            std::process::exit(2);
        }
    }
    // Optional scenario numbers after the size select a subset: `bench all 1 3`.
    let only: Vec<String> = std::env::args().skip(2).collect();
    let run = |n: &str| only.is_empty() || only.iter().any(|o| o == n);
    // A full run makes a fresh file system of its own (see `scratch`);
    // `BENCH_FS=here` runs in the temporary directory as it is.
    let scratch = if which == "all" && std::env::var("BENCH_FS").as_deref() != Ok("here") {
        // Room for scenario 5's largest tree three times over (the
        // active's, the passive's and rsync's copies).
        let idle_max = footprint::sizes(sizes.idle_files).into_iter().max().unwrap_or(0);
        match scratch::ScratchFs::create(&std::env::temp_dir(), 3 * idle_max) {
            Ok(s) => {
                // The clusters' directories, and so the agents' files, follow.
                std::env::set_var("TMPDIR", s.tmp());
                Some(s)
            }
            Err(why) => {
                eprintln!("no fresh file system for this run ({why}); running in the temporary directory");
                None
            }
        }
    } else {
        None
    };
    let fs_note = match &scratch {
        Some(s) => s.describe(),
        None => format!("the temporary directory as it is ({})", std::env::temp_dir().display()),
    };
    let work = tempfile::Builder::new().prefix("warmspare-bench").tempdir().unwrap();
    let sshd = Sshd::start(&work.path().join("sshd"));
    let mut rows: Vec<Row> = Vec::new();
    // Trees made by timed runs are deleted only when the run ends.
    let mut kept: Vec<TestCluster> = Vec::new();
    if which == "all" && scratch.is_none() {
        forget_deletions();
    }
    // `BENCH_ROUNDS` sets another number of rounds, for comparing builds.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(sizes.rounds);

    // 1. Initial sync of a CA-like tree, in rounds that alternate which tool
    // goes first; the table takes the median of each.
    if run("1") {
        let (mut rsync_times, mut ws_times, mut tar_times) = (Vec::new(), Vec::new(), Vec::new());
        let (mut peaks, mut cpus) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (times, shipping, pair) = initial_round(&sshd, work.path(), &sizes, round);
            let (rsync_s, ws) = (times.rsync, times.warmspare);
            kept.push(pair);
            println!(
                "initial sync, round {}: active agent peak {:.2} MiB, CPU {:.2} s",
                round + 1,
                shipping.peak_mib,
                shipping.cpu_s
            );
            peaks.push(shipping.peak_mib);
            cpus.push(shipping.cpu_s);
            println!(
                "initial sync, round {}: rsync {rsync_s:.2} s, warmspare {ws:.2} s, tar | ssh | tar {:.2} s",
                round + 1,
                times.tar
            );
            rsync_times.push(rsync_s);
            ws_times.push(ws);
            tar_times.push(times.tar);
        }
        let rsync_s = percentile(&mut rsync_times, 0.5);
        let ws = percentile(&mut ws_times, 0.5);
        let tar_s = percentile(&mut tar_times, 0.5);
        rows.push(Row {
            scenario: format!("1. initial sync, {} files", sizes.files),
            measure: "time".into(),
            warmspare: ws,
            best_other: rsync_s,
            other_name: "rsync".into(),
            unit: "s",
            target: "<= 0.8x".into(),
        });
        rows.push(Row {
            scenario: format!("1. initial sync, {} files", sizes.files),
            measure: "time against the raw stream".into(),
            warmspare: ws,
            best_other: tar_s,
            other_name: "tar over ssh".into(),
            unit: "s",
            target: "<= 1.0x".into(),
        });
        // Scenario 5's second half: the footprint while shipping this tree.
        rows.push(Row {
            scenario: format!("5. shipping scenario 1, {} files", sizes.files),
            measure: "peak resident memory".into(),
            warmspare: percentile(&mut peaks, 0.5),
            best_other: f64::NAN,
            other_name: "-".into(),
            unit: "MiB",
            target: String::new(),
        });
        rows.push(Row {
            scenario: format!("5. shipping scenario 1, {} files", sizes.files),
            measure: "CPU time of the active".into(),
            warmspare: percentile(&mut cpus, 0.5),
            best_other: f64::NAN,
            other_name: "-".into(),
            unit: "s",
            target: String::new(),
        });
    }

    // 2. Event latency: certificates written one at a time, 100 ms apart.
    if run("2") {
        let c = pair();
        let src = c.ca("a");
        ca_tree(&src, sizes.files);
        // `BENCH_WRAP_PASSIVE` wraps the passive here too (strace, perf).
        let _b = start_agent(&c, "b", &std::env::var("BENCH_WRAP_PASSIVE").unwrap_or_default());
        let _a = start_agent(&c, "a", "");
        converge(&src, &c.ca("b"), Duration::from_secs(600));
        let mut lat = event_latencies(&src, &c.ca("b"), "new", sizes.events);
        // The old module's way: one whole-tree rsync over ssh per event.
        let mirror = work.path().join("rsync-events");
        fs::create_dir_all(&mirror).unwrap();
        sshd.rsync(&src, &mirror, &[]);
        let mut rlat = Vec::new();
        for i in 0..sizes.events.min(50) {
            let rel = format!("signed/new/rsync{i:04}.pem");
            write_file(&src.join(&rel), b"-----BEGIN CERTIFICATE-----\nR\n", 0o644);
            let (secs, _) = sshd.rsync(&src, &mirror, &["-u"]);
            rlat.push(secs * 1000.0);
        }
        let lsync = lsyncd_latency(&sshd, work.path(), &src, sizes.events.min(50));
        let (p50, p99, max) = (
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            percentile(&mut lat, 1.0),
        );
        let rp50 = percentile(&mut rlat, 0.5);
        let (other, other_p50) = match lsync {
            Some(l) if l < rp50 => ("lsyncd".to_string(), l),
            _ => ("rsync per event".to_string(), rp50),
        };
        for (m, v, t) in [
            ("p50", p50, "<= 5 ms, >= 20x better than lsyncd"),
            ("p90", percentile(&mut lat, 0.9), ""),
            ("p99", p99, "<= 20 ms"),
            ("max", max, ""),
        ] {
            rows.push(Row {
                scenario: format!("2. event latency, {} events", sizes.events),
                measure: m.into(),
                warmspare: v,
                best_other: if m == "p50" { other_p50 } else { f64::NAN },
                other_name: if m == "p50" { other.clone() } else { "-".into() },
                unit: "ms",
                target: t.into(),
            });
        }
        if let Some(l) = lsync {
            eprintln!("lsyncd p50 {l:.1} ms; rsync per event p50 {rp50:.1} ms");
        }
        kept.push(c);
    }

    // 3. Large delta and 4. large new file (see `large`), which run
    // together: asking for either runs both.
    if run("3") || run("4") {
        kept.push(large::run(&sshd, work.path(), &sizes, rounds, &mut rows));
    }

    // 5. Footprint: idle watching (its first half is measured in
    // scenario 1's rounds).
    if run("5") {
        kept.extend(footprint::run(&sshd, work.path(), &sizes, &mut rows));
    }

    // 6. Distance: scenarios 1 and 2 with 25 ms each way between the
    // host's network namespace and one of the passive's own: from `tc netem`
    // on a veth pair where the kernel has netem, else from a delay relay.
    // `BENCH_DISTANCE_RELAY=1` takes the relay even where netem exists;
    // `BENCH_DISTANCE_NO_DELAY=1` runs the veth plumbing without a delay.
    let mut notes = String::new();
    if run("6") {
        match NetLink::create() {
            Err(why) => notes = format!("\n6. Distance: skipped: {why}.\n"),
            Ok(link) => {
                let how = if std::env::var_os("BENCH_DISTANCE_NO_DELAY").is_some() {
                    Emulation::Plain
                } else if std::env::var_os("BENCH_DISTANCE_RELAY").is_none() && link.delay(25).is_ok() {
                    Emulation::Netem
                } else {
                    Emulation::Relay
                };
                notes = format!("\n6. Distance: {}.\n", how.describe());
                kept.extend(distance::run(&link, how, &sizes, rounds, work.path(), &mut rows));
                notes += &distance::compression(&link, &sizes, work.path(), &mut rows);
            }
        }
    }

    // 7. Failover through etcd: kill -9 of the active, `failovers` rounds
    // (`BENCH_FAILOVER_ROUNDS` sets another number).
    if run("7") {
        let n = std::env::var("BENCH_FAILOVER_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(sizes.failovers);
        notes += &failover::run(n, &mut rows).unwrap_or_else(|why| format!("\n7. Failover: skipped: {why}.\n"));
    }

    // 8. Bursts: files created and every third deleted as fast as a writer
    // can, the tail after its last write (`BENCH_BURST_FILES` sets the sizes).
    if run("8") {
        let (note, trees) = burst::run(&sshd, work.path(), &burst::sizes(sizes.bursts), &mut rows);
        notes += &note;
        kept.extend(trees);
    }

    // The table.
    let mut md = String::new();
    let host = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "Machine: {} cores, {host}; run `{which}`; file system: {fs_note}.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(md, "| scenario | measure | warmspare | best other | other | ratio | target |\n| --- | --- | ---: | ---: | --- | ---: | --- |");
    // By scenario number (scenario 1's rounds also measure part of 5),
    // keeping the order within a scenario.
    rows.sort_by_key(|r| {
        r.scenario
            .split('.')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    for r in &rows {
        let ratio = r.warmspare / r.best_other;
        let fmt = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else if v >= 1000.0 {
                format!("{v:.0} {}", r.unit)
            } else {
                format!("{v:.2} {}", r.unit)
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.measure,
            fmt(r.warmspare),
            fmt(r.best_other),
            r.other_name,
            if ratio.is_nan() {
                "-".into()
            } else {
                format!("{ratio:.2}x")
            },
            r.target
        );
    }
    md.push_str(&notes);
    print!("{md}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out_dir).unwrap();
    let mut f = fs::File::create(out_dir.join("results.md")).unwrap();
    f.write_all(md.as_bytes()).unwrap();
    eprintln!("wrote {}", out_dir.join("results.md").display());
}

/// Writes `n` certificates under `src/signed/DIR/`, 100 ms apart, and returns
/// for each the milliseconds from the writer's close until it is whole under
/// `dst`.
fn event_latencies(src: &Path, dst: &Path, dir: &str, n: usize) -> Vec<f64> {
    // Both trees share one file system here, not two machines: with a
    // journal (data=ordered), the receiver's first fsync would otherwise
    // also write back the data of the source tree the harness just made
    // (40 MB; 410 ms in one run), which on a real pair is on the other node.
    settle();
    let mut lat = Vec::new();
    for i in 0..n {
        let rel = format!("signed/{dir}/event{i:04}.pem");
        let data = format!("-----BEGIN CERTIFICATE-----\n{}\n", "E".repeat(2000 + i));
        write_file(&src.join(&rel), data.as_bytes(), 0o644);
        let t = Instant::now();
        let target = dst.join(&rel);
        wait(Duration::from_secs(30), || {
            read(&target).is_some_and(|d| d == data.as_bytes())
        });
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    lat
}

/// lsyncd (delay = 0, rsync over ssh) watching `src`: median latency of `n`
/// new files; `None` when lsyncd is not installed.
fn lsyncd_latency(sshd: &Sshd, work: &Path, src: &Path, n: usize) -> Option<f64> {
    let target = work.join("lsyncd-target");
    let lsyncd = lsyncd::Lsyncd::start(sshd, work, "lsyncd", src, &target)?;
    let mut lat = Vec::new();
    for i in 0..n {
        let rel = format!("signed/new/lsyncd{i:04}.pem");
        write_file(&src.join(&rel), b"-----BEGIN CERTIFICATE-----\nL\n", 0o644);
        let t = Instant::now();
        let dst = target.join(&rel);
        let deadline = t + Duration::from_secs(60);
        while !dst.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(lsyncd);
    Some(percentile(&mut lat, 0.5))
}
