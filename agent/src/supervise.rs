//! What the supervisor (`daemon`) watches besides its tasks: whether a
//! task the agent cannot do without stopped ([`Failure`]), and whether its
//! own loop still goes round ([`Heartbeat`], read by the watchdog in `sd`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Whether, and why, a task the agent cannot do without stopped.
#[derive(Default)]
pub struct Failure {
    /// Cancelled at the first failure: the supervisor then shuts down and
    /// the agent exits non-zero.
    fatal: CancellationToken,
    /// Why (the first task that stopped).
    reason: Mutex<Option<String>>,
}

impl Failure {
    /// A task the agent cannot do without stopped (returned or panicked)
    /// outside a shutdown: the agent stops and exits non-zero, so that the
    /// service manager starts it again whole (`Restart=on-failure`). The
    /// first reason is kept.
    pub fn fail(&self, why: String) {
        tracing::error!(
            reason = why,
            "a task the agent needs stopped; exiting so that it is restarted"
        );
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        self.fatal.cancel();
    }

    /// Resolves once a task the agent cannot do without stopped (see
    /// [`Failure::fail`]).
    pub async fn failed(&self) {
        self.fatal.cancelled().await;
    }

    /// Why the agent is stopping after a failure, if it is.
    pub fn failure(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// When the supervisor's loop last went round; the watchdog is fed only
/// while it is recent.
pub struct Heartbeat {
    /// What the beats count from.
    origin: Instant,
    /// The last beat, in milliseconds since `origin`.
    last: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Heartbeat {
    /// Records that the supervisor's loop went round.
    pub fn beat(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether the supervisor's loop went round within `limit`.
    pub fn within(&self, limit: Duration) -> bool {
        self.now_ms().saturating_sub(self.last.load(Ordering::Relaxed)) <= limit.as_millis() as u64
    }

    /// Milliseconds since `origin`.
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests;
