//! The active's side: acquiring etcd's leader key for this node's epoch,
//! renewing it every `loop_wait`, and the self-demotion when a renewal
//! cannot be confirmed within the window of `confirm::Leadership`.
//!
//! The fence (`role::LeaderKey`) is lifted only once a transaction put the
//! key naming this node on a lease of its own at its epoch; it goes up
//! again, at once, when the verdict is `Demote`: the supervisor then stops
//! the active side and runs `on_demote`, health answers 503 and jobs stop.
//! A demoted node revokes its lease (best effort) and tries to acquire the
//! key again: it gets it back only if no other node took it.

use std::time::{Duration, Instant};

use warmspare_shared::etcd::confirm::{Leadership, Renewal, Verdict};
use warmspare_shared::state::RoleState;

use super::decide::{self, Step};
use super::failsafe::Prober;
use super::{Ctx, Lease};

/// While this node's role state names it active: acquires the key, holds
/// it, and returns when the role state names another node (the lease
/// revoked: a switchover is quick) or the agent stops (the lease kept: a
/// restart within `ttl` claims the key again). Returns the lease it still
/// holds, if any.
pub(super) async fn lead(ctx: &Ctx, mut lease: Option<Lease>) -> Option<Lease> {
    loop {
        if ctx.cancel.is_cancelled() {
            return lease;
        }
        let local = ctx.role.current();
        if local.active != ctx.me() {
            if let Some(l) = lease.take() {
                ctx.revoke(l).await;
            }
            ctx.fence(format!("{} is named active at epoch {}", local.active, local.epoch));
            return None;
        }
        if let (Some(l), None) = (lease, ctx.role.leader_key_fence()) {
            lease = hold(ctx, local.epoch, l).await;
            continue;
        }
        match acquire(ctx, &local).await {
            Ok(l) => {
                // The key moved to the new lease: the old one may go.
                if let Some(old) = lease.replace(l) {
                    ctx.revoke(old).await;
                }
            }
            Err(again) => ctx.pause(again).await,
        }
    }
}

/// One attempt to acquire the leader key for `local` (which names this
/// node); the lease the key is now on, or how long to wait before the next
/// attempt (a switchover's target waiting for the old active to let go
/// tries again soon).
async fn acquire(ctx: &Ctx, local: &RoleState) -> Result<Lease, Duration> {
    let etcd = match ctx.bounded(ctx.client.role()).await {
        Ok(r) => r,
        Err(e) => {
            ctx.fence(format!("cannot read the role from etcd: {e}"));
            return Err(ctx.etcd.loop_wait);
        }
    };
    let again = if etcd.handover.is_some() {
        (ctx.etcd.loop_wait / 10).max(Duration::from_millis(50))
    } else {
        ctx.etcd.loop_wait
    };
    let step = decide::as_active(ctx.me(), &ctx.live.cluster(), local, &etcd);
    // Held until the transaction is done: no failsafe promise meanwhile.
    let mut taking = None;
    let (claim, from, to, moved) = match step {
        Step::Adopt(next) => {
            tracing::warn!(
                epoch = next.epoch,
                active = next.active,
                "etcd names another node active"
            );
            ctx.adopt(next).await;
            return Err(again);
        }
        Step::Wait(why) => {
            if ctx.role.leader_key_fence().as_deref() != Some(&format!("without etcd's leader key: {why}")) {
                tracing::warn!(epoch = local.epoch, "named active, not acting as active: {why}");
            }
            ctx.fence(why);
            return Err(again);
        }
        Step::Claim { from, to } => (true, from, to, None),
        Step::Seize { from, to, local } => {
            // A promise given to another active's failsafe probe binds an
            // operator's promotion too (`failover --force` while that node
            // may still act as active).
            match ctx.role.start_take() {
                Ok(guard) => taking = Some(guard),
                Err(why) => {
                    ctx.fence(why);
                    return Err(again);
                }
            }
            (false, from, to, local)
        }
    };
    let put = ctx.put_key(local, claim, from, to, moved).await;
    drop(taking);
    match put {
        Ok((lease, epoch)) => {
            // etcd confirmed this node: no peer's confirmation is needed.
            ctx.role.confirm("etcd");
            tracing::warn!(epoch, lease = lease.id, claimed = claim, "holding etcd's leader key");
            Ok(lease)
        }
        Err(why) => {
            ctx.fence(why);
            Err(again)
        }
    }
}

