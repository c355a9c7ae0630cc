//! What the running tasks report: the link towards each peer, the
//! shippers' inboxes, when a passive last applied a batch, the bytes sent,
//! and the progress counter flushes wait on. Status, health and the
//! watchdog read it; the shippers, the receiver and the role write it.
//! Imports no agent module but `events` and `lag`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::events::{Inbox, Work};
use crate::lag::Freshness;

/// The node's telemetry handle (one per node).
pub struct Telemetry {
    /// What the running tasks report, for status and flushes.
    runtime: Mutex<Runtime>,
    /// Bumped whenever a shipper finishes work or the role or hold
    /// changes (flushes wait on it and check again).
    pub progress: watch::Sender<u64>,
    /// Bytes written to peers, frames included.
    pub bytes_sent: Arc<AtomicU64>,
    /// What those bytes stand for before compression: the same frames
    /// uncompressed (equal to `bytes_sent` when nothing is compressed).
    pub bytes_uncompressed: Arc<AtomicU64>,
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
    /// On a passive: when it last heard from the active and was last
    /// caught up with it, the two moments of its lag (see `lag`).
    pub freshness: Freshness,
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
    /// Whether the current (or last) session compresses what it sends.
    pub compressed: bool,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            runtime: Mutex::new(Runtime::default()),
            progress: watch::channel(0).0,
            bytes_sent: Arc::new(AtomicU64::new(0)),
            bytes_uncompressed: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Telemetry {
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
        self.nudge();
    }

    /// Tells whoever waits on progress (flushes) to look again.
    pub fn nudge(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    /// Wakes every shipper from its wait on its inbox (pause, a confirmed
    /// epoch): each looks at the node's state again.
    pub fn interrupt_shippers(&self) {
        for inbox in self.runtime().inboxes.values() {
            inbox.interrupt();
        }
    }
}
