//! The active side of this node for one epoch (`ActiveSide`): waits for
//! the role change before it, runs `on_promote`, then the watcher and one
//! shipper per peer until the supervisor cancels it; on demotion, once it
//! has drained, `on_demote`. `daemon` starts and stops it on role changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::ledger::Ledgers;
use warmspare_shared::local::Tracker;
use warmspare_shared::state::RoleState;

use crate::allow_deletes::AllowDeletes;
use crate::events::Inbox;
use crate::live::Live;
use crate::pause::Pause;
use crate::progress::Loops;
use crate::role::Role;
use crate::roots::Roots;
use crate::supervise::Failure;
use crate::telemetry::Telemetry;
use crate::{hooks, ship, watch as watcher};

/// What the active side uses of the node: its own share and what it hands
/// each shipper ([`Handles::ship`]). The supervisor builds it.
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force and this node's identity.
    pub live: Arc<Live>,
    /// The role (the hooks run under it; the shippers confirm and adopt).
    pub role: Arc<Role>,
    /// Where the shippers' inboxes and links are reported.
    pub telemetry: Arc<Telemetry>,
    /// Told when a task of the active side stops before its token.
    pub failure: Arc<Failure>,
    /// The local changes flagged while passive, cleared on promotion.
    pub local: Arc<Tracker>,
    /// The watch roots, checked on promotion; the watcher is woken when
    /// one recovers.
    pub roots: Arc<Roots>,
    /// Where the watcher's and shippers' progress stamps are registered.
    pub loops: Arc<Loops>,
    /// The agreed content of every replicated file (for the shippers).
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// The operator's hold (for the shippers).
    pub pause: Arc<Pause>,
    /// The operator's deletion permissions (for the shippers).
    pub allow_deletes: Arc<AllowDeletes>,
}

impl Handles {
    /// What a shipper takes of these.
    pub fn ship(&self) -> ship::Handles {
        ship::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            ledgers: self.ledgers.clone(),
            pause: self.pause.clone(),
            loops: self.loops.clone(),
            roots: self.roots.clone(),
            allow_deletes: self.allow_deletes.clone(),
        }
    }
}

/// How long a role-change task waits for the one before it: the longest a
/// hook may run, plus the active side's drain and some slack.
fn chain_limit(live: &Live) -> Duration {
    live.cluster().cluster.hook_timeout * 2 + Duration::from_secs(30)
}

async fn wait_previous(live: &Live, previous: Option<tokio::task::JoinHandle<()>>) {
    if let Some(h) = previous {
        if tokio::time::timeout(chain_limit(live), h).await.is_err() {
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
        handles: &Handles,
        parent: &CancellationToken,
        role: &RoleState,
        from: &str,
        previous: Option<tokio::task::JoinHandle<()>>,
    ) -> ActiveSide {
        let token = parent.child_token();
        let (s, t, epoch, prev) = (handles.clone(), token.clone(), role.epoch, from.to_string());
        let handle = tokio::spawn(async move {
            wait_previous(&s.live, previous).await;
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
                        s.failure.fail(match ended {
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
    pub fn demote(self, handles: &Handles, role: &RoleState) -> tokio::task::JoinHandle<()> {
        let (s, epoch) = (handles.clone(), role.epoch);
        let to = demoted_to(&handles.live.me.name, role).to_string();
        let handle = self.handle;
        tokio::spawn(async move {
            wait_previous(&s.live, Some(handle)).await;
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

/// The node an `on_demote` hook is told is active after the change
/// (`WARMSPARE_TO`): the one the role names, or nobody when the role still
/// names this node (it lost etcd's leader key and does not know who takes
/// over).
fn demoted_to<'a>(me: &str, role: &'a RoleState) -> &'a str {
    if role.active == me {
        ""
    } else {
        &role.active
    }
}

fn start_active(handles: &Handles, tasks: &mut JoinSet<&'static str>, token: &CancellationToken) {
    // Roots are checked now, so that status and the log say at once when
    // one is not fit to ship from (the shippers check again before each batch).
    // Local changes flagged while passive are this node's own tree now.
    handles.local.clear_pending();
    for w in handles.live.local_watches().iter().filter(|w| w.verify_root) {
        let _ = handles.roots.verify(&w.name, &w.root);
    }
    let mut inboxes = Vec::new();
    for peer in handles.live.cluster().peers_of(&handles.live.me.name) {
        let inbox = Arc::new(Inbox::default());
        inboxes.push(inbox.clone());
        handles
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
        let (s, p, t) = (handles.ship(), peer.clone(), token.clone());
        tasks.spawn(async move {
            ship::run(s, p, inbox, t).await;
            "a shipper"
        });
    }
    let targets = handles
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
    let rewatch = handles.roots.recovered.clone();
    let stamp = handles.loops.register("the watcher", watcher::LIMIT);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demote_names_the_new_active_or_nobody_when_it_is_still_this_node() {
        let moved = RoleState {
            epoch: 3,
            active: "b".into(),
        };
        let fenced = RoleState {
            epoch: 2,
            active: "a".into(),
        };
        assert_eq!(demoted_to("a", &moved), "b");
        assert_eq!(demoted_to("a", &fenced), "");
    }
}
