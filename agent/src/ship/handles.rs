//! What a shipper takes of the node's handles.

use std::sync::{Arc, Mutex};

use warmspare_shared::ledger::Ledgers;

use crate::allow_deletes::AllowDeletes;
use crate::live::Live;
use crate::pause::Pause;
use crate::progress::Loops;
use crate::role::Role;
use crate::roots::Roots;
use crate::telemetry::Telemetry;

/// What a shipper uses of the node: built by the active side
/// (`active::Handles::ship`), one clone per shipper.
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force and this node's identity.
    pub live: Arc<Live>,
    /// The role: the hello, confirmation of a held epoch, adoption.
    pub role: Arc<Role>,
    /// Where the link towards the peer and the bytes sent are reported.
    pub telemetry: Arc<Telemetry>,
    /// The agreed content of every replicated file, recorded as the peer
    /// acknowledges.
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// The operator's hold: a paused shipper sends nothing.
    pub pause: Arc<Pause>,
    /// Where the shipper's progress stamp is registered (the watchdog).
    pub loops: Arc<Loops>,
    /// The watch roots, verified before each batch.
    pub roots: Arc<Roots>,
    /// The operator's one-shot permissions to remove what the deletion
    /// guard would hold.
    pub allow_deletes: Arc<AllowDeletes>,
}
