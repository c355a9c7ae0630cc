//! `after_apply`: a watch's command on the receiving node after applied batches.
//!
//! The receiver never waits for it: a commit is acknowledged as soon as it
//! is durable, and the hook runs beside replication on the async runtime,
//! through the one command runner ([`crate::shell`]: own process group,
//! killed at the watch's `after_apply_timeout`). Runs of one watch never
//! overlap: batches that land while the hook runs are coalesced into one
//! more run once it ends. Every outcome is counted (status, metrics) and a
//! failure is logged with the tail of its output, which is kept in
//! `state_dir/hooks/after_apply.<watch>.log`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::proto::{AfterApplyRun, AfterApplyStatus};

use crate::live::Live;

/// The `after_apply` runtime of every watch.
pub struct AfterApply {
    /// The configuration in force (the hooks' commands, the node's env).
    live: Arc<Live>,
    /// Per watch: running, queued, counters and the last run.
    state: Mutex<BTreeMap<String, AfterApplyStatus>>,
    /// The runs under way (one task per watch at most).
    tasks: Mutex<JoinSet<()>>,
    /// Cancelled at shutdown: a run under way is cut off (its process
    /// group killed).
    stop: CancellationToken,
}

impl AfterApply {
    /// No run yet, for the configuration `live`.
    pub fn new(live: Arc<Live>) -> AfterApply {
        AfterApply {
            live,
            state: Mutex::default(),
            tasks: Mutex::default(),
            stop: CancellationToken::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, BTreeMap<String, AfterApplyStatus>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hook's status for `watch`; `None` when it never ran and has no
    /// command (nothing to say).
    pub fn status(&self, watch: &str, configured: bool) -> Option<AfterApplyStatus> {
        match self.state().get(watch) {
            Some(s) => Some(s.clone()),
            None if configured => Some(AfterApplyStatus::default()),
            None => None,
        }
    }

    /// Cuts off the runs under way (their process groups are killed) and
    /// waits at most `limit` for them to end.
    pub async fn shutdown(&self, limit: Duration) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        if tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!("after_apply runs did not stop in time");
            tasks.abort_all();
        }
    }
}

/// Asks for a run of `watch`'s `after_apply` after a batch was applied:
/// started now on `runtime` when none runs, else queued behind the one
/// that runs (any number of requests meanwhile make one more run). Never
/// blocks: the receiver calls it from its apply thread.
pub fn request(after: &Arc<AfterApply>, runtime: &tokio::runtime::Handle, watch: &str) {
    if after.stop.is_cancelled() || command(&after.live, watch).is_none() {
        return;
    }
    {
        let mut g = after.state();
        let s = g.entry(watch.to_string()).or_default();
        if s.running {
            s.queued = true;
            return;
        }
        s.running = true;
    }
    let mut tasks = after.tasks.lock().unwrap_or_else(|p| p.into_inner());
    // Runs that ended are let go of here (their results are in `state`).
    while tasks.try_join_next().is_some() {}
    tasks.spawn_on(runs(after.clone(), watch.to_string()), runtime);
}

/// The command, timeout and root of `watch`'s hook in the cluster file in force.
fn command(live: &Live, watch: &str) -> Option<(String, Duration, PathBuf)> {
    let cluster = live.cluster();
    let w = cluster.watch(watch)?;
    let cmd = w.after_apply.clone()?;
    Some((cmd, w.after_apply_timeout, live.me.local_path(&w.path)))
}

/// Runs the hook of `watch` until no run is queued.
async fn runs(after: Arc<AfterApply>, watch: String) {
    loop {
        let run = match command(&after.live, &watch) {
            // The watch lost its hook in a reload: nothing more to run.
            None => None,
            Some((cmd, timeout, root)) => {
                tokio::select! {
                    _ = after.stop.cancelled() => None,
                    r = run_once(&after.live, &watch, &cmd, timeout, root) => Some(r),
                }
            }
        };
        let mut g = after.state();
        let s = g.entry(watch.clone()).or_default();
        if let Some(run) = run {
            if run.ok {
                s.runs_ok += 1;
            } else {
                s.runs_failed += 1;
            }
            s.last = Some(run);
        }
        if s.queued && !after.stop.is_cancelled() && command(&after.live, &watch).is_some() {
            s.queued = false;
            continue;
        }
        s.running = false;
        s.queued = false;
        return;
    }
}

/// One run of the hook, to its end or its time limit.
async fn run_once(live: &Live, watch: &str, cmd: &str, timeout: Duration, root: PathBuf) -> AfterApplyRun {
    let start_ms = crate::clock::now_ms();
    let dir = live.state_dir.join("hooks");
    let log = dir.join(format!("after_apply.{watch}.log"));
    let outcome = match warmspare_shared::perms::ensure_private_dir(&dir) {
        Ok(()) => {
            crate::shell::run_hook(crate::shell::Hook {
                cmd,
                node_env: live.env(),
                node: &live.me.name,
                vars: vec![
                    ("WARMSPARE_WATCH", watch.into()),
                    ("WARMSPARE_PATH", root.into_os_string()),
                ],
                timeout,
                log: &log,
            })
            .await
        }
        Err(e) => Err(e),
    };
    let mut run = AfterApplyRun {
        start_ms,
        end_ms: crate::clock::now_ms(),
        ok: false,
        detail: String::new(),
    };
    match outcome {
        Ok(end) => (run.ok, run.detail) = (end.ok, end.detail),
        Err(e) => run.detail = format!("cannot run after_apply: {e}"),
    }
    let ms = run.end_ms - run.start_ms;
    if run.ok {
        tracing::debug!(watch, ms, "after_apply ran");
    } else {
        tracing::warn!(watch, ms, detail = run.detail, "after_apply failed");
    }
    run
}
