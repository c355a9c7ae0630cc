//! The daemon: one supervisor owning every long-lived task.
//!
//! The SSH server (and with it the receiver) runs on every node. The watcher
//! and one shipper per peer run only while this node is the active one: the
//! role is a `watch` channel, and a change of role starts or cancels the
//! active-side tasks without a restart. SIGTERM or SIGINT cancels the root
//! token; every task stops on it. Start-up is `startup`'s; the active side
//! of one epoch is `active::ActiveSide`. With `[etcd]`, the leadership task
//! (`leadership`) runs too, and a node named active runs its active side
//! only while it holds etcd's leader key.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::state;

use crate::active::ActiveSide;
use crate::node::Shared;
use crate::{health, hooks, jobs, leadership, sd, server, startup};

/// Runs the node `node` of the cluster file at `cluster` (`None`: found by
/// host name) until SIGTERM or SIGINT.
pub async fn run(cluster: &std::path::Path, node: Option<&str>) -> Result<()> {
    let shared = Shared::load(cluster, node)?;
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });
    let listener = startup::bind(&shared.live).await?;
    let http = match shared.live.me.http {
        Some(addr) => Some(startup::bind_listener(addr).await?),
        None => None,
    };
    serve(shared, listener, http, cancel).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the daemon on a bound listener until `cancel` fires.
