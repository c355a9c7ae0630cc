//! Scenario 7: automatic failover through etcd. Three real etcd members on
//! loopback (the harness's [`EtcdCluster`]) and two release agents with an
//! `[etcd]` table. In each round a writer puts numbered certificates on the
//! active, one every 20 ms; the active agent is killed with SIGKILL; the
//! bench times the kill until the passive answers 200 on `/_status/check`
//! (polled every 10 ms) and then counts what the new active holds.
//!
//! "Acknowledged" is what the killed active's log says the passive
//! committed: the agents run at the tests' log level, where the active logs
//! `file shipped` for each file it sends and `batch replicated` only once
//! the passive acknowledged every commit of the batch (its `Committed`
//! replies). The files named before the last `batch replicated` line are
//! acknowledged; the agent logs to stderr unbuffered, so a kill can only
//! cost the last line, which makes the count smaller, never larger. Lost
//! writes are acknowledged files missing (or different) on the new active:
//! there must be none. Files written but not acknowledged may be missing:
//! the window between the writer's rename and the passive's commit.
//!
//! An [`ActiveGuard`] polls both nodes every 10 ms for the whole round:
//! never two 200s in one poll round.

use std::collections::BTreeSet;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmspare_tests::{http_status, read, wait_until, ActiveGuard, ClusterOptions, EtcdCluster, TestCluster, CA_WATCH};

use super::{percentile, Row};

/// The lease and loop timings of the `[etcd]` table, in seconds.
#[derive(Clone, Copy)]
pub struct Timing {
    ttl: u64,
    loop_wait: u64,
    retry_timeout: u64,
}

impl Timing {
    /// The e2e tests' scaled-down timings (ttl 6 s, loop_wait 1 s,
    /// retry_timeout 2 s), or `BENCH_FAILOVER_TIMING=ttl,loop_wait,retry_timeout`.
    pub fn from_env() -> Timing {
        let given: Vec<u64> = std::env::var("BENCH_FAILOVER_TIMING")
            .unwrap_or_default()
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        match given[..] {
            [ttl, loop_wait, retry_timeout] => Timing {
                ttl,
                loop_wait,
                retry_timeout,
            },
            _ => Timing {
                ttl: 6,
                loop_wait: 1,
                retry_timeout: 2,
            },
        }
    }

    fn describe(&self) -> String {
        format!(
            "ttl {} s, loop_wait {} s, retry_timeout {} s",
            self.ttl, self.loop_wait, self.retry_timeout
        )
    }
}

/// What one round counted.
struct Round {
    /// From the kill until the passive answered 200, in seconds.
    takeover: f64,
    /// Files whose rename into the active's tree finished before the kill.
    written: usize,
    /// Of those, the ones the active's log shows the passive acknowledged.
    acknowledged: usize,
    /// Files whole on the new active (a subset of `written`).
    on_b: usize,
    /// Acknowledged files missing or different on the new active.
    lost: usize,
    /// Written, never acknowledged, and missing on the new active.
    unacknowledged_missing: usize,
    /// Poll rounds of the guard, and in how many exactly one node answered 200.
    guard_rounds: u64,
    guard_one_active: u64,
}

fn body(round: usize, i: usize) -> Vec<u8> {
    format!(
        "-----BEGIN CERTIFICATE-----\nround {round} file {i}\n{}\n-----END CERTIFICATE-----\n",
        "MIIB".repeat(500)
    )
    .into_bytes()
}

fn name(i: usize) -> String {
    format!("failover/host{i:05}.pem")
}

/// Runs `rounds` rounds and adds the scenario's rows; `Err` says why it
/// could not run (no etcd).
pub fn run(rounds: usize, rows: &mut Vec<Row>) -> Result<String, String> {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v etcd"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err("no etcd (apt-get install etcd-server)".into());
    }
    let timing = Timing::from_env();
    let etcd = EtcdCluster::start();
    let mut done = Vec::new();
    for round in 0..rounds {
        let r = one_round(&etcd, timing, round);
        println!(
            "failover, round {}: kill to new active {:.0} ms; written {}, acknowledged {}, on the new active {}, \
             lost {}, never acknowledged and missing {}; guard {} polls, {} with one active, none with two",
            round + 1,
            r.takeover * 1000.0,
            r.written,
            r.acknowledged,
            r.on_b,
            r.lost,
            r.unacknowledged_missing,
            r.guard_rounds,
            r.guard_one_active
        );
        done.push(r);
    }
    let scenario = format!("7. failover through etcd, {} kills", done.len());
    let mut takeovers: Vec<f64> = done.iter().map(|r| r.takeover).collect();
    let mut missing: Vec<f64> = done.iter().map(|r| r.unacknowledged_missing as f64).collect();
    let lost: usize = done.iter().map(|r| r.lost).sum();
    let acknowledged: usize = done.iter().map(|r| r.acknowledged).sum();
    let budget = (timing.ttl + timing.loop_wait) as f64;
    for (measure, value, unit, target) in [
        (
            "kill to new active, median",
            percentile(&mut takeovers, 0.5),
            "s",
            format!("<= ttl + loop_wait ({budget} s) + a few s"),
        ),
        (
            "kill to new active, max",
            percentile(&mut takeovers, 1.0),
            "s",
            String::new(),
        ),
        ("acknowledged writes lost, all kills", lost as f64, "files", "0".into()),
        (
            "acknowledged writes, all kills",
            acknowledged as f64,
            "files",
            String::new(),
        ),
        (
            "never acknowledged, missing, median",
            percentile(&mut missing, 0.5),
            "files",
            String::new(),
        ),
        (
            "never acknowledged, missing, max",
            percentile(&mut missing, 1.0),
            "files",
            String::new(),
        ),
    ] {
        rows.push(Row {
            scenario: scenario.clone(),
            measure: measure.into(),
            warmspare: value,
            best_other: f64::NAN,
            other_name: "-".into(),
            unit,
            target,
        });
    }
    assert_eq!(lost, 0, "acknowledged writes were lost in a failover");
    Ok(format!(
        "\n7. Failover: {}; one write every 20 ms; never two nodes answered 200 in any 10 ms poll round.\n",
        timing.describe()
    ))
}

