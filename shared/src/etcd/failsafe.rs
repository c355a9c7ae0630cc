//! Failsafe mode (`[etcd] failsafe = true`, modelled on Patroni's): the
//! promise a passive gives the active's failsafe probe, as pure functions
//! of role states and monotonic times.
//!
//! While it holds the leader key, an active with failsafe probes every
//! passive over the SSH link (`Request::Failsafe`, protocol 6) every half
//! `loop_wait`. A passive that answers promises not to take etcd's leader
//! key for its own `ttl` from the moment it received the probe; the active
//! counts each answered probe as a confirmation for its window
//! (`loop_wait + retry_timeout`, below `ttl`) from the moment it *sent* it
//! (see [`super::confirm::Leadership::record_probe`]). The probe was
//! received after it was sent, so the active's confirmation ends before
//! the promise does: the same argument, and the same assumption of bounded
//! clock-rate drift, as the lease rule.
//!
//! A passive answers only the node its role state names active, at its own
//! epoch, and only when its own cluster file sets `failsafe`; a promise is
//! kept until it lapses, whatever the role state does meanwhile.

use std::time::{Duration, Instant};

use crate::state::RoleState;

/// A passive's promise: it does not take etcd's leader key before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promise {
    /// The active node it was given to.
    pub to: String,
    /// That node's epoch.
    pub epoch: u64,
    /// Until when it binds (this node's monotonic clock).
    pub until: Instant,
}

/// A failsafe probe as the passive received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe<'a> {
    /// The node that sent it (the authenticated peer).
    pub from: &'a str,
    /// The epoch it says it is active at.
    pub epoch: u64,
    /// Its confirmation window (`loop_wait + retry_timeout` in its file).
    pub window: Duration,
    /// When it arrived.
    pub at: Instant,
}

/// What this node (`me`, role state `mine`, `failsafe` and `ttl` from its
/// own `[etcd]`) answers `probe`: the promise it gives, or why it gives
/// none. A promise lasts `ttl` from the probe's arrival; a probe whose
/// window is not below `ttl` is refused (the active would count on a
/// longer promise than this node gives).
pub fn answer(me: &str, failsafe: bool, ttl: Duration, mine: &RoleState, probe: &Probe<'_>) -> Result<Promise, String> {
    if !failsafe {
        return Err(format!("failsafe is not set in {me}'s cluster file"));
    }
    if probe.from == me || mine.active == me {
        return Err(format!("{me} is the active node of epoch {}", mine.epoch));
    }
    if probe.epoch != mine.epoch || probe.from != mine.active {
        return Err(format!(
            "{me} knows {} as the active node of epoch {}, not {} at epoch {}",
            mine.active, mine.epoch, probe.from, probe.epoch
        ));
    }
    if probe.window.is_zero() || probe.window >= ttl {
        return Err(format!(
            "the probe's window of {} ms is not below {me}'s ttl of {} ms",
            probe.window.as_millis(),
            ttl.as_millis()
        ));
    }
    Ok(Promise {
        to: probe.from.to_string(),
        epoch: probe.epoch,
        until: probe.at + ttl,
    })
}

/// The promise to keep after `new` was given while `old` stood: the one
/// that ends later (a promise is never shortened).
pub fn keep(old: Option<Promise>, new: Promise) -> Promise {
    match old {
        Some(o) if o.until > new.until => o,
        _ => new,
    }
}

/// Why this node may not take the leader key at `now`, if a promise binds.
pub fn binds(promise: Option<&Promise>, now: Instant) -> Option<String> {
    let p = promise?;
    (now < p.until).then(|| {
        format!(
            "promised {} (active at epoch {}) not to take the leader key for {} ms more: it reaches this node (failsafe)",
            p.to,
            p.epoch,
            (p.until - now).as_millis()
        )
    })
}

#[cfg(test)]
mod tests;
