//! The node: the handles its tasks share, each an `Arc` of its own type
//! that a task can take alone (the configuration in force `live::Live`,
//! the role `role::Role`, the reports `telemetry::Telemetry`, the
//! receiver's `sessions::Sessions`, the operator's hold `pause::Pause`,
//! `supervise::Failure` and `supervise::Heartbeat`, the deletion permits
//! `allow_deletes::AllowDeletes`, the watch roots, the progress stamps,
//! the ledgers, the undo store, the jobs', `after_apply` and file counts'
//! runtimes). [`Shared`] bundles them; the supervisor (`daemon`) makes one
//! per node and hands each task family only what it uses, as built here
//! (`Shared::for_*`).

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

    /// What the active side of an epoch uses (and hands on to its
    /// shippers, see `active::Handles::ship`).
    pub fn for_active(&self) -> crate::active::Handles {
        crate::active::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            failure: self.failure.clone(),
            local: self.local.clone(),
            roots: self.roots.clone(),
            loops: self.loops.clone(),
            ledgers: self.ledgers.clone(),
            pause: self.pause.clone(),
            allow_deletes: self.allow_deletes.clone(),
        }
    }

    /// What the systemd notifications and the watchdog read.
    pub fn for_sd(&self) -> crate::sd::Handles {
        crate::sd::Handles {
            live: self.live.clone(),
            role: self.role.clone(),
            telemetry: self.telemetry.clone(),
            heartbeat: self.heartbeat.clone(),
            loops: self.loops.clone(),
        }
    }
}
