//! The decisions of role changes, as pure functions of the cluster file and
//! the nodes' reports: the switchover preflight, whether the target acts
//! already, the plan of a forced failover, and the epoch arithmetic.

use std::time::Duration;

use anyhow::Result;
use warmspare_shared::config::Cluster;
use warmspare_shared::proto::NodeStatus;
use warmspare_shared::state::RoleState;

use crate::client::NodeView;
use crate::exit::{fail, REFUSED};

/// A replication link this far behind (oldest unacknowledged change) fails
/// the switchover preflight: the final flush would take too long to trust.
pub const MAX_PREFLIGHT_LAG: Duration = Duration::from_secs(60);

/// The cluster's current role, from the reachable nodes: the highest epoch wins.
fn current_role(views: &[NodeView]) -> Option<RoleState> {
    views
        .iter()
        .filter_map(|v| v.status.as_ref().ok())
        .map(|s| s.role.clone())
        .max_by_key(|r| r.epoch)
}

/// The epoch at which `to` already acts as the active node (named active,
/// not fenced, and the cluster's current role names it), if it does.
pub(super) fn already_acting(views: &[NodeView], to: &str) -> Option<u64> {
    let s = status_of(views, to)?;
    (s.role.active == s.node && s.held.is_none() && current_role(views).is_some_and(|r| r.active == to))
        .then_some(s.role.epoch)
}

fn status_of<'a>(views: &'a [NodeView], node: &str) -> Option<&'a NodeStatus> {
    views
        .iter()
        .find(|v| v.node.name == node)
        .and_then(|v| v.status.as_ref().ok())
}

/// The preflight checks of a switchover to `to`, from the nodes' reports
/// alone; `Ok` holds the role to move from and what passed, `Err` lists what
/// failed.
pub(super) fn preflight(
    cluster: &Cluster,
    views: &[NodeView],
    to: &str,
) -> std::result::Result<(RoleState, Vec<String>), Vec<String>> {
    let mut bad = Vec::new();
    let mut good = Vec::new();
    if cluster.node(to).is_none() {
        return Err(vec![format!("{to:?} is not a node of the cluster")]);
    }
    let Some(role) = current_role(views) else {
        return Err(vec!["no node could be reached".into()]);
    };
    if role.active == to {
        return Err(vec![format!("{to} is already the active node (epoch {})", role.epoch)]);
    }
    let hash = cluster.hash();
    let active = status_of(views, &role.active);
    let target = status_of(views, to);
    match (active, target) {
        (None, _) => bad.push(format!(
            "the active node {} is not reachable (use failover if it is down)",
            role.active
        )),
        (_, None) => bad.push(format!("{to} is not reachable")),
        (Some(a), Some(t)) => {
            if let Some(why) = &a.held {
                bad.push(format!(
                    "{} is named active but fenced ({why}): use `failover --to {to} --force`",
                    a.node
                ));
            }
            if a.role != role || a.role.active != a.node {
                bad.push(format!(
                    "{} does not report itself active at epoch {}",
                    a.node, role.epoch
                ));
            }
            if t.role != role {
                bad.push(format!(
                    "{to} is at epoch {} with {} active, not epoch {} with {}",
                    t.role.epoch, t.role.active, role.epoch, role.active
                ));
            }
            if a.version != t.version || a.protocol != t.protocol {
                bad.push(format!(
                    "versions differ: {} runs {} (protocol {}), {to} runs {} (protocol {})",
                    a.node, a.version, a.protocol, t.version, t.protocol
                ));
            } else {
                good.push(format!("both run version {} (protocol {})", a.version, a.protocol));
            }
            if a.config_hash != hash || t.config_hash != hash {
                bad.push("the cluster files differ between the nodes or from this one (see status)".into());
            } else {
                good.push(format!("same cluster file (hash {})", &hash[..12]));
            }
            if a.paused || t.paused {
                bad.push("replication is paused (run `warmsparectl resume` first)".into());
            }
            let links: Vec<_> = a.links.iter().filter(|l| l.peer == to).collect();
            if links.iter().any(|l| !l.connected) || (links.is_empty() && !cluster.watch.is_empty()) {
                bad.push(format!("{} is not connected to {to}", a.node));
            }
            let lag = links.iter().map(|l| l.lag_seconds).fold(0.0, f64::max);
            if lag > MAX_PREFLIGHT_LAG.as_secs_f64() {
                bad.push(format!(
                    "{to} is {lag:.0}s behind (at most {}s is allowed before a switchover)",
                    MAX_PREFLIGHT_LAG.as_secs()
                ));
            } else if !links.is_empty() {
                good.push(format!("{to} is connected and {lag:.1}s behind"));
            }
        }
    }
    if bad.is_empty() {
        Ok((role, good))
    } else {
        Err(bad)
    }
}

