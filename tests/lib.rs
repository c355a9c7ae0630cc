//! Harness for end-to-end tests: clusters of real `warmspare-agent`
//! processes on loopback, in temporary directories.
//!
//! Every wait polls with a deadline; nothing sleeps a fixed time and hopes.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmspare_shared::keys::SecretKey;

pub mod etcd_proxy;
pub mod faults;

/// Where the workspace's binaries are: beside the test executable's `deps/`.
///
/// `cargo test` and `cargo nextest` build a package's binaries only for that
/// package's own integration tests, so the first call in a test process
/// builds them (a no-op when they are fresh): a test never runs a stale agent.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // Test executables live in `target/<profile>/deps/`, other binaries (the bench) beside the agent.
        let parent = exe.parent().expect("executable dir");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target dir")
        } else {
            parent
        }
        .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "warmspare-agent",
            "-p",
            "warmsparectl",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing after the build", p.display());
    p
}

/// The longest one `warmsparectl` run (without `--timeout`) or `warmspare-agent
/// check` may take in a test: their calls have deadlines of a few seconds,
/// a role change's up to its hook timeout plus a minute, so one that runs
/// this long hangs. It stays under the test runner's own limit (300 s), so
/// the failure names the command.
pub const CTL_LIMIT: Duration = Duration::from_secs(240);

/// The limit for `warmsparectl args`: [`CTL_LIMIT`], or the run's own
/// `--timeout` (`600s`, `10m`) and two minutes more.
pub fn ctl_limit(args: &[&str]) -> Duration {
    let given = args
        .iter()
        .position(|a| *a == "--timeout")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| {
            let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
            let n: u64 = n.parse().ok()?;
            match unit {
                "s" => Some(Duration::from_secs(n)),
                "m" => Some(Duration::from_secs(n * 60)),
                _ => None,
            }
        });
    match given {
        Some(t) => t + Duration::from_secs(120),
        None => CTL_LIMIT,
    }
}

/// The longest an agent may take to stop after SIGTERM (its own shutdown
/// bounds every step, 10 s at most each).
pub const STOP_LIMIT: Duration = Duration::from_secs(40);

