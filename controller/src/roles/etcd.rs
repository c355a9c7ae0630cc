//! Role changes through etcd, with `[etcd]` in the cluster file: each
//! switchover, failback and failover is one transaction on etcd's role
//! keys, made before the agents are told (they also follow etcd by
//! themselves). `pause` and `resume` set and clear the pause key.
//!
//! The key a transaction writes names the new active on a lease the
//! controller grants (`ttl` of `[etcd]`) and never renews: the new active's
//! agent claims the key onto a lease of its own at once, and if it never
//! does (it died), the key lapses with the controller's lease and an
//! automatic failover follows, as after any dead active. A refused
//! transaction revokes that lease again: nothing is left behind.
//!
//! The decisions are pure functions of the role etcd holds, table-tested
//! in `etcd/tests.rs`; the flows in `roles` and `admin` act on them.

use std::time::Duration;

use anyhow::Result;
use warmspare_shared::etcd::{Client, EtcdError, Leader, Role as EtcdRole, TxnOutcome};
use warmspare_shared::state::RoleState;

use crate::client::Operator;
use crate::exit::{fail, FAILED, REFUSED, UNKNOWN};

/// The cluster's etcd, for role changes.
pub struct Etcd {
    client: Client,
    ttl: Duration,
}

/// What a forced failover writes to etcd, decided from the role it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// The leader key is absent: take it for the target, moving the epoch
    /// from `from` to `to`.
    Seize {
        /// etcd's epoch now.
        from: u64,
        /// The epoch to record.
        to: u64,
    },
    /// The key names the target (held by a failed `on_promote`): put it on
    /// a new lease at the next epoch.
    Claim {
        /// etcd's epoch now.
        from: u64,
        /// The epoch to record.
        to: u64,
    },
    /// Another node holds the key: refused, after asking how long its
    /// lease has left.
    Held(Leader),
}

impl Etcd {
    /// The cluster's etcd, or `None` without `[etcd]`.
    pub fn of(op: &Operator) -> Result<Option<Etcd>> {
        let Some(etcd) = op.cluster.etcd.as_ref() else {
            return Ok(None);
        };
        let client = Client::new(etcd, etcd.retry_timeout).map_err(|e| fail(FAILED, format!("etcd: {e}")))?;
        Ok(Some(Etcd { client, ttl: etcd.ttl }))
    }

    /// The role etcd holds; an error when it cannot be read (exit 1,
    /// nothing changed).
    pub async fn role(&self) -> Result<EtcdRole> {
        self.client.role().await.map_err(|e| {
            fail(
                FAILED,
                format!("cannot read the role from etcd, nothing was changed: {e}"),
            )
        })
    }

    /// The switchover transaction: the leader key moves from `old` to `to`
    /// and the epoch from `epoch` to `epoch + 1` (see `Client::switch`).
    /// Refused (exit 3) when etcd no longer shows `old` at `epoch`.
    pub async fn switch(&self, old: &Leader, to: &str, epoch: u64) -> Result<u64> {
        let lease = self.grant().await?;
        let outcome = self.client.switch(old, to, lease, epoch).await;
        self.settle(outcome, lease, to).await
    }

    /// The failover transaction for `to` (see [`Take`]): the epoch it
    /// recorded.
    pub async fn take(&self, take: &Take, to: &str) -> Result<u64> {
        let (claim, from, next) = match take {
            Take::Seize { from, to: next } => (false, *from, *next),
            Take::Claim { from, to: next } => (true, *from, *next),
            Take::Held(l) => return Err(self.still_held(l).await),
        };
        let lease = self.grant().await?;
        let outcome = if claim {
            self.client.claim(to, lease, from, next).await
        } else {
            self.client.seize(to, lease, from, next).await
        };
        self.settle(outcome, lease, to).await
    }

    /// The refusal of a failover while `leader` still holds the key: how
    /// long its lease has left.
    pub async fn still_held(&self, leader: &Leader) -> anyhow::Error {
        let left = self.client.time_to_live(leader.lease).await.ok().flatten();
        held_refusal(leader, left)
    }

    /// Sets (`Some`) or clears the pause of automatic failover.
    pub async fn set_paused(&self, note: Option<&str>) -> Result<()> {
        let what = if note.is_some() { "pause" } else { "resume" };
        self.client
            .set_paused(note)
            .await
            .map_err(|e| fail(FAILED, format!("cannot {what} automatic failover in etcd: {e}")))
    }

    async fn grant(&self) -> Result<i64> {
        self.client.grant(self.ttl).await.map_err(|e| {
            fail(
                FAILED,
                format!("cannot get a lease from etcd, nothing was changed: {e}"),
            )
        })
    }

    async fn revoke(&self, lease: i64) {
        if let Err(e) = self.client.revoke(lease).await {
            eprintln!("warning: cannot revoke lease {lease} (it lapses after its ttl): {e}");
        }
    }

