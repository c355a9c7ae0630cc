//! Dialing a peer: the shipper's loop, which connects with jittered,
//! capped backoff (cut short when the peer's probe answers) and runs one
//! session per connection.

use super::*;

/// The first and the longest wait before dialing a peer again after a
/// failure (each with a jitter of a quarter either way). A peer coming back
/// is dialed sooner: its probe wakes the shipper (see [`crate::heartbeat`]).
pub(super) const REDIAL_MIN: Duration = Duration::from_millis(100);
pub(super) const REDIAL_MAX: Duration = Duration::from_secs(5);
/// The longest a dial of the replication session may take.
pub(super) const DIAL_LIMIT: Duration = Duration::from_secs(10);

/// Runs the shipper for `peer` until `cancel` fires.
pub async fn run(shared: Arc<Shared>, peer: Node, inbox: Arc<Inbox>, cancel: CancellationToken) {
    let mut backoff = REDIAL_MIN;
    let server_key = match peer.key() {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(peer = peer.name, error = %e, "cannot ship: the peer's pinned key does not parse");
            return;
        }
    };
    // The probe beside the replication session: it tells a dead or hung
    // peer from a busy one, and a peer that answers again.
    let live = Arc::new(heartbeat::Liveness::new(&peer));
    let probe = tokio::spawn(heartbeat::run(
        shared.clone(),
        peer.clone(),
        server_key.clone(),
        live.clone(),
        cancel.child_token(),
    ));
    let _probe = AbortOnDrop(probe);
    let mut quiet = false;
    loop {
        let started = Instant::now();
        let mut progressed = false;
        let seen = live.now();
        let dialed = tokio::select! {
            _ = cancel.cancelled() => return,
            d = ssh::dial(&peer.ssh, &server_key, &shared.live.key, &shared.live.me.name, DIAL_LIMIT) => Some(d),
            // The probe got through and this dial still has not, 2 s later
            // (the link came back while its SYNs were being retried): dial
            // again now rather than at TCP's next retransmission.
            _ = async {
                live.answered_after(seen.ups).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => None,
        };
        let Some(dialed) = dialed else { continue };
        match dialed {
            Ok(d) => {
                tracing::info!(peer = peer.name, addr = peer.ssh, "connected");
                let mut before = None;
                shared.link(&peer.name, |l| {
                    l.connected = true;
                    before = l.last_success.values().max().copied();
                });
                let result = session(&shared, &peer, d, &inbox, &live, &cancel).await;
                shared.link(&peer.name, |l| {
                    progressed = l.last_success.values().max().copied() != before;
                    l.connected = false;
                    l.in_progress = None;
                    if let Err(e) = &result {
                        l.last_error = Some(format!("{e:#}"));
                    }
                });
                match result {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(peer = peer.name, error = format!("{e:#}"), "replication session ended"),
                }
                quiet = false;
            }
            Err(e) => {
                // The first failure in a row is a warning; the retries are not news.
                if quiet {
                    tracing::debug!(peer = peer.name, addr = peer.ssh, error = %e, "cannot reach the peer");
                } else {
                    tracing::warn!(peer = peer.name, addr = peer.ssh, error = %e, "cannot reach the peer; retrying with backoff");
                }
                quiet = true;
                shared.link(&peer.name, |l| {
                    l.last_error = Some(format!("cannot reach {}: {e}", peer.ssh))
                });
            }
        }
        // A session that got work acknowledged, or lasted a while, ended for
        // a reason of its own (a restart, a cut): redial soon. Only repeated
        // failures to get anywhere back off further.
        if progressed || started.elapsed() > Duration::from_secs(5) {
            backoff = REDIAL_MIN;
        }
        let seen_ups = live.now().ups;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(heartbeat::jitter(backoff)) => {}
            // The peer answers its probe again: dial now.
            _ = live.answered_after(seen_ups) => backoff = REDIAL_MIN,
        }
        backoff = (backoff * 2).min(REDIAL_MAX);
    }
}

/// Aborts a task when dropped (the shipper's probe ends with the shipper).
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