/// Waits for `child` to exit, at most `limit`: its status, or `None` if it
/// is still running.
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {}
            Ok(None) | Err(_) => return None,
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` (standard input closed) and collects its output, like
/// `Command::output`, but kills it and fails the test if it has not exited
/// within `limit`, showing what it printed so far.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let status = exit_within(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => std::process::Output { status, stdout, stderr },
        None => panic!(
            "{cmd:?} did not exit within {limit:?}; it printed:\n{}\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A free TCP port on 127.0.0.1, reserved for this test process.
///
/// A port from binding port 0 comes from the kernel's ephemeral range, where
/// every other test's outgoing connections also take their local ports: one
/// such connection took an agent's port between the pick and the agent's
/// bind (`Address already in use`) in a loaded run. So ports are drawn from
/// 20000-32767, below the default ephemeral range (32768-60999), and each is
/// reserved across the test processes nextest runs side by side by a lock on
/// a file named after it, held until this process exits.
pub fn free_port() -> u16 {
    use rand::RngExt as _;
    static HELD: std::sync::Mutex<Vec<fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("warmspare-test-ports");
    fs::create_dir_all(&dir).expect("create the port reservation directory");
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port: u16 = rng.random_range(20_000..32_768);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .expect("open a port reservation file");
        if file.try_lock().is_err() || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|p| p.into_inner()).push(file);
        return port;
    }
    panic!("no free port in 20000-32767 after 10,000 tries");
}

/// Polls `cond` every few milliseconds until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One node of a test cluster.
pub struct NodeSpec {
    /// The node's name.
    pub name: String,
    /// Its `root` (every local path lives under it).
    pub root: PathBuf,
    /// The address it listens on (127.0.0.1 unless the options say otherwise).
    pub host: String,
    /// Its SSH port.
    pub port: u16,
    /// Its HTTP port on 127.0.0.1.
    pub http_port: u16,
    /// Its key.
    pub key: SecretKey,
}

/// Options for a test cluster.
#[derive(Default)]
pub struct ClusterOptions {
    /// Node names; the first is the preferred active.
    pub nodes: Vec<&'static str>,
    /// Extra TOML appended to the generated file (watches, jobs).
    pub extra: String,
    /// Extra keys for a node's table (e.g. `env = { PGPORT = "5433" }`).
    pub node_extra: Vec<(&'static str, String)>,
    /// Listening addresses other than 127.0.0.1, per node (for nodes in a
    /// network namespace).
    pub hosts: Vec<(&'static str, String)>,
}

/// A cluster file and the nodes' directories, in a temporary directory.
pub struct TestCluster {
    /// Holds the temporary directory.
    pub dir: tempfile::TempDir,
    /// The cluster file.
    pub file: PathBuf,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
    /// An operator key listed in the file.
    pub operator_key: PathBuf,
}

/// The watch every test cluster has: `/ssl/ca` under each node's root.
pub const CA_WATCH: &str = "/ssl/ca";

impl TestCluster {
    /// A cluster with one watch `ca` at [`CA_WATCH`] and `extra` appended.
    pub fn new(opts: ClusterOptions) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("warmspare-e2e")
            .tempdir()
            .expect("tempdir");
        let mut nodes = Vec::new();
        for name in &opts.nodes {
            let root = dir.path().join(name);
            let key = SecretKey::generate();
            let key_path = root.join("etc/warmspare/node.key");
            key.save(&key_path).expect("save key");
            // The CA directory exists on every node, as on an installed
            // server: an active agent never creates its watch roots.
            fs::create_dir_all(root.join(CA_WATCH.trim_start_matches('/'))).expect("create the CA directory");
            let host = opts
                .hosts
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| "127.0.0.1".to_string(), |(_, h)| h.clone());
            nodes.push(NodeSpec {
                name: name.to_string(),
                host,
                root,
                port: free_port(),
                http_port: free_port(),
                key,
            });
        }
        let op = SecretKey::generate();
        let operator_key = dir.path().join("operator.key");
        op.save(&operator_key).expect("save operator key");
        let mut text = format!(
            "[cluster]\nname = \"test\"\npreferred_active = \"{}\"\nstate_dir = \"/var/lib/warmspare\"\nkey_file = \"/etc/warmspare/node.key\"\n\n",
            opts.nodes[0]
        );
        for n in &nodes {
            text += &format!(
                "[[node]]\nname = \"{}\"\nssh = \"{}:{}\"\nhttp = \"{}:{}\"\npublic_key = \"{}\"\nroot = \"{}\"\n\n",
                n.name,
                n.host,
                n.port,
                n.host,
                n.http_port,
                n.key.public().to_openssh(),
                n.root.display()
            );
            for (_, extra) in opts.node_extra.iter().filter(|(name, _)| *name == n.name) {
                text = text.trim_end().to_string() + "\n" + extra + "\n\n";
            }
        }
        text += &format!(
            "[[operator]]\nname = \"tester\"\npublic_key = \"{}\"\n\n",
            op.public().to_openssh()
        );
        text += &opts.extra;
        let file = dir.path().join("cluster.toml");
        write_cluster_file(&file, &text);
        TestCluster {
            dir,
            file,
            nodes,
            operator_key,
        }
    }

    /// Two nodes `a` (active) and `b` with the `ca` watch and `watch_extra`
    /// added to its table (e.g. `exclude = [...]`).
    pub fn pair(watch_extra: &str) -> TestCluster {
        TestCluster::new(ClusterOptions {
            nodes: vec!["a", "b"],
            extra: format!("[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\ndebounce_ms = 0\n{watch_extra}\n"),
            ..Default::default()
        })
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &NodeSpec {
        self.nodes.iter().find(|n| n.name == name).expect("node in cluster")
    }

    /// The `ca` watch root of node `name`.
    pub fn ca(&self, name: &str) -> PathBuf {
        self.node(name).root.join(CA_WATCH.trim_start_matches('/'))
    }

    /// Starts the agent of node `name`.
    pub fn start(&self, name: &str) -> Agent {
        self.start_with_env(name, &[])
    }

    /// Starts the agent of node `name` with extra environment variables.
    pub fn start_with_env(&self, name: &str, env: &[(&str, &str)]) -> Agent {
        self.start_wrapped(name, env, &[])
    }

    /// Starts the agent of node `name` with its own cluster file `file` (a
    /// copy of [`TestCluster::file`] with a change for this node only, such
    /// as other etcd endpoints).
    pub fn start_with_cluster_file(&self, name: &str, file: &Path) -> Agent {
        let mut a = Agent {
            wrapper: Vec::new(),
            child: None,
            cluster: file.to_path_buf(),
            name: name.to_string(),
            log: self.dir.path().join(format!("{name}.log")),
            env: Vec::new(),
        };
        a.spawn();
        a
    }

    /// Writes a copy of the cluster file with `from` replaced by `to`, for
    /// node `name` (see [`TestCluster::start_with_cluster_file`]).
    pub fn cluster_file_variant(&self, name: &str, from: &str, to: &str) -> PathBuf {
        let text = fs::read_to_string(&self.file).expect("read the cluster file");
        assert!(text.contains(from), "the cluster file has no {from:?}");
        let file = self.dir.path().join(format!("cluster-{name}.toml"));
        write_cluster_file(&file, &text.replace(from, to));
        file
    }

    /// Starts the agent of node `name` inside the network namespace `netns`.
    pub fn start_in_netns(&self, name: &str, netns: &str) -> Agent {
        self.start_wrapped(name, &[], &["ip", "netns", "exec", netns])
    }

    /// Starts the agent of node `name` under `wrapper` (a command that execs
    /// its arguments, such as `ip netns exec NS` or a profiler).
    pub fn start_wrapped(&self, name: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Agent {
        let mut a = Agent {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            child: None,
            cluster: self.file.clone(),
            name: name.to_string(),
            log: self.dir.path().join(format!("{name}.log")),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        a.spawn();
        a
    }
}

/// A running `warmspare-agent run` process; killed when dropped.
pub struct Agent {
    child: Option<Child>,
    cluster: PathBuf,
    /// The node name.
    pub name: String,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// A command the agent runs under (`ip netns exec NS`), which execs it.
    wrapper: Vec<String>,
}

impl Agent {
    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("warmspare-agent"));
                c
            }
            None => Command::new(bin("warmspare-agent")),
        };
        let child = cmd
            .args(["--cluster"])
            .arg(&self.cluster)
            .args(["--node", &self.name, "--log-level", "info,warmspare_agent=debug", "run"])
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`-HUP`, `-TERM`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(sig).arg(c.id().to_string()).status();
        }
    }

    /// Waits for the process to exit (after a signal) and returns its status.
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        c.wait().expect("wait agent")
    }

    /// Sends SIGTERM and waits for the exit status (at most
    /// [`STOP_LIMIT`]: an agent that does not stop fails the test).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        exit_within(&mut c, STOP_LIMIT).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!("agent {} did not stop within {STOP_LIMIT:?} of SIGTERM", self.name)
        })
    }

    /// Starts the process again after a kill.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn();
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many inotify watches the process holds, while running.
    pub fn inotify_watches(&self) -> Option<usize> {
        let pid = self.pid()?;
        let mut n = 0;
        for fd in fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
            let info = fs::read_to_string(fd.path()).unwrap_or_default();
            n += info.lines().filter(|l| l.starts_with("inotify wd:")).count();
        }
        Some(n)
    }

    /// The resident set size in KiB, while running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The configured cluster file.
    pub fn cluster_file(&self) -> &Path {
        &self.cluster
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What a tree holds, for comparisons: path -> description.
pub type Snapshot = BTreeMap<String, String>;

/// Describes every entry under `root` (content hash, mode, mtime, link target),
/// leaving out directory mtimes when `dir_mtimes` is false.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for de in rd.flatten() {
        let p = de.path();
        let rel = p.strip_prefix(root).expect("under root").to_string_lossy().to_string();
        let Ok(md) = fs::symlink_metadata(&p) else { continue };
        let mode = md.mode() & 0o7777;
        // Owners are replicated only by a receiver running as root.
        let owner = if warmspare_shared::apply::can_chown() {
            format!(" {}:{}", md.uid(), md.gid())
        } else {
            String::new()
        };
        let desc = if md.file_type().is_symlink() {
            format!(
                "link -> {}",
                fs::read_link(&p).map(|t| t.display().to_string()).unwrap_or_default()
            )
        } else if md.is_dir() {
            walk(root, &p, out);
            format!("dir {mode:o}{owner}")
        } else {
            let hash = fs::read(&p)
                .map(|b| blake3::hash(&b).to_hex().to_string())
                .unwrap_or_else(|_| "vanished".into());
            format!(
                "file {mode:o} {}.{:09} {} {}",
                md.mtime(),
                md.mtime_nsec(),
                md.len(),
                hash.get(..16).unwrap_or(&hash)
            )
        };
        out.insert(rel, desc);
    }
}

/// Temporary files of the applier under `root`.
pub fn temp_files(root: &Path) -> Vec<String> {
    // Names only: hashing the tree first (as a snapshot does) would let a
    // short-lived temporary file come and go between two looks.
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for de in rd.flatten() {
            let p = de.path();
            if de.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            } else if warmspare_shared::relpath::is_temp_name(&de.file_name().to_string_lossy()) {
                out.push(p.strip_prefix(root).unwrap_or(&p).to_string_lossy().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// Waits until the trees under `a` and `b` are identical, then returns the time it took.
pub fn converge(a: &Path, b: &Path, limit: Duration) -> Duration {
    let start = Instant::now();
    let deadline = start + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        let (sa, sb) = (snapshot(a), snapshot(b));
        if sa == sb {
            return start.elapsed();
        }
        if Instant::now() > deadline {
            let only_a: Vec<_> = sa.iter().filter(|(k, v)| sb.get(*k) != Some(v)).take(10).collect();
            let only_b: Vec<_> = sb.iter().filter(|(k, v)| sa.get(*k) != Some(v)).take(10).collect();
            panic!(
                "trees did not converge in {limit:?}\n  differing on {}: {only_a:#?}\n  differing on {}: {only_b:#?}",
                a.display(),
                b.display()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Writes `data` to `path` (creating parents) and sets its mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("mkdir");
    }
    let mut f = fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
    drop(f);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Writes a cluster file with mode 0600, whatever the umask: the agent and
/// `warmsparectl` refuse one that group or others can write.
pub fn write_cluster_file(path: &Path, text: &str) {
    write_file(path, text.as_bytes(), 0o600);
}

/// Reads a whole file, or `None`.
pub fn read(path: &Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    fs::File::open(path).ok()?.read_to_end(&mut v).ok()?;
    Some(v)
}

/// Pseudo-random bytes from a seed (fast, reproducible).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Runs a command and returns its output, failing the test on a non-zero exit.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Drop for TestCluster {
    /// A failing test (or any test with WARMSPARE_TEST_LOGS set) shows the
    /// tail of every agent's log.
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("WARMSPARE_TEST_LOGS").is_none() {
            return;
        }
        for n in &self.nodes {
            let log = self.dir.path().join(format!("{}.log", n.name));
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- log of {} (last {} lines) ----\n{}",
                n.name,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

impl TestCluster {
    /// Runs `warmsparectl` with this cluster file and its operator key.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin("warmsparectl"));
        cmd.arg("--cluster")
            .arg(&self.file)
            .arg("--key")
            .arg(&self.operator_key)
            .args(args);
        output_within(cmd, ctl_limit(args))
    }

    /// Runs `warmspare-agent check` as `node` with this cluster file and
    /// `args` (`--local`...): its exit code and standard output.
    pub fn check(&self, node: &str, args: &[&str]) -> (Option<i32>, String) {
        check_with(&self.file, node, args)
    }

    /// Waits until `node`'s links to its peers are all connected, as
    /// `warmsparectl status --json` reports them.
    pub fn wait_linked(&self, node: &str, limit: Duration) {
        wait_until(&format!("{node} connected to its peers"), limit, || {
            let out = self.ctl(&["status", "--json"]);
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return false;
            };
            let links = v["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["node"] == node))
                .and_then(|n| n["status"]["links"].as_array().cloned())
                .unwrap_or_default();
            !links.is_empty() && links.iter().all(|l| l["connected"] == true)
        });
    }

    /// Every node's member record in etcd, as `warmsparectl status --json`
    /// shows it: the published lag in milliseconds (none before the node's
    /// first catch-up with the active) and the eligibility text, by node.
    /// Empty while status cannot be read.
    pub fn etcd_standings(&self) -> BTreeMap<String, (Option<u64>, String)> {
        let out = self.ctl(&["status", "--json"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return BTreeMap::new();
        };
        v["etcd"]["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["node"].as_str().unwrap_or_default().to_string(),
                            (
                                m["lag_ms"].as_u64(),
                                m["eligibility"].as_str().unwrap_or_default().to_string(),
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `node` has published a lag in etcd: it has caught up
    /// with the active since it started. Before that it is not eligible to
    /// take the role automatically (it does not know how far behind it
    /// is), so a test that kills or cuts off the active, and expects `node`
    /// to take over (or to stay passive for another reason), starts here.
    pub fn wait_caught_up(&self, node: &str, limit: Duration) {
        wait_until(&format!("{node} to publish its lag in etcd"), limit, || {
            self.etcd_standings().get(node).is_some_and(|(lag, _)| lag.is_some())
        });
    }

    /// `warmsparectl status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json did not parse: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Node `node`'s own status, as `status --json` reports it.
    pub fn node_status(&self, node: &str) -> serde_json::Value {
        let st = self.status_json();
        st["nodes"]
            .as_array()
            .expect("status --json lists nodes")
            .iter()
            .find(|n| n["node"] == node)
            .unwrap_or_else(|| panic!("status --json does not list {node}: {st}"))["status"]
            .clone()
    }
}

