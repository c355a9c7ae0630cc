//! The SSH listener: accepts connections and hands sessions to the receiver.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::ssh::{self, IncomingSession};

use crate::daemon::Shared;
use crate::receive;

/// Serves `listener` until `cancel` fires.
pub async fn run(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let config = ssh::server_config(&shared.key);
    let (tx, mut rx) = mpsc::channel::<IncomingSession>(16);
    let mut connections = JoinSet::new();
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tracing::debug!(%peer, "connection");
                    // Each connection takes the trust of the cluster file in
                    // force: a reload applies to every connection after it.
                    let trust = Arc::new(shared.trust());
                    let (config, tx) = (config.clone(), tx.clone());
                    connections.spawn(async move {
                        if let Err(e) = ssh::serve_connection(config, tcp, trust, tx).await {
                            tracing::debug!(%peer, error = %e, "ssh connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(session) = rx.recv() => {
                tracing::debug!(who = %session.identity, "session");
                sessions.spawn(receive::handle(shared.clone(), session));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    sessions.shutdown().await;
    connections.shutdown().await;
}