/// What a forced failover does, decided from the nodes' reports alone.
#[derive(Debug, PartialEq)]
pub(super) enum FailoverPlan {
    /// The target already acts as the active node at `epoch`: nothing to do.
    Already {
        /// The cluster's epoch.
        epoch: u64,
    },
    /// Promote the target.
    Promote {
        /// The cluster's role now (the highest epoch reported).
        from: RoleState,
        /// The role state the target reports, which its promotion swaps.
        expect: RoleState,
        /// The role state after the promotion.
        next: RoleState,
        /// Why the target, already named active at `from`, is fenced and so
        /// promoted again; `None` for a promotion from passive.
        retry: Option<String>,
    },
}

/// Decides a forced failover to `to`: refused (exit 3) when no node answers,
/// when the active node is reachable and acting (a switchover is the way), or
/// when `to` is not reachable.
pub(super) fn plan_failover(views: &[NodeView], to: &str) -> Result<FailoverPlan> {
    let role = current_role(views).ok_or_else(|| fail(REFUSED, "no node could be reached"))?;
    let retry = status_of(views, to)
        .filter(|s| s.role.active == s.node && s.role == role)
        .and_then(|s| s.held.clone());
    if role.active == to && retry.is_none() {
        return Ok(FailoverPlan::Already { epoch: role.epoch });
    }
    if retry.is_none()
        && role.active != to
        && status_of(views, &role.active).is_some_and(|s| s.role.active == s.node && s.held.is_none())
    {
        return Err(fail(
            REFUSED,
            format!(
                "the active node {} is reachable and active: use switchover",
                role.active
            ),
        ));
    }
    let target = status_of(views, to).ok_or_else(|| fail(REFUSED, format!("{to} is not reachable")))?;
    // A held target with a peer unreachable: that peer may have moved on
    // while the target was down (a failover to it), so the epoch skips
    // ahead and a peer returning at any epoch it may have reached adopts
    // this one and follows, rather than meeting a second active at its own.
    let someone_unreachable = views.iter().any(|v| v.status.is_err());
    let step_up = if retry.is_some() && someone_unreachable {
        HELD_EPOCH_STEP
    } else {
        1
    };
    let next = RoleState {
        epoch: advance_epoch(role.epoch, step_up)?,
        active: to.to_string(),
    };
    Ok(FailoverPlan::Promote {
        expect: target.role.clone(),
        from: role,
        next,
        retry,
    })
}

/// The epoch after `current`, or a refusal saying why there is none.
pub(super) fn next_epoch(current: u64) -> Result<u64> {
    advance_epoch(current, 1)
}

/// How far a failover that promotes a held node moves the epoch (well
/// within what an agent accepts in one step, `state::MAX_EPOCH_JUMP`).
pub const HELD_EPOCH_STEP: u64 = 100;