/// Runs `warmspare-agent check` as `node` with the cluster file `file` and
/// `args`: its exit code and standard output.
pub fn check_with(file: &Path, node: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("warmspare-agent"));
    cmd.arg("--cluster")
        .arg(file)
        .args(["--node", node, "check"])
        .args(args);
    let out = output_within(cmd, CTL_LIMIT);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
}

/// The workspace's root (the README, `docs/`, `packaging/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A finished command's standard output followed by its standard error.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A finished command's exit code (-1 when a signal ended it).
pub fn exit_code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A protocol session to an agent over SSH: the frame reader and writer,
/// and the connection's handle (dropping it hangs up).
pub type Session = (
    warmspare_shared::proto::FrameReader<tokio::io::ReadHalf<russh::ChannelStream<russh::client::Msg>>>,
    warmspare_shared::proto::FrameWriter<tokio::io::WriteHalf<russh::ChannelStream<russh::client::Msg>>>,
    russh::client::Handle<warmspare_shared::ssh::PinnedHost>,
);

/// The hello a test session opens with: `node` speaking the current
/// protocol for `purpose` at `epoch`, naming itself active (for a
/// replication or probe session), with the config hash "test" and
/// `compress = "auto"`. A test that needs another field changes it with
/// struct update syntax.
pub fn test_hello(node: &str, purpose: warmspare_shared::proto::Purpose, epoch: u64) -> warmspare_shared::proto::Hello {
    use warmspare_shared::proto::{Hello, Purpose, PROTOCOL_VERSION};
    let active = match purpose {
        Purpose::Control => String::new(),
        _ => node.into(),
    };
    Hello {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
        node: node.into(),
        epoch,
        active,
        config_hash: "test".into(),
        purpose,
        owners: false,
        compress: warmspare_shared::compress::Compress::Auto,
    }
}

