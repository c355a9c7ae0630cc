//! Work handed from the watcher to the shippers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// What changed under the watches since a shipper last looked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Work {
    /// Changed relative paths, per watch.
    pub paths: BTreeMap<String, BTreeSet<String>>,
    /// Watches to compare in full.
    pub full: BTreeSet<String>,
}

impl Work {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.full.is_empty()
    }
}

/// The most distinct paths kept per watch before a full rescan is cheaper.
const MAX_PATHS: usize = 50_000;

/// A shipper's inbox: changes coalesce here until the shipper takes them.
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<(Work, u64)>,
    cond: Condvar,
}

impl Inbox {
    /// Adds changed paths of `watch`.
    pub fn add_paths(&self, watch: &str, paths: impl IntoIterator<Item = String>) {
        let mut g = self.lock();
        if !g.0.full.contains(watch) {
            let set = g.0.paths.entry(watch.to_string()).or_default();
            set.extend(paths);
            if set.len() > MAX_PATHS {
                g.0.paths.remove(watch);
                g.0.full.insert(watch.to_string());
            }
        }
        self.cond.notify_all();
    }

    /// Asks for a full comparison of `watch`.
    pub fn add_full(&self, watch: &str) {
        let mut g = self.lock();
        g.0.paths.remove(watch);
        g.0.full.insert(watch.to_string());
        self.cond.notify_all();
    }

    /// Wakes a waiting [`Inbox::take`] without adding work (disconnect, shutdown).
    pub fn interrupt(&self) {
        let mut g = self.lock();
        g.1 += 1;
        self.cond.notify_all();
    }

    /// Waits until there is work (returned and cleared) or an interrupt
    /// (returns `None`), at most `limit`.
    pub fn take(&self, limit: Duration) -> Option<Work> {
        let mut g = self.lock();
        let interrupts = g.1;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if !g.0.is_empty() {
                return Some(std::mem::take(&mut g.0));
            }
            if g.1 != interrupts {
                return None;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            g = match self.cond.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Work, u64)> {
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
        i.add_paths("ca", ["a".to_string()]);
        let w = i.take(Duration::from_millis(1)).unwrap();
        assert_eq!(w.paths["ca"].len(), 2);
        i.add_paths("ca", ["a".to_string()]);
        i.add_full("ca");
        i.add_paths("ca", ["c".to_string()]);
        let w = i.take(Duration::from_millis(1)).unwrap();
        assert!(w.paths.is_empty());
        assert!(w.full.contains("ca"));
        assert!(i.take(Duration::from_millis(1)).is_none());
    }
}
