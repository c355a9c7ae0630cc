//! Role hooks: `on_promote` and `on_demote`.
//!
//! `on_promote` runs on a node that holds a new epoch naming it active,
//! before it acts as active: until the hook has succeeded for the current
//! epoch the node answers 503 on `/_status/check`, ships nothing and runs no
//! active-side jobs ([`Role::is_active`](crate::role::Role::is_active) is false). A failed run leaves the
//! node holding the epoch but fenced until an operator retries (a new epoch
//! naming it again) or moves the role elsewhere. `on_demote` runs once the
//! node's active side has stopped, whatever demoted it.
//!
//! Each run is recorded under `state_dir/hooks/<hook>.json` when it starts
//! and again when it ends (atomically); a run that has no end was cut off
//! (the agent stopped) and runs again at the next start.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use warmspare_shared::config::Hook;
use warmspare_shared::persist;
use warmspare_shared::proto::HookRun;
use warmspare_shared::state::{self, HistoryEntry};

use crate::clock::unix;
use crate::live::Live;
use crate::promotion::Promotion;
use crate::role::Role;

/// The most output of one run copied into the agent's log.
const LOG_TAIL: u64 = 8 * 1024;

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("hooks")
}

fn record_path(state_dir: &Path, hook: Hook) -> PathBuf {
    dir(state_dir).join(format!("{}.json", hook.name()))
}

/// The last recorded run of `hook` on this node.
pub fn last_run(state_dir: &Path, hook: Hook) -> Option<HookRun> {
    let bytes = fs::read(record_path(state_dir, hook)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The last run of each hook, for status.
pub fn last_runs(state_dir: &Path) -> Vec<HookRun> {
    Hook::ALL.iter().filter_map(|h| last_run(state_dir, *h)).collect()
}

fn store(state_dir: &Path, run: &HookRun) {
    let path = record_path(state_dir, run.hook);
    let written = serde_json::to_vec_pretty(run)
        .map_err(std::io::Error::other)
        .and_then(|bytes| persist::write_atomic(&path, &bytes));
    if let Err(e) = written {
        tracing::error!(hook = %run.hook, path = %path.display(), error = %e, "cannot record the hook run");
    }
}

/// Runs `hook` for the move to `epoch` (from `from` to `to`); `None` when
/// this node has no such hook.
pub async fn run(live: &Live, role: &Role, hook: Hook, epoch: u64, from: &str, to: &str) -> Option<HookRun> {
    let cluster = live.cluster();
    let cmd = cluster.hook(&live.me, hook)?.to_string();
    let timeout = cluster.cluster.hook_timeout;
    let mut run = HookRun {
        hook,
        epoch,
        from: from.to_string(),
        start_ms: crate::clock::now_ms(),
        end_ms: None,
        ok: false,
        detail: "running".into(),
    };
    store(&live.state_dir, &run);
    tracing::warn!(%hook, epoch, from, to, "running the role hook");
    let log = dir(&live.state_dir).join(format!("{}.log", hook.name()));
    let outcome = crate::shell::run_hook(crate::shell::Hook {
        cmd: &cmd,
        node_env: live.env(),
        node: &live.me.name,
        vars: vec![
            ("WARMSPARE_HOOK", hook.name().into()),
            ("WARMSPARE_EPOCH", epoch.to_string().into()),
            ("WARMSPARE_FROM", from.into()),
            ("WARMSPARE_TO", to.into()),
        ],
        timeout,
        log: &log,
    })
    .await;
    let output = crate::shell::tail_of(&log, LOG_TAIL);
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        tracing::info!(%hook, "output: {line}");
    }
    run.end_ms = Some(crate::clock::now_ms());
    match outcome {
        Ok(end) => (run.ok, run.detail) = (end.ok, end.detail),
        Err(e) => {
            run.ok = false;
            run.detail = format!("cannot run the hook: {e}");
        }
    }
    store(&live.state_dir, &run);
    role.hooks.counted(hook, run.ok);
    let ms = run.end_ms.unwrap_or(run.start_ms) - run.start_ms;
    if run.ok {
        tracing::warn!(%hook, epoch, ms, "the role hook succeeded");
    } else {
        tracing::error!(%hook, epoch, ms, detail = run.detail, "the role hook failed");
        let entry = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch,
            from: from.to_string(),
            to: to.to_string(),
            reason: format!("{hook} failed on {}: {}", live.me.name, run.detail),
            by: live.me.name.clone(),
        };
        if let Err(e) = state::append_history(&live.state_dir, &entry) {
            tracing::warn!(error = %e, "cannot append the hook failure to the role history");
        }
    }
    Some(run)
}

/// Runs `on_promote` for `epoch` unless it already succeeded for it (or
/// failed for it: that waits for an operator), and publishes the outcome;
/// true when the node may act as active.
pub async fn promote(live: &Live, role: &Role, epoch: u64, from: &str) -> bool {
    let set = |p: Promotion| {
        role.set_promotion(p);
    };
    if live.cluster().hook(&live.me, Hook::OnPromote).is_none() {
        set(Promotion::Done(epoch));
        return true;
    }
    if let Some(last) = last_run(&live.state_dir, Hook::OnPromote) {
        if last.epoch == epoch && last.end_ms.is_some() {
            if last.ok {
                set(Promotion::Done(epoch));
                return true;
            }
            tracing::error!(
                epoch,
                detail = last.detail,
                "on_promote failed for this epoch: this node stays fenced until an operator retries"
            );
            set(Promotion::Failed(epoch, last.detail));
            return false;
        }
    }
    set(Promotion::Running(epoch));
    let me = live.me.name.clone();
    match run(live, role, Hook::OnPromote, epoch, from, &me).await {
        Some(r) if r.ok => {
            set(Promotion::Done(epoch));
            true
        }
        Some(r) => {
            set(Promotion::Failed(epoch, r.detail));
            false
        }
        None => {
            set(Promotion::Done(epoch));
            true
        }
    }
}

/// At start-up on a passive node: runs `on_demote` again when its last run
/// was cut off, or when a promotion began here and no demotion followed it.
pub async fn recover_passive(live: &Live, role: &Role, epoch: u64, active: &str) {
    let demote = last_run(&live.state_dir, Hook::OnDemote);
    let promote = last_run(&live.state_dir, Hook::OnPromote);
    let again = match (&demote, &promote) {
        (Some(d), _) if d.end_ms.is_none() => true,
        (Some(d), Some(p)) => p.epoch > d.epoch,
        (None, Some(_)) => true,
        (_, None) => false,
    };
    if again {
        tracing::warn!("the last role change did not finish its on_demote hook: running it again");
        let me = live.me.name.clone();
        let _ = run(live, role, Hook::OnDemote, epoch, &me, active).await;
    }
}
