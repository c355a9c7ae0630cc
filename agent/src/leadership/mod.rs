//! Automatic failover through etcd (`[etcd]` in the cluster file): the
//! leadership task, which the supervisor spawns only when `[etcd]` is set.
//!
//! etcd is the authority on who is active. A node whose role state names it
//! active acts as active only while it holds etcd's leader key for its
//! epoch (`role::LeaderKey`, the fence behind `Role::is_active`): `keep`
//! acquires the key (at start, after a restart, after an operator's role
//! change), renews it every `loop_wait` and demotes this node when it cannot
//! confirm it within the window of `confirm::Leadership`. A passive
//! (`take`) watches the key; when it is gone and the election rule over the
//! member records picks this node, it takes the key and then the role.
//! Either side adopts a higher epoch etcd shows. `decide` holds the
//! decisions, pure and table-tested. Beside that loop, `publish` keeps this
//! node's member record (its `failover` and its lag, see `lag`) in etcd.
//! With `failsafe`, the active probes every passive while it holds the key
//! (`failsafe`), and answered probes keep it confirmed while etcd fails; a
//! passive's promise to such a probe holds back its take.
//!
//! Every etcd call is bounded; the loop stamps its progress for the
//! watchdog (see `progress`). On shutdown the key is left on its lease: an
//! agent restarted within `ttl` claims it again at the same epoch; one that
//! stays down loses it when the lease lapses, and a passive takes over.
//!
//! Imports `live`, `role`, `progress`, `telemetry`; nothing imports back
//! but `daemon`.

mod decide;
mod failsafe;
mod keep;
mod publish;
mod take;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warmspare_shared::config::Etcd;
use warmspare_shared::etcd::{Client, EtcdError, TxnOutcome};
use warmspare_shared::state::RoleState;

use crate::live::Live;
use crate::progress::Stamp;
use crate::role::{LeaderKey, Role};
use crate::telemetry::Telemetry;

/// The progress limit of the leadership loop for the watchdog: between its
/// confirmation window and `ttl`, so that a hung agent is killed before
/// its lease can lapse (its confirmation would have run out first).
pub fn watchdog_limit(etcd: &Etcd) -> Duration {
    (etcd.confirm_window() + etcd.ttl) / 2
}

/// Fences this node until the leadership task confirms it holds the
/// leader key (called at start-up, before any task runs, with `[etcd]`).
pub fn fence_at_start(role: &Role) {
    role.set_leader_key(LeaderKey::Missing(
        "without etcd's leader key: not confirmed since this agent started".into(),
    ));
}

/// A lease this node was granted, and when the grant was sent (the lease
/// lives at least `ttl` from then).
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    granted: Instant,
}

/// What the leadership task works with.
struct Ctx {
    live: Arc<Live>,
    role: Arc<Role>,
    /// Where this node's lag is measured (see `lag`).
    telemetry: Arc<Telemetry>,
    client: Client,
    etcd: Etcd,
    stamp: Arc<Stamp>,
    cancel: CancellationToken,
}

/// Runs the leadership task until `cancel` fires; `[etcd]` must be set
/// (without it the task returns at once).
pub async fn run(
    live: Arc<Live>,
    role: Arc<Role>,
    telemetry: Arc<Telemetry>,
    stamp: Arc<Stamp>,
    cancel: CancellationToken,
) {
    let Some(etcd) = live.cluster().etcd.clone() else {
        return;
    };
    // TLS files that cannot be used hold this node fenced (and a passive
    // never takes over) until they can: each try is logged.
    let client = loop {
        match Client::new(&etcd, etcd.retry_timeout) {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "cannot make the etcd client; trying again");
                role.set_leader_key(LeaderKey::Missing(format!("without etcd's leader key: {e}")));
                stamp.stamp();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(etcd.loop_wait) => {}
                }
            }
        }
    };
    let ctx = Ctx {
        live,
        role,
        telemetry,
        client,
        etcd,
        stamp,
        cancel,
    };
    tracing::info!(
        prefix = ctx.client.leader_key(),
        ttl_s = ctx.etcd.ttl.as_secs(),
        loop_wait_ms = ctx.etcd.loop_wait.as_millis() as u64,
        retry_timeout_ms = ctx.etcd.retry_timeout.as_millis() as u64,
        "automatic failover through etcd"
    );
    let lead = async {
        let mut lease = None;
        while !ctx.cancel.is_cancelled() {
            ctx.stamp.stamp();
            lease = if ctx.role.current().active == ctx.me() {
                keep::lead(&ctx, lease).await
            } else {
                take::follow(&ctx).await
            };
        }
    };
    tokio::join!(lead, publish::run(&ctx));
}

impl Ctx {
    fn me(&self) -> &str {
        &self.live.me.name
    }

