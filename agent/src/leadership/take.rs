//! The passive's side: watching etcd's leader key and taking the role when
//! the key is gone and the election rule over the member records picks
//! this node (`decide::eligible`), or adopting a higher epoch etcd shows.
//!
//! The watch only wakes the loop sooner: each round reads the role from
//! etcd, and a round comes at least every `loop_wait` (a watch that breaks
//! or says nothing is no reason to wait longer). While the key is gone
//! every round reads the member records again: a node that is not picked
//! waits a round and looks again, so a picked node that cannot take the
//! role (down, cut off, hung) holds up the others only until its record
//! lapses with its lease. A take is one transaction
//! (`take`: the key absent and etcd's epoch N, then this node leader at
//! N + 1), and only then the local role moves to N + 1 naming this node,
//! which starts the promotion as an operator's would (`on_promote`, then
//! active). With failsafe, a promise this node gave the active's probe
//! (`Role::start_take`) holds the take until it lapses.

use warmspare_shared::etcd::LeaderWatch;
use warmspare_shared::state::RoleState;

use super::decide::{self, Step};
use super::{Ctx, Lease};

/// While this node's role state names another node: follows etcd's role.
/// Returns when the role state names this node: with the lease of the key
/// when this node took it.
pub(super) async fn follow(ctx: &Ctx) -> Option<Lease> {
    let mut watch: Option<LeaderWatch> = None;
    let mut unreachable = false;
    // Why this node last did not take a free key (logged when it changes).
    let mut waiting: Option<String> = None;
    // The role state for which a failsafe promise was last logged.
    let mut promised: Option<RoleState> = None;
    loop {
        ctx.stamp.stamp();
        let local = ctx.role.current();
        if ctx.cancel.is_cancelled() || local.active == ctx.me() {
            return None;
        }
        match ctx.bounded(ctx.client.role()).await {
            Err(e) => {
                if !unreachable {
                    tracing::warn!(error = %e, "cannot read the role from etcd; no automatic failover until it answers");
                    unreachable = true;
                }
                watch = None;
            }
            Ok(etcd) => {
                if unreachable {
                    tracing::info!("etcd answers again");
                    unreachable = false;
                }
                let cluster = ctx.live.cluster();
                let eligible = if etcd.leader.is_none() && etcd.epoch >= local.epoch {
                    match ctx.bounded(ctx.client.members()).await {
                        Ok((records, _)) => decide::eligible(
                            &cluster,
                            ctx.me(),
                            &local.active,
                            &records,
                            ctx.etcd.max_lag_on_failover,
                        ),
                        Err(e) => Err(format!("cannot read the member records: {e}")),
                    }
                } else {
                    Ok(())
                };
                match decide::as_passive(&cluster, &local, &etcd, eligible) {
                    Step::Adopt(next) => ctx.adopt(next).await,
                    Step::Seize {
                        from,
                        to,
                        local: reason,
                    } => match ctx.role.start_take() {
                        // The active still reaches this node (failsafe).
                        Err(why) => {
                            if promised.as_ref() != Some(&local) {
                                tracing::warn!(epoch = local.epoch, "the leader key is gone, not taking it: {why}");
                                promised = Some(local.clone());
                            }
                        }
                        Ok(_taking) => {
                            let reason = reason.unwrap_or_else(|| "automatic failover".into());
                            if let Some(lease) = take_over(ctx, &local, from, to, reason).await {
                                return Some(lease);
                            }
                        }
                    },
                    Step::Wait(why) if etcd.leader.is_none() => {
                        if waiting.as_deref() != Some(why.as_str()) {
                            tracing::info!(epoch = etcd.epoch, "no leader key; not taking the role: {why}");
                            waiting = Some(why);
                        }
                    }
                    Step::Claim { .. } | Step::Wait(_) => {}
                }
                if watch.is_none() {
                    match ctx.bounded(ctx.client.watch_leader(etcd.revision + 1)).await {
                        Ok(w) => watch = Some(w),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot watch the leader key; reading it every loop_wait")
                        }
                    }
                }
            }
        }
        wait(ctx, &mut watch).await;
    }
}

/// Takes the key (etcd's epoch `from` to `to`), then moves this node's role
/// from `local` to `to` naming itself; the lease of the key on success.
async fn take_over(ctx: &Ctx, local: &RoleState, from: u64, to: u64, reason: String) -> Option<Lease> {
    match ctx.put_key(local, false, from, to, Some(reason.clone())).await {
        Ok((lease, epoch)) => {
            tracing::warn!(epoch, old = local.active, "took etcd's leader key: {reason}");
            Some(lease)
        }
        Err(why) => {
            tracing::info!("did not take the leader key: {why}");
            None
        }
    }
}

/// Waits for a change of the leader key (at most `loop_wait`), a change of
/// this node's role state, or the agent's stop.
async fn wait(ctx: &Ctx, watch: &mut Option<LeaderWatch>) {
    let mut roles = ctx.role.subscribe();
    roles.borrow_and_update();
    let limit = ctx.etcd.loop_wait;
    match watch {
        Some(w) => {
            let start = tokio::time::Instant::now();
            let broke = tokio::select! {
                _ = ctx.cancel.cancelled() => false,
                _ = roles.changed() => false,
                next = w.next_within(limit) => match next {
                    Err(e) => {
                        tracing::debug!(error = %e, "the watch of the leader key broke");
                        true
                    }
                    Ok(_) => false,
                },
            };
            if broke {
                // A watch that breaks as soon as it is made would spin this
                // loop: the rest of the wait goes by as without a watch.
                *watch = None;
                ctx.pause(limit.saturating_sub(start.elapsed())).await;
            }
        }
        None => ctx.pause(limit).await,
    }
    ctx.stamp.stamp();
}
