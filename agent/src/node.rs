//! The node's shared state: the cluster file in force, this node's key
//! and state dir, the role (compare-and-swap, adoption, the hold of an
//! unconfirmed active), pause, and what the running tasks report. The
//! supervisor (`daemon`) makes one [`Shared`] and hands it to every task.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warmspare_shared::ledger::Ledgers;
use warmspare_shared::persist;
use warmspare_shared::proto::{Hello, Purpose, PROTOCOL_VERSION};
use warmspare_shared::state::{self, HistoryEntry, RoleState};

use crate::clock::unix;
use crate::events::{Inbox, Work};
use crate::live::Live;
use crate::roots;

/// What every task of the daemon shares.
pub struct Shared {
    /// The configuration in force and this node's identity.
    pub live: Arc<Live>,
    /// The current role state; persisted before it changes here.
    role: watch::Sender<RoleState>,
    /// Serialises role changes (compare-and-swap).
    role_lock: Mutex<()>,
    /// Bytes written to peers, frames included.
    pub bytes_sent: Arc<AtomicU64>,
    /// The agreed content of every replicated file (for divergence).
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// Whether replication (and jobs) are held by `warmsparectl pause`.
    paused: AtomicBool,
    /// What the running tasks report, for status and flushes.
    runtime: Mutex<Runtime>,
    /// Bumped whenever a shipper finishes work (flushes wait on it).
    pub progress: watch::Sender<u64>,
    /// When the agent started.
    pub started: SystemTime,
    /// The jobs' runtime.
    pub jobs: crate::job_state::Jobs,
    /// The role hooks' runtime (the promotion gate).
    pub hooks: crate::promotion::Hooks,
    /// The `after_apply` hooks' runtime (runs, counters, last outcomes).
    pub after: Arc<crate::after::AfterApply>,
    /// The watches' file counts for status, shared by concurrent requests.
    pub tree_counts: crate::counts::TreeCounts,
    /// Cancelled when a task the agent cannot do without stopped: the
    /// supervisor then shuts down and the agent exits non-zero.
    fatal: CancellationToken,
    /// Why (the first task that stopped).
    fatal_reason: Mutex<Option<String>>,
    /// When the supervisor's loop last went round (milliseconds since the
    /// agent started); the watchdog is fed only while it is recent.
    heartbeat: AtomicU64,
    /// The watch roots: where each was last seen, what is wrong with them.
    pub roots: roots::Roots,
    /// (peer, watch) pairs whose next full comparison may remove what the
    /// deletion guard would hold (`warmsparectl resync --allow-deletes`).
    allow_deletes: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Why this node, though its role state names it active, does not act
    /// as the active one (see [`Shared::unconfirmed`]).
    held: Mutex<Option<String>>,
    /// The receiver's record of its own writes and, on a passive, the
    /// local changes flagged under the watch roots (see `passive`).
    pub local: Arc<warmspare_shared::local::Tracker>,
    /// The undo store (`state_dir/undo`): what this node's receiver removed
    /// or replaced.
    pub undo: Arc<warmspare_shared::undo::Store>,
}

/// What the running tasks report.
#[derive(Debug, Default)]
pub struct Runtime {
    /// The inbox of each peer's shipper, while this node is active.
    pub inboxes: BTreeMap<String, Arc<Inbox>>,
    /// Replication towards each peer.
    pub links: BTreeMap<String, Link>,
    /// On a passive: when a batch was last applied, per watch.
    pub last_applied: BTreeMap<String, SystemTime>,
}

/// Replication towards one peer.
#[derive(Debug, Default, Clone)]
pub struct Link {
    /// Whether a session is up.
    pub connected: bool,
    /// The last error, cleared by a success.
    pub last_error: Option<String>,
    /// When the peer last acknowledged a complete batch, per watch.
    pub last_success: BTreeMap<String, SystemTime>,
    /// Work taken from the inbox and not yet acknowledged.
    pub in_progress: Option<Work>,
    /// The inbox generation the peer is known to be up to.
    pub done_generation: u64,
    /// Files the deletion guard keeps on the peer, per watch.
    pub deletions_held: BTreeMap<String, u64>,
}