/// Holds the key for `epoch` on `lease`: renews it every `loop_wait`
/// (sooner after a failure) and records each outcome. Returns the lease
/// when the role state moved on or the agent stops, `None` once this node
/// demoted itself (the lease then revoked, best effort).
async fn hold(ctx: &Ctx, epoch: u64, lease: Lease) -> Option<Lease> {
    let me = ctx.me().to_string();
    let window = ctx.etcd.confirm_window();
    let mut leadership = Leadership::new(lease.granted, window);
    // With failsafe, every other node is probed while the key is held.
    let mut prober = ctx.etcd.failsafe.then(|| {
        let passives = ctx
            .live
            .cluster()
            .node
            .iter()
            .filter(|n| n.name != me)
            .map(|n| n.name.clone())
            .collect::<Vec<_>>();
        leadership = Leadership::new(lease.granted, window).with_failsafe(passives);
        let every = (ctx.etcd.loop_wait / 2).max(Duration::from_millis(100));
        Prober::start(&ctx.live, &ctx.role, epoch, window, every)
    });
    let mut by_failsafe = false;
    let mut due = lease.granted + ctx.etcd.loop_wait;
    let retry = (ctx.etcd.retry_timeout / 4).min(ctx.etcd.loop_wait);
    let mut roles = ctx.role.subscribe();
    loop {
        ctx.stamp.stamp();
        for (passive, sent) in prober.as_mut().map(Prober::answered).unwrap_or_default() {
            leadership.record_probe(&passive, sent);
        }
        let now = Instant::now();
        let until = match leadership.verdict(now) {
            Verdict::Confirmed { until } => until,
            Verdict::Demote => return demote(ctx, &leadership, lease).await,
        };
        let failsafe_only = now > leadership.last_success_send() + window;
        if failsafe_only != by_failsafe {
            by_failsafe = failsafe_only;
            if failsafe_only {
                tracing::warn!(
                    epoch,
                    "etcd does not confirm the leadership; kept by failsafe: every passive answered its probe"
                );
            } else {
                tracing::warn!(epoch, "etcd confirms the leadership again");
            }
        }
        // Just past the window, so that the verdict is `Demote` then.
        let expiry = tokio::time::Instant::from_std(until + Duration::from_millis(1));
        roles.borrow_and_update();
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Some(lease),
            _ = roles.changed() => {
                let now = ctx.role.current();
                if now.active != me || now.epoch != epoch {
                    return Some(lease);
                }
                continue;
            }
            _ = tokio::time::sleep_until(expiry) => continue,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
        }
        let sent = Instant::now();
        let outcome = tokio::select! {
            _ = ctx.cancel.cancelled() => return Some(lease),
            r = ctx.bounded(ctx.client.renew(&me, lease.id)) => match r {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leader key");
                    Renewal::Failed(e.kind())
                }
            },
            // The window ends while the renewal is out: the verdict decides.
            _ = tokio::time::sleep_until(expiry) => continue,
        };
        leadership.record(sent, outcome);
        due = match outcome {
            Renewal::Confirmed => sent + ctx.etcd.loop_wait,
            _ => Instant::now() + retry,
        };
    }
}

/// The verdict is `Demote`: the fence goes up at once, then the lease is
/// revoked (best effort: etcd may be what is unreachable).
async fn demote(ctx: &Ctx, leadership: &Leadership, lease: Lease) -> Option<Lease> {
    let since = leadership.last_success_send().elapsed();
    ctx.fence(format!(
        "leadership not confirmed for {} ms (the window is {} ms); demoted",
        since.as_millis(),
        ctx.etcd.confirm_window().as_millis()
    ));
    tracing::error!(
        since_ms = since.as_millis() as u64,
        window_ms = ctx.etcd.confirm_window().as_millis() as u64,
        "cannot confirm etcd's leader key: this node demotes itself"
    );
    ctx.revoke(lease).await;
    None
}
