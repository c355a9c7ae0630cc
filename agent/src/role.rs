//! The node's role handle: which node is active at which epoch, as this
//! node knows it, and whether this node acts on it.
//!
//! - [`Role::current`] and [`Role::subscribe`] read the role state and
//!   follow its changes (a `watch` channel: the supervisor starts and stops
//!   the active side on them).
//! - [`Role::compare_and_swap`] moves the role from an expected state to a
//!   higher epoch (an operator's switchover or failover);
//!   [`Role::adopt`] takes a higher epoch a peer showed (fencing). Both
//!   persist the state and append to the role history before anything
//!   sees the change, and are serialised with each other.
//! - The hold: a node named active that no peer has confirmed since it
//!   started ([`Role::hold`], [`Role::confirm`]); with `[etcd]`, the leader
//!   key fence: a node named active that does not hold etcd's leader key
//!   for its epoch ([`Role::set_leader_key`], set by `leadership`); and the
//!   promotion gate ([`Role::hooks`]: its `on_promote` hook).
//!   [`Role::is_active`] is true only past all three.
//! - With `[etcd] failsafe`, the promise a passive gave the active's
//!   failsafe probe ([`Role::failsafe_probe`], [`Role::start_take`]): the
//!   leadership task takes no leader key while it binds, and no promise is
//!   given while it takes one.
//!
//! Imports `live` (this node's name, state dir, cluster), `telemetry`
//! (nudges flushes, wakes shippers) and `promotion`; nothing imports back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::sync::watch;
use warmspare_shared::etcd::failsafe;
use warmspare_shared::proto::{Hello, Purpose, PROTOCOL_VERSION};
use warmspare_shared::state::{self, HistoryEntry, RoleState};

use crate::clock::unix;
use crate::live::Live;
use crate::promotion::{Hooks, Promotion};
use crate::telemetry::Telemetry;

/// Why [`Role::compare_and_swap`] did not move the role.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The node is not at the state the caller expected.
    #[error(
        "expected epoch {} with {} active, but this node is at epoch {} with {} active",
        expected.epoch,
        expected.active,
        current.epoch,
        current.active
    )]
    Stale {
        /// What the caller expected.
        expected: RoleState,
        /// Where the node is.
        current: RoleState,
    },
    /// The new epoch is not above the current one.
    #[error("the new epoch {next} is not above {current}")]
    NotAbove {
        /// The epoch asked for.
        next: u64,
        /// The node's epoch.
        current: u64,
    },
    /// The new epoch is further above the current one than a controller
    /// could have made it (or past the highest).
    #[error(transparent)]
    TooFar(#[from] state::EpochError),
    /// The node to make active is not in the cluster file.
    #[error("{0:?} is not a node of the cluster")]
    UnknownNode(String),
    /// The new state could not be persisted; nothing changed.
    #[error("cannot record the new role: {0:#}")]
    NotPersisted(#[source] anyhow::Error),
}

/// The node's role handle (one per node).
pub struct Role {
    /// This node's identity, state dir and cluster file.
    live: Arc<Live>,
    /// Told of every change (flushes wait on its progress).
    telemetry: Arc<Telemetry>,
    /// The current role state; persisted before it changes here.
    state: watch::Sender<RoleState>,
    /// Serialises role changes (compare-and-swap, adoption).
    lock: Mutex<()>,
    /// Why this node, though its role state names it active, does not act
    /// as the active one (see [`Role::unconfirmed`]).
    held: Mutex<Option<String>>,
    /// With `[etcd]`: whether this node holds the leader key, and for which
    /// epoch (see [`LeaderKey`]).
    leader_key: watch::Sender<LeaderKey>,
    /// The role hooks' runtime (the promotion gate).
    pub hooks: Hooks,
    /// With `[etcd] failsafe`: the promise this node gave the active's
    /// failsafe probe (see [`Role::failsafe_probe`]), and whether it is
    /// taking the leader key (no promise is given meanwhile).
    promise: Mutex<(Option<failsafe::Promise>, bool)>,
}

/// Where this node stands with etcd's leader key. With `[etcd]` a node
/// named active acts as active only while it holds the key for its current
/// epoch; without `[etcd]` the key plays no part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderKey {
    /// No `[etcd]`: no fence.
    NotUsed,
    /// This node holds the leader key for this epoch.
    Held(u64),
    /// It does not hold the key, for this reason.
    Missing(String),
}

