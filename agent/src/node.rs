//! The node: the handles its tasks share. The configuration in force
//! (`live::Live`), the role (`role::Role`), what the tasks report
//! (`telemetry::Telemetry`) and the receiver's sessions
//! (`sessions::Sessions`), the operator's hold (`pause::Pause`), a
//! failed task and the supervisor's heartbeat (`supervise`) and the
//! operator's one-shot deletion permissions (`allow_deletes`) are handles
//! of their own, each an `Arc` a task can take alone; [`Shared`] bundles
//! them with what is left (the ledgers, the undo store, the watch roots,
//! the jobs' and `after_apply` runtimes). The supervisor (`daemon`) makes
//! one [`Shared`] per node.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Result;
use warmspare_shared::ledger::Ledgers;

use crate::allow_deletes::AllowDeletes;
use crate::live::Live;
use crate::pause::Pause;
use crate::role::Role;
use crate::roots;
use crate::sessions::Sessions;
use crate::supervise::{Failure, Heartbeat};
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
    pub pause: Arc<Pause>,
    /// When the agent started.
    pub started: SystemTime,
    /// The jobs' runtime.
    pub jobs: Arc<crate::job_state::Jobs>,
    /// The `after_apply` hooks' runtime (runs, counters, last outcomes).
    pub after: Arc<crate::after::AfterApply>,
    /// The watches' file counts for status, shared by concurrent requests.
    pub tree_counts: Arc<crate::counts::TreeCounts>,
    /// Whether, and why, a task the agent cannot do without stopped.
    pub failure: Arc<Failure>,
    /// When the supervisor's loop last went round (for the watchdog).
    pub heartbeat: Arc<Heartbeat>,
    /// The watch roots: where each was last seen, what is wrong with them.
    pub roots: Arc<roots::Roots>,
    /// (peer, watch) pairs whose next full comparison may remove what the
    /// deletion guard would hold (`warmsparectl resync --allow-deletes`).
    pub allow_deletes: Arc<AllowDeletes>,
    /// The receiver's record of its own writes and, on a passive, the
    /// local changes flagged under the watch roots (see `passive`).
    pub local: Arc<warmspare_shared::local::Tracker>,
    /// The undo store (`state_dir/undo`): what this node's receiver removed
    /// or replaced.
    pub undo: Arc<warmspare_shared::undo::Store>,
    /// The progress stamps of the loops that must keep going round (the
    /// watchdog is fed only while each is recent).
    pub loops: Arc<crate::progress::Loops>,
}

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
            pause: Arc::new(Pause::load(&state_dir, telemetry.clone())),
            role,
            telemetry,
            sessions: Arc::new(Sessions::default()),
            started: SystemTime::now(),
            jobs: Arc::new(crate::job_state::Jobs::default()),
            after: Arc::new(crate::after::AfterApply::new(live.clone())),
            tree_counts: Arc::new(crate::counts::TreeCounts::default()),
            failure: Arc::new(Failure::default()),
            heartbeat: Arc::new(Heartbeat::default()),
            roots: Arc::new(roots::Roots::load(&state_dir)),
            allow_deletes: Arc::new(AllowDeletes::default()),
            local: Arc::new(Default::default()),
            undo: Arc::new(warmspare_shared::undo::Store::new(state_dir.join("undo"))),
            loops: Arc::new(crate::progress::Loops::default()),
        })
    }

    /// See [`Failure::fail`] (until every user takes the handle).
    pub fn fail(&self, why: String) {
        self.failure.fail(why);
    }

    /// See [`Failure::failed`] (until every user takes the handle).
    pub async fn failed(&self) {
        self.failure.failed().await;
    }

    /// See [`Heartbeat::beat`] (until every user takes the handle).
    pub fn beat(&self) {
        self.heartbeat.beat();
    }

    /// See [`Pause::is_paused`] (until every user takes the handle).
    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
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
}

/// What each task family takes of the node, built here and nowhere else.
impl Shared {
    /// The undo store's handles (bounds, status, restores).
    pub fn for_undo(&self) -> crate::undo::Handles {
        crate::undo::Handles {
            live: self.live.clone(),
            store: self.undo.clone(),
        }
    }

    /// What the node's status is read from.
    pub fn for_status(&self) -> crate::status::Sources {
        crate::status::Sources {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            pause: self.pause.clone(),
            jobs: self.jobs.clone(),
            after: self.after.clone(),
            tree_counts: self.tree_counts.clone(),
            roots: self.roots.clone(),
            local: self.local.clone(),
            undo: self.for_undo(),
            started: self.started,
        }
    }

    /// What the jobs use.
    pub fn for_jobs(&self) -> crate::jobs::Handles {
        crate::jobs::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            pause: self.pause.clone(),
            jobs: self.jobs.clone(),
        }
    }

    /// What an operator's session uses.
    pub fn for_control(&self) -> crate::control::Handles {
        crate::control::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            pause: self.pause.clone(),
            roots: self.roots.clone(),
            allow_deletes: self.allow_deletes.clone(),
            undo: self.for_undo(),
            status: self.for_status(),
            jobs: self.for_jobs(),
        }
    }

    /// What the receiver (and the SSH server before it) uses.
    pub fn for_receiver(&self) -> crate::receive::Handles {
        crate::receive::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            sessions: self.sessions.clone(),
            ledgers: self.ledgers.clone(),
            local: self.local.clone(),
            undo: self.for_undo(),
            after: self.after.clone(),
            jobs: self.jobs.clone(),
            control: self.for_control(),
        }
    }

    /// The read-only view the HTTP endpoints have of the node.
    pub fn for_health(&self) -> crate::health::View {
        crate::health::View::new(self.for_status())
    }
}
