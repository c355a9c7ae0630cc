//! Who may open which session: the receiver's admission rule, a pure
//! function of the peer's authenticated identity, its hello and this node's
//! role state (table-tested in `admission/tests.rs`).

use warmspare_shared::proto::{self, Hello, Purpose};
use warmspare_shared::ssh::Identity;
use warmspare_shared::state::RoleState;

/// What to do with a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    /// The session proceeds.
    Accept,
    /// Accept once this higher epoch is adopted (persisted).
    Adopt(RoleState),
    /// A push from an older epoch: tell the sender who is active now.
    Stale(RoleState),
    /// The session is refused, for this reason.
    Refuse(String),
}

/// Decides whether a session from `who`, saying `hello`, may proceed on a
/// node whose role state is `mine`.
pub(super) fn decide(who: &Identity, hello: &Hello, mine: &RoleState) -> Admission {
    if hello.protocol != proto::PROTOCOL_VERSION {
        return Admission::Refuse(format!(
            "protocol {} is not supported (this agent speaks {})",
            hello.protocol,
            proto::PROTOCOL_VERSION
        ));
    }
    match (hello.purpose, who) {
        (Purpose::Probe, _) => return Admission::Accept,
        (Purpose::Control, Identity::Operator(_)) => return Admission::Accept,
        (Purpose::Control, _) => return Admission::Refuse(format!("{who} is not an operator")),
        (Purpose::Replicate, Identity::Node(n)) if *n == hello.node => {}
        (Purpose::Replicate, _) => return Admission::Refuse(format!("{who} may not push as node {:?}", hello.node)),
    }
    if hello.epoch < mine.epoch {
        return Admission::Stale(mine.clone());
    }
    if hello.active != hello.node {
        return Admission::Refuse(format!(
            "{} is not the active node of epoch {}",
            hello.node, hello.epoch
        ));
    }
    if hello.epoch == mine.epoch && mine.active != hello.node {
        return Admission::Refuse(format!(
            "{} is the active node of epoch {}, not {}",
            mine.active, mine.epoch, hello.node
        ));
    }
    if hello.epoch > mine.epoch {
        return Admission::Adopt(RoleState {
            epoch: hello.epoch,
            active: hello.active.clone(),
        });
    }
    Admission::Accept
}

/// Whether `who` is a node pushing replication under its own name (the
/// only session whose configuration hash is compared with this node's).
pub(super) fn pushes_as_itself(who: &Identity, hello: &Hello) -> bool {
    hello.purpose == Purpose::Replicate && matches!(who, Identity::Node(n) if *n == hello.node)
}

#[cfg(test)]
mod tests;
