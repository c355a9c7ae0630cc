//! When the watcher hands a watch's changes to the shippers: a pure state
//! machine, fed events and the time, asked what is due.
//!
//! By default (`debounce_ms = 0`) changes ship on their leading edge: an
//! event that says its change is whole ([`Edge::Complete`]) hands the
//! watch's pending paths over at once. Coalescing happens downstream, in
//! each shipper's [`crate::events::Inbox`]: what arrives while a batch is in
//! flight gathers there and becomes the next batch, so a storm makes few
//! large batches and a single change on an idle pair ships without waiting.
//!
//! An event that does not say its change is whole ([`Edge::Partial`]: a
//! file created and not closed yet, a write before its close) waits for
//! [`PARTIAL_QUIET`] of quiet, in case its close follows; a writer that keeps
//! its file open still ships within [`MAX_HOLD`].
//!
//! `debounce_ms > 0` is the trailing debounce, opt-in for writers that close
//! a file before it is whole: every event, of any kind, waits until the
//! watch has been quiet that long (at most [`MAX_HOLD`]).

use std::collections::BTreeMap;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::EventKind;
use tokio::time::Instant;

/// The longest a steady stream of events can hold a batch back.
pub const MAX_HOLD: Duration = Duration::from_millis(500);

/// How long a partial change waits for the event that completes it.
pub const PARTIAL_QUIET: Duration = Duration::from_millis(10);

/// What an event says about the change to the path it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// The change is whole as far as the file system can tell: a file
    /// closed after writing, a name moved into or out of place, a removal,
    /// a new directory, a change of mode or owner.
    Complete,
    /// More is likely to follow: a file created and not closed yet, a
    /// write before its close, or an event the watcher cannot read.
    Partial,
}

impl Edge {
    /// What an event of `kind` says. A created file waits for its close
    /// (hard links and symbolic links, which are never closed, wait for the
    /// quiet instead); a written one too, since writes come before their
    /// close.
    pub fn of(kind: &EventKind) -> Edge {
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_))
            | EventKind::Create(CreateKind::Folder)
            | EventKind::Remove(_) => Edge::Complete,
            _ => Edge::Partial,
        }
    }
}

/// One watch's changes not yet handed over.
#[derive(Debug)]
struct Pending {
    /// Changed relative paths; `""` alone asks for the whole watch.
    paths: Vec<String>,
    /// When the watch has been quiet long enough.
    quiet: Instant,
    /// When the first change has waited [`MAX_HOLD`].
    hold: Instant,
    /// Whether a complete change (the leading edge) made it due: later
    /// partial changes do not hold it back then.
    now: bool,
}

/// The pending changes of every watch, by index.
#[derive(Debug, Default)]
pub struct Batcher {
    pending: BTreeMap<usize, Pending>,
}

impl Batcher {
    /// Notes a change of `rel` in watch `idx` at `now`, with that watch's
    /// `debounce` (zero: the leading edge). More than `max_paths` distinct
    /// paths become the root (`""`), which compares the whole watch.
    pub fn add(&mut self, idx: usize, rel: String, edge: Edge, debounce: Duration, now: Instant, max_paths: usize) {
        let entry = self.pending.entry(idx).or_insert_with(|| Pending {
            paths: Vec::new(),
            quiet: now,
            hold: now + MAX_HOLD,
            now: false,
        });
        if entry.paths.first().is_some_and(String::is_empty) {
            // The whole watch is asked for already.
        } else if rel.is_empty() || entry.paths.len() >= max_paths {
            entry.paths = vec![String::new()];
        } else {
            entry.paths.push(rel);
        }
        if !debounce.is_zero() {
            entry.quiet = now + debounce;
        } else if edge == Edge::Complete {
            entry.now = true;
            entry.quiet = now;
        } else if !entry.now {
            entry.quiet = now + PARTIAL_QUIET;
        }
    }

    /// The earliest moment something becomes due, if anything is pending.
    pub fn next(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.quiet.min(p.hold)).min()
    }

    /// Takes what is due at `now`: per watch index, its changed paths.
    pub fn due(&mut self, now: Instant) -> Vec<(usize, Vec<String>)> {
        let ready: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.now || p.quiet <= now || p.hold <= now)
            .map(|(i, _)| *i)
            .collect();
        ready
            .into_iter()
            .filter_map(|i| self.pending.remove(&i).map(|p| (i, p.paths)))
            .collect()
    }
}

#[cfg(test)]
mod tests;
