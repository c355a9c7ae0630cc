//! Restores on passives: the spool's dump, once it matches its metadata
//! and is newer than the last one restored here.

use std::fs;

use anyhow::{Context as _, Result};
use warmspare_shared::config::Job;
use warmspare_shared::manifest::ContentHash;
use warmspare_shared::proto::{JobKind, JobRun};

use crate::live::spool_dir;

use super::dump::keep_generation;
use super::{job_dir, load_persisted, record, shell, store_persisted, Handles, Meta};

/// Restores the spool's dump if it is newer than the last restored one (or,
/// with `retry`, if the last restore of it failed). `None`: nothing to restore.
pub(super) async fn restore(node: &Handles, job: &Job, retry: bool) -> Result<Option<JobRun>> {
    let Some(cmd) = job.restore.as_deref() else {
        return Ok(None);
    };
    let lock = node.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let spool = spool_dir(&node.live.state_dir).join(&job.name);
    let Some(meta) = fs::read(spool.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
    else {
        return Ok(None);
    };
    let mut p = load_persisted(&node.live.state_dir, &job.name);
    let failed_before = node.jobs.statuses(&node.live.cluster().job).iter().any(|s| {
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
    let dir = job_dir(&node.live.state_dir, &job.name);
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
    let dir = job_dir(&node.live.state_dir, &job.name);
    p.generation = p.generation.max(meta.generation);
    let start_ms = crate::clock::now_ms();
    let ran = shell(node, job, cmd, &[("WARMSPARE_INPUT", &kept)], &dir).await?;
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
    store_persisted(&node.live.state_dir, &job.name, &p).context("cannot record the restore")?;
    record(node, &run);
    Ok(Some(run))
}
