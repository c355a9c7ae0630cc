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
//!
//! With failsafe ([`Leadership::with_failsafe`]), an answered failsafe
//! probe is a confirmation too, from one passive: while etcd fails, the
//! active stays confirmed as long as *every* passive answered a probe sent
//! within the window (see [`super::failsafe`] for the passive's promise).
//! An answer that says the leadership is gone still demotes at once.

use std::collections::BTreeMap;
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
    /// With failsafe: per passive, the send time of the last failsafe
    /// probe it answered (`None` before its first answer).
    failsafe: Option<BTreeMap<String, Option<Instant>>>,
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
            failsafe: None,
        }
    }

    /// Failsafe mode: an answered probe from each of `passives` (every
    /// other node of the cluster) confirms the leadership as well. With no
    /// passive, failsafe confirms nothing.
    pub fn with_failsafe<I: IntoIterator<Item = String>>(mut self, passives: I) -> Leadership {
        self.failsafe = Some(passives.into_iter().map(|p| (p, None)).collect());
        self
    }

    /// Records that `passive` answered a failsafe probe sent at `sent_at`
    /// (with a promise). Never moves backwards; a name that is not one of
    /// the passives, or without failsafe, changes nothing.
    pub fn record_probe(&mut self, passive: &str, sent_at: Instant) {
        if let Some(last) = self.failsafe.as_mut().and_then(|m| m.get_mut(passive)) {
            if last.is_none_or(|l| sent_at > l) {
                *last = Some(sent_at);
            }
        }
    }

    /// Until when failsafe confirms the leadership: the window from the
    /// oldest of the passives' last answered probes; `None` without
    /// failsafe, without passives, or while one has never answered.
    pub fn failsafe_until(&self) -> Option<Instant> {
        let passives = self.failsafe.as_ref()?;
        let mut oldest: Option<Instant> = None;
        for last in passives.values() {
            let sent = (*last)?;
            oldest = Some(oldest.map_or(sent, |o| o.min(sent)));
        }
        Some(oldest? + self.window)
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
    /// once more than the window has passed since the last success was sent
    /// (with failsafe: and since the oldest of the passives' last answered
    /// probes was sent).
    pub fn verdict(&self, now: Instant) -> Verdict {
        let etcd = self.last_success_send + self.window;
        let until = self.failsafe_until().map_or(etcd, |f| f.max(etcd));
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
    fn failsafe_confirms_while_every_passive_answers() {
        // (answered probes as (passive, sent at), now, demote?); etcd's last
        // success at 0, so without failsafe the window ends at 20.
        type Case = (&'static [(&'static str, u64)], u64, bool);
        let cases: &[Case] = &[
            (&[], 20, false),
            (&[], 21, true),
            // One of two passives answered: no failsafe confirmation.
            (&[("b", 15)], 21, true),
            (&[("c", 15)], 21, true),
            // Both answered: the oldest answer decides.
            (&[("b", 15), ("c", 10)], 30, false),
            (&[("b", 15), ("c", 10)], 31, true),
            (&[("b", 15), ("c", 10), ("c", 18)], 35, false),
            (&[("b", 15), ("c", 10), ("c", 18)], 36, true),
            // A late record of an older probe does not move it back.
            (&[("b", 15), ("c", 18), ("b", 5)], 35, false),
            // A name that is not a passive counts for nothing.
            (&[("b", 15), ("x", 30)], 21, true),
        ];
        for (probes, now, demote) in cases {
            let base = Instant::now();
            let mut l = Leadership::new(base, WINDOW).with_failsafe(["b".to_string(), "c".to_string()]);
            for (who, at) in *probes {
                l.record_probe(who, base + s(*at));
            }
            let v = l.verdict(base + s(*now));
            assert_eq!(v == Verdict::Demote, *demote, "{probes:?} at {now}: {v:?}");
        }
    }

    #[test]
    fn failsafe_holds_through_every_failure_kind_but_not_a_lost_leadership() {
        for kind in KINDS {
            let base = Instant::now();
            let mut l = Leadership::new(base, WINDOW).with_failsafe(["b".to_string()]);
            for at in [5, 10, 15, 20, 25, 30] {
                l.record(base + s(at), Renewal::Failed(kind));
                l.record_probe("b", base + s(at));
            }
            assert_eq!(
                l.verdict(base + s(50)),
                Verdict::Confirmed { until: base + s(50) },
                "{kind:?}"
            );
            assert_eq!(l.verdict(base + s(51)), Verdict::Demote, "{kind:?}");
        }
        let base = Instant::now();
        let mut l = Leadership::new(base, WINDOW).with_failsafe(["b".to_string()]);
        l.record_probe("b", base + s(1));
        l.record(base + s(1), Renewal::Lost);
        assert_eq!(l.verdict(base + s(1)), Verdict::Demote);
    }

    #[test]
    fn without_failsafe_or_passives_probes_count_for_nothing() {
        let base = Instant::now();
        let mut plain = Leadership::new(base, WINDOW);
        plain.record_probe("b", base + s(15));
        assert_eq!(plain.verdict(base + s(21)), Verdict::Demote);
        let mut alone = Leadership::new(base, WINDOW).with_failsafe(Vec::<String>::new());
        alone.record_probe("b", base + s(15));
        assert_eq!(alone.failsafe_until(), None);
        assert_eq!(alone.verdict(base + s(21)), Verdict::Demote);
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
