//! The node: the handles its tasks share. The configuration in force
//! (`live::Live`), the role (`role::Role`), what the tasks report
//! (`telemetry::Telemetry`) and the receiver's sessions
//! (`sessions::Sessions`) are handles of their own, each an `Arc` a task
//! can take alone; [`Shared`] bundles them with what is left (pause, the
//! ledgers, the undo store, the watch roots, the jobs' and `after_apply`
//! runtimes, failure and heartbeat). The supervisor (`daemon`) makes one
//! [`Shared`] per node.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use warmspare_shared::ledger::Ledgers;
use warmspare_shared::persist;

use crate::live::Live;
use crate::role::Role;
use crate::roots;
use crate::sessions::Sessions;
use crate::telemetry::Telemetry;

/// What every task of the daemon shares.
pub struct Shared {
    /// The configuration in force and this node's identity.
    pub live: Arc<Live>,
    /// The role: current state, compare-and-swap, adoption, the hold.
    pub role: Arc<Role>,
    /// What the running tasks report (links, inboxes, progress, bytes).
    pub telemetry: Arc<Telemetry>,
    /// The replication sessions the receiver serves, one per sending node.
    pub sessions: Arc<Sessions>,
    /// The agreed content of every replicated file (for divergence).
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// Whether replication (and jobs) are held by `warmsparectl pause`.
    paused: AtomicBool,
    /// When the agent started.
    pub started: SystemTime,
    /// The jobs' runtime.
    pub jobs: crate::job_state::Jobs,
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
    /// The receiver's record of its own writes and, on a passive, the
    /// local changes flagged under the watch roots (see `passive`).
    pub local: Arc<warmspare_shared::local::Tracker>,
    /// The undo store (`state_dir/undo`): what this node's receiver removed
    /// or replaced.
    pub undo: Arc<warmspare_shared::undo::Store>,
    /// The progress stamps of the loops that must keep going round (the
    /// watchdog is fed only while each is recent).
    pub loops: crate::progress::Loops,
}

/// The file under the state dir that marks a paused agent.
const PAUSED_FILE: &str = "paused";

impl Shared {
    /// Loads the cluster file, finds this node, and loads and checks its key.
    pub fn load(cluster_path: &Path, node: Option<&str>) -> Result<Shared> {
        let live = Live::load(cluster_path, node)?;
        let state_dir = live.state_dir.clone();
        let live = Arc::new(live);
        let telemetry = Arc::new(Telemetry::default());
        let role = Arc::new(Role::new(live.clone(), telemetry.clone()));
        Ok(Shared {
            live: live.clone(),
            ledgers: Arc::new(Mutex::new(Ledgers::new(state_dir.join("ledger")))),
            paused: AtomicBool::new(state_dir.join(PAUSED_FILE).exists()),
            role,
            telemetry,
            sessions: Arc::new(Sessions::default()),
            started: SystemTime::now(),
            jobs: crate::job_state::Jobs::default(),
            after: Arc::new(crate::after::AfterApply::new(live.clone())),
            tree_counts: crate::counts::TreeCounts::default(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
            roots: roots::Roots::load(&state_dir),
            allow_deletes: Mutex::new(Default::default()),
            local: Arc::new(Default::default()),
            undo: Arc::new(warmspare_shared::undo::Store::new(state_dir.join("undo"))),
            loops: crate::progress::Loops::default(),
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
        self.telemetry.interrupt_shippers();
        tracing::warn!(
            paused,
            "replication and jobs {}",
            if paused { "held" } else { "released" }
        );
        Ok(())
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

    /// Lets the next full comparison of `watch` towards every current peer
    /// remove what the deletion guard holds.
    pub fn allow_deletes(&self, watch: &str) {
        let peers: Vec<String> = self.telemetry.runtime().inboxes.keys().cloned().collect();
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
