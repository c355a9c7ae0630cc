//! Scheduled jobs: dumps on the active, restores on passives, plain commands.
//!
//! A good dump becomes a new generation: kept under `state_dir/jobs/<job>/gen/`
//! and published in the job spool (`state_dir/spool/<job>/dump` plus
//! `meta.json`). The spool is an internal watch, so dumps travel the
//! replication path: a new generation goes as a delta against the one the
//! passive holds. On a passive, a spool whose dump matches its metadata and is
//! newer than the last restored generation is restored (on arrival, or at
//! `restore_schedule`). A failed, timed-out or empty dump publishes nothing.
//! Missed schedules are not replayed: after a restart each job waits for its
//! next scheduled time.
//!
//! `schedule` runs each job at its cron times, `dump` makes and publishes
//! generations, `restore` restores what arrived, and `history` records
//! every run and reads the last one back at start.

mod dump;
mod history;
mod restore;
mod schedule;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use warmspare_shared::config::{Job, RunOn};
use warmspare_shared::manifest::ContentHash;
use warmspare_shared::perms;
use warmspare_shared::persist::write_atomic;
use warmspare_shared::proto::{JobKind, JobRun};

use crate::job_state::Jobs;
use crate::live::Live;
use crate::pause::Pause;
use crate::role::Role;

use self::dump::dump;
pub use self::history::history;
use self::history::{recall, record};
use self::restore::restore;
use self::schedule::{scheduled, Trigger};

/// What the jobs use of the node.
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force: the jobs, the state dir, the node's `env`.
    pub live: Arc<Live>,
    /// The role: where each job runs, and whether this node is held.
    pub role: Arc<Role>,
    /// The operator's hold: a paused node runs no scheduled job.
    pub pause: Arc<Pause>,
    /// The jobs' runtime: one lock per job, statuses, the arrival signal.
    pub jobs: Arc<Jobs>,
}

/// The folder of a job's kept generations, state and history.
fn job_dir(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("jobs").join(job)
}

/// What the spool says about the dump next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    generation: u64,
    hash: ContentHash,
    bytes: u64,
    time_ms: i64,
    node: String,
}

/// What a node remembers of a job across restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Persisted {
    /// The newest generation this node dumped or received.
    generation: u64,
    /// The newest generation restored successfully here.
    restored: u64,
}

