//! systemd integration: readiness, status lines, the watchdog, stopping.
//!
//! Every call is a no-op when the agent does not run under systemd
//! (`NOTIFY_SOCKET` unset).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::live::Live;
use crate::progress::Loops;
use crate::role::Role;
use crate::supervise::Heartbeat;
use crate::telemetry::Telemetry;

/// What the systemd integration reads of the node: the status line's
/// role and links, and what the watchdog checks. The supervisor builds it.
#[derive(Clone)]
pub struct Handles {
    /// This node's identity.
    pub live: Arc<Live>,
    /// The role, for the status line.
    pub role: Arc<Role>,
    /// The links, for the status line; the lock the watchdog checks.
    pub telemetry: Arc<Telemetry>,
    /// The supervisor's heartbeat.
    pub heartbeat: Arc<Heartbeat>,
    /// The loops that must keep going round.
    pub loops: Arc<Loops>,
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// Listeners are up.
pub fn ready(handles: &Handles) {
    send(&[NotifyState::Ready, NotifyState::Status(&summary(handles))]);
}

/// The agent is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The agent re-reads its cluster file.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A one-line status: role, epoch, and each peer's link.
pub fn summary(handles: &Handles) -> String {
    let role = handles.role.current();
    if role.active != handles.live.me.name {
        return format!("passive at epoch {} ({} is active)", role.epoch, role.active);
    }
    let Some(rt) = handles.telemetry.try_runtime() else {
        return format!("active at epoch {}", role.epoch);
    };
    let links: Vec<String> = rt
        .links
        .iter()
        .map(|(peer, l)| {
            let pending: usize = rt
                .inboxes
                .get(peer)
                .map(|i| i.peek().paths.values().map(|p| p.len()).sum())
                .unwrap_or(0);
            format!(
                "{peer} {}, {pending} pending",
                if l.connected { "connected" } else { "DISCONNECTED" }
            )
        })
        .collect();
    format!(
        "active at epoch {}; {}",
        role.epoch,
        if links.is_empty() {
            "no peer yet".into()
        } else {
            links.join("; ")
        }
    )
}

/// Sends `WATCHDOG=1` at half the watchdog interval (when systemd set one)
/// and refreshes the status line, until `cancel` fires.
///
/// The watchdog is fed only while the agent makes progress:
/// - every loop that must keep going round (each shipper, the SSH and HTTP
///   accept loops, the watcher: see `crate::progress`) stamped its
///   progress within its own limit;
/// - the supervisor's loop went round within the interval (it goes round
///   every second; it stalls when the async runtime is blocked);
/// - the runtime reports, which every shipper and receiver updates, were
///   not found locked at two ticks in a row (they are never held over I/O).
///
/// Otherwise systemd's watchdog restarts the agent.
pub async fn run(handles: Handles, cancel: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    let mut was_locked = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let locked = handles.telemetry.try_runtime().is_none();
        let stuck = locked && was_locked;
        was_locked = locked;
        let beating = handles.heartbeat.within(every.max(Duration::from_secs(3)));
        let stale = handles.loops.stale();
        let status = summary(&handles);
        match watchdog {
            Some(_) if beating && !stuck && stale.is_empty() => {
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)])
            }
            Some(_) => {
                let stalled: Vec<String> = stale.iter().map(|s| s.to_string()).collect();
                tracing::error!(
                    supervisor_beating = beating,
                    runtime_locked = stuck,
                    stalled = stalled.join("; "),
                    "the agent is not making progress: the watchdog is not fed"
                );
                let names: Vec<&str> = stale.iter().map(|s| s.name.as_str()).collect();
                let line = if names.is_empty() {
                    "not making progress".to_string()
                } else {
                    format!("not making progress: {}", names.join(", "))
                };
                send(&[NotifyState::Status(&line)]);
            }
            None => send(&[NotifyState::Status(&status)]),
        }
    }
}