/// Dials node `to` of `c` on loopback with `key` as `user`, sends `hello`,
/// and returns the session with the agent's answer to it.
pub async fn hello_session(
    c: &TestCluster,
    to: &str,
    key: &SecretKey,
    user: &str,
    hello: warmspare_shared::proto::Hello,
) -> Result<(Session, warmspare_shared::proto::Reply), warmspare_shared::ssh::DialError> {
    use warmspare_shared::proto::{FrameReader, FrameWriter, Reply, Request};
    let target = c.node(to);
    let d = warmspare_shared::ssh::dial(
        &format!("127.0.0.1:{}", target.port),
        &target.key.public(),
        key,
        user,
        Duration::from_secs(10),
    )
    .await?;
    let (rd, wr) = tokio::io::split(d.stream);
    let (mut r, mut w) = (FrameReader::new(rd), FrameWriter::new(wr));
    w.send(&Request::Hello(hello)).await.expect("send the hello");
    let reply = r
        .recv::<Reply>()
        .await
        .expect("read the answer to the hello")
        .expect("an answer to the hello");
    Ok(((r, w, d.handle), reply))
}

/// The processes whose environment contains `needle` (a test's temporary
/// directory, say: every command an agent of that test starts inherits a
/// path under it), by process id. The agents themselves are left out
/// only if their environment lacks it.
pub fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The HTTP status code of `GET path` on 127.0.0.1:`port`, or `None` when
/// nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(code, _)| code)
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// A guard against two active nodes: a thread polls every node's
/// `/_status/check` in turn, a round every 10 ms, for as long as the guard
/// lives, and records every round in which more than one node answered
/// 200. [`ActiveGuard::finish`] (or the drop, unless the test is already
/// failing) panics if there was one.
pub struct ActiveGuard {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<GuardReport>>,
}

