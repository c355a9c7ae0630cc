//! The fault cases: each starts real agents, injects one kind of fault
//! (possibly many times), lets the system recover, and ends with a full
//! comparison of both trees and a scan for leftover temporary files.
//!
//! The same functions run at a small [`Scale`] in the e2e tests and at a
//! large one in the soak command (`tests/soak`), which prints their
//! [`Report`]s.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::{RngExt as _, SeedableRng};
use warmspare_shared::relpath::is_temp_name;

use crate::{converge, noise, snapshot, temp_files, wait_until, write_file, ClusterOptions, TestCluster};

/// How big and how many: the e2e tests and the soak run differ only here.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Size of the large file killed mid-transfer.
    pub big_file: usize,
    /// Files in the many-files sync killed mid-transfer.
    pub files: usize,
    /// Kills per kill case.
    pub kills: usize,
    /// How long a link stays cut.
    pub cut: Duration,
    /// Files created in the burst case.
    pub burst: usize,
    /// Files in the queue overflow case.
    pub overflow_files: usize,
    /// The seed of every random choice (kill moments, contents).
    pub seed: u64,
}

impl Scale {
    /// Small enough for every CI run.
    pub fn ci() -> Scale {
        Scale {
            big_file: 24 << 20,
            files: 3_000,
            kills: 3,
            cut: Duration::from_secs(4),
            burst: 6_000,
            overflow_files: 3_000,
            seed: 1,
        }
    }

    /// The soak run's sizes, as the reliability document quotes them.
    pub fn soak(seed: u64) -> Scale {
        Scale {
            big_file: 256 << 20,
            files: 20_000,
            kills: 50,
            cut: Duration::from_secs(30),
            burst: 100_000,
            overflow_files: 20_000,
            seed,
        }
    }
}

/// What one case did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The case.
    pub case: String,
    /// Faults injected.
    pub faults: usize,
    /// Files (or file versions) checked against the allowed contents while
    /// a fault was in effect.
    pub checked: u64,
    /// Times from the end of a fault to identical trees.
    pub converge: Vec<Duration>,
    /// Files found lost or corrupted (a case panics before reporting one,
    /// so a finished report always says 0).
    pub lost: u64,
    /// Anything else worth printing.
    pub notes: Vec<String>,
}

impl Report {
    fn new(case: &str) -> Report {
        Report {
            case: case.into(),
            ..Report::default()
        }
    }

    /// The longest time to converge.
    pub fn worst(&self) -> Duration {
        self.converge.iter().copied().max().unwrap_or_default()
    }

    /// The median time to converge.
    pub fn median(&self) -> Duration {
        let mut v = self.converge.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

/// Which agent a kill case kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// The passive, while it receives.
    Receiver,
    /// The active, while it sends.
    Sender,
}

/// Under the test runner's 300 s limit, so a hang fails with the logs.
const LIMIT: Duration = Duration::from_secs(240);

fn pair(extra: &str) -> TestCluster {
    TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n{extra}\n",
            crate::CA_WATCH
        ),
        ..Default::default()
    })
}

/// Writes `data` to `path` through a temporary name and a rename, as a
/// careful writer on the active does, so the active's own file is always one
/// complete version.
fn replace_file(path: &Path, data: &[u8]) {
    // The staging directory is beside the watch root, on the same file system.
    let root = path
        .ancestors()
        .find(|p| p.ends_with(crate::CA_WATCH.trim_start_matches('/')))
        .expect("a path under the ca watch");
    let tmp = root.with_file_name("staging").join("next");
    write_file(&tmp, data, 0o644);
    fs::rename(&tmp, path).expect("rename into place");
}

fn hash(data: &[u8]) -> blake3::Hash {
    blake3::hash(data)
}

fn hash_file(path: &Path) -> Option<blake3::Hash> {
    fs::read(path).ok().map(|b| hash(&b))
}

fn assert_no_temps(c: &TestCluster) {
    for n in ["a", "b"] {
        let t = temp_files(&c.ca(n));
        assert!(t.is_empty(), "temporary files left on {n}: {t:?}");
    }
}

