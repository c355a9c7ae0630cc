//! This node's member record, `<prefix>/members/<name>` (see
//! `warmspare_shared::etcd::elect`): its `failover` from the cluster file
//! and its lag (see `lag`; none while it is named active), on a lease of
//! its own, written and the lease renewed every `loop_wait` and at once
//! when the role state changes. The passives' take decision reads these
//! records (`take`), and `warmsparectl status` shows them.
//!
//! It runs beside the leadership loop, with calls bounded the same way but
//! without stamping that loop's progress. A failure is logged once (and
//! once more when publishing works again) and retried the next round;
//! the record then lapses with its lease after `ttl`, and the node is not
//! eligible meanwhile. A leadership loop that has not stamped within its
//! watchdog limit (hung) stops the renewals too: the record lapses, and
//! the others stop waiting for a node that could not take the role.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use warmspare_shared::etcd::elect::MemberRecord;
use warmspare_shared::etcd::EtcdError;

use super::{watchdog_limit, Ctx};

/// Publishes this node's record until the agent stops.
pub(super) async fn run(ctx: &Ctx) {
    let mut lease: Option<i64> = None;
    let mut failing: Option<String> = None;
    let mut roles = ctx.role.subscribe();
    loop {
        roles.borrow_and_update();
        if ctx.cancel.is_cancelled() {
            return;
        }
        let outcome = if ctx.stamp.since() > watchdog_limit(&ctx.etcd) {
            Err(format!(
                "the leadership loop made no progress for {} s: the member record is left to lapse",
                ctx.stamp.since().as_secs()
            ))
        } else {
            publish(ctx, &mut lease).await.map_err(|e| e.to_string())
        };
        match (outcome, &failing) {
            (Ok(()), Some(_)) => {
                tracing::info!("the member record is published again");
                failing = None;
            }
            (Ok(()), None) => {}
            (Err(why), None) => {
                tracing::warn!(
                    error = why,
                    "cannot publish this node's member record in etcd; retrying every loop_wait"
                );
                failing = Some(why);
            }
            (Err(_), Some(_)) => {}
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            changed = roles.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(ctx.etcd.loop_wait).await;
                }
            }
            _ = tokio::time::sleep(ctx.etcd.loop_wait) => {}
        }
    }
}

/// One round: renews `lease` (a new one when it is gone or there is none)
/// and writes the record on it.
async fn publish(ctx: &Ctx, lease: &mut Option<i64>) -> Result<(), EtcdError> {
    if let Some(id) = *lease {
        if ctx.within(ctx.client.keepalive(id)).await?.is_none() {
            *lease = None;
        }
    }
    let id = match *lease {
        Some(id) => id,
        None => {
            let id = ctx.within(ctx.client.grant(ctx.etcd.ttl)).await?;
            *lease = Some(id);
            id
        }
    };
    let record = record(ctx);
    ctx.within(ctx.client.publish_member(ctx.me(), &record, id)).await
}

/// This node's record now. While it is named active it has no lag, and
/// what it measured as a passive is forgotten: after a later demotion it
/// counts from the new active's first caught-up marker.
fn record(ctx: &Ctx) -> MemberRecord {
    let me = ctx.me();
    let failover = ctx.live.cluster().node(me).is_some_and(|n| n.failover);
    let lag = if ctx.role.current().active == me {
        ctx.telemetry.runtime().freshness = Default::default();
        None
    } else {
        ctx.telemetry.runtime().freshness.lag()
    };
    MemberRecord {
        failover,
        lag_ms: lag.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
        at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64,
    }
}