/// What an [`ActiveGuard`] saw.
#[derive(Debug, Default)]
pub struct GuardReport {
    /// How many poll rounds it made.
    pub rounds: u64,
    /// In how many rounds exactly one node answered 200.
    pub one_active: u64,
    /// The rounds in which two or more nodes answered 200 (their names,
    /// and the milliseconds since the guard started).
    pub doubles: Vec<(u64, Vec<String>)>,
}

impl ActiveGuard {
    /// Starts polling `nodes` (name, HTTP port).
    pub fn start(nodes: &[(&str, u16)]) -> ActiveGuard {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let nodes: Vec<(String, u16)> = nodes.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut report = GuardReport::default();
            // At least one round, however soon the guard is stopped.
            loop {
                let round = Instant::now();
                let ok: Vec<String> = nodes
                    .iter()
                    .filter(|(_, port)| http_status(*port, "/_status/check") == Some(200))
                    .map(|(n, _)| n.clone())
                    .collect();
                report.rounds += 1;
                match ok.len() {
                    0 => {}
                    1 => report.one_active += 1,
                    _ => report.doubles.push((started.elapsed().as_millis() as u64, ok)),
                }
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Some(rest) = Duration::from_millis(10).checked_sub(round.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            report
        });
        ActiveGuard {
            stop,
            thread: Some(thread),
        }
    }