fn one_round(etcd: &EtcdCluster, timing: Timing, round: usize) -> Round {
    // One etcd for every round; each round's pair has a prefix of its own.
    let table = etcd.toml(&format!(
        "prefix = \"/warmspare/bench{round}\"\nttl = \"{}s\"\nloop_wait = \"{}s\"\nretry_timeout = \"{}s\"",
        timing.ttl, timing.loop_wait, timing.retry_timeout
    ));
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!("[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\n\n{table}"),
        ..Default::default()
    });
    let check = |node: &str| http_status(c.node(node).http_port, "/_status/check");
    // The tests' log level: the active names every file it ships.
    let mut a = c.start("a");
    let b = c.start("b");
    wait_until("a active through etcd", Duration::from_secs(60), || {
        check("a") == Some(200)
    });
    wait_until("b answering as a passive", Duration::from_secs(60), || {
        check("b") == Some(503)
    });
    c.wait_linked("a", Duration::from_secs(60));
    // A passive that has not caught up since it started is not eligible.
    c.wait_caught_up("b", Duration::from_secs(60));
    let guard = ActiveGuard::start(&[("a", c.node("a").http_port), ("b", c.node("b").http_port)]);

    let (src, dst) = (c.ca("a"), c.ca("b"));
    let stage = c.dir.path().join("stage");
    fs::create_dir_all(&stage).unwrap();
    fs::create_dir_all(src.join("failover")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, written, src) = (stop.clone(), written.clone(), src.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                // Whole files, by rename, as the CA writes them.
                let tmp = stage.join("next");
                fs::write(&tmp, body(round, i)).unwrap();
                fs::rename(&tmp, src.join(name(i))).unwrap();
                i += 1;
                written.store(i, Ordering::SeqCst);
                let next = start + Duration::from_millis(20 * i as u64);
                if let Some(rest) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
            }
        })
    };
    // Write for 1.5-2.5 s, a different time each round, so that the kill
    // falls at different points of the lease's renewal cycle.
    let writing = Duration::from_millis(1500 + (round as u64 * 337) % 1000);
    std::thread::sleep(writing);
    let first_arrived = Instant::now() + Duration::from_secs(30);
    while !dst.join(name(0)).exists() {
        if Instant::now() > first_arrived {
            // What both agents said about the round's first file and the
            // directory it is in, and every warning: the tail printed on
            // failure starts long after them.
            let first = name(0);
            for (who, log) in [("a", a.log_text()), ("b", b.log_text())] {
                for line in log.lines().filter(|l| {
                    l.contains(&first) || l.contains("\"failover\"") || l.contains("WARN") || l.contains("ERROR")
                }) {
                    eprintln!("{who}: {line}");
                }
                eprintln!("{who}: first lines after start:");
                for line in log.lines().take(40) {
                    eprintln!("{who}: {line}");
                }
            }
            let on_b: Vec<String> = fs::read_dir(dst.join("failover"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .take(5)
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "timed out after 30s waiting for some files on b before the kill; b's failover/ starts with {on_b:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let written_before = written.load(Ordering::SeqCst);
    a.kill9();
    let killed = Instant::now();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    let limit = Duration::from_secs(timing.ttl + timing.loop_wait + 30);
    let took = loop {
        let poll = Instant::now();
        if check("b") == Some(200) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < limit, "b not active {limit:?} after the kill");
        if let Some(rest) = Duration::from_millis(10).checked_sub(poll.elapsed()) {
            std::thread::sleep(rest);
        }
    };
    // The guard keeps watching a moment after the takeover.
    std::thread::sleep(Duration::from_millis(500));
    let report = guard.finish();

    let acked = acknowledged(&a.log_text());
    let whole = |i: usize| read(&dst.join(name(i))).as_deref() == Some(body(round, i).as_slice());
    let on_b = (0..written_before).filter(|&i| whole(i)).count();
    let acked_i: BTreeSet<usize> = (0..written_before).filter(|i| acked.contains(&name(*i))).collect();
    let lost = acked_i.iter().filter(|&&i| !whole(i)).count();
    let unacknowledged_missing = (0..written_before)
        .filter(|i| !acked_i.contains(i) && !whole(*i))
        .count();
    drop(b);
    Round {
        takeover: took.as_secs_f64(),
        written: written_before,
        acknowledged: acked_i.len(),
        on_b,
        lost,
        unacknowledged_missing,
        guard_rounds: report.rounds,
        guard_one_active: report.one_active,
    }
}

/// The paths named in `file shipped` lines before the last `batch
/// replicated` line of an active's log.
fn acknowledged(log: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = log.lines().collect();
    let Some(last) = lines.iter().rposition(|l| l.contains("batch replicated")) else {
        return BTreeSet::new();
    };
    lines[..last]
        .iter()
        .filter(|l| l.contains("file shipped"))
        .filter_map(|l| Some(l.split("path=\"").nth(1)?.split('"').next()?.to_string()))
        .collect()
}
