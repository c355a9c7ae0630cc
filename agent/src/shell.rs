//! Running operator commands (jobs, role hooks) through `/bin/sh -c`.
//!
//! Each command gets its own process group, a clean environment for systemd
//! variables, stdin from /dev/null and its output in files; at its time
//! limit, or when the future running it is dropped, the whole group is
//! killed, so pipelines and children go too. The wait runs on the async
//! runtime without holding a thread (tokio's child reaper).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};

/// A command to run.
pub struct Spec<'a> {
    /// The shell command line.
    pub cmd: &'a str,
    /// Environment added to the agent's own.
    pub env: Vec<(String, OsString)>,
    /// How long it may run.
    pub timeout: Duration,
    /// Where its standard output goes.
    pub stdout: File,
    /// Where its standard error goes.
    pub stderr: File,
}

/// How a command ended.
#[derive(Debug)]
pub enum Outcome {
    /// It exited (or was killed by someone else) with this status.
    Exited(ExitStatus),
    /// It ran past its time limit; its process group was killed.
    TimedOut(Duration),
}

impl Outcome {
    /// Whether the command succeeded.
    pub fn success(&self) -> bool {
        matches!(self, Outcome::Exited(s) if s.success())
    }

    /// The outcome in words (`exit status 0`, `timed out after 5s; killed`).
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited(s) => s.to_string(),
            Outcome::TimedOut(d) => format!("timed out after {}s; killed", d.as_secs()),
        }
    }
}

/// Kills a process group when dropped, unless disarmed.
struct Group(Option<u32>);