/// The file under the state dir that marks a paused agent.
const PAUSED_FILE: &str = "paused";

impl Shared {
    /// Loads the cluster file, finds this node, and loads and checks its key.
    pub fn load(cluster_path: &Path, node: Option<&str>) -> Result<Shared> {
        let live = Live::load(cluster_path, node)?;
        let state_dir = live.state_dir.clone();
        let (role, _) = watch::channel(RoleState {
            epoch: 0,
            active: String::new(),
        });
        let (progress, _) = watch::channel(0);
        let live = Arc::new(live);
        Ok(Shared {
            live: live.clone(),
            ledgers: Arc::new(Mutex::new(Ledgers::new(state_dir.join("ledger")))),
            paused: AtomicBool::new(state_dir.join(PAUSED_FILE).exists()),
            role,
            role_lock: Mutex::new(()),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            runtime: Mutex::new(Runtime::default()),
            progress,
            started: SystemTime::now(),
            jobs: crate::job_state::Jobs::default(),
            hooks: crate::promotion::Hooks::default(),
            after: Arc::new(crate::after::AfterApply::new(live.clone())),
            tree_counts: crate::counts::TreeCounts::default(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
            roots: roots::Roots::load(&state_dir),
            allow_deletes: Mutex::new(Default::default()),
            held: Mutex::new(None),
            local: Arc::new(Default::default()),
            undo: Arc::new(warmspare_shared::undo::Store::new(state_dir.join("undo"))),
        })
    }

    /// A task the agent cannot do without stopped (returned or panicked)
    /// outside a shutdown: the agent stops and exits non-zero, so that the
    /// service manager starts it again whole (`Restart=on-failure`).
    pub fn fail(&self, why: String) {
        tracing::error!(
            reason = why,
            "a task the agent needs stopped; exiting so that it is restarted"
        );
        self.fatal_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        self.fatal.cancel();
    }

    /// Resolves once a task the agent cannot do without stopped (see
    /// [`Shared::fail`]).
    pub async fn failed(&self) {
        self.fatal.cancelled().await;
    }

    /// Why the agent is stopping after a failure, if it is.
    pub fn failure(&self) -> Option<String> {
        self.fatal_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes the role state loaded at start-up (before any task runs).
    pub fn start_role(&self, role: RoleState) {
        self.role.send_replace(role);
    }

    /// A receiver of every change of the role state.
    pub fn subscribe_role(&self) -> watch::Receiver<RoleState> {
        self.role.subscribe()
    }

    /// Records that the supervisor's loop went round.
    pub fn beat(&self) {
        let ms = self.started.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0);
        self.heartbeat.store(ms, Ordering::Relaxed);
    }

    /// Whether the supervisor's loop went round within `limit`.
    pub fn heartbeat_within(&self, limit: Duration) -> bool {
        let now = self.started.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0);
        now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)) <= limit.as_millis() as u64
    }

    /// The runtime reports, if nobody holds their lock right now (never
    /// waits: for the watchdog, which must not hang on a stuck lock).
    pub fn try_runtime(&self) -> Option<MutexGuard<'_, Runtime>> {
        match self.runtime.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The runtime reports, locked.
    pub fn runtime(&self) -> MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the link towards `peer`.
    pub fn link(&self, peer: &str, f: impl FnOnce(&mut Link)) {
        f(self.runtime().links.entry(peer.to_string()).or_default());
        self.progress.send_modify(|n| *n += 1);
    }

    /// Whether this node acts as the active one now: it is named active and
    /// its `on_promote` hook (if any) succeeded for the current epoch.
    pub fn is_active(&self) -> bool {
        let role = self.role.borrow();
        role.active == self.live.me.name && self.hooks.promoted(role.epoch) && !self.is_unconfirmed()
    }

    /// Why this node, though named active, does not act as active (no
    /// peer confirmed its epoch yet, or its `on_promote` hook); `None` when
    /// it does or when it is passive.
    pub fn held(&self) -> Option<String> {
        let role = self.role();
        if role.active != self.live.me.name {
            return None;
        }
        self.unconfirmed().or_else(|| self.hooks.held(role.epoch))
    }

    /// Waits (at most `limit`) until this node has acted on its promotion
    /// to `epoch`: `Ok` once it acts as active, `Err` with the reason when
    /// its `on_promote` failed, the role moved on, or the time ran out.
    pub async fn wait_promoted(&self, epoch: u64, limit: Duration) -> std::result::Result<(), String> {
        let mut rx = self.hooks.promotion.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let role = self.role();
            if role.epoch != epoch || role.active != self.live.me.name {
                return Err(format!(
                    "the role moved on to epoch {} with {} active",
                    role.epoch, role.active
                ));
            }
            match &*rx.borrow_and_update() {
                crate::promotion::Promotion::Done(e) if *e == epoch => return Ok(()),
                crate::promotion::Promotion::Failed(e, detail) if *e == epoch => {
                    return Err(format!(
                        "{}: {detail}; {} holds epoch {epoch} but stays fenced until an operator retries \
                         (`warmsparectl failover --to {} --force`) or moves the role elsewhere",
                        warmspare_shared::proto::PROMOTE_HOOK_FAILED,
                        self.live.me.name,
                        self.live.me.name
                    ))
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(format!("{} did not finish its promotion in time", self.live.me.name));
            }
        }
    }

    /// Whether this node's role state names it active but no peer has yet
    /// confirmed that epoch since the agent started: it might be a stale
    /// active whose peers moved on while it was down. A held node answers
    /// 503 on health, runs no jobs and sends no changes; its shippers only
    /// say hello, which confirms the epoch (the hold ends) or fences it.
    pub fn is_unconfirmed(&self) -> bool {
        self.unconfirmed().is_some()
    }

    /// Why this node is held for want of a confirmation, while it is.
    pub fn unconfirmed(&self) -> Option<String> {
        if self.role.borrow().active != self.live.me.name {
            return None;
        }
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Holds this node (named active, not acting as active) for `reason`,
    /// or ends the hold.
    pub fn set_held(&self, reason: Option<String>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.progress.send_modify(|n| *n += 1);
    }

    /// A peer confirmed this node's epoch (or an operator promoted it): the
    /// hold ends and the active side goes to work.
    pub fn confirm(&self, by: &str) {
        let was = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if was.is_some() {
            tracing::warn!(
                by,
                epoch = self.role().epoch,
                "epoch confirmed: acting as the active node"
            );
            self.progress.send_modify(|n| *n += 1);
            for inbox in self.runtime().inboxes.values() {
                inbox.interrupt();
            }
        }
    }

    /// The receiver applied something in the job spool.
    pub fn jobs_arrived(&self) {
        self.jobs.arrived.notify_one();
    }

    /// Whether replication and jobs are held.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Holds or releases replication and jobs (persisted across restarts).
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        let marker = self.live.state_dir.join(PAUSED_FILE);
        if paused {
            persist::write_atomic(&marker, b"paused by warmsparectl\n")?;
        } else if marker.exists() {
            std::fs::remove_file(&marker)?;
        }
        self.paused.store(paused, Ordering::SeqCst);
        for inbox in self.runtime().inboxes.values() {
            inbox.interrupt();
        }
        tracing::warn!(
            paused,
            "replication and jobs {}",
            if paused { "held" } else { "released" }
        );
        Ok(())
    }

    /// Compare-and-swap of the role: moves from `expect` to `next` (a higher
    /// epoch), persisting before publishing; `Err` says why not.
    pub fn cas_role(
        &self,
        expect: &RoleState,
        next: RoleState,
        reason: &str,
        by: &str,
    ) -> std::result::Result<RoleState, String> {
        let _g = self.role_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.role();
        if current != *expect {
            return Err(format!(
                "expected epoch {} with {} active, but this node is at epoch {} with {} active",
                expect.epoch, expect.active, current.epoch, current.active
            ));
        }
        if next.epoch <= current.epoch {
            return Err(format!("the new epoch {} is not above {}", next.epoch, current.epoch));
        }
        state::check_epoch_step(current.epoch, next.epoch).map_err(|e| e.to_string())?;
        if self.live.cluster().node(&next.active).is_none() {
            return Err(format!("{:?} is not a node of the cluster", next.active));
        }
        self.set_role(next.clone(), reason, by)
            .map_err(|e| format!("cannot record the new role: {e:#}"))?;
        // An operator's promotion needs no peer's confirmation.
        self.confirm(by);
        Ok(next)
    }

    /// Adopts `next` if its epoch is above ours (fencing); returns the state after.
    pub fn adopt(&self, next: RoleState, reason: &str, by: &str) -> Result<RoleState> {
        let _g = self.role_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.role().epoch;
        if next.epoch > current {
            // A peer or an operator cannot move this node further than a
            // controller could have (see `MAX_EPOCH_JUMP`).
            if let Err(e) = state::check_epoch_step(current, next.epoch) {
                tracing::error!(epoch = next.epoch, current, by, error = %e, "refused an epoch");
                return Err(e.into());
            }
            self.set_role(next, reason, by)?;
        }
        Ok(self.role())
    }

    /// Runs `f` with this `Shared` on a blocking thread: for what writes
    /// and syncs files (role changes, the pause marker) from async code.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Result<T> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| anyhow::anyhow!("a blocking task failed: {e}"))
    }

    /// The current role state.
    pub fn role(&self) -> RoleState {
        self.role.borrow().clone()
    }

    /// Persists, records and publishes a new role state (callers hold `role_lock`).
    fn set_role(&self, next: RoleState, reason: &str, by: &str) -> Result<()> {
        let prev = self.role();
        next.store(&self.live.state_dir)?;
        let entry = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: next.epoch,
            from: prev.active.clone(),
            to: next.active.clone(),
            reason: reason.to_string(),
            by: by.to_string(),
        };
        if let Err(e) = state::append_history(&self.live.state_dir, &entry) {
            tracing::warn!(error = %e, "cannot append to the role history");
        }
        self.role.send_replace(next.clone());
        // Waiters on progress (flushes) re-check the role.
        self.progress.send_modify(|n| *n += 1);
        tracing::warn!(
            from_epoch = prev.epoch,
            from_active = prev.active,
            epoch = next.epoch,
            active = next.active,
            reason,
            by,
            "role changed"
        );
        Ok(())
    }

    /// A hello describing this node.
    pub fn hello(&self, purpose: Purpose) -> Hello {
        let role = self.role();
        Hello {
            protocol: PROTOCOL_VERSION,
            version: warmspare_shared::VERSION.to_string(),
            node: self.live.me.name.clone(),
            epoch: role.epoch,
            active: role.active,
            config_hash: self.live.config_hash(),
            purpose,
            owners: warmspare_shared::apply::can_chown(),
        }
    }

    /// Lets the next full comparison of `watch` towards every current peer
    /// remove what the deletion guard holds.
    pub fn allow_deletes(&self, watch: &str) {
        let peers: Vec<String> = self.runtime().inboxes.keys().cloned().collect();
        let mut g = self.allow_deletes.lock().unwrap_or_else(|p| p.into_inner());
        for p in peers {
            g.insert((p, watch.to_string()));
        }
    }

    /// Takes the operator's permission for a full comparison of `watch`
    /// towards `peer` to remove what the deletion guard holds.
    pub fn take_allow_deletes(&self, peer: &str, watch: &str) -> bool {
        self.allow_deletes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(peer.to_string(), watch.to_string()))
    }
}