    fn join(&mut self) -> Option<GuardReport> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().map(|t| t.join().expect("the guard thread panicked"))
    }

    /// Stops polling; panics if two nodes ever answered 200 in one round.
    pub fn finish(mut self) -> GuardReport {
        let report = self.join().expect("guard running");
        assert!(
            report.doubles.is_empty(),
            "two nodes answered 200 in the same round: {:?}",
            report.doubles
        );
        assert!(report.rounds > 0, "the guard made no round");
        report
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(report) = self.join() {
            if !std::thread::panicking() {
                assert!(
                    report.doubles.is_empty(),
                    "two nodes answered 200 in the same round: {:?}",
                    report.doubles
                );
            }
        }
    }
}

/// The path of the program `tool` (looked up on `PATH`, then in the
/// system directories root's `PATH` has), or a panic that names the Debian
/// package providing it: a test never passes or skips because a tool is
/// absent. `tests/run` installs every package named here.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(tool);
        if fs::metadata(&candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return candidate;
        }
    }
    panic!("{tool} is not installed: install the Debian package {package} (tests/run does it)")
}

/// A throwaway PostgreSQL server on a Unix socket, run as the `postgres`
/// user when the tests run as root (initdb refuses root); stopped on drop.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    /// The socket directory (PGHOST).
    pub socket: PathBuf,
    /// The port (PGPORT).
    pub port: u16,
    bindir: PathBuf,
}