/// Case 1 and 2 for one large file: the active replaces it again and again;
/// the victim is killed at a random moment of each transfer. At every kill
/// the passive's file is the previous or the new complete version.
pub fn kill_during_large_file(scale: &Scale, victim: Victim) -> Report {
    let mut report = Report::new(match victim {
        Victim::Receiver => "kill -9 receiver, large file",
        Victim::Sender => "kill -9 sender, large file",
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(scale.seed ^ 0x1a);
    let c = pair("");
    let a_path = c.ca("a").join("big.bin");
    let b_path = c.ca("b").join("big.bin");
    let mut content = noise(scale.big_file, rng.random());
    write_file(&a_path, &content, 0o644);
    let mut a = c.start("a");
    let mut b = c.start("b");
    let first = converge(&c.ca("a"), &c.ca("b"), LIMIT);
    // Kill moments are drawn over the time a whole transfer took.
    let span = first.max(Duration::from_millis(200));
    let mut mid = 0;
    for i in 0..scale.kills {
        let old = hash(&content);
        if i % 2 == 0 {
            // A full rewrite: shipped whole.
            content = noise(scale.big_file, rng.random());
        } else {
            // 1% of the bytes in 100 places: shipped as a delta.
            let chunk = (scale.big_file / 100 / 100).max(1);
            for _ in 0..100 {
                let at = rng.random_range(0..scale.big_file - chunk);
                rng.fill(&mut content[at..at + chunk]);
            }
        }
        let new = hash(&content);
        replace_file(&a_path, &content);
        std::thread::sleep(span.mul_f64(rng.random_range(0.0..1.0)));
        let agent = match victim {
            Victim::Receiver => &mut b,
            Victim::Sender => &mut a,
        };
        agent.kill9();
        report.faults += 1;
        if let Some(h) = hash_file(&b_path) {
            report.checked += 1;
            assert!(
                h == old || h == new,
                "kill {i}: the passive's file is neither the old nor the new version"
            );
            if h == old {
                mid += 1;
            }
        }
        agent.restart();
        let t = Instant::now();
        converge(&c.ca("a"), &c.ca("b"), LIMIT);
        report.converge.push(t.elapsed());
        wait_until("temporary files cleaned", Duration::from_secs(30), || {
            temp_files(&c.ca("b")).is_empty()
        });
    }
    report.notes.push(format!(
        "{mid} of {} kills found the passive still holding the previous version",
        scale.kills
    ));
    assert_no_temps(&c);
    report
}

/// Case 1 and 2 for many small files: an initial sync, then rounds that
/// each create a new set of files, rewrite the previous round's and delete
/// the one before. The victim is killed when the passive holds a random
/// share of the round's new files, so kills land mid-transfer. At every kill
/// each file on the passive is absent or holds a complete version.
pub fn kill_during_many_files(scale: &Scale, victim: Victim) -> Report {
    let mut report = Report::new(match victim {
        Victim::Receiver => "kill -9 receiver, many files",
        Victim::Sender => "kill -9 sender, many files",
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(scale.seed ^ 0x2b);
    let c = pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    // Allowed contents per path: every version written so far.
    let mut allowed: BTreeMap<String, Vec<blake3::Hash>> = BTreeMap::new();
    let body = |round: usize, i: usize, v: u32| {
        format!(
            "-----BEGIN CERTIFICATE-----\nround {round} file {i} version {v}\n{}\n-----END CERTIFICATE-----\n",
            "MIIC".repeat(500)
        )
    };
    let rel = |round: usize, i: usize| format!("round-{round}/{:02}/{i:06}.pem", i % 64);
    let write = |round: usize, v: u32, allowed: &mut BTreeMap<String, Vec<blake3::Hash>>| {
        for i in 0..scale.files {
            let b = body(round, i, v);
            write_file(&a_root.join(rel(round, i)), b.as_bytes(), 0o644);
            allowed.entry(rel(round, i)).or_default().push(hash(b.as_bytes()));
        }
    };
    let arrived = |round: usize| -> usize {
        (0..64)
            .map(|d| {
                fs::read_dir(b_root.join(format!("round-{round}/{d:02}")))
                    .map(|rd| {
                        rd.filter(|e| {
                            e.as_ref()
                                .is_ok_and(|e| !is_temp_name(&e.file_name().to_string_lossy()))
                        })
                        .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    };
    write(0, 1, &mut allowed);
    let mut a = c.start("a");
    let mut b = c.start("b");
    let per_round = 5;
    let rounds = scale.kills.div_ceil(per_round).max(1);
    let (mut kills, mut mid) = (0, 0);
    for round in 0..rounds {
        if round > 0 {
            // Replication is held while the round is written, so that the
            // kills land while it crosses, not after.
            let paused = c.ctl(&["pause"]);
            assert!(paused.status.success(), "pause failed: {paused:?}");
            write(round, 1, &mut allowed);
            write(round - 1, 2, &mut allowed);
            if round > 1 {
                let _ = fs::remove_dir_all(a_root.join(format!("round-{}", round - 2)));
            }
            let resumed = c.ctl(&["resume"]);
            assert!(resumed.status.success(), "resume failed: {resumed:?}");
        }
        let mut marks: Vec<usize> = (0..per_round.min(scale.kills - kills))
            .map(|_| rng.random_range(scale.files / 20..scale.files * 19 / 20))
            .collect();
        marks.sort();
        for mark in marks {
            let deadline = Instant::now() + LIMIT;
            let mut seen = arrived(round);
            while seen < mark && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                seen = arrived(round);
            }
            let agent = match victim {
                Victim::Receiver => &mut b,
                Victim::Sender => &mut a,
            };
            agent.kill9();
            kills += 1;
            report.faults += 1;
            if arrived(round) < scale.files {
                mid += 1;
            }
            for (path, desc) in snapshot(&b_root) {
                if !desc.starts_with("file") || path.rsplit('/').next().is_some_and(is_temp_name) {
                    continue;
                }
                let h = hash_file(&b_root.join(&path));
                let ok = match (allowed.get(&path), h) {
                    (Some(v), Some(h)) => v.contains(&h),
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                assert!(ok, "kill {kills}: {path} on the passive is not a complete version");
                report.checked += 1;
            }
            agent.restart();
        }
        let t = Instant::now();
        converge(&a_root, &b_root, LIMIT);
        report.converge.push(t.elapsed());
        wait_until("temporary files cleaned", Duration::from_secs(30), || {
            temp_files(&b_root).is_empty()
        });
    }
    report.notes.push(format!(
        "{mid} of {kills} kills landed while the round's files were still arriving"
    ));
    assert_no_temps(&c);
    report
}

/// Two network namespaces' worth of link: the passive runs in a namespace
/// joined to the host's by a veth pair, which can be cut (all packets
/// dropped both ways), healed, or given a delay.
pub struct NetLink {
    /// The namespace's name.
    pub ns: String,
    host_if: String,
    ns_if: String,
    /// The host side's address.
    pub outer: String,
    /// The namespace side's address.
    pub inner: String,
}

static NETLINKS: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tc_in(ns: Option<&str>, args: &[&str]) -> bool {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => Command::new("tc"),
    };
    cmd.args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl NetLink {
    /// Creates the namespace and the link, or says why it cannot.
    pub fn create() -> Result<NetLink, String> {
        let n = NETLINKS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfffff);
        let ns = format!("ws{tag}");
        let (host_if, ns_if) = (format!("wsh{tag}"), format!("wsn{tag}"));
        // A /30 chosen from the pid, in 10.201.0.0/16.
        let slot = (pid.wrapping_mul(7).wrapping_add(n * 13)) % 16_384;
        let base = slot * 4;
        let outer = format!("10.201.{}.{}", base / 256, base % 256 + 1);
        let inner = format!("10.201.{}.{}", base / 256, base % 256 + 2);
        if !ip(&["netns", "add", &ns]) {
            return Err("cannot create a network namespace here (needs root and CAP_SYS_ADMIN)".into());
        }
        let link = NetLink {
            ns: ns.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            outer: outer.clone(),
            inner: inner.clone(),
        };
        let ok = ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])
            && ip(&["link", "set", &ns_if, "netns", &ns])
            && ip(&["addr", "add", &format!("{outer}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&["-n", &ns, "addr", "add", &format!("{inner}/30"), "dev", &ns_if])
            && ip(&["-n", &ns, "link", "set", &ns_if, "up"])
            && ip(&["-n", &ns, "link", "set", "lo", "up"]);
        if !ok {
            return Err("cannot set up a veth pair between namespaces".into());
        }
        Ok(link)
    }

    /// Sets the link down: nothing crosses either way, and no end is told
    /// (open connections stall, they are not reset).
    pub fn cut(&self) {
        assert!(ip(&["link", "set", &self.host_if, "down"]), "cannot set the link down");
    }

    /// Sets the link up again.
    pub fn heal(&self) {
        assert!(ip(&["link", "set", &self.host_if, "up"]), "cannot set the link up");
    }

    /// Delays every packet by `ms` milliseconds each way with `tc netem`;
    /// `Err` when the kernel has no netem.
    pub fn delay(&self, ms: u32) -> Result<(), String> {
        let d = format!("{ms}ms");
        if tc_in(
            None,
            &["qdisc", "replace", "dev", &self.host_if, "root", "netem", "delay", &d],
        ) && tc_in(
            Some(&self.ns),
            &["qdisc", "replace", "dev", &self.ns_if, "root", "netem", "delay", &d],
        ) {
            Ok(())
        } else {
            Err("tc netem is not available in this kernel".into())
        }
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.ns]);
        ip(&["link", "del", &self.host_if]);
    }
}

/// Case 3: the link between the nodes drops every packet for `scale.cut`
/// while a large file is in flight and new files keep appearing; once it
/// heals, the trees converge. `Err` when namespaces cannot be made here.
pub fn cut_link(scale: &Scale) -> Result<Report, String> {
    let link = NetLink::create()?;
    let mut report = Report::new("link cut (veth down, nothing crosses)");
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n",
            crate::CA_WATCH
        ),
        hosts: vec![("a", link.outer.clone()), ("b", link.inner.clone())],
        ..Default::default()
    });
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("signed/seed.pem"), b"seed", 0o644);
    let _a = c.start("a");
    let _b = c.start_in_netns("b", &link.ns);
    converge(&a_root, &b_root, LIMIT);
    // A large file starts crossing, then the link goes dead.
    let big = noise(scale.big_file.min(64 << 20), scale.seed);
    replace_file(&a_root.join("big.bin"), &big);
    std::thread::sleep(Duration::from_millis(50));
    link.cut();
    report.faults += 1;
    let cut_at = Instant::now();
    let mut i = 0;
    while cut_at.elapsed() < scale.cut {
        write_file(
            &a_root.join(format!("signed/during-{i:04}.pem")),
            format!("cert {i}").as_bytes(),
            0o644,
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing half-written is visible on the passive meanwhile.
    if let Some(h) = hash_file(&b_root.join("big.bin")) {
        assert_eq!(h, hash(&big), "a partial large file is visible on the passive");
        report.checked += 1;
    }
    link.heal();
    let t = Instant::now();
    converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    report.checked += i as u64;
    report.notes.push(format!(
        "{i} files written during a {} s cut; identical {:.1} s after the link healed",
        scale.cut.as_secs(),
        t.elapsed().as_secs_f64()
    ));
    assert_no_temps(&c);
    Ok(report)
}

/// A tmpfs mounted over a directory for the life of the guard.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(Tmpfs(dir.to_path_buf()))
        } else {
            Err("cannot mount a tmpfs here (needs root)".into())
        }
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot resize the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Case 4: the passive's watch root is a small file system that fills up.
/// The failure shows in the log and in status, previous versions stay, no
/// temporary file stays; once there is room, the trees converge.
pub fn disk_full(_scale: &Scale) -> Result<Report, String> {
    let mut report = Report::new("receiver's disk full");
    let c = pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let fsys = Tmpfs::mount(&b_root, "8m")?;
    fs::set_permissions(&b_root, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let mut old = BTreeMap::new();
    for i in 0..8 {
        let data = noise(512 * 1024, 100 + i);
        write_file(&a_root.join(format!("f{i}.bin")), &data, 0o644);
        old.insert(format!("f{i}.bin"), hash(&data));
    }
    let _a = c.start("a");
    let b = c.start("b");
    converge(&a_root, &b_root, LIMIT);
    // 4 MiB used of 8: a 6 MiB file and new versions of every file cannot all fit.
    write_file(&a_root.join("huge.bin"), &noise(6 << 20, 7), 0o644);
    for i in 0..8 {
        write_file(&a_root.join(format!("f{i}.bin")), &noise(512 * 1024, 200 + i), 0o644);
    }
    report.faults += 1;
    wait_until("a log line about the full disk", Duration::from_secs(60), || {
        b.log_text().contains("No space left on device")
    });
    let mut status_line = String::new();
    wait_until("the failure in status", Duration::from_secs(60), || {
        let s = c.status_json();
        let errors: Vec<String> = s["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|n| n["status"]["links"].as_array().cloned().unwrap_or_default())
            .filter_map(|l| l["last_error"].as_str().map(str::to_string))
            .collect();
        match errors.into_iter().find(|e| e.contains("not applied on b")) {
            Some(e) => {
                status_line = e;
                true
            }
            None => false,
        }
    });
    assert!(status_line.contains("No space left"), "status says: {status_line}");
    report.notes.push(format!("status showed \"{status_line}\""));
    // Whatever is on the passive is a complete version: old or new.
    for i in 0..8u64 {
        let rel = format!("f{i}.bin");
        let h = hash_file(&b_root.join(&rel)).expect("a file vanished on the full disk");
        let new = hash_file(&a_root.join(&rel));
        assert!(h == old[&rel] || Some(h) == new, "{rel} is neither version");
        report.checked += 1;
    }
    wait_until("temporary files cleaned", Duration::from_secs(30), || {
        temp_files(&b_root).is_empty()
    });
    fsys.resize("64m");
    let t = Instant::now();
    converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    assert_no_temps(&c);
    drop(b);
    Ok(report)
}

/// Sets `fs.inotify.max_queued_events` for the life of the guard.
struct QueueLimit(Option<String>);

const QUEUE_SYSCTL: &str = "/proc/sys/fs/inotify/max_queued_events";

impl QueueLimit {
    fn set(value: u32) -> QueueLimit {
        let old = fs::read_to_string(QUEUE_SYSCTL).ok();
        if old.is_some() && fs::write(QUEUE_SYSCTL, value.to_string()).is_ok() {
            QueueLimit(old)
        } else {
            QueueLimit(None)
        }
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = fs::write(QUEUE_SYSCTL, old.trim());
        }
    }
}

/// Case 5: the kernel's event queue overflows, for certain. The limit is
/// lowered (when permitted) only while the active starts, since the kernel
/// reads it when an inotify instance is made. The active is then stopped
/// (SIGSTOP, as a starved agent would be) while more files than the limit
/// are created in a directory it watches: the kernel queues an event for
/// each and must drop the rest. Directories are made during the overflow
/// too, so their creation events are lost with it. The case asserts that
/// the active noticed the loss and compared the whole tree, and that it
/// watches those directories afterwards. `Err` only when the queue limit
/// cannot be read.
pub fn queue_overflow(scale: &Scale) -> Result<Report, String> {
    let mut report = Report::new("inotify queue overflow");
    let c = pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    fs::create_dir_all(a_root.join("burst/watched")).expect("create the active's root");
    let b = c.start("b");
    let files = scale.overflow_files;
    let (a, limit) = {
        let lowered = QueueLimit::set(64);
        // What the active's inotify instance gets: read while the guard holds.
        let limit: usize = fs::read_to_string(QUEUE_SYSCTL)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| format!("cannot read {QUEUE_SYSCTL}"))?;
        let a = c.start("a");
        wait_until("the active watching", Duration::from_secs(30), || {
            a.log_text().contains("watching")
        });
        if lowered.0.is_none() {
            report.notes.push(format!(
                "could not lower max_queued_events; overflowed the queue of {limit}"
            ));
        }
        (a, limit)
    };
    converge(&a_root, &b_root, LIMIT);
    let dirs_before = count_dirs(&a_root);
    wait_until("every directory watched", Duration::from_secs(30), || {
        a.inotify_watches() == Some(dirs_before)
    });
    let t = Instant::now();
    a.signal("-STOP");
    // More creations in a watched directory than the queue holds, while
    // nothing reads it: an overflow is certain.
    let flood = limit + 100;
    for i in 0..flood {
        write_file(
            &a_root.join(format!("burst/watched/{i:06}.pem")),
            format!("{i}").as_bytes(),
            0o644,
        );
    }
    // A new directory every files/50 files, so that directories are made
    // all through the overflow; half of them while the active is stopped.
    let per_dir = files.div_ceil(50);
    for i in 0..files {
        if i == files / 2 {
            a.signal("-CONT");
        }
        write_file(
            &a_root.join(format!("burst/{:02}/{i:06}.pem", i / per_dir)),
            format!("{i}").as_bytes(),
            0o644,
        );
    }
    report.faults += 1;
    converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    // The rescan: the active logs the loss as it renews its watches and
    // asks for a comparison of the whole tree.
    wait_until("the active to compare the whole tree after the overflow", LIMIT, || {
        a.log_text()
            .contains("inotify lost events; watching the tree again and comparing it whole")
    });
    // Every directory is watched again, those whose creation was lost too.
    let dirs = count_dirs(&a_root);
    wait_until(
        "every directory watched after the overflow",
        Duration::from_secs(30),
        || a.inotify_watches() == Some(dirs),
    );
    // The directories made during the overflow had their creation events
    // lost with the rest: they must be watched all the same, so a change in
    // each of them ships now, not at the next periodic comparison.
    let t = Instant::now();
    for d in 0..50 {
        write_file(
            &a_root.join(format!("burst/{d:02}/after.pem")),
            format!("after {d}").as_bytes(),
            0o644,
        );
    }
    let after = converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    report.notes.push(format!(
        "{flood} files against a queue of {limit} while the active was stopped, then {files}; \
         the active logged the overflow and compared the whole tree; \
         a file in each directory made during the overflow shipped {:.1} s after",
        after.as_secs_f64()
    ));
    report.checked += (flood + files) as u64 + 50;
    assert_no_temps(&c);
    drop(b);
    Ok(report)
}

/// The directories under `root`, itself included.
fn count_dirs(root: &Path) -> usize {
    let subdirs: usize = fs::read_dir(root)
        .expect("list a directory")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| count_dirs(&e.path()))
        .sum();
    1 + subdirs
}

/// Case 6: many files created, modified and deleted in a burst while
/// replication runs.
pub fn burst(scale: &Scale) -> Report {
    let mut report = Report::new("create/modify/delete burst");
    let c = pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    fs::create_dir_all(&a_root).expect("create the active's root");
    let _a = c.start("a");
    let _b = c.start("b");
    converge(&a_root, &b_root, LIMIT);
    let t = Instant::now();
    for i in 0..scale.burst {
        write_file(
            &a_root.join(format!("d{:03}/{i:06}.pem", i % 200)),
            format!("v1 {i}").as_bytes(),
            0o644,
        );
        if i % 3 == 0 && i >= 300 {
            let j = i - 300;
            write_file(
                &a_root.join(format!("d{:03}/{j:06}.pem", j % 200)),
                format!("v2 {j}").as_bytes(),
                0o600,
            );
        }
        if i % 5 == 0 && i >= 500 {
            let j = i - 500;
            let _ = fs::remove_file(a_root.join(format!("d{:03}/{j:06}.pem", j % 200)));
        }
    }
    let written = t.elapsed();
    report.faults += 1;
    let c_time = converge(&a_root, &b_root, LIMIT);
    report.converge.push(c_time);
    report.checked += snapshot(&b_root).len() as u64;
    report.notes.push(format!(
        "{} files in {:.1} s of writing; identical {:.1} s after the last write",
        scale.burst,
        written.as_secs_f64(),
        c_time.as_secs_f64()
    ));
    assert_no_temps(&c);
    report
}

fn set_mtime(path: &Path, t: SystemTime) {
    let f = fs::File::options().write(true).open(path).expect("open for mtime");
    f.set_modified(t).expect("set mtime");
}

/// Case 7: both sides hold files of the same size and modification time but
/// other content (a skewed clock, a restored backup); content hashes decide.
/// Then a change on the active that keeps size and mtime still ships.
pub fn clock_skew(_scale: &Scale) -> Report {
    let mut report = Report::new("clock skew (same size and mtime, other content)");
    let c = pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let future = SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
    for i in 0..400 {
        let rel = format!("signed/{i:04}.pem");
        let t = if i % 2 == 0 { future } else { past };
        let (pa, pb) = (a_root.join(&rel), b_root.join(&rel));
        write_file(&pa, format!("active {i:08}").as_bytes(), 0o644);
        write_file(&pb, format!("stale  {i:08}").as_bytes(), 0o644);
        set_mtime(&pa, t);
        set_mtime(&pb, t);
    }
    let _b = c.start("b");
    let _a = c.start("a");
    report.faults += 1;
    let t = Instant::now();
    converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    report.checked += 400;
    // The same size and mtime again, with new content, on the active.
    for i in (0..400).step_by(7) {
        let p = a_root.join(format!("signed/{i:04}.pem"));
        let before = fs::metadata(&p).and_then(|m| m.modified()).expect("mtime");
        write_file(&p, format!("again  {i:08}").as_bytes(), 0o644);
        set_mtime(&p, before);
        report.checked += 1;
    }
    report.faults += 1;
    let t = Instant::now();
    converge(&a_root, &b_root, LIMIT);
    report.converge.push(t.elapsed());
    assert_no_temps(&c);
    report
}

/// Runs `f` in a thread that stops the whole process with a message when it
/// exceeds `limit` (a hung case must not hang the soak run).
pub fn with_watchdog<T: Send + 'static>(name: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let name = name.to_string();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !flag.load(Ordering::Relaxed) {
            if start.elapsed() > limit {
                eprintln!("{name}: still running after {limit:?}; giving up");
                std::process::exit(2);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let out = f();
    done.store(true, Ordering::Relaxed);
    out
}
