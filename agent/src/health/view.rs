//! What the HTTP endpoints may see of the node: a read-only view. Its
//! fields are private to this module, so the handlers in `health` reach
//! the node only through the accessors below, none of which changes the
//! role, the hold or anything else.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use warmspare_shared::config::Hook;
use warmspare_shared::proto::NodeStatus;
use warmspare_shared::state::RoleState;

use crate::role::Role;
use crate::status;
use crate::telemetry::Telemetry;

/// The node as the HTTP endpoints see it.
#[derive(Clone)]
pub struct View {
    /// The role, read for the check and the hook counters.
    role: Arc<Role>,
    /// The runtime reports, read for the bytes sent.
    telemetry: Arc<Telemetry>,
    /// What the status is made from.
    status: status::Sources,
}

impl View {
    /// A view of `status`'s sources (its role and reports included).
    pub fn new(status: status::Sources) -> View {
        View {
            role: status.role.clone(),
            telemetry: status.telemetry.clone(),
            status,
        }
    }

    /// The role state in force.
    pub fn role(&self) -> RoleState {
        self.role.current()
    }

    /// Whether this node acts as the active one (named, and not held).
    pub fn is_active(&self) -> bool {
        self.role.is_active()
    }

    /// Why this node is named active but held, if it is.
    pub fn held(&self) -> Option<String> {
        self.role.held()
    }

    /// How many runs of `hook` ended with `ok` since the agent started.
    pub fn hook_runs(&self, hook: Hook, ok: bool) -> u64 {
        self.role.hooks.count(hook, ok)
    }

    /// The bytes sent to peers, framing included.
    pub fn bytes_sent(&self) -> u64 {
        self.telemetry.bytes_sent.load(Ordering::Relaxed)
    }

    /// What the bytes sent to peers stand for before compression.
    pub fn bytes_uncompressed(&self) -> u64 {
        self.telemetry.bytes_uncompressed.load(Ordering::Relaxed)
    }

    /// The node's status, made on a blocking thread (it reads the disk).
    pub async fn status(&self) -> anyhow::Result<NodeStatus> {
        status::node_status_off_runtime(&self.status).await
    }
}
