//! The record of every run (`jobs/<job>/history.jsonl`), and each job's
//! last run read back from its end after a restart.

use std::fs;
use std::path::Path;

use warmspare_shared::config::Job;
use warmspare_shared::perms;
use warmspare_shared::proto::JobRun;

use crate::job_state::Jobs;

use super::{job_dir, Handles};

/// Takes each job's last run from its persisted history when this
/// agent has not seen a run of it yet (after a restart), so status and
/// metrics keep showing it. The run counters stay counts since start.
pub(super) fn recall(state: &Jobs, state_dir: &Path, jobs: &[Job]) {
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

pub(super) fn record(node: &Handles, run: &JobRun) {
    let dir = job_dir(&node.live.state_dir, &run.job);
    let line = serde_json::to_string(run).unwrap_or_default() + "\n";
    let appended = perms::ensure_private_dir(&dir).and_then(|()| {
        use std::io::Write;
        perms::append_private_file(&dir.join("history.jsonl"))?.write_all(line.as_bytes())
    });
    if let Err(e) = appended {
        tracing::warn!(job = run.job, error = %e, "cannot append to the job history");
    }
    node.jobs.update(&run.job, |s| {
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
