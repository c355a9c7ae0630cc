//! Running operator commands (jobs, role hooks) through `/bin/sh -c`.
//!
//! Each command gets its own process group, a clean environment for systemd
//! variables, stdin from /dev/null and its output in files; at its time
//! limit, or when the future running it is dropped, the whole group is
//! killed, so pipelines and children go too. The wait runs on the async
//! runtime without holding a thread (tokio's child reaper).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
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

/// Runs `spec` to its end or its time limit.
pub async fn run(spec: Spec<'_>) -> Result<Outcome> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(spec.cmd)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(spec.stdout)
        .stderr(spec.stderr)
        .process_group(0);
    let mut child = tokio::process::Command::from(c)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", spec.cmd))?;
    let mut group = Group(child.id());
    match tokio::time::timeout(spec.timeout, child.wait()).await {
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
            Ok(Outcome::TimedOut(spec.timeout))
        }
    }
}
