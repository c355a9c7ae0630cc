//! Dumps on the active: a good dump becomes the next generation, kept
//! under `gen/` and published in the job spool.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Result;
use warmspare_shared::config::Job;
use warmspare_shared::manifest::ContentHash;
use warmspare_shared::perms;
use warmspare_shared::persist::write_atomic;
use warmspare_shared::proto::{JobKind, JobRun};

use crate::live::spool_dir;

use super::{job_dir, load_persisted, record, shell, store_persisted, Handles, Meta};

/// Runs the dump; a good one becomes the next generation and is published.
pub(super) async fn dump(node: &Handles, job: &Job) -> Result<JobRun> {
    let lock = node.jobs.lock_of(&job.name);
    let _g = lock.lock().await;
    let start_ms = crate::clock::now_ms();
    let dir = job_dir(&node.live.state_dir, &job.name);
    let output = dir.join(".warmspare-tmp.output");
    let _ = fs::remove_file(&output);
    let cmd = job.dump.as_deref().unwrap_or_default();
    let ran = shell(node, job, cmd, &[("WARMSPARE_OUTPUT", &output)], &dir).await;
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
            let (state_dir, me, j) = (node.live.state_dir.clone(), node.live.me.name.clone(), job.clone());
            let result = tokio::task::spawn_blocking(move || publish(&state_dir, &me, &j, &file))
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
    record(node, &run);
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
pub(super) fn keep_generation(dir: &Path, generation: u64, file: &Path, keep: u32) -> io::Result<PathBuf> {
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
