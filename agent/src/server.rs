//! The SSH listener: accepts connections and hands sessions to the receiver.
//!
//! At most [`ssh::MAX_UNAUTHENTICATED`] connections are in their handshake at
//! once, each for at most [`ssh::AUTH_DEADLINE`]: connections past that are
//! closed as soon as they are accepted, so half-open connections cannot take
//! every descriptor (and with them the operators' and peers' way in).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::ssh::{self, IncomingSession};

use crate::progress::Loops;
use crate::receive;

/// The longest an accept loop (SSH or HTTP) waits before it comes round.
pub const ACCEPT_ROUND: Duration = Duration::from_secs(1);
/// How long an accept loop may go without coming round before the
/// watchdog stops being fed (its rounds take [`ACCEPT_ROUND`]; a complaint
/// about a failed accept waits 100 ms).
pub const ACCEPT_LIMIT: Duration = Duration::from_secs(10);

/// How often a repeated listener complaint is logged.
const COMPLAINT_EVERY: Duration = Duration::from_secs(60);

/// Logs a repeated complaint once per [`COMPLAINT_EVERY`], with how many
/// times it happened since.
#[derive(Default)]
pub struct Complaint {
    last: Option<Instant>,
    since: u64,
}

impl Complaint {
    /// Counts one occurrence; true when it is time to log (then `since` says
    /// how many there were, this one included).
    pub fn due(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < COMPLAINT_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

/// Serves `listener` until `cancel` fires: each session goes to the
/// receiver with `node`; the accept loop stamps its progress in `loops`.
pub async fn run(node: receive::Handles, loops: Arc<Loops>, listener: TcpListener, cancel: CancellationToken) {
    let config = ssh::server_config(&node.live.key);
    let (tx, mut rx) = mpsc::channel::<IncomingSession>(16);
    let preauth = Arc::new(Semaphore::new(ssh::MAX_UNAUTHENTICATED));
    let mut connections = JoinSet::new();
    let mut sessions = JoinSet::new();
    let (mut crowded, mut failing) = (Complaint::default(), Complaint::default());
    let stamp = loops.register("the SSH accept loop", ACCEPT_LIMIT);
    loop {
        stamp.stamp();
        if crate::progress::test_hang("ssh-accept") {
            crate::progress::hang_task("the SSH accept loop").await;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            // Idle, the loop still comes round (and stamps) every second.
            _ = tokio::time::sleep(ACCEPT_ROUND) => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(permit) = preauth.clone().try_acquire_owned() else {
                        if let Some(n) = crowded.due() {
                            tracing::warn!(%peer, closed = n, "{} connections are still authenticating: closing new ones at once", ssh::MAX_UNAUTHENTICATED);
                        }
                        drop(tcp);
                        continue;
                    };
                    tracing::debug!(%peer, "connection");
                    // Each connection takes the trust of the cluster file in
                    // force: a reload applies to every connection after it.
                    let trust = Arc::new(node.live.trust());
                    let (config, tx) = (config.clone(), tx.clone());
                    connections.spawn(async move {
                        if let Err(e) = ssh::serve_connection(config, tcp, trust, tx, permit).await {
                            tracing::debug!(%peer, error = %e, "ssh connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    if let Some(n) = failing.due() {
                        tracing::warn!(error = %e, times = n, "cannot accept a connection");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(session) = rx.recv() => {
                tracing::debug!(who = %session.identity, "session");
                sessions.spawn(receive::handle(node.clone(), session));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    sessions.shutdown().await;
    connections.shutdown().await;
}