fn load_persisted(state_dir: &Path, job: &str) -> Persisted {
    fs::read(job_dir(state_dir, job).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn store_persisted(state_dir: &Path, job: &str, p: &Persisted) -> io::Result<()> {
    let bytes = serde_json::to_vec(p).map_err(io::Error::other)?;
    write_atomic(&job_dir(state_dir, job).join("state.json"), &bytes)
}

/// Runs every job's schedule until `cancel` fires.
pub async fn run(node: Handles, cancel: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    // Reading the histories' ends is file I/O: off the runtime.
    let s = node.clone();
    let jobs = node.live.cluster().job.clone();
    let _ = tokio::task::spawn_blocking(move || recall(&s.jobs, &s.live.state_dir, &jobs)).await;
    for job in node.live.cluster().job.clone() {
        let g = load_persisted(&node.live.state_dir, &job.name);
        node.jobs.update(&job.name, |s| s.generation = g.generation);
        if let Some(expr) = &job.schedule {
            tasks.spawn(scheduled(
                node.clone(),
                job.clone(),
                expr.clone(),
                Trigger::Main,
                cancel.clone(),
            ));
        }
        if let Some(expr) = &job.restore_schedule {
            tasks.spawn(scheduled(
                node.clone(),
                job.clone(),
                expr.clone(),
                Trigger::Restore,
                cancel.clone(),
            ));
        }
    }
    // Restores on arrival.
    let s = node.clone();
    let c = cancel.clone();
    tasks.spawn(async move {
        loop {
            // A passive that restarts restores what arrived while it was down.
            for job in s
                .live
                .cluster()
                .job
                .iter()
                .filter(|j| j.restore.is_some() && j.restore_schedule.is_none())
            {
                if !s.role.is_active() && !s.pause.is_paused() && !s.role.is_unconfirmed() {
                    let _ = restore(&s, job, false).await;
                }
            }
            tokio::select! {
                _ = c.cancelled() => return,
                _ = s.jobs.arrived.notified() => {}
            }
        }
    });
    cancel.cancelled().await;
    tasks.shutdown().await;
}

/// Runs `name` now, as this node's role says; for `warmsparectl run-job`.
pub async fn run_now(node: &Handles, name: &str) -> Result<JobRun> {
    let cluster = node.live.cluster();
    let job = cluster
        .job
        .iter()
        .find(|j| j.name == name)
        .with_context(|| format!("there is no job {name:?}"))?;
    if let Some(reason) = node.role.held() {
        anyhow::bail!("{reason}");
    }
    let active = node.role.is_active();
    if job.dump.is_some() {
        if active {
            dump(node, job).await
        } else if job.restore.is_some() {
            restore(node, job, true)
                .await?
                .with_context(|| format!("no dump of {name} has arrived yet"))
        } else {
            anyhow::bail!("{name} has no restore command, and this node is not active")
        }
    } else {
        // A `run` command runs only where its `on` says, whoever asks.
        let on = job.on.unwrap_or(RunOn::Active);
        let fits = match on {
            RunOn::Active => active,
            RunOn::Passive => !active,
            RunOn::All => true,
        };
        if !fits {
            anyhow::bail!(
                "{name} runs on {} nodes only, and this node is {}",
                if on == RunOn::Active { "the active" } else { "passive" },
                if active { "active" } else { "passive" }
            );
        }
        run_command(node, job).await
    }
}

/// The outcome of running a shell command.
struct Ran {
    ok: bool,
    detail: String,
    stdout: PathBuf,
}

/// Runs `cmd` through `/bin/sh -c` in its own process group with the node's
/// environment plus `vars`, killing the whole group at the job's timeout.
async fn shell(node: &Handles, job: &Job, cmd: &str, vars: &[(&str, &Path)], work: &Path) -> Result<Ran> {
    // The job's directory is private: what a command writes there (a dump
    // with its umask's 0644) is out of other users' reach from the start.
    perms::ensure_private_dir(work).with_context(|| format!("cannot create {}", work.display()))?;
    let stdout = work.join(".warmspare-tmp.stdout");
    let stderr = work.join(".warmspare-tmp.stderr");
    let mut env: Vec<(String, std::ffi::OsString)> = node.live.env().into_iter().map(|(k, v)| (k, v.into())).collect();
    env.push(("WARMSPARE_JOB".into(), job.name.clone().into()));
    env.push(("WARMSPARE_NODE".into(), node.live.me.name.clone().into()));
    for (k, v) in vars {
        env.push((k.to_string(), v.as_os_str().to_owned()));
    }
    let outcome = crate::shell::run(crate::shell::Spec {
        cmd,
        env,
        timeout: job.timeout(),
        stdout: perms::create_private_file(&stdout).context("cannot create the stdout file")?,
        stderr: perms::create_private_file(&stderr).context("cannot create the stderr file")?,
    })
    .await?;
    let status = match outcome {
        crate::shell::Outcome::Exited(s) => Some(s),
        crate::shell::Outcome::TimedOut(_) => None,
    };
    let tail = crate::shell::tail_of(&stderr, 2048);
    let _ = fs::remove_file(&stderr);
    let (ok, detail) = match status {
        None => (false, format!("timed out after {}s; killed", job.timeout().as_secs())),
        Some(s) if s.success() => (true, "exit status 0".to_string()),
        Some(s) => (false, format!("{s}; stderr: {}", tail.trim())),
    };
    Ok(Ran { ok, detail, stdout })
}

/// Runs a plain `run` command.
async fn run_command(node: &Handles, job: &Job) -> Result<JobRun> {
    let lock = node.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let start_ms = crate::clock::now_ms();
    let dir = job_dir(&node.live.state_dir, &job.name);
    let ran = shell(node, job, job.run.as_deref().unwrap_or_default(), &[], &dir).await?;
    let _ = fs::remove_file(&ran.stdout);
    let run = JobRun {
        job: job.name.clone(),
        kind: JobKind::Run,
        start_ms,
        end_ms: crate::clock::now_ms(),
        ok: ran.ok,
        detail: ran.detail,
        bytes: 0,
        generation: 0,
    };
    record(node, &run);
    Ok(run)
}
