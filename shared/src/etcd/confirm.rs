//! The active's self-demotion rule, as a pure function of monotonic times.
//!
//! The active holds the leader key on a lease of `ttl`. etcd lets the lease
//! lapse no earlier than `ttl` after it processed the last renewal, and it
//! processed that renewal after this node sent it. So, timed on this node's
//! monotonic clock from the *send* of the last renewal that succeeded, the
//! lease is certainly alive for `ttl` (given bounded clock-rate drift between
//! the nodes). The active counts itself confirmed for a shorter window
//! (`loop_wait + retry_timeout`, kept below `ttl` by validation) and demotes
//! itself once that window has passed without a newer success.
//!
//! Every kind of etcd failure (a timeout, a refused connection, a "no
//! leader" answer, an unknown error code, a broken watch) is the same thing
//! here: not a success. None of them moves the time of the last success,
//! and none of them demotes at once; only the window does. An answer that
//! says the leadership is gone (the lease expired, the key names another
//! node) demotes at once.

use std::time::{Duration, Instant};

use super::FailureKind;

/// The outcome of one attempt to renew and confirm the leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// etcd renewed the lease and the leader key names this node on it.
    Confirmed,
    /// etcd answered that the leadership is gone: the lease expired or the
    /// leader key is absent or names another node or lease.
    Lost,
    /// No confirmation: the request failed, whatever the kind.
    Failed(FailureKind),
}

/// Where the active stands with its leadership at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Confirmed until the instant given (exclusive of nothing later).
    Confirmed {
        /// The instant after which, with no newer success, it must demote.
        until: Instant,
    },
    /// Not confirmed: the active side must stop now.
    Demote,
}

/// The active's record of its leadership: the send time of the last renewal
/// that succeeded, and whether etcd said the leadership is gone.
#[derive(Debug, Clone)]
pub struct Leadership {
    window: Duration,
    last_success_send: Instant,
    lost: bool,
}

impl Leadership {
    /// Leadership confirmed by a request sent at `sent_at` (for a new
    /// leader, the send of the lease grant its leader key is on), trusted
    /// for `window` after each successful send.
    pub fn new(sent_at: Instant, window: Duration) -> Leadership {
        Leadership {
            window,
            last_success_send: sent_at,
            lost: false,
        }
    }

    /// Records the outcome of a renewal sent at `sent_at`. Only a success
    /// moves the time of the last success, and never backwards (a late
    /// answer to an older request cannot shorten the window).
    pub fn record(&mut self, sent_at: Instant, outcome: Renewal) {
        match outcome {
            Renewal::Confirmed => {
                if sent_at > self.last_success_send {
                    self.last_success_send = sent_at;
                }
            }
            Renewal::Lost => self.lost = true,
            Renewal::Failed(_) => {}
        }
    }

    /// The send time of the last renewal that succeeded.
    pub fn last_success_send(&self) -> Instant {
        self.last_success_send
    }

    /// The verdict at `now`: demote once the leadership is known lost, or
    /// once more than the window has passed since the last success was sent.
    pub fn verdict(&self, now: Instant) -> Verdict {
        let until = self.last_success_send + self.window;
        if self.lost || now > until {
            Verdict::Demote
        } else {
            Verdict::Confirmed { until }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const WINDOW: Duration = Duration::from_secs(20);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Every failure kind the client can report.
    const KINDS: [FailureKind; 5] = [
        FailureKind::Timeout,
        FailureKind::Refused,
        FailureKind::NoLeader,
        FailureKind::Unknown,
        FailureKind::WatchBroken,
    ];

    #[test]
    fn the_window_runs_from_the_send_of_the_last_success() {
        // (renewals as (sent at, confirmed?), now, demote?)
        type Case = (&'static [(u64, bool)], u64, bool);
        let cases: &[Case] = &[
            (&[], 0, false),
            (&[], 20, false),
            (&[], 21, true),
            (&[(10, true)], 21, false),
            (&[(10, true)], 30, false),
            (&[(10, true)], 31, true),
            // Failures after a success change nothing.
            (&[(10, true), (20, false), (25, false)], 30, false),
            (&[(10, true), (20, false), (25, false)], 31, true),
            // Only failures: the start is the last success.
            (&[(5, false), (15, false)], 21, true),
            // A late answer to an older request does not move the time back.
            (&[(18, true), (12, true)], 38, false),
            (&[(18, true), (12, true)], 39, true),
        ];
        for (renewals, now, demote) in cases {
            let base = Instant::now();
            let mut l = Leadership::new(base, WINDOW);
            for (at, ok) in *renewals {
                let outcome = if *ok {
                    Renewal::Confirmed
                } else {
                    Renewal::Failed(FailureKind::Timeout)
                };
                l.record(base + s(*at), outcome);
            }
            let v = l.verdict(base + s(*now));
            assert_eq!(v == Verdict::Demote, *demote, "{renewals:?} at {now}: {v:?}");
        }
    }

    #[test]
    fn every_failure_kind_takes_the_same_path() {
        // For each kind: the same verdicts at every instant as a timeout.
        for kind in KINDS {
            let base = Instant::now();
            let mut reference = Leadership::new(base, WINDOW);
            let mut l = Leadership::new(base, WINDOW);
            for at in [1, 5, 10, 19] {
                reference.record(base + s(at), Renewal::Failed(FailureKind::Timeout));
                l.record(base + s(at), Renewal::Failed(kind));
            }
            for now in 0..40 {
                assert_eq!(
                    l.verdict(base + s(now)),
                    reference.verdict(base + s(now)),
                    "{kind:?} at {now}"
                );
            }
            assert_eq!(
                l.verdict(base + s(20)),
                Verdict::Confirmed { until: base + WINDOW },
                "{kind:?}"
            );
            assert_eq!(l.verdict(base + s(21)), Verdict::Demote, "{kind:?}");
        }
    }

    #[test]
    fn a_lost_leadership_demotes_at_once_and_for_good() {
        let base = Instant::now();
        let mut l = Leadership::new(base, WINDOW);
        l.record(base + s(1), Renewal::Lost);
        assert_eq!(l.verdict(base + s(1)), Verdict::Demote);
        l.record(base + s(2), Renewal::Confirmed);
        assert_eq!(l.verdict(base + s(2)), Verdict::Demote);
    }
}
