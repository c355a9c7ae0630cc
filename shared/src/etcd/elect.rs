//! Who may take the role when the leader key is gone: a pure function of
//! the member records the nodes publish (`<prefix>/members/<name>`), the
//! cluster file's `failover` flags and priority order, and
//! `max_lag_on_failover`.
//!
//! A node is eligible when the cluster file lets it fail over, it has
//! published a record on a live lease, that record also says `failover`
//! and carries the lag the node measured as a passive, and that lag is at
//! most `max_lag_on_failover`. Among the eligible nodes the most caught up
//! takes the role; lags within [`LAG_TIE`] of each other count as equal
//! (each node measures its own, so small differences are noise), and then
//! the priority order decides: `preferred_active` first, then file order.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Cluster;

/// Lags closer than this to the smallest one count as equally caught up.
pub const LAG_TIE: Duration = Duration::from_secs(1);

/// What one node publishes about itself under `<prefix>/members/<name>`, on
/// a lease of its own (the record vanishes when the node stops renewing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Whether the node's own cluster file lets it be promoted
    /// automatically.
    pub failover: bool,
    /// How far behind the active the node is, in milliseconds, by its own
    /// last applied state; `None` when it is not a passive or has not
    /// measured yet (the active publishes `None`).
    pub lag_ms: Option<u64>,
    /// When the record was written: milliseconds since the Unix epoch on
    /// the publisher's clock (shown, never compared across nodes).
    pub at_ms: u64,
}

/// Whether one node may be promoted automatically, and if not why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eligibility {
    /// It may: this is its published lag.
    Eligible {
        /// The lag it published.
        lag: Duration,
    },
    /// `failover = false`, in the cluster file or in its record.
    FailoverOff,
    /// No record (the node is down, or cannot reach etcd).
    Unpublished,
    /// Its record carries no lag (it is the active, or has not measured).
    LagUnknown,
    /// It is further behind than `max_lag_on_failover`.
    TooFarBehind {
        /// The lag it published.
        lag: Duration,
        /// The limit.
        max: Duration,
    },
}

impl Eligibility {
    /// Whether this is [`Eligibility::Eligible`].
    pub fn eligible(&self) -> bool {
        matches!(self, Eligibility::Eligible { .. })
    }
}

/// One node's standing: `failover` from the cluster file and its record.
pub fn eligibility(failover: bool, record: Option<&MemberRecord>, max_lag: Duration) -> Eligibility {
    if !failover {
        return Eligibility::FailoverOff;
    }
    let Some(record) = record else {
        return Eligibility::Unpublished;
    };
    if !record.failover {
        return Eligibility::FailoverOff;
    }
    let Some(ms) = record.lag_ms else {
        return Eligibility::LagUnknown;
    };
    let lag = Duration::from_millis(ms);
    if lag > max_lag {
        Eligibility::TooFarBehind { lag, max: max_lag }
    } else {
        Eligibility::Eligible { lag }
    }
}

/// The nodes in priority order, each with its `failover` flag:
/// `preferred_active` first, then the others in file order.
pub fn priority(cluster: &Cluster) -> Vec<(&str, bool)> {
    let preferred = cluster.cluster.preferred_active.as_str();
    let first = cluster.node.iter().filter(|n| n.name == preferred);
    let rest = cluster.node.iter().filter(|n| n.name != preferred);
    first.chain(rest).map(|n| (n.name.as_str(), n.failover)).collect()
}

/// Each node of `order` (see [`priority`]) with its eligibility. Records of
/// names the cluster file does not list are ignored.
pub fn standings<'a>(
    order: &[(&'a str, bool)],
    records: &BTreeMap<String, MemberRecord>,
    max_lag: Duration,
) -> Vec<(&'a str, Eligibility)> {
    order
        .iter()
        .map(|(name, failover)| (*name, eligibility(*failover, records.get(*name), max_lag)))
        .collect()
}

/// The node that should take the role, if any is eligible: the most caught
/// up, with the priority order deciding between lags within [`LAG_TIE`].
pub fn choose<'a>(
    order: &[(&'a str, bool)],
    records: &BTreeMap<String, MemberRecord>,
    max_lag: Duration,
) -> Option<&'a str> {
    let eligible: Vec<(&str, Duration)> = standings(order, records, max_lag)
        .into_iter()
        .filter_map(|(name, e)| match e {
            Eligibility::Eligible { lag } => Some((name, lag)),
            _ => None,
        })
        .collect();
    let best = eligible.iter().map(|(_, lag)| *lag).min()?;
    // The first in priority order whose lag ties with the best.
    eligible
        .into_iter()
        .find(|(_, lag)| lag.saturating_sub(best) < LAG_TIE)
        .map(|(name, _)| name)
}

/// Whether `me` may take the role now that the leader key is gone.
pub fn may_take(me: &str, order: &[(&str, bool)], records: &BTreeMap<String, MemberRecord>, max_lag: Duration) -> bool {
    choose(order, records, max_lag) == Some(me)
}

#[cfg(test)]
mod tests;