    /// The outcome of a role transaction made on `lease` for `to`: the new
    /// epoch, or the error to exit with (the lease revoked when the change
    /// was surely not made).
    async fn settle(&self, outcome: Result<TxnOutcome, EtcdError>, lease: i64, to: &str) -> Result<u64> {
        let now = match outcome {
            Ok(TxnOutcome::Done(epoch)) => return Ok(epoch),
            Ok(TxnOutcome::Refused(now)) => {
                self.revoke(lease).await;
                return Err(refused(&now));
            }
            Err(e) => e,
        };
        // No answer: the change may have been made. etcd says which.
        match self.client.role().await {
            Ok(role) => match after_error(&role, to, lease) {
                Ok(epoch) => Ok(epoch),
                Err(e) => {
                    self.revoke(lease).await;
                    Err(e)
                }
            },
            Err(again) => Err(fail(
                UNKNOWN,
                format!(
                    "the etcd transaction got no answer ({now}) and etcd cannot be read ({again}): the role may \
                     have changed; run `warmsparectl status`"
                ),
            )),
        }
    }
}

/// Whether etcd's `role` agrees with the agents' `role` for a switchover:
/// the leader key names the active at its epoch and no handover is under
/// way. `Ok` holds the leader (the transaction compares its lease too);
/// `Err` why not.
pub(super) fn agrees(role: &RoleState, etcd: &EtcdRole) -> std::result::Result<Leader, String> {
    if let Some(old) = &etcd.handover {
        return Err(format!(
            "etcd shows a switchover from {old} under way (epoch {}): try again in a moment",
            etcd.epoch
        ));
    }
    match &etcd.leader {
        Some(l) if l.name == role.active && etcd.epoch == role.epoch => Ok(l.clone()),
        Some(l) => Err(format!(
            "etcd names {} active at epoch {}, the nodes {} at epoch {}",
            l.name, etcd.epoch, role.active, role.epoch
        )),
        None => Err(format!(
            "etcd has no leader key at epoch {} (the active's lease lapsed or it never took it): wait, or use failover",
            etcd.epoch
        )),
    }
}

/// What a forced failover to `to` writes, given etcd's `role` and the epoch
/// the agents' plan asks for (`planned`): never below etcd's next epoch.
pub(super) fn plan_take(etcd: &EtcdRole, to: &str, planned: u64) -> std::result::Result<Take, String> {
    let next = etcd.epoch.checked_add(1).map_or(planned, |n| planned.max(n));
    if next > warmspare_shared::state::MAX_EPOCH {
        return Err(format!("etcd's epoch {} cannot be moved past the highest", etcd.epoch));
    }
    if let Some(old) = &etcd.handover {
        return Err(format!(
            "etcd shows a switchover from {old} under way (epoch {}): the old active may still act until its \
             lease is gone; try again in a moment",
            etcd.epoch
        ));
    }
    Ok(match &etcd.leader {
        None => Take::Seize {
            from: etcd.epoch,
            to: next,
        },
        Some(l) if l.name == to => Take::Claim {
            from: etcd.epoch,
            to: next,
        },
        Some(l) => Take::Held(l.clone()),
    })
}

/// The refusal of a failover while `leader` holds the key, its lease
/// having `left` seconds (when known).
pub(super) fn held_refusal(leader: &Leader, left: Option<i64>) -> anyhow::Error {
    let left = match left {
        Some(s) => format!("its lease has {s}s left"),
        None => "its lease is lapsing".to_string(),
    };
    fail(
        REFUSED,
        format!(
            "{} still holds etcd's leader key ({left}): its agent may still be acting, nothing was changed. Once \
             the lease has lapsed, an eligible passive takes over by itself, or run this failover again",
            leader.name
        ),
    )
}

/// A refused transaction: etcd's role changed since it was read.
pub(super) fn refused(now: &EtcdRole) -> anyhow::Error {
    let holder = match (&now.leader, &now.handover) {
        (_, Some(old)) => format!("a switchover from {old} under way"),
        (Some(l), None) => format!("{} holding the leader key", l.name),
        (None, None) => "no node holding the leader key".to_string(),
    };
    fail(
        REFUSED,
        format!(
            "etcd refused the role change: the role changed meanwhile (etcd is at epoch {} with {holder}); \
             another change may have won; nothing was changed",
            now.epoch
        ),
    )
}

/// After a transaction that got no answer: done when etcd shows the key
/// naming `to` on `lease` (the epoch it is at); unknown when it names `to`
/// on another lease (the target may have claimed it already, or another
/// change won); otherwise not made (exit 1).
pub(super) fn after_error(now: &EtcdRole, to: &str, lease: i64) -> Result<u64> {
    match &now.leader {
        Some(l) if l.name == to && l.lease == lease => Ok(now.epoch),
        Some(l) if l.name == to => Err(fail(
            UNKNOWN,
            format!(
                "the etcd transaction got no answer; etcd now names {to} active at epoch {}: run `warmsparectl \
                 status`",
                now.epoch
            ),
        )),
        _ => Err(fail(
            FAILED,
            format!(
                "the etcd transaction got no answer and etcd does not show it made (epoch {}): nothing was changed",
                now.epoch
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
