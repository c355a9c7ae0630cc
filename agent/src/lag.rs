//! How far behind the active a passive is, by its own last applied state:
//! the lag it publishes in its member record (`leadership`), which decides
//! whether it may take the role automatically (`max_lag_on_failover`).
//!
//! Two moments on this node's monotonic clock define it:
//! - `heard`: the last time this node heard from the active it names (a
//!   ping of the active's probe session, about every second while the
//!   active lives and reaches this node; a caught-up marker);
//! - `caught_up`: the arrival of the last caught-up marker whose requests
//!   before it are all applied. The active's shipper sends the marker (a
//!   `Ping` in the replication session) only when it has nothing pending
//!   for this node: its inbox empty, nothing unacknowledged, nothing to
//!   retry. The apply thread sees it after everything sent before it.
//!
//! The lag is `heard - caught_up`: this node holds the active's state as of
//! `caught_up`, and the active was known alive (and able to change things)
//! until `heard`. While the active ships to it the lag stays within about a
//! second (a marker follows every batch and every idle second); while
//! shipping to it is held or fails, or it applies slowly, `heard` moves on
//! and the lag grows. When the active dies both moments stop: the lag does
//! not grow while its leader key runs out, so a caught-up passive stays
//! eligible. Before the first marker (a restarted passive) there is no lag:
//! the node does not know how far behind it is.
//!
//! Pure: the times come in as arguments. Imports no agent module.

use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

/// The two moments the lag is measured between (see the module).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// The last time this node heard from the active it names.
    pub heard: Option<Instant>,
    /// The arrival of the last caught-up marker applied.
    pub caught_up: Option<Instant>,
}

impl Freshness {
    /// The active was heard from at `at` (a probe ping).
    pub fn heard(&mut self, at: Instant) {
        self.heard = Some(self.heard.map_or(at, |h| h.max(at)));
    }

    /// A caught-up marker that arrived at `at` was applied: this node held
    /// the active's state then, and heard from it.
    pub fn caught_up(&mut self, at: Instant) {
        self.caught_up = Some(self.caught_up.map_or(at, |c| c.max(at)));
        self.heard(at);
    }

    /// The lag now (see [`lag`]).
    pub fn lag(&self) -> Option<Duration> {
        lag(self.heard, self.caught_up)
    }
}

/// The lag of a passive that last heard from the active at `heard` and was
/// last caught up with it at `caught_up`: `None` before the first catch-up
/// (unknown), else the time between the two.
pub fn lag(heard: Option<Instant>, caught_up: Option<Instant>) -> Option<Duration> {
    let caught_up = caught_up?;
    Some(heard.map_or(Duration::ZERO, |h| h.saturating_duration_since(caught_up)))
}