    /// `call` within the client's deadline (and a little more: the client
    /// bounds each call itself; this bounds what it does not), then a stamp
    /// of the leadership loop's progress.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, EtcdError>>) -> Result<T, EtcdError> {
        let out = self.within(call).await;
        self.stamp.stamp();
        out
    }

    /// `call` within the deadline of [`Ctx::bounded`], stamping nothing
    /// (for `publish`, which must not keep a stuck leadership loop's stamp
    /// fresh).
    async fn within<T>(&self, call: impl Future<Output = Result<T, EtcdError>>) -> Result<T, EtcdError> {
        let limit = self.etcd.retry_timeout + Duration::from_millis(500);
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(EtcdError::Timeout {
                endpoint: "etcd".into(),
                after: limit,
            })
        })
    }

    /// A new lease of `ttl`.
    async fn grant(&self) -> Result<Lease, EtcdError> {
        let granted = Instant::now();
        let id = self.bounded(self.client.grant(self.etcd.ttl)).await?;
        Ok(Lease { id, granted })
    }

    /// Revokes `lease` (its key goes at once); a failure is logged: the
    /// lease then lapses after `ttl`.
    async fn revoke(&self, lease: Lease) {
        if let Err(e) = self.bounded(self.client.revoke(lease.id)).await {
            tracing::warn!(lease = lease.id, error = %e, "cannot revoke the lease; it lapses after its ttl");
        }
    }

    /// Records that this node does not hold the leader key, for `why`.
    fn fence(&self, why: String) {
        self.role
            .set_leader_key(LeaderKey::Missing(format!("without etcd's leader key: {why}")));
    }

    /// Waits `limit`, less when the role state changes or the agent stops.
    async fn pause(&self, limit: Duration) {
        let mut roles = self.role.subscribe();
        roles.borrow_and_update();
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = roles.changed() => {}
            _ = tokio::time::sleep(limit) => {}
        }
        self.stamp.stamp();
    }

    /// Moves this node's role state from `expect` to `next`, which names
    /// this node (see `Role::compare_and_swap`: `Ok` also when it is at
    /// `next` already).
    async fn move_role(&self, expect: RoleState, next: RoleState, reason: String) -> Result<(), String> {
        let role = self.role.clone();
        tokio::task::spawn_blocking(move || {
            role.compare_and_swap(&expect, next, &reason, "etcd")
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the role change failed: {e}")))
    }

    /// Puts etcd's leader key on a new lease of this node: a claim (the key
    /// names this node at etcd's epoch `from`, which becomes `to`) or a
    /// seize (the key absent, etcd's epoch `from` moved to `to`). Holding
    /// the key lifts the fence for its epoch and, with `moved` (a reason),
    /// moves this node's role from `local` to that epoch naming itself.
    /// The lease and the epoch; `Err` says why not, the lease revoked again.
    async fn put_key(
        &self,
        local: &RoleState,
        claim: bool,
        from: u64,
        to: u64,
        moved: Option<String>,
    ) -> Result<(Lease, u64), String> {
        let lease = self.grant().await.map_err(|e| format!("cannot get a lease: {e}"))?;
        let me = self.me().to_string();
        let outcome = if claim {
            self.bounded(self.client.claim(&me, lease.id, from, to)).await
        } else if local.active == me {
            self.bounded(self.client.seize(&me, lease.id, from, to)).await
        } else {
            // A passive's take is an automatic failover: etcd refuses it
            // while `warmsparectl pause` holds automatic failover.
            self.bounded(self.client.take_unless_paused(&me, lease.id, from, to))
                .await
        };
        let why = match outcome {
            Ok(TxnOutcome::Done(epoch)) => {
                self.role.set_leader_key(LeaderKey::Held(epoch));
                let Some(reason) = moved else {
                    return Ok((lease, epoch));
                };
                let next = RoleState { epoch, active: me };
                match self.move_role(local.clone(), next, reason).await {
                    Ok(()) => return Ok((lease, epoch)),
                    Err(why) => {
                        tracing::error!(epoch, "took the leader key but cannot move the role: {why}");
                        let why = format!("cannot record epoch {epoch}: {why}");
                        self.fence(why.clone());
                        why
                    }
                }
            }
            Ok(TxnOutcome::Refused(now)) => format!(
                "the transaction was refused: etcd is at epoch {} with {} holding the key",
                now.epoch,
                now.leader.map_or_else(|| "no node".to_string(), |l| l.name)
            ),
            Err(e) => format!("the transaction failed: {e}"),
        };
        self.revoke(lease).await;
        Err(why)
    }

    /// Adopts `next`, the role etcd holds (a higher epoch).
    async fn adopt(&self, next: RoleState) {
        let role = self.role.clone();
        let reason = format!(
            "{}{} active at epoch {}",
            warmspare_shared::state::ETCD_ADOPTION,
            next.active,
            next.epoch
        );
        let adopted = tokio::task::spawn_blocking(move || role.adopt(next, &reason, "etcd")).await;
        match adopted {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "cannot adopt etcd's role"),
            Err(e) => tracing::error!(error = %e, "cannot adopt etcd's role"),
        }
    }
}
