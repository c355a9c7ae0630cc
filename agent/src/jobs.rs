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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use warmspare_shared::config::{Job, RunOn};
use warmspare_shared::manifest::ContentHash;
use warmspare_shared::perms;
use warmspare_shared::persist::write_atomic;
use warmspare_shared::proto::{JobKind, JobRun};

use crate::job_state::Jobs;
use crate::live::spool_dir;
use crate::node::Shared;

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

/// Takes each job's last run from its persisted history when this
/// agent has not seen a run of it yet (after a restart), so status and
/// metrics keep showing it. The run counters stay counts since start.
fn recall(state: &Jobs, state_dir: &Path, jobs: &[Job]) {
    for job in jobs {
        let known = state.has_run(&job.name);
        if known {
            continue;
        }
        if let Some(run) = last_recorded(state_dir, &job.name) {
            state.update(&job.name, |s| {
                if s.last.is_none() {
                    s.last = Some(run);
                }
            });
        }
    }
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

fn record(shared: &Shared, run: &JobRun) {
    let dir = job_dir(&shared.live.state_dir, &run.job);
    let line = serde_json::to_string(run).unwrap_or_default() + "\n";
    let appended = perms::ensure_private_dir(&dir).and_then(|()| {
        use std::io::Write;
        perms::append_private_file(&dir.join("history.jsonl"))?.write_all(line.as_bytes())
    });
    if let Err(e) = appended {
        tracing::warn!(job = run.job, error = %e, "cannot append to the job history");
    }
    shared.jobs.update(&run.job, |s| {
        s.last = Some(run.clone());
        if run.ok {
            s.runs_ok += 1;
        } else {
            s.runs_failed += 1;
        }
        if run.generation > s.generation {
            s.generation = run.generation;
        }
    });
    if run.ok {
        tracing::info!(job = run.job, kind = ?run.kind, generation = run.generation, bytes = run.bytes, ms = run.end_ms - run.start_ms, "job ran");
    } else {
        tracing::warn!(job = run.job, kind = ?run.kind, detail = run.detail, "job failed");
    }
}

/// The recorded runs of `job` on this node (oldest first).
pub fn history(state_dir: &Path, job: &str) -> Vec<JobRun> {
    fs::read_to_string(job_dir(state_dir, job).join("history.jsonl"))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// How much of the end of a job's history is read for its last run: a
/// record is a few KiB at most (the detail keeps 2 KiB of stderr).
const LAST_RUN_TAIL: u64 = 64 * 1024;

/// The newest run of `job` in its persisted history, read from the end of
/// the file (the history itself is never read whole for this).
fn last_recorded(state_dir: &Path, job: &str) -> Option<JobRun> {
    let bytes = crate::files::tail_bytes(&job_dir(state_dir, job).join("history.jsonl"), LAST_RUN_TAIL);
    // The first line may be cut mid-character: it is skipped as unparsable.
    String::from_utf8_lossy(&bytes)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<JobRun>(l).ok())
        .filter(|r| r.job == job)
}

/// Runs every job's schedule until `cancel` fires.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    // Reading the histories' ends is file I/O: off the runtime.
    let s = shared.clone();
    let jobs = shared.live.cluster().job.clone();
    let _ = tokio::task::spawn_blocking(move || recall(&s.jobs, &s.live.state_dir, &jobs)).await;
    for job in shared.live.cluster().job.clone() {
        let g = load_persisted(&shared.live.state_dir, &job.name);
        shared.jobs.update(&job.name, |s| s.generation = g.generation);
        if let Some(expr) = &job.schedule {
            tasks.spawn(scheduled(
                shared.clone(),
                job.clone(),
                expr.clone(),
                Trigger::Main,
                cancel.clone(),
            ));
        }
        if let Some(expr) = &job.restore_schedule {
            tasks.spawn(scheduled(
                shared.clone(),
                job.clone(),
                expr.clone(),
                Trigger::Restore,
                cancel.clone(),
            ));
        }
    }
    // Restores on arrival.
    let s = shared.clone();
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
                if !s.is_active() && !s.is_paused() && !s.is_unconfirmed() {
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

#[derive(Clone, Copy)]
enum Trigger {
    /// `schedule`: the dump (on the active) or the run command.
    Main,
    /// `restore_schedule`: the restore (on passives).
    Restore,
}

async fn scheduled(shared: Arc<Shared>, job: Job, expr: String, trigger: Trigger, cancel: CancellationToken) {
    let Ok(schedule) = cron::Schedule::from_str(&expr) else {
        return;
    };
    loop {
        let Some(next) = schedule.upcoming(chrono::Local).next() else {
            return;
        };
        if matches!(trigger, Trigger::Main) {
            shared.jobs.update(&job.name, |s| s.next = Some(next.timestamp()));
        }
        let wait = (next - chrono::Local::now()).to_std().unwrap_or(Duration::ZERO);
        // Far-off times are approached a day at a time (timers have a range,
        // and the wall clock may be adjusted meanwhile).
        if wait > Duration::from_secs(86_400) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(86_400)) => continue,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if shared.is_paused() {
            tracing::info!(job = job.name, "job skipped: paused");
            continue;
        }
        if shared.is_unconfirmed() {
            tracing::info!(
                job = job.name,
                "job skipped: this node is held until a peer confirms its epoch"
            );
            continue;
        }
        let active = shared.is_active();
        match trigger {
            Trigger::Restore if !active => {
                let _ = restore(&shared, &job, true).await;
            }
            Trigger::Main if job.dump.is_some() && active => {
                let _ = dump(&shared, &job).await;
            }
            Trigger::Main if job.run.is_some() && runs_here(&job, active) => {
                let _ = run_command(&shared, &job).await;
            }
            _ => {}
        }
    }
}

fn runs_here(job: &Job, active: bool) -> bool {
    match job.on.unwrap_or(RunOn::Active) {
        RunOn::All => true,
        RunOn::Active => active,
        RunOn::Passive => !active,
    }
}

/// Runs `name` now, as this node's role says; for `warmsparectl run-job`.
pub async fn run_now(shared: &Shared, name: &str) -> Result<JobRun> {
    let cluster = shared.live.cluster();
    let job = cluster
        .job
        .iter()
        .find(|j| j.name == name)
        .with_context(|| format!("there is no job {name:?}"))?;
    if let Some(reason) = shared.held() {
        anyhow::bail!("{reason}");
    }
    let active = shared.is_active();
    if job.dump.is_some() {
        if active {
            dump(shared, job).await
        } else if job.restore.is_some() {
            restore(shared, job, true)
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
        run_command(shared, job).await
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
async fn shell(shared: &Shared, job: &Job, cmd: &str, vars: &[(&str, &Path)], work: &Path) -> Result<Ran> {
    // The job's directory is private: what a command writes there (a dump
    // with its umask's 0644) is out of other users' reach from the start.
    perms::ensure_private_dir(work).with_context(|| format!("cannot create {}", work.display()))?;
    let stdout = work.join(".warmspare-tmp.stdout");
    let stderr = work.join(".warmspare-tmp.stderr");
    let mut env: Vec<(String, std::ffi::OsString)> =
        shared.live.env().into_iter().map(|(k, v)| (k, v.into())).collect();
    env.push(("WARMSPARE_JOB".into(), job.name.clone().into()));
    env.push(("WARMSPARE_NODE".into(), shared.live.me.name.clone().into()));
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

/// Runs the dump; a good one becomes the next generation and is published.
async fn dump(shared: &Shared, job: &Job) -> Result<JobRun> {
    let lock = shared.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let start_ms = crate::clock::now_ms();
    let dir = job_dir(&shared.live.state_dir, &job.name);
    let output = dir.join(".warmspare-tmp.output");
    let _ = fs::remove_file(&output);
    let cmd = job.dump.as_deref().unwrap_or_default();
    let ran = shell(shared, job, cmd, &[("WARMSPARE_OUTPUT", &output)], &dir).await;
    let mut run = JobRun {
        job: job.name.clone(),
        kind: JobKind::Dump,
        start_ms,
        end_ms: 0,
        ok: false,
        detail: String::new(),
        bytes: 0,
        generation: 0,
    };
    let published = match ran {
        Err(e) => Err(format!("{e:#}")),
        Ok(ran) if !ran.ok => {
            let _ = fs::remove_file(&ran.stdout);
            Err(ran.detail)
        }
        Ok(ran) => {
            // WARMSPARE_OUTPUT when the command wrote it, else its stdout.
            let written = fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            let file = if written > 0 {
                output.clone()
            } else {
                ran.stdout.clone()
            };
            // Hashing and linking a dump of gigabytes is blocking work.
            let (state_dir, node, j) = (shared.live.state_dir.clone(), shared.live.me.name.clone(), job.clone());
            let result = tokio::task::spawn_blocking(move || publish(&state_dir, &node, &j, &file))
                .await
                .unwrap_or_else(|e| Err(format!("the task publishing the dump failed: {e}")));
            let _ = fs::remove_file(&ran.stdout);
            result
        }
    };
    let _ = fs::remove_file(&output);
    match published {
        Ok((generation, bytes)) => {
            run.ok = true;
            run.generation = generation;
            run.bytes = bytes;
            run.detail = "exit status 0".into();
        }
        Err(detail) => run.detail = detail,
    }
    run.end_ms = crate::clock::now_ms();
    record(shared, &run);
    Ok(run)
}

/// Makes `file` the next generation: kept under `gen/`, then the spool.
fn publish(state_dir: &Path, node: &str, job: &Job, file: &Path) -> std::result::Result<(u64, u64), String> {
    // The command wrote WARMSPARE_OUTPUT with its own umask: the dump is made
    // private before it is kept, linked into the spool and shipped.
    fs::File::open(file)
        .and_then(|f| perms::make_private(&f))
        .map_err(|e| format!("cannot make the dump private: {e}"))?;
    let bytes = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if bytes == 0 {
        return Err("the dump command succeeded but wrote nothing; nothing was shipped".into());
    }
    let hash = ContentHash::of_file(file).map_err(|e| format!("cannot hash the dump: {e}"))?;
    let mut p = load_persisted(state_dir, &job.name);
    let generation = p.generation + 1;
    let dir = job_dir(state_dir, &job.name);
    let kept = keep_generation(&dir, generation, file, job.keep).map_err(|e| format!("cannot keep the dump: {e}"))?;
    let spool = spool_dir(state_dir).join(&job.name);
    let meta = Meta {
        generation,
        hash,
        bytes,
        time_ms: crate::clock::now_ms(),
        node: node.to_string(),
    };
    (|| -> io::Result<()> {
        perms::ensure_private_dir(&spool)?;
        let tmp = spool.join(format!(".warmspare-tmp.dump.{generation}"));
        let _ = fs::remove_file(&tmp);
        fs::hard_link(&kept, &tmp).or_else(|_| fs::copy(&kept, &tmp).map(drop))?;
        fs::rename(&tmp, spool.join("dump"))?;
        write_atomic(
            &spool.join("meta.json"),
            &serde_json::to_vec(&meta).map_err(io::Error::other)?,
        )
    })()
    .map_err(|e| format!("cannot publish the dump: {e}"))?;
    p.generation = generation;
    store_persisted(state_dir, &job.name, &p).map_err(|e| format!("cannot record the generation: {e}"))?;
    Ok((generation, bytes))
}

/// Moves or links `file` to `gen/<generation>` and prunes to `keep` generations.
fn keep_generation(dir: &Path, generation: u64, file: &Path, keep: u32) -> io::Result<PathBuf> {
    let gens = dir.join("gen");
    perms::ensure_private_dir(&gens)?;
    let dest = gens.join(format!("{generation:010}"));
    let _ = fs::remove_file(&dest);
    if fs::hard_link(file, &dest).is_err() {
        fs::copy(file, &dest)?;
    }
    let mut all: Vec<PathBuf> = fs::read_dir(&gens)?.flatten().map(|d| d.path()).collect();
    all.sort();
    let excess = all.len().saturating_sub(keep as usize);
    for old in &all[..excess] {
        fs::remove_file(old)?;
    }
    Ok(dest)
}

/// Restores the spool's dump if it is newer than the last restored one (or,
/// with `retry`, if the last restore of it failed). `None`: nothing to restore.
async fn restore(shared: &Shared, job: &Job, retry: bool) -> Result<Option<JobRun>> {
    let Some(cmd) = job.restore.as_deref() else {
        return Ok(None);
    };
    let lock = shared.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let spool = spool_dir(&shared.live.state_dir).join(&job.name);
    let Some(meta) = fs::read(spool.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
    else {
        return Ok(None);
    };
    let mut p = load_persisted(&shared.live.state_dir, &job.name);
    let failed_before = shared.jobs.statuses(&shared.live.cluster().job).iter().any(|s| {
        s.name == job.name
            && s.last
                .as_ref()
                .is_some_and(|r| r.kind == JobKind::Restore && !r.ok && r.generation == meta.generation)
    });
    if meta.generation <= p.restored || (failed_before && !retry) {
        return Ok(None);
    }
    // The dump and its metadata arrive separately: wait for both to match.
    // Hashing a dump and keeping it are blocking work.
    let dump = spool.join("dump");
    let dir = job_dir(&shared.live.state_dir, &job.name);
    let (generation, keep, expected) = (meta.generation, job.keep, meta.hash);
    let kept = tokio::task::spawn_blocking(move || {
        if ContentHash::of_file(&dump).ok() != Some(expected) {
            return Ok(None);
        }
        keep_generation(&dir, generation, &dump, keep).map(Some)
    })
    .await
    .context("the task keeping the arrived dump failed")?
    .context("cannot keep the arrived dump")?;
    let Some(kept) = kept else {
        return Ok(None);
    };
    let dir = job_dir(&shared.live.state_dir, &job.name);
    p.generation = p.generation.max(meta.generation);
    let start_ms = crate::clock::now_ms();
    let ran = shell(shared, job, cmd, &[("WARMSPARE_INPUT", &kept)], &dir).await?;
    let _ = fs::remove_file(&ran.stdout);
    let run = JobRun {
        job: job.name.clone(),
        kind: JobKind::Restore,
        start_ms,
        end_ms: crate::clock::now_ms(),
        ok: ran.ok,
        detail: ran.detail,
        bytes: meta.bytes,
        generation: meta.generation,
    };
    if run.ok {
        p.restored = meta.generation;
    }
    store_persisted(&shared.live.state_dir, &job.name, &p).context("cannot record the restore")?;
    record(shared, &run);
    Ok(Some(run))
}

/// Runs a plain `run` command.
async fn run_command(shared: &Shared, job: &Job) -> Result<JobRun> {
    let lock = shared.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let start_ms = crate::clock::now_ms();
    let dir = job_dir(&shared.live.state_dir, &job.name);
    let ran = shell(shared, job, job.run.as_deref().unwrap_or_default(), &[], &dir).await?;
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
    record(shared, &run);
    Ok(run)
}
