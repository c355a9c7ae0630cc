//! The active side of this node for one epoch (`ActiveSide`): waits for
//! the role change before it, runs `on_promote`, then the watcher and one
//! shipper per peer until the supervisor cancels it; on demotion, once it
//! has drained, `on_demote`. `daemon` starts and stops it on role changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::state::RoleState;

use crate::events::Inbox;
use crate::node::Shared;
use crate::{hooks, ship, watch as watcher};

/// How long a role-change task waits for the one before it: the longest a
/// hook may run, plus the active side's drain and some slack.
fn chain_limit(shared: &Shared) -> Duration {
    shared.live.cluster().cluster.hook_timeout * 2 + Duration::from_secs(30)
}

async fn wait_previous(shared: &Shared, previous: Option<tokio::task::JoinHandle<()>>) {
    if let Some(h) = previous {
        if tokio::time::timeout(chain_limit(shared), h).await.is_err() {
            tracing::error!("the previous role change did not finish in time; going on");
        }
    }
}

/// The active side of this node for one epoch: `on_promote`, then the
/// watcher and the shippers until its token is cancelled.
pub struct ActiveSide {
    /// The epoch it was started for.
    pub epoch: u64,
    /// The active node before this one.
    pub from: String,
    /// Cancelled when the role leaves this node (or on reload).
    pub token: CancellationToken,
    /// Ends once the hook has run and the shippers and watcher have stopped.
    pub handle: tokio::task::JoinHandle<()>,
}

impl ActiveSide {
    /// Starts the active side for `role` under a child of `parent`, after
    /// the role change `previous` (if any) has finished.
    pub fn start(
        shared: &Arc<Shared>,
        parent: &CancellationToken,
        role: &RoleState,
        from: &str,
        previous: Option<tokio::task::JoinHandle<()>>,
    ) -> ActiveSide {
        let token = parent.child_token();
        let (s, t, epoch, prev) = (shared.clone(), token.clone(), role.epoch, from.to_string());
        let handle = tokio::spawn(async move {
            wait_previous(&s, previous).await;
            if t.is_cancelled() || !hooks::promote(&s.live, &s.role, epoch, &prev).await || t.is_cancelled() {
                return;
            }
            tracing::info!("this node is active: watching and shipping");
            let mut set = JoinSet::new();
            start_active(&s, &mut set, &t);
            // Every task of the active side runs until the token is
            // cancelled: one that returns or panics before is a failure of
            // the agent (it exits non-zero and systemd restarts it), never
            // a node that says "active" while nothing ships.
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    Some(ended) = set.join_next() => {
                        if t.is_cancelled() {
                            break;
                        }
                        s.fail(match ended {
                            Ok(what) => format!("{what} of the active side stopped"),
                            Err(e) => format!("a task of the active side failed: {e}"),
                        });
                    }
                }
            }
            s.telemetry.runtime().inboxes.clear();
            if tokio::time::timeout(Duration::from_secs(10), async {
                while set.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                tracing::warn!("the active side did not stop in time; aborting it");
                set.abort_all();
            }
            tracing::warn!("the active side has stopped");
        });
        ActiveSide {
            epoch,
            from: from.to_string(),
            token,
            handle,
        }
    }

    /// After the active side has stopped: `on_demote` (the token must be
    /// cancelled already).
    pub fn demote(self, shared: &Arc<Shared>, role: &RoleState) -> tokio::task::JoinHandle<()> {
        let (s, epoch, to) = (shared.clone(), role.epoch, role.active.clone());
        let handle = self.handle;
        tokio::spawn(async move {
            wait_previous(&s, Some(handle)).await;
            let me = s.live.me.name.clone();
            let _ = hooks::run(
                &s.live,
                &s.role,
                warmspare_shared::config::Hook::OnDemote,
                epoch,
                &me,
                &to,
            )
            .await;
        })
    }
}

fn start_active(shared: &Arc<Shared>, tasks: &mut JoinSet<&'static str>, token: &CancellationToken) {
    // Roots are checked now, so that status and the log say at once when
    // one is not fit to ship from (the shippers check again before each batch).
    // Local changes flagged while passive are this node's own tree now.
    shared.local.clear_pending();
    for w in shared.live.local_watches().iter().filter(|w| w.verify_root) {
        let _ = shared.roots.verify(&w.name, &w.root);
    }
    let mut inboxes = Vec::new();
    for peer in shared.live.cluster().peers_of(&shared.live.me.name) {
        let inbox = Arc::new(Inbox::default());
        inboxes.push(inbox.clone());
        shared
            .telemetry
            .runtime()
            .inboxes
            .insert(peer.name.clone(), inbox.clone());
        let stop = inbox.clone();
        let t = token.clone();
        tasks.spawn(async move {
            t.cancelled().await;
            stop.interrupt();
            "an interrupt relay"
        });
        let (s, p, t) = (shared.clone(), peer.clone(), token.clone());
        tasks.spawn(async move {
            ship::run(s, p, inbox, t).await;
            "a shipper"
        });
    }
    let targets = shared
        .live
        .local_watches()
        .into_iter()
        .map(|w| watcher::Target {
            name: w.name,
            root: w.root,
            debounce: w.debounce,
        })
        .collect();
    let t = token.clone();
    let rewatch = shared.roots.recovered.clone();
    let stamp = shared.loops.register("the watcher", watcher::LIMIT);
    tasks.spawn(async move {
        // A hidden switch for the tests of this supervision: a watcher that
        // fails at once, as one whose inotify instance cannot be made.
        let result = if std::env::var_os("WARMSPARE_TEST_BREAK_WATCHER").is_some() {
            Err(anyhow::anyhow!("broken on purpose (WARMSPARE_TEST_BREAK_WATCHER)"))
        } else {
            watcher::run(targets, inboxes, rewatch, stamp, t).await
        };
        if let Err(e) = result {
            tracing::error!(error = format!("{e:#}"), "the watcher failed");
        }
        "the watcher"
    });
}
