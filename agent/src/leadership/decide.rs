//! The leadership task's decisions: pure functions of this node's name,
//! the cluster file, this node's role state, the role etcd holds and the
//! member records. Table-tested in `tests.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use warmspare_shared::config::Cluster;
use warmspare_shared::etcd::elect::{self, Eligibility, MemberRecord};
use warmspare_shared::etcd::Role as EtcdRole;
use warmspare_shared::state::{self, RoleState};

/// What to do about the leader key, given the role etcd holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The key names this node: put it on this node's new lease and move
    /// etcd's epoch from `from` to `to` (the same epoch after a restart).
    Claim {
        /// etcd's epoch now.
        from: u64,
        /// The epoch to record (this node's).
        to: u64,
    },
    /// The key is absent: take it, moving etcd's epoch from `from` to `to`.
    Seize {
        /// etcd's epoch now.
        from: u64,
        /// The epoch to record.
        to: u64,
        /// The reason of the local role change to `to` that follows, when
        /// this node's role state is not at `to` yet (a failover, or an
        /// active whose lease lapsed taking the key again).
        local: Option<String>,
    },
    /// etcd names another node at a higher epoch: this node adopts it.
    Adopt(RoleState),
    /// Nothing to do now, for this reason.
    Wait(String),
}

/// The step of a node whose role state names it active.
pub fn as_active(me: &str, cluster: &Cluster, local: &RoleState, etcd: &EtcdRole) -> Step {
    let e = local.epoch;
    match &etcd.leader {
        Some(l) if etcd.epoch > e => adopt(cluster, etcd.epoch, &l.name),
        None if etcd.epoch > e => Step::Wait(format!(
            "etcd is at epoch {}, above this node's {e}, and no node holds the leader key",
            etcd.epoch
        )),
        // A switchover's old active may still act until its lease is gone.
        _ if etcd.handover.is_some() => Step::Wait(handing_over(etcd)),
        Some(l) if l.name == me => Step::Claim {
            from: etcd.epoch,
            to: e,
        },
        Some(l) => Step::Wait(format!("{} holds the leader key at epoch {}", l.name, etcd.epoch)),
        // The key lapsed at this node's own epoch: no other node took it,
        // so this node, the last active, takes it again at the next epoch.
        None if etcd.epoch == e => match state::next_epoch(e) {
            Ok(to) => Step::Seize {
                from: e,
                to,
                local: Some(format!(
                    "the leader key's lease lapsed at epoch {e}; {me} took it again"
                )),
            },
            Err(err) => Step::Wait(err.to_string()),
        },
        // etcd is behind this node's epoch (the first start with `[etcd]`,
        // or an operator's change): record this node's epoch.
        None => Step::Seize {
            from: etcd.epoch,
            to: e,
            local: None,
        },
    }
}

/// The step of a passive node (its role state names another node).
/// `eligible` says whether this node may take the role automatically.
pub fn as_passive(cluster: &Cluster, local: &RoleState, etcd: &EtcdRole, eligible: Result<(), String>) -> Step {
    match &etcd.leader {
        Some(l) if etcd.epoch > local.epoch => adopt(cluster, etcd.epoch, &l.name),
        Some(l) => Step::Wait(format!("{} holds the leader key at epoch {}", l.name, etcd.epoch)),
        None if etcd.epoch < local.epoch => Step::Wait(format!(
            "etcd is at epoch {}, below this node's {}: {} takes the key",
            etcd.epoch, local.epoch, local.active
        )),
        None if etcd.paused.is_some() => Step::Wait(format!(
            "automatic failover is paused ({}): `warmsparectl resume` ends it",
            etcd.paused.as_deref().unwrap_or_default()
        )),
        None if etcd.handover.is_some() => Step::Wait(handing_over(etcd)),
        None => match (eligible, state::next_epoch(etcd.epoch)) {
            (Ok(()), Ok(to)) => Step::Seize {
                from: etcd.epoch,
                to,
                local: Some(format!(
                    "automatic failover: the leader key of {} expired",
                    local.active
                )),
            },
            (Err(why), _) => Step::Wait(why),
            (_, Err(err)) => Step::Wait(err.to_string()),
        },
    }
}

/// Whether `me` may take the role automatically from `old` (the active
/// node it knew), read from the member records `records` once the key is
/// gone: its own `failover` is not `false`, and the election rule of
/// `elect` (the most caught up eligible node, the priority order between
/// lags within `elect::LAG_TIE`) picks `me` among the nodes other than
/// `old`, whose record, if it still has one, does not count. `Err` says why
/// not: this node is not eligible itself, another node is picked, or none.
pub fn eligible(
    cluster: &Cluster,
    me: &str,
    old: &str,
    records: &BTreeMap<String, MemberRecord>,
    max_lag: Duration,
) -> Result<(), String> {
    let node = cluster
        .node(me)
        .ok_or_else(|| format!("{me} is not a node of the cluster"))?;
    if !node.failover {
        return Err(format!("{me} has failover = false: only an operator promotes it"));
    }
    let order: Vec<(&str, bool)> = elect::priority(cluster)
        .into_iter()
        .filter(|(name, _)| *name != old)
        .collect();
    let chosen = elect::choose(&order, records, max_lag);
    if chosen == Some(me) {
        return Ok(());
    }
    let mine = elect::standings(&order, records, max_lag)
        .into_iter()
        .find(|(name, _)| *name == me)
        .map(|(_, e)| e);
    match (mine, chosen) {
        (Some(e), _) if !e.eligible() => Err(format!("{me} is not eligible: {}", why_not(e))),
        (_, Some(other)) => Err(format!(
            "{other} takes the role: more caught up, or first in priority order among lags within {} ms",
            elect::LAG_TIE.as_millis()
        )),
        (_, None) => Err("no node is eligible".into()),
    }
}

/// A few words for why a node is not eligible.
fn why_not(e: Eligibility) -> String {
    match e {
        Eligibility::Eligible { .. } => "it is".into(),
        Eligibility::FailoverOff => "failover = false".into(),
        Eligibility::Unpublished => "no member record in etcd".into(),
        Eligibility::LagUnknown => "no lag measured (not caught up with the active since it started)".into(),
        Eligibility::TooFarBehind { lag, max } => format!(
            "{} ms behind, more than max_lag_on_failover ({} ms)",
            lag.as_millis(),
            max.as_millis()
        ),
    }
}

/// Why a take waits for a switchover's old active.
fn handing_over(etcd: &EtcdRole) -> String {
    format!(
        "{} hands the role over at epoch {}: waiting until its lease is gone",
        etcd.handover.as_deref().unwrap_or_default(),
        etcd.epoch
    )
}

fn adopt(cluster: &Cluster, epoch: u64, name: &str) -> Step {
    if cluster.node(name).is_none() {
        return Step::Wait(format!(
            "etcd names {name:?} active at epoch {epoch}, which is not a node of the cluster"
        ));
    }
    Step::Adopt(RoleState {
        epoch,
        active: name.to_string(),
    })
}