impl Postgres {
    /// Creates and starts a cluster.
    pub fn start() -> Postgres {
        let bindir = PathBuf::from(
            String::from_utf8(
                Command::new(require("pg_config", "postgresql"))
                    .arg("--bindir")
                    .output()
                    .expect("pg_config")
                    .stdout,
            )
            .expect("utf8")
            .trim(),
        );
        let dir = tempfile::Builder::new()
            .prefix("warmspare-pg")
            .tempdir()
            .expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let (data, socket) = (dir.path().join("data"), dir.path().join("sock"));
        fs::create_dir_all(&socket).expect("mkdir sock");
        let pg = Postgres {
            _dir: dir,
            data,
            socket,
            port: free_port(),
            bindir,
        };
        if warmspare_shared::apply::can_chown() {
            sh(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.socket.parent().expect("parent")));
        }
        sh(&mut pg.as_owner(
            "initdb",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        ));
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c fsync=off",
            pg.port,
            pg.socket.display()
        );
        sh(&mut pg.as_owner(
            "pg_ctl",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-o",
                &opts,
                "-l",
                &pg.data.join("log").display().to_string(),
                "-w",
                "start",
            ],
        ));
        pg
    }

    fn as_owner(&self, tool: &str, args: &[&str]) -> Command {
        let exe = self.bindir.join(tool);
        if warmspare_shared::apply::can_chown() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe).args(args);
            c
        } else {
            let mut c = Command::new(exe);
            c.args(args);
            c
        }
    }

    /// The `env` table for a node whose jobs use this server.
    pub fn env_toml(&self) -> String {
        format!(
            "env = {{ PGHOST = \"{}\", PGPORT = \"{}\", PGUSER = \"postgres\" }}",
            self.socket.display(),
            self.port
        )
    }

    /// Runs SQL in database `db` and returns psql's unaligned output.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        sh(&mut self.psql(db, sql)).trim().to_string()
    }

    /// Runs `sql` in database `db`, or `None` when psql fails (for polling a
    /// database that a restore may be rewriting).
    pub fn try_sql(&self, db: &str, sql: &str) -> Option<String> {
        let out = self.psql(db, sql).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn psql(&self, db: &str, sql: &str) -> Command {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql]);
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner(
                "pg_ctl",
                &["-D", &self.data.display().to_string(), "-m", "immediate", "stop"],
            )
            .output();
    }
}

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    /// The member's name (`m0`, `m1`, ...).
    pub name: String,
    /// Its client port on 127.0.0.1.
    pub client_port: u16,
    /// Its peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Its plain-HTTP metrics and health port on 127.0.0.1 (the client
    /// port may speak TLS only).
    pub metrics_port: u16,
    /// Whether its client URL is `https` (see [`EtcdCluster::start_tls`]).
    pub tls: bool,
    child: Option<Child>,
}

impl EtcdMember {
    /// The member's client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Whether the member answers `/health` with `"health":"true"` (it is
    /// up and its cluster has a leader).
    pub fn healthy(&self) -> bool {
        http_get(self.metrics_port, "/health").is_some_and(|(code, body)| code == 200 && body.contains("\"true\""))
    }
}