impl Group {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // The whole process group (`kill -KILL -- -PGID`), as one system
            // call: nothing to wait for, safe from async code and from `drop`.
            if let Some(pgid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Bytes of a hook's standard output and of its standard error kept at the
/// start and at the end of its log by [`run_capped`].
pub const HOOK_OUTPUT_KEEP: usize = 64 * 1024;

/// How long the output of a command that exited is still read: what it left
/// running in the background may hold its output open for ever.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Runs `spec` like [`run`], but its output passes through the agent on its
/// way to the files: each stream keeps its first `keep` bytes and its last
/// `keep`, with a line saying how many bytes between them were left out. A
/// hook that writes without end costs neither memory nor disk.
pub async fn run_capped(spec: Spec<'_>, keep: usize) -> Result<Outcome> {
    let (stdout, stderr) = (spec.stdout, spec.stderr);
    let mut child = spawn(spec.cmd, &spec.env, Stdio::piped(), Stdio::piped())?;
    let mut group = Group(child.id());
    let copies = [
        child.stdout.take().map(|p| tokio::spawn(copy_capped(p, stdout, keep))),
        child.stderr.take().map(|p| tokio::spawn(copy_capped(p, stderr, keep))),
    ];
    let outcome = wait(&mut child, &mut group, spec.timeout).await;
    for copy in copies.into_iter().flatten() {
        let abort = copy.abort_handle();
        if tokio::time::timeout(OUTPUT_DRAIN, copy).await.is_err() {
            // A background process kept the pipe: stop reading it.
            abort.abort();
        }
    }
    outcome
}

/// The most output of a failed hook quoted in its outcome.
const DETAIL_TAIL: u64 = 512;

/// A hook to run: a role hook or a watch's `after_apply`.
pub struct Hook<'a> {
    /// The shell command line.
    pub cmd: &'a str,
    /// This node's `env` from the cluster file in force.
    pub node_env: BTreeMap<String, String>,
    /// This node's name (`WARMSPARE_NODE`).
    pub node: &'a str,
    /// The hook's own `WARMSPARE_*` variables.
    pub vars: Vec<(&'static str, OsString)>,
    /// How long it may run.
    pub timeout: Duration,
    /// Where its output is kept (made private whatever the umask, since
    /// hook output can carry secrets; the directory must exist).
    pub log: &'a Path,
}

/// How a hook ended.
pub struct HookEnd {
    /// Whether it succeeded.
    pub ok: bool,
    /// The outcome in words; for a failure, with the tail of its output.
    pub detail: String,
}

/// Runs a hook with the node's environment and its variables, its output
/// kept in its log ([`run_capped`] with [`HOOK_OUTPUT_KEEP`]); `Err` when
/// it could not be started.
pub async fn run_hook(hook: Hook<'_>) -> std::io::Result<HookEnd> {
    let out = warmspare_shared::perms::create_private_file(hook.log)?;
    let err = out.try_clone()?;
    let mut env: Vec<(String, OsString)> = hook.node_env.into_iter().map(|(k, v)| (k, v.into())).collect();
    env.extend(hook.vars.into_iter().map(|(k, v)| (k.to_string(), v)));
    env.push(("WARMSPARE_NODE".into(), hook.node.into()));
    let outcome = run_capped(
        Spec {
            cmd: hook.cmd,
            env,
            timeout: hook.timeout,
            stdout: out,
            stderr: err,
        },
        HOOK_OUTPUT_KEEP,
    )
    .await
    .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let ok = outcome.success();
    let mut detail = outcome.describe();
    if !ok {
        let tail = tail_of(hook.log, DETAIL_TAIL);
        let tail = tail.trim();
        if !tail.is_empty() {
            detail = format!("{detail}; output: {tail}");
        }
    }
    Ok(HookEnd { ok, detail })
}

/// Copies `from` into `to`: the first `keep` bytes as they come, then only
/// the last `keep` in memory, written at the end after a marker line.
async fn copy_capped(mut from: impl tokio::io::AsyncRead + Unpin, to: File, keep: usize) {
    use std::io::Write as _;
    use tokio::io::AsyncReadExt as _;
    let mut to = std::io::BufWriter::new(to);
    let mut head = 0usize;
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        if head < keep {
            let take = chunk.len().min(keep - head);
            let _ = to.write_all(&chunk[..take]);
            head += take;
            chunk = &chunk[take..];
        }
        if chunk.len() >= keep {
            // Only this chunk's end can stay.
            dropped += (tail.len() + chunk.len() - keep) as u64;
            tail.clear();
            chunk = &chunk[chunk.len() - keep..];
        }
        tail.extend(chunk);
        if tail.len() > keep {
            let excess = tail.len() - keep;
            tail.drain(..excess);
            dropped += excess as u64;
        }
    }
    if dropped > 0 {
        let _ = write!(to, "\n[warmspare: {dropped} bytes of output left out]\n");
    }
    let (a, b) = tail.as_slices();
    let _ = to.write_all(a).and_then(|()| to.write_all(b)).and_then(|()| to.flush());
}

fn spawn(cmd: &str, env: &[(String, OsString)], stdout: Stdio, stderr: Stdio) -> Result<tokio::process::Child> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    tokio::process::Command::from(c)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))
}

async fn wait(child: &mut tokio::process::Child, group: &mut Group, timeout: Duration) -> Result<Outcome> {
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => {
            let status = s.context("cannot wait for the command")?;
            // The shell is done; what it started in the background on
            // purpose (a service it launched) is left alone.
            group.0 = None;
            Ok(Outcome::Exited(status))
        }
        Err(_) => {
            group.kill();
            // SIGKILL cannot be ignored: the shell ends now; still bounded.
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            Ok(Outcome::TimedOut(timeout))
        }
    }
}

/// Runs `spec` to its end or its time limit.
pub async fn run(spec: Spec<'_>) -> Result<Outcome> {
    let mut child = spawn(spec.cmd, &spec.env, spec.stdout.into(), spec.stderr.into())?;
    let mut group = Group(child.id());
    wait(&mut child, &mut group, spec.timeout).await
}

/// The last `n` bytes of the file at `path`, as text (empty when
/// unreadable; a character cut by the start of the tail, or any byte that
/// is not UTF-8, becomes U+FFFD).
pub fn tail_of(path: &Path, n: u64) -> String {
    String::from_utf8_lossy(&crate::files::tail_bytes(path, n)).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tail_cut_inside_a_character_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        // The 11-byte tail starts on the second byte of "à" (c3 a0).
        std::fs::write(&path, "déjà vu\nfailed").unwrap();
        assert_eq!(super::tail_of(&path, 11), "\u{fffd} vu\nfailed");
    }
}
