//! Progress stamps of the loops that must keep going round, for the
//! systemd watchdog (see `sd`).
//!
//! A loop registers itself with the limit it must come round within, and
//! stamps a monotonic time at every round; a loop that waits (for an event,
//! a connection, the peer) gives its wait a timeout so that it comes round
//! and stamps while idle, and long work (a full comparison of a large tree,
//! a large file) stamps as it goes. A loop that ends drops its [`Stamp`]
//! and is no longer checked; one that hangs keeps it, goes stale, and the
//! watchdog is no longer fed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The registered loops.
pub struct Loops {
    /// What the stamps count from.
    origin: Instant,
    /// Every loop registered; a dropped stamp is pruned at the next check.
    loops: Mutex<Vec<Weak<Stamp>>>,
}

impl Default for Loops {
    fn default() -> Self {
        Loops {
            origin: Instant::now(),
            loops: Mutex::new(Vec::new()),
        }
    }
}

/// One loop's progress: when it last went round.
pub struct Stamp {
    name: String,
    limit: Duration,
    origin: Instant,
    /// Milliseconds from `origin` to the last stamp.
    last: AtomicU64,
}

/// A loop that has not stamped within its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The loop's name ("the shipper to b").
    pub name: String,
    /// How long ago it last stamped.
    pub since: Duration,
    /// Its limit.
    pub limit: Duration,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (no progress for {} s, limit {} s)",
            self.name,
            self.since.as_secs(),
            self.limit.as_secs()
        )
    }
}

impl Loops {
    /// Registers a loop that must stamp at least once per `limit`; it
    /// counts as stamped now.
    pub fn register(&self, name: impl Into<String>, limit: Duration) -> Arc<Stamp> {
        let stamp = Arc::new(Stamp {
            name: name.into(),
            limit,
            origin: self.origin,
            last: AtomicU64::new(0),
        });
        stamp.stamp();
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.retain(|l| l.strong_count() > 0);
        loops.push(Arc::downgrade(&stamp));
        stamp
    }

    /// The registered loops that have not stamped within their limit.
    pub fn stale(&self) -> Vec<Stale> {
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.retain(|l| l.strong_count() > 0);
        loops
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|s| {
                let since = s.since();
                (since > s.limit).then(|| Stale {
                    name: s.name.clone(),
                    since,
                    limit: s.limit,
                })
            })
            .collect()
    }
}

impl Stamp {
    /// Records that the loop made progress now.
    pub fn stamp(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long ago the loop last stamped.
    pub fn since(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Whether the loop `what` is to hang for the tests of the watchdog
/// (`WARMSPARE_TEST_HANG_LOOP`: `shipper`, `ssh-accept`, `http-accept` or
/// `watcher`). Never set outside tests.
pub fn test_hang(what: &str) -> bool {
    static HANG: OnceLock<Option<String>> = OnceLock::new();
    HANG.get_or_init(|| std::env::var("WARMSPARE_TEST_HANG_LOOP").ok())
        .as_deref()
        == Some(what)
}

/// Hangs the calling thread for good (see [`test_hang`]).
pub fn hang_thread(what: &str) -> ! {
    tracing::warn!(what, "hanging on purpose (WARMSPARE_TEST_HANG_LOOP)");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Hangs the calling task for good (see [`test_hang`]).
pub async fn hang_task(what: &str) {
    tracing::warn!(what, "hanging on purpose (WARMSPARE_TEST_HANG_LOOP)");
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stale_past_its_limit_and_forgotten_once_it_ends() {
        let loops = Loops::default();
        let quick = loops.register("quick", Duration::ZERO);
        let slow = loops.register("slow", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        let stale = loops.stale();
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert_eq!(stale[0].name, "quick");
        assert!(
            stale[0].to_string().starts_with("quick (no progress for 0 s"),
            "{}",
            stale[0]
        );
        slow.stamp();
        drop(quick);
        assert!(loops.stale().is_empty());
        assert_eq!(loops.loops.lock().unwrap().len(), 1);
    }
}