/// `current + by`, with checked arithmetic, or a refusal saying why not.
fn advance_epoch(current: u64, by: u64) -> Result<u64> {
    use warmspare_shared::state::{EpochError, MAX_EPOCH};
    current.checked_add(by).filter(|e| *e <= MAX_EPOCH).ok_or_else(|| {
        fail(
            REFUSED,
            format!("cannot change the role: {}", EpochError::Exhausted { current }),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cluster, code, link, role, status, views};

    /// `a` active at epoch 7 with a connected link to `b`, `b` passive at the same epoch.
    fn healthy(c: &Cluster) -> (NodeStatus, NodeStatus) {
        let mut a = status(c, "a", role(7, "a"));
        a.links.push(link("b", 0.5));
        (a, status(c, "b", role(7, "a")))
    }

    #[test]
    fn preflight_passes_a_healthy_pair_and_names_what_passed() {
        let c = cluster();
        let (a, b) = healthy(&c);
        let (from, good) = match preflight(&c, &views(&c, vec![a, b]), "b") {
            Ok(r) => r,
            Err(bad) => panic!("refused: {bad:?}"),
        };
        assert_eq!(from, role(7, "a"));
        assert_eq!(good.len(), 3, "{good:?}");
        assert!(good[2].contains("b is connected and 0.5s behind"), "{good:?}");
    }

    #[test]
    fn preflight_refuses_each_unsafe_state() {
        type Change = fn(&mut NodeStatus, &mut NodeStatus);
        // What is changed from a healthy pair (a active, b passive) and the
        // one failure it must cause.
        let cases: &[(&str, Change, &str)] = &[
            (
                "fenced active",
                |a, _| a.held = Some("unconfirmed".into()),
                "a is named active but fenced (unconfirmed)",
            ),
            (
                "active at another epoch",
                |a, _| a.role = role(6, "a"),
                "a does not report itself active at epoch 7",
            ),
            (
                "target behind on the epoch",
                |_, b| b.role = role(6, "a"),
                "b is at epoch 6 with a active",
            ),
            (
                "versions differ",
                |_, b| b.version = "1.0.1".into(),
                "versions differ: a runs 1.0.0",
            ),
            ("protocols differ", |_, b| b.protocol += 1, "versions differ"),
            (
                "cluster file differs on the active",
                |a, _| a.config_hash = "0".repeat(64),
                "the cluster files differ",
            ),
            (
                "cluster file differs on the target",
                |_, b| b.config_hash = "0".repeat(64),
                "the cluster files differ",
            ),
            ("paused active", |a, _| a.paused = true, "replication is paused"),
            ("paused target", |_, b| b.paused = true, "replication is paused"),
            (
                "link down",
                |a, _| a.links[0].connected = false,
                "a is not connected to b",
            ),
            (
                "no link while there are watches",
                |a, _| a.links.clear(),
                "a is not connected to b",
            ),
            (
                "link to another peer only",
                |a, _| a.links[0].peer = "c".into(),
                "a is not connected to b",
            ),
            (
                "target too far behind",
                |a, _| a.links[0].lag_seconds = 60.5,
                "b is 60s behind (at most 60s",
            ),
        ];
        let c = cluster();
        for (what, change, want) in cases {
            let (mut a, mut b) = healthy(&c);
            change(&mut a, &mut b);
            match preflight(&c, &views(&c, vec![a, b]), "b") {
                Ok(_) => panic!("{what}: the preflight passed"),
                Err(bad) => assert!(
                    bad.iter().any(|f| f.contains(want)),
                    "{what}: {want:?} not among {bad:?}"
                ),
            }
        }
    }

    #[test]
    fn preflight_allows_exactly_the_maximum_lag() {
        let c = cluster();
        let (mut a, b) = healthy(&c);
        a.links[0].lag_seconds = MAX_PREFLIGHT_LAG.as_secs_f64();
        assert!(preflight(&c, &views(&c, vec![a, b]), "b").is_ok());
    }

    #[test]
    fn preflight_refuses_before_comparing_when_the_pair_is_incomplete() {
        let c = cluster();
        let (a, b) = healthy(&c);
        let cases: Vec<(&str, Vec<NodeStatus>, &str, &str)> = vec![
            (
                "unknown node",
                vec![a.clone(), b.clone()],
                "c",
                "\"c\" is not a node of the cluster",
            ),
            ("nobody answers", vec![], "b", "no node could be reached"),
            (
                "already active",
                vec![a.clone(), b.clone()],
                "a",
                "a is already the active node (epoch 7)",
            ),
            (
                "active down",
                vec![b.clone()],
                "b",
                "the active node a is not reachable (use failover",
            ),
            ("target down", vec![a.clone()], "b", "b is not reachable"),
        ];
        for (what, reports, to, want) in cases {
            match preflight(&c, &views(&c, reports), to) {
                Ok(_) => panic!("{what}: the preflight passed"),
                Err(bad) => assert!(
                    bad.len() == 1 && bad[0].contains(want),
                    "{what}: {want:?} is not {bad:?}"
                ),
            }
        }
    }

    #[test]
    fn switchover_to_the_acting_active_is_nothing_to_do() {
        let c = cluster();
        let (a, b) = healthy(&c);
        assert_eq!(already_acting(&views(&c, vec![a.clone(), b.clone()]), "a"), Some(7));
        assert_eq!(already_acting(&views(&c, vec![a.clone(), b.clone()]), "b"), None);
        // Fenced, it does not act: the preflight (and its advice) decides.
        let mut held = a.clone();
        held.held = Some("unconfirmed".into());
        assert_eq!(already_acting(&views(&c, vec![held, b.clone()]), "a"), None);
        // Named active at an epoch the cluster has moved past: not active.
        let moved_on = status(&c, "b", role(8, "b"));
        assert_eq!(already_acting(&views(&c, vec![a, moved_on]), "a"), None);
    }

    /// The plan, or the refusal's exit code and message.
    fn plan(reports: Vec<NodeStatus>, to: &str) -> std::result::Result<FailoverPlan, (u8, String)> {
        let c = cluster();
        plan_failover(&views(&c, reports), to).map_err(|e| (code(&e), e.to_string()))
    }

    fn promote(from: RoleState, expect: RoleState, next: RoleState, retry: Option<&str>) -> FailoverPlan {
        FailoverPlan::Promote {
            from,
            expect,
            next,
            retry: retry.map(String::from),
        }
    }

    #[test]
    fn failover_plans() {
        let c = cluster();
        let active = status(&c, "a", role(7, "a"));
        let passive = status(&c, "b", role(7, "a"));
        let behind = status(&c, "b", role(5, "a"));
        let mut fenced_a = active.clone();
        fenced_a.held = Some("unconfirmed".into());
        let fenced_b = {
            let mut s = status(&c, "b", role(8, "b"));
            s.held = Some("on_promote failed".into());
            s
        };
        let passive_at_8 = status(&c, "a", role(8, "b"));
        type Want = std::result::Result<FailoverPlan, (u8, &'static str)>;
        let cases: Vec<(&str, Vec<NodeStatus>, Want)> = vec![
            (
                "active down",
                vec![passive.clone()],
                Ok(promote(role(7, "a"), role(7, "a"), role(8, "b"), None)),
            ),
            // The target swaps the state it reports, even behind the cluster's.
            (
                "active down, target behind",
                vec![behind.clone()],
                Ok(promote(role(5, "a"), role(5, "a"), role(6, "b"), None)),
            ),
            (
                "active fenced",
                vec![fenced_a.clone(), passive.clone()],
                Ok(promote(role(7, "a"), role(7, "a"), role(8, "b"), None)),
            ),
            (
                "fenced target, peer down",
                vec![fenced_b.clone()],
                Ok(promote(
                    role(8, "b"),
                    role(8, "b"),
                    role(8 + HELD_EPOCH_STEP, "b"),
                    Some("on_promote failed"),
                )),
            ),
            (
                "fenced target, peer up",
                vec![fenced_b.clone(), passive_at_8.clone()],
                Ok(promote(
                    role(8, "b"),
                    role(8, "b"),
                    role(9, "b"),
                    Some("on_promote failed"),
                )),
            ),
            (
                "target acts already",
                vec![passive_at_8.clone(), status(&c, "b", role(8, "b"))],
                Ok(FailoverPlan::Already { epoch: 8 }),
            ),
            ("nobody answers", vec![], Err((REFUSED, "no node could be reached"))),
            (
                "active up and acting",
                vec![active.clone(), passive.clone()],
                Err((REFUSED, "the active node a is reachable and active: use switchover")),
            ),
            (
                "target down",
                vec![fenced_a.clone()],
                Err((REFUSED, "b is not reachable")),
            ),
        ];
        for (what, reports, want) in cases {
            let got = plan(reports, "b");
            let want = want.map_err(|(code, m)| (code, m.to_string()));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn failover_refuses_when_the_epochs_are_used_up() {
        use warmspare_shared::state::MAX_EPOCH;
        let c = cluster();
        let last = status(&c, "b", role(MAX_EPOCH, "a"));
        match plan(vec![last], "b") {
            Err((code, m)) => assert!(code == REFUSED && m.starts_with("cannot change the role"), "{code} {m}"),
            Ok(p) => panic!("planned {p:?}"),
        }
        let mut held = status(&c, "b", role(MAX_EPOCH - HELD_EPOCH_STEP + 1, "b"));
        held.held = Some("on_promote failed".into());
        assert!(plan(vec![held], "b").is_err(), "a held step past MAX_EPOCH was planned");
    }

    #[test]
    fn the_current_role_is_the_highest_epoch_reported() {
        let c = cluster();
        let cases: Vec<(Vec<NodeStatus>, Option<RoleState>)> = vec![
            (Vec::new(), None),
            (vec![status(&c, "a", role(3, "a"))], Some(role(3, "a"))),
            (
                vec![status(&c, "a", role(3, "a")), status(&c, "b", role(4, "b"))],
                Some(role(4, "b")),
            ),
            (
                vec![status(&c, "a", role(9, "b")), status(&c, "b", role(4, "b"))],
                Some(role(9, "b")),
            ),
        ];
        for (reports, want) in cases {
            assert_eq!(current_role(&views(&c, reports.clone())), want, "{reports:?}");
        }
    }

    #[test]
    fn epochs_advance_within_the_highest() {
        use warmspare_shared::state::MAX_EPOCH;
        let cases: Vec<(u64, u64, Option<u64>)> = vec![
            (0, 1, Some(1)),
            (41, 1, Some(42)),
            (7, HELD_EPOCH_STEP, Some(7 + HELD_EPOCH_STEP)),
            (MAX_EPOCH - 1, 1, Some(MAX_EPOCH)),
            (MAX_EPOCH, 1, None),
            (MAX_EPOCH - 1, HELD_EPOCH_STEP, None),
            (u64::MAX, 1, None),
        ];
        for (current, by, want) in cases {
            match (advance_epoch(current, by), want) {
                (Ok(e), Some(w)) => assert_eq!(e, w),
                (Err(e), None) => {
                    assert_eq!(code(&e), REFUSED);
                    assert!(format!("{e}").starts_with("cannot change the role: "), "{e}");
                }
                (got, want) => panic!("{current} + {by}: {got:?} where {want:?} was wanted"),
            }
        }
        assert_eq!(next_epoch(5).unwrap(), 6);
    }
}
