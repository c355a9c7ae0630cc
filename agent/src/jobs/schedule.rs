//! Each job's cron schedule: the dump or run command at `schedule`, the
//! restore at `restore_schedule`.

use std::str::FromStr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warmspare_shared::config::{Job, RunOn};

use super::{dump, restore, run_command, Handles};

#[derive(Clone, Copy)]
pub(super) enum Trigger {
    /// `schedule`: the dump (on the active) or the run command.
    Main,
    /// `restore_schedule`: the restore (on passives).
    Restore,
}

pub(super) async fn scheduled(node: Handles, job: Job, expr: String, trigger: Trigger, cancel: CancellationToken) {
    let Ok(schedule) = cron::Schedule::from_str(&expr) else {
        return;
    };
    loop {
        let Some(next) = schedule.upcoming(chrono::Local).next() else {
            return;
        };
        if matches!(trigger, Trigger::Main) {
            node.jobs.update(&job.name, |s| s.next = Some(next.timestamp()));
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
        if node.pause.is_paused() {
            tracing::info!(job = job.name, "job skipped: paused");
            continue;
        }
        if node.role.is_unconfirmed() {
            tracing::info!(
                job = job.name,
                "job skipped: this node is held until a peer confirms its epoch"
            );
            continue;
        }
        let active = node.role.is_active();
        match trigger {
            Trigger::Restore if !active => {
                let _ = restore(&node, &job, true).await;
            }
            Trigger::Main if job.dump.is_some() && active => {
                let _ = dump(&node, &job).await;
            }
            Trigger::Main if job.run.is_some() && runs_here(&job, active) => {
                let _ = run_command(&node, &job).await;
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