pub async fn serve(
    shared: Shared,
    listener: TcpListener,
    http: Option<TcpListener>,
    cancel: CancellationToken,
) -> Result<()> {
    let role = startup::prepare(&shared.live, &shared.role, &shared.roots)?;
    shared.for_undo().prune();
    let shared = Arc::new(shared);
    let side_handles = shared.for_active();
    let sd_handles = shared.for_sd();
    tracing::info!(
        node = shared.live.me.name,
        ssh = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        epoch = role.epoch,
        active = role.active,
        version = warmspare_shared::VERSION,
        "agent started"
    );

    // Every task says what it was when it ends; the supervisor reaps each
    // as it ends (see the loop below). Only the cache warm-up may end on
    // its own; jobs end when a reload cancels their token.
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let (s, l, c) = (shared.for_receiver(), shared.loops.clone(), cancel.clone());
    tasks.spawn(async move {
        server::run(s, l, listener, c).await;
        "the SSH server"
    });
    if role.active != shared.live.me.name {
        let live = shared.live.clone();
        tasks.spawn(async move {
            startup::warm_send_caches(live).await;
            WARM_CACHES
        });
    }
    if let Some(http) = http {
        let (s, l, c) = (shared.for_health(), shared.loops.clone(), cancel.clone());
        tasks.spawn(async move {
            health::run(s, l, http, c).await;
            "the HTTP listener"
        });
    }
    let (s, c) = (sd_handles.clone(), cancel.clone());
    tasks.spawn(async move {
        sd::run(s, c).await;
        "the watchdog"
    });
    if let Some(etcd) = shared.live.cluster().etcd.clone() {
        leadership::fence_at_start(&shared.role);
        let stamp = shared
            .loops
            .register("the etcd leadership loop", leadership::watchdog_limit(&etcd));
        let (live, role, c) = (shared.live.clone(), shared.role.clone(), cancel.clone());
        let telemetry = shared.telemetry.clone();
        tasks.spawn(async move {
            leadership::run(live, role, telemetry, stamp, c).await;
            "the etcd leadership loop"
        });
    }
    // Jobs and the active side restart on every accepted reload.
    let mut config_token = cancel.child_token();
    tasks.spawn(run_jobs(shared.for_jobs(), config_token.clone()));
    let mut hangups =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot handle SIGHUP")?;
    sd::ready(&sd_handles);

    let mut roles = shared.role.subscribe();
    let mut leader_key = shared.role.subscribe_leader_key();
    let mut active: Option<ActiveSide> = None;
    // While this node is passive: the watcher of local changes.
    let mut passive: Option<CancellationToken> = None;
    // The last role-change task (active side, demotion): the next waits for it.
    let mut last: Option<tokio::task::JoinHandle<()>> = None;
    if role.active != shared.live.me.name {
        let (s, epoch, now) = (shared.clone(), role.epoch, role.active.clone());
        last = Some(tokio::spawn(async move {
            hooks::recover_passive(&s.live, &s.role, epoch, &now).await
        }));
    }
    // The active node before this one (WARMSPARE_FROM): from the history
    // entry that named this node when it starts active.
    let mut previous = if role.active == shared.live.me.name {
        state::read_history(&shared.live.state_dir)
            .iter()
            .rev()
            .find(|e| e.epoch == role.epoch && e.to == role.active)
            .map(|e| e.from.clone())
            .unwrap_or_default()
    } else {
        role.active.clone()
    };
    loop {
        let role = roles.borrow_and_update().clone();
        leader_key.borrow_and_update();
        // With `[etcd]`, named active without the leader key is no active side.
        let mine = role.active == shared.live.me.name && shared.role.leader_key_fence().is_none();
        match &passive {
            None if !mine => {
                let token = config_token.child_token();
                let handles = crate::passive::Handles {
                    live: shared.live.clone(),
                    ledgers: shared.ledgers.clone(),
                    local: shared.local.clone(),
                };
                let t = token.clone();
                tasks.spawn(async move {
                    crate::passive::run(handles, t).await;
                    PASSIVE_WATCHER
                });
                passive = Some(token);
            }
            Some(token) if mine => {
                // This node's tree is now the one that counts.
                token.cancel();
                passive = None;
                shared.local.clear_pending();
            }
            _ => {}
        }
        match &active {
            None if mine => {
                tracing::info!(epoch = role.epoch, "this node is named active");
                active = Some(ActiveSide::start(
                    &side_handles,
                    &config_token,
                    &role,
                    &previous,
                    last.take(),
                ));
            }
            Some(side) if mine && side.epoch != role.epoch => {
                if shared.role.hooks.promoted(side.epoch) {
                    // Still this node, at a higher epoch: nothing to redo.
                    shared
                        .role
                        .hooks
                        .promotion
                        .send_replace(crate::promotion::Promotion::Done(role.epoch));
                    if let Some(side) = active.as_mut() {
                        side.epoch = role.epoch;
                    }
                } else if let Some(side) = active.take() {
                    // An operator named this held node again: a new promotion.
                    side.token.cancel();
                    let from = side.from.clone();
                    active = Some(ActiveSide::start(
                        &side_handles,
                        &config_token,
                        &role,
                        &from,
                        Some(side.handle),
                    ));
                }
            }
            Some(_) if !mine => {
                if let Some(side) = active.take() {
                    tracing::warn!("this node is no longer active: stopping shipping");
                    side.token.cancel();
                    shared.telemetry.runtime().inboxes.clear();
                    last = Some(side.demote(&side_handles, &role));
                }
            }
            _ => {}
        }
        previous = role.active.clone();
        shared.heartbeat.beat();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.failure.failed() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
            Some(ended) = tasks.join_next() => match ended {
                // A task that ends because the agent is stopping is no
                // failure: select! may reap it before it sees the cancel.
                _ if cancel.is_cancelled() => break,
                Ok(WARM_CACHES) | Ok(JOBS) | Ok(PASSIVE_WATCHER) => {}
                Ok(what) => shared.failure.fail(format!("{what} stopped")),
                Err(e) if e.is_panic() => shared.failure.fail(format!("a task panicked: {e}")),
                Err(_) => {}
            },
            changed = roles.changed() => if changed.is_err() { break },
            changed = leader_key.changed() => if changed.is_err() { break },
            _ = hangups.recv() => {
                sd::reloading();
                match shared.live.reload() {
                    Ok(true) => {
                        tracing::warn!(path = %shared.live.cluster_path.display(), hash = shared.live.config_hash(), "cluster file reloaded; restarting jobs and the active side");
                        config_token.cancel();
                        shared.telemetry.runtime().inboxes.clear();
                        // The loop starts the passive watcher again, on the new watches.
                        passive = None;
                        config_token = cancel.child_token();
                        tasks.spawn(run_jobs(shared.for_jobs(), config_token.clone()));
                        // The loop starts the active side again under the new
                        // token; a promotion already done is not redone.
                        if let Some(side) = active.take() {
                            last = Some(side.handle);
                        }
                    }
                    Ok(false) => tracing::info!("cluster file unchanged"),
                    Err(e) => tracing::error!(path = %shared.live.cluster_path.display(), error = format!("{e:#}"), "reload refused; running on the previous cluster file"),
                }
                sd::ready(&sd_handles);
            }
        }
    }
    sd::stopping();
    if let Some(side) = active.take() {
        side.token.cancel();
        last = Some(side.handle);
    }
    if let Some(h) = last.take() {
        // A hook still running is cut off here (its record has no end, so it
        // runs again at the next start); the shipper drains within 10 s.
        if tokio::time::timeout(Duration::from_secs(10), h).await.is_err() {
            tracing::warn!("the role change in progress did not stop in time");
        }
    }
    // after_apply runs are cut off: their process groups are killed.
    shared.after.shutdown(Duration::from_secs(5)).await;
    if let Err(e) = shared.ledgers.lock().unwrap_or_else(|p| p.into_inner()).save() {
        tracing::warn!(error = %e, "cannot save the sync ledger");
    }
    if tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
        tasks.abort_all();
    }
    let failed = shared.failure.failure();
    if let Some(why) = failed {
        tracing::error!(reason = why, "stopped after a failure");
        bail!("stopped because {why}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the supervisor's loop goes round when nothing happens (its
/// heartbeat, which the watchdog checks).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the cache warm-up task says when it ends (it may).
const WARM_CACHES: &str = "the cache warm-up";
/// What the jobs task says when it ends (a reload cancels it).
const JOBS: &str = "the jobs";
/// The passive watcher's name as a task: it ends when the node becomes
/// active or a reload restarts it (and, on an inotify failure, it logs why).
const PASSIVE_WATCHER: &str = "the passive watcher";

async fn run_jobs(node: jobs::Handles, token: CancellationToken) -> &'static str {
    jobs::run(node, token).await;
    JOBS
}
