//! The jobs' runtime state, shared by the job tasks, the receiver (the
//! arrival signal) and status: one lock per job, each job's status. Imports
//! no other agent module.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{Mutex as AsyncMutex, Notify};
use warmspare_shared::config::Job;
use warmspare_shared::proto::JobStatus;

/// The jobs' shared runtime: one lock per job (runs never overlap), status,
/// and the arrival signal from the receiver.
#[derive(Default)]
pub struct Jobs {
    locks: std::sync::Mutex<BTreeMap<String, Arc<AsyncMutex<()>>>>,
    status: std::sync::Mutex<BTreeMap<String, JobStatus>>,
    /// Woken when the receiver applied something in the spool.
    pub arrived: Notify,
}

impl Jobs {
    /// The lock that keeps runs of `job` from overlapping.
    pub fn lock_of(&self, job: &str) -> Arc<AsyncMutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job.to_string())
            .or_default()
            .clone()
    }

    /// Whether a run of `job` is known (since start, or recalled).
    pub fn has_run(&self, job: &str) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .is_some_and(|s| s.last.is_some())
    }

    /// The status of every job of `jobs` (jobs that never ran here included).
    pub fn statuses(&self, jobs: &[Job]) -> Vec<JobStatus> {
        let g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        jobs.iter()
            .map(|j| {
                g.get(&j.name).cloned().unwrap_or(JobStatus {
                    name: j.name.clone(),
                    last: None,
                    next: None,
                    runs_ok: 0,
                    runs_failed: 0,
                    generation: 0,
                })
            })
            .collect()
    }

    /// Changes the status of `job` (made empty when it has none yet).
    pub fn update(&self, job: &str, f: impl FnOnce(&mut JobStatus)) {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let s = g.entry(job.to_string()).or_insert_with(|| JobStatus {
            name: job.to_string(),
            last: None,
            next: None,
            runs_ok: 0,
            runs_failed: 0,
            generation: 0,
        });
        f(s);
    }
}
