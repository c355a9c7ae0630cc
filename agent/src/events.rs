//! Work handed from the watcher (and the controller) to the shippers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What changed under the watches since a shipper last looked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Work {
    /// Changed relative paths, per watch.
    pub paths: BTreeMap<String, BTreeSet<String>>,
    /// Watches to compare in full.
    pub full: BTreeSet<String>,
    /// When the oldest change of each watch in this work happened.
    pub since: BTreeMap<String, SystemTime>,
    /// The inbox generation this work brings the peer up to once shipped.
    pub generation: u64,
}

impl Work {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.full.is_empty()
    }

    fn note(&mut self, watch: &str) {
        self.since.entry(watch.to_string()).or_insert_with(SystemTime::now);
    }
}

/// The most distinct paths kept per watch before a full rescan is cheaper.
const MAX_PATHS: usize = 50_000;

#[derive(Debug, Default)]
struct State {
    work: Work,
    interrupts: u64,
    requested: u64,
}

/// A shipper's inbox: changes coalesce here until the shipper takes them.
///
/// Every addition bumps a generation; a shipper reports the generation of the
/// work it finished, so a flush can wait for "everything added before now".
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<State>,
    cond: Condvar,
}

impl Inbox {
    /// Adds changed paths of `watch`; returns the new generation.
    pub fn add_paths(&self, watch: &str, paths: impl IntoIterator<Item = String>) -> u64 {
        let mut g = self.lock();
        if !g.work.full.contains(watch) {
            let set = g.work.paths.entry(watch.to_string()).or_default();
            set.extend(paths);
            if set.len() > MAX_PATHS {
                g.work.paths.remove(watch);
                g.work.full.insert(watch.to_string());
            }
        }
        g.work.note(watch);
        self.bump(g)
    }

    /// Asks for a full comparison of `watch`; returns the new generation.
    pub fn add_full(&self, watch: &str) -> u64 {
        let mut g = self.lock();
        g.work.paths.remove(watch);
        g.work.full.insert(watch.to_string());
        g.work.note(watch);
        self.bump(g)
    }

    fn bump(&self, mut g: std::sync::MutexGuard<'_, State>) -> u64 {
        g.requested += 1;
        g.work.generation = g.requested;
        self.cond.notify_all();
        g.requested
    }

    /// Wakes a waiting [`Inbox::take`] without adding work (disconnect,
    /// shutdown, resume).
    pub fn interrupt(&self) {
        let mut g = self.lock();
        g.interrupts += 1;
        self.cond.notify_all();
    }

    /// Waits until there is work (returned and cleared) or an interrupt
    /// (returns `None`), at most `limit`.
    pub fn take(&self, limit: Duration) -> Option<Work> {
        let mut g = self.lock();
        let interrupts = g.interrupts;
        let deadline = Instant::now() + limit;
        loop {
            if !g.work.is_empty() {
                return Some(std::mem::take(&mut g.work));
            }
            if g.interrupts != interrupts {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = match self.cond.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits for an interrupt only (used while paused), at most `limit`.
    pub fn wait_interrupt(&self, limit: Duration) {
        let mut g = self.lock();
        let interrupts = g.interrupts;
        let deadline = Instant::now() + limit;
        while g.interrupts == interrupts {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = match self.cond.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Puts work back (the session ended before it was shipped).
    pub fn put_back(&self, work: Work) {
        let mut g = self.lock();
        for w in work.full {
            g.work.paths.remove(&w);
            g.work.full.insert(w);
        }
        for (w, paths) in work.paths {
            if !g.work.full.contains(&w) {
                g.work.paths.entry(w).or_default().extend(paths);
            }
        }
        for (w, t) in work.since {
            let e = g.work.since.entry(w).or_insert(t);
            *e = (*e).min(t);
        }
        g.work.generation = g.requested;
        self.cond.notify_all();
    }

    /// Whether nothing is waiting (without copying it).
    pub fn is_idle(&self) -> bool {
        self.lock().work.is_empty()
    }

    /// A copy of what is waiting, for status.
    pub fn peek(&self) -> Work {
        self.lock().work.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_coalesce_and_full_wins() {
        let i = Inbox::default();
        i.add_paths("ca", ["a".to_string(), "b".to_string()]);
        let g = i.add_paths("ca", ["a".to_string()]);
        let w = i.take(Duration::from_millis(1)).unwrap();
        assert_eq!(w.paths["ca"].len(), 2);
        assert_eq!(w.generation, g);
        assert!(w.since.contains_key("ca"));
        i.add_paths("ca", ["a".to_string()]);
        i.add_full("ca");
        i.add_paths("ca", ["c".to_string()]);
        let w = i.take(Duration::from_millis(1)).unwrap();
        assert!(w.paths.is_empty());
        assert!(w.full.contains("ca"));
        assert!(i.take(Duration::from_millis(1)).is_none());
        i.put_back(w);
        assert!(i.peek().full.contains("ca"));
    }
}