impl Role {
    /// A role handle at epoch 0 with no node active, until the supervisor
    /// publishes the persisted state ([`Role::start`]).
    pub fn new(live: Arc<Live>, telemetry: Arc<Telemetry>) -> Role {
        Role {
            live,
            telemetry,
            state: watch::channel(RoleState {
                epoch: 0,
                active: String::new(),
            })
            .0,
            lock: Mutex::new(()),
            held: Mutex::new(None),
            leader_key: watch::channel(LeaderKey::NotUsed).0,
            hooks: Hooks::default(),
            promise: Mutex::new((None, false)),
        }
    }

    /// Publishes the role state loaded at start-up (before any task runs).
    pub fn start(&self, role: RoleState) {
        self.state.send_replace(role);
    }

    /// The current role state.
    pub fn current(&self) -> RoleState {
        self.state.borrow().clone()
    }

    /// A receiver of every change of the role state.
    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.state.subscribe()
    }

    /// Whether this node acts as the active one now: it is named active and
    /// its `on_promote` hook (if any) succeeded for the current epoch.
    pub fn is_active(&self) -> bool {
        let role = self.state.borrow();
        role.active == self.live.me.name && self.hooks.promoted(role.epoch) && !self.is_unconfirmed()
    }

    /// Why this node, though named active, does not act as active (no
    /// peer confirmed its epoch yet, or its `on_promote` hook); `None` when
    /// it does or when it is passive.
    pub fn held(&self) -> Option<String> {
        let role = self.current();
        if role.active != self.live.me.name {
            return None;
        }
        self.unconfirmed().or_else(|| self.hooks.held(role.epoch))
    }

    /// Waits (at most `limit`) until this node has acted on its promotion
    /// to `epoch`: `Ok` once it acts as active, `Err` with the reason when
    /// its `on_promote` failed, the role moved on, or the time ran out.
    pub async fn wait_promoted(&self, epoch: u64, limit: Duration) -> std::result::Result<(), String> {
        let mut rx = self.hooks.promotion.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let role = self.current();
            if role.epoch != epoch || role.active != self.live.me.name {
                return Err(format!(
                    "the role moved on to epoch {} with {} active",
                    role.epoch, role.active
                ));
            }
            match &*rx.borrow_and_update() {
                Promotion::Done(e) if *e == epoch => return Ok(()),
                Promotion::Failed(e, detail) if *e == epoch => {
                    return Err(format!(
                        "{}: {detail}; {} holds epoch {epoch} but stays fenced until an operator retries \
                         (`warmsparectl failover --to {} --force`) or moves the role elsewhere",
                        warmspare_shared::proto::PROMOTE_HOOK_FAILED,
                        self.live.me.name,
                        self.live.me.name
                    ))
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(format!("{} did not finish its promotion in time", self.live.me.name));
            }
        }
    }

    /// Records where this node stands with its `on_promote` hook.
    pub fn set_promotion(&self, p: Promotion) {
        self.hooks.promotion.send_replace(p);
        self.telemetry.nudge();
    }

    /// Whether this node's role state names it active but no peer has yet
    /// confirmed that epoch since the agent started: it might be a stale
    /// active whose peers moved on while it was down. A held node answers
    /// 503 on health, runs no jobs and sends no changes; its shippers only
    /// say hello, which confirms the epoch (the hold ends) or fences it.
    pub fn is_unconfirmed(&self) -> bool {
        self.unconfirmed().is_some()
    }

    /// Why this node is held for want of a confirmation, while it is: by
    /// etcd (see [`Role::leader_key_fence`]) or by a peer.
    pub fn unconfirmed(&self) -> Option<String> {
        if self.state.borrow().active != self.live.me.name {
            return None;
        }
        self.leader_key_fence()
            .or_else(|| self.held.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// With `[etcd]`: why this node, named active, does not hold the leader
    /// key for its current epoch (it must not act as active); `None` when it
    /// does, when it is passive, or without `[etcd]`.
    pub fn leader_key_fence(&self) -> Option<String> {
        let role = self.state.borrow();
        if role.active != self.live.me.name {
            return None;
        }
        match &*self.leader_key.borrow() {
            LeaderKey::NotUsed => None,
            LeaderKey::Held(epoch) if *epoch == role.epoch => None,
            LeaderKey::Held(epoch) => Some(format!(
                "this node holds etcd's leader key for epoch {epoch}, not for epoch {}",
                role.epoch
            )),
            LeaderKey::Missing(why) => Some(why.clone()),
        }
    }

    /// Records where this node stands with etcd's leader key (the
    /// leadership task's, alone).
    pub fn set_leader_key(&self, key: LeaderKey) {
        if self.leader_key.send_if_modified(|k| {
            let changed = *k != key;
            *k = key;
            changed
        }) {
            self.telemetry.nudge();
            self.telemetry.interrupt_shippers();
        }
    }

    /// A receiver of every change of [`LeaderKey`] (the supervisor starts
    /// and stops the active side on them).
    pub fn subscribe_leader_key(&self) -> watch::Receiver<LeaderKey> {
        self.leader_key.subscribe()
    }

    /// Holds this node (named active, not acting as active) for `reason`,
    /// or ends the hold.
    pub fn hold(&self, reason: Option<String>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.telemetry.nudge();
    }

    /// A peer confirmed this node's epoch (or an operator promoted it): the
    /// hold ends and the active side goes to work.
    pub fn confirm(&self, by: &str) {
        let was = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if was.is_some() {
            tracing::warn!(
                by,
                epoch = self.current().epoch,
                "epoch confirmed: acting as the active node"
            );
            self.telemetry.nudge();
            self.telemetry.interrupt_shippers();
        }
    }

    /// Compare-and-swap of the role: moves from `expect` to `next` (a higher
    /// epoch), persisting before publishing; `Err` says why not. It ends a
    /// hold: an operator's promotion needs no peer's confirmation.
    ///
    /// A promotion of this node that finds it exactly at `next` already is
    /// done, whatever `expect` was: with `[etcd]` a switchover's target may
    /// take the freed leader key by itself before the operator's promotion
    /// reaches it, and a request repeated after a lost reply finds its own
    /// change. Only a promotion of this node: a demotion that finds the
    /// node moved on is still refused, so two concurrent switchovers cannot
    /// both pass their demotion step.
    pub fn compare_and_swap(
        &self,
        expect: &RoleState,
        next: RoleState,
        reason: &str,
        by: &str,
    ) -> std::result::Result<RoleState, SwapError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        if current == next && next.active == self.live.me.name {
            // With `[etcd]` the node may have adopted the operator's change
            // from etcd first: the operator's reason is recorded as well,
            // so that history shows who ordered the change and why.
            if by.starts_with("operator ") {
                self.record(&expect.active, &next, reason, by);
            }
            return Ok(current);
        }
        if current != *expect {
            return Err(SwapError::Stale {
                expected: expect.clone(),
                current,
            });
        }
        if next.epoch <= current.epoch {
            return Err(SwapError::NotAbove {
                next: next.epoch,
                current: current.epoch,
            });
        }
        state::check_epoch_step(current.epoch, next.epoch)?;
        if self.live.cluster().node(&next.active).is_none() {
            return Err(SwapError::UnknownNode(next.active));
        }
        self.set(next.clone(), reason, by).map_err(SwapError::NotPersisted)?;
        self.confirm(by);
        Ok(next)
    }

    /// Adopts `next` if its epoch is above ours (fencing); returns the state after.
    pub fn adopt(&self, next: RoleState, reason: &str, by: &str) -> Result<RoleState> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current().epoch;
        if next.epoch > current {
            // A peer or an operator cannot move this node further than a
            // controller could have (see `MAX_EPOCH_JUMP`).
            if let Err(e) = state::check_epoch_step(current, next.epoch) {
                tracing::error!(epoch = next.epoch, current, by, error = %e, "refused an epoch");
                return Err(e.into());
            }
            self.set(next, reason, by)?;
        }
        Ok(self.current())
    }

    /// Persists, records and publishes a new role state (callers hold `lock`).
    fn set(&self, next: RoleState, reason: &str, by: &str) -> Result<()> {
        let prev = self.current();
        next.store(&self.live.state_dir)?;
        self.record(&prev.active, &next, reason, by);
        self.state.send_replace(next.clone());
        // Waiters on progress (flushes) re-check the role.
        self.telemetry.nudge();
        tracing::warn!(
            from_epoch = prev.epoch,
            from_active = prev.active,
            epoch = next.epoch,
            active = next.active,
            reason,
            by,
            "role changed"
        );
        Ok(())
    }

    /// Answers a failsafe probe from `from` (an authenticated node) at
    /// `epoch` with window `window`, by the rule of `etcd::failsafe`: the
    /// promise is recorded before the answer goes out. `Err` says why no
    /// promise was given.
    pub fn failsafe_probe(&self, from: &str, epoch: u64, window: Duration) -> std::result::Result<(), String> {
        let cluster = self.live.cluster();
        let Some(etcd) = cluster.etcd.as_ref() else {
            return Err(format!("{} has no [etcd] table", self.live.me.name));
        };
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let probe = failsafe::Probe {
            from,
            epoch,
            window,
            at: std::time::Instant::now(),
        };
        let mut kept = self.promise.lock().unwrap_or_else(|p| p.into_inner());
        if kept.1 {
            return Err(format!("{} is taking the leader key", self.live.me.name));
        }
        let promise = failsafe::answer(&self.live.me.name, etcd.failsafe, etcd.ttl, &self.current(), &probe)?;
        kept.0 = Some(failsafe::keep(kept.0.take(), promise));
        Ok(())
    }

    /// Starts taking etcd's leader key: `Err` with the reason while a
    /// failsafe promise binds; otherwise no promise is given until the
    /// guard is dropped (a probe answered between the check and the
    /// transaction would be a promise broken).
    pub fn start_take(self: &Arc<Role>) -> std::result::Result<TakeGuard, String> {
        let mut kept = self.promise.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = failsafe::binds(kept.0.as_ref(), std::time::Instant::now()) {
            return Err(why);
        }
        kept.1 = true;
        Ok(TakeGuard { role: self.clone() })
    }

    /// Appends the change from `from` to `next` to the role history (a
    /// failure is logged: the role state is what counts).
    fn record(&self, from: &str, next: &RoleState, reason: &str, by: &str) {
        let entry = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: next.epoch,
            from: from.to_string(),
            to: next.active.clone(),
            reason: reason.to_string(),
            by: by.to_string(),
        };
        if let Err(e) = state::append_history(&self.live.state_dir, &entry) {
            tracing::warn!(error = %e, "cannot append to the role history");
        }
    }

    /// A hello describing this node.
    pub fn hello(&self, purpose: Purpose) -> Hello {
        let role = self.current();
        Hello {
            protocol: PROTOCOL_VERSION,
            version: warmspare_shared::VERSION.to_string(),
            node: self.live.me.name.clone(),
            epoch: role.epoch,
            active: role.active,
            config_hash: self.live.config_hash(),
            purpose,
            owners: warmspare_shared::apply::can_chown(),
            compress: self.live.cluster().compress_of(&self.live.me),
        }
    }
}

/// While this lives, this node gives no failsafe promise (see
/// [`Role::start_take`]).
pub struct TakeGuard {
    role: Arc<Role>,
}

impl Drop for TakeGuard {
    fn drop(&mut self) {
        self.role.promise.lock().unwrap_or_else(|p| p.into_inner()).1 = false;
    }
}

#[cfg(test)]
mod tests;