/// Certificates made with the real `openssl` in a temporary directory: a
/// CA, a server certificate for 127.0.0.1 and a client certificate signed
/// by it, and a second CA with a client certificate of its own (the wrong
/// ones). Every file is PEM; keys are P-256.
pub struct TestPki {
    /// Where the files are.
    pub dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes every certificate (valid for two days).
    pub fn new() -> TestPki {
        let openssl = require("openssl", "openssl");
        let dir = tempfile::Builder::new()
            .prefix("warmspare-pki")
            .tempdir()
            .expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "wrong-ca"] {
            let (keyfile, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=warmspare test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            args.extend([
                "-keyout",
                keyfile.as_str(),
                "-out",
                pem.as_str(),
                "-days",
                "2",
                "-subj",
                subj.as_str(),
            ]);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            run(&args);
        }
        fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write server.ext");
        fs::write(dir.path().join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write client.ext");
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("wrong-client", "wrong-ca", "client.ext"),
        ] {
            let (keyfile, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            let subj = format!("/CN={name}");
            let mut args = vec!["req"];
            args.extend(key);
            args.extend([
                "-keyout",
                keyfile.as_str(),
                "-out",
                csr.as_str(),
                "-subj",
                subj.as_str(),
            ]);
            run(&args);
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            run(&[
                "x509",
                "-req",
                "-in",
                csr.as_str(),
                "-CA",
                ca_pem.as_str(),
                "-CAkey",
                ca_key.as_str(),
                "-CAcreateserial",
                "-out",
                pem.as_str(),
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        TestPki { dir }
    }

    /// The path of `file` (`ca.pem`, `client.key`, ...).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// Real etcd members (Debian's `etcd-server`) on loopback: free ports,
/// data in a temporary directory, each member killed when this is dropped
/// (also when a test panics) and, through `setpriv --pdeathsig`, when the
/// test process dies.
pub struct EtcdCluster {
    /// The members, in the order of the `initial-cluster` list.
    pub members: Vec<EtcdMember>,
    /// The members' data directories and logs (`<name>.log`).
    pub dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits (with a deadline) until each one is
    /// healthy.
    pub fn start() -> EtcdCluster {
        EtcdCluster::start_n(3)
    }

    /// Starts `n` members and waits until each one is healthy.
    pub fn start_n(n: usize) -> EtcdCluster {
        EtcdCluster::launch(n, None)
    }

    /// Starts three members whose client URLs are `https` with the server
    /// certificate of `pki`, and which ask every client for a certificate
    /// signed by its CA (`--client-cert-auth`). Peers talk plain HTTP.
    pub fn start_tls(pki: &TestPki) -> EtcdCluster {
        EtcdCluster::launch(3, Some(pki))
    }

    fn launch(n: usize, pki: Option<&TestPki>) -> EtcdCluster {
        let etcd = require("etcd", "etcd-server");
        let setpriv = require("setpriv", "util-linux");
        let dir = tempfile::Builder::new()
            .prefix("warmspare-etcd")
            .tempdir()
            .expect("tempdir");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                tls: pki.is_some(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("warmspare-{}-{}", std::process::id(), members[0].client_port);
        let mut cluster = EtcdCluster { members, dir };
        for m in &mut cluster.members {
            let log = fs::File::create(cluster.dir.path().join(format!("{}.log", m.name))).expect("etcd log");
            let client = m.endpoint();
            let peer = format!("http://127.0.0.1:{}", m.peer_port);
            let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
            let mut command = Command::new(&setpriv);
            if let Some(pki) = pki {
                command
                    .arg("--pdeathsig")
                    .arg("KILL")
                    .arg("--")
                    .arg(&etcd)
                    .arg("--cert-file")
                    .arg(pki.path("server.pem"))
                    .arg("--key-file")
                    .arg(pki.path("server.key"))
                    .arg("--trusted-ca-file")
                    .arg(pki.path("ca.pem"))
                    .arg("--client-cert-auth");
            } else {
                command.args(["--pdeathsig", "KILL", "--"]).arg(&etcd);
            }
            let child = command
                .args(["--listen-metrics-urls", &metrics])
                .args(["--name", &m.name, "--data-dir"])
                .arg(cluster.dir.path().join(&m.name))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            m.child = Some(child);
        }
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    /// Waits until every running member is healthy.
    pub fn wait_healthy(&self, limit: Duration) {
        wait_until("every etcd member healthy", limit, || {
            self.members
                .iter()
                .filter(|m| m.child.is_some())
                .all(EtcdMember::healthy)
        });
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// An `[etcd]` table naming every member, with `extra` lines added.
    pub fn toml(&self, extra: &str) -> String {
        let list = self
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("[etcd]\nendpoints = [{list}]\n{extra}\n")
    }

    /// Sends `sig` (`-STOP`, `-CONT`, `-KILL`) to member `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        let child = self.members[i].child.as_ref().expect("member running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} member {i}");
    }

    /// The members' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- {} ---\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                // SIGKILL ends a stopped process too.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
