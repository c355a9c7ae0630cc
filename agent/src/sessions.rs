//! The replication sessions this node's receiver serves, one per sending
//! node. A sender that lost its link dials again while the receiver may
//! still be serving its old session (a cut link is noticed late on this
//! side): the newer session ends the older one, and applies nothing until
//! the older one's worker has let go of the watch roots. The registry is
//! the node's own (a field of `node::Shared`), so two nodes in one process
//! never see each other's sessions. Imports no agent module.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

/// How long a new replication session waits for the older session of the
/// same node to let go of the watch roots before it is refused (the sender
/// then dials again after its backoff).
pub const REPLACE_DEADLINE: Duration = Duration::from_secs(30);

/// The node's session registry handle.
#[derive(Default)]
pub struct Sessions {
    /// The session now serving each sending node.
    slots: Mutex<HashMap<String, Slot>>,
    /// The id the next session gets.
    next: AtomicU64,
}

/// One node's place in [`Sessions`].
struct Slot {
    /// The session now serving the node.
    id: u64,
    /// Ends that session.
    end: CancellationToken,
    /// Held by a session's apply worker for as long as it runs.
    gate: Arc<AsyncMutex<()>>,
}

/// A replication session's registration; dropping it takes the session
/// out of its [`Sessions`] unless a newer one took its place.
pub struct Turn {
    sessions: Arc<Sessions>,
    node: String,
    id: u64,
    /// Cancelled when a newer session of the same node takes over.
    pub end: CancellationToken,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.sessions.leave(&self.node, self.id);
    }
}

/// The older session of the node did not end within [`REPLACE_DEADLINE`].
#[derive(Debug, thiserror::Error)]
#[error("the older session of {node} did not end within {REPLACE_DEADLINE:?}")]
pub struct OlderSessionStuck {
    /// The sending node.
    pub node: String,
}

impl Sessions {
    /// Registers a replication session of `node`: ends the older session
    /// of the same node, if any, and waits (at most [`REPLACE_DEADLINE`])
    /// for its apply worker to end. Returns the registration and the gate
    /// the apply worker holds while it runs.
    pub async fn take_turn(self: &Arc<Self>, node: &str) -> Result<(Turn, OwnedMutexGuard<()>), OlderSessionStuck> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let end = CancellationToken::new();
        let gate = {
            let mut g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let gate = g.get(node).map(|s| s.gate.clone()).unwrap_or_default();
            if let Some(old) = g.insert(
                node.to_string(),
                Slot {
                    id,
                    end: end.clone(),
                    gate: gate.clone(),
                },
            ) {
                tracing::warn!(
                    from = node,
                    "a new replication session from this node: ending its older session"
                );
                old.end.cancel();
            }
            gate
        };
        match tokio::time::timeout(REPLACE_DEADLINE, gate.lock_owned()).await {
            Ok(gate) => Ok((
                Turn {
                    sessions: self.clone(),
                    node: node.to_string(),
                    id,
                    end,
                },
                gate,
            )),
            Err(_) => {
                // Leave the slot to the older session (still ending) unless
                // another one took it meanwhile.
                self.leave(node, id);
                Err(OlderSessionStuck { node: node.to_string() })
            }
        }
    }

    /// Takes session `id` of `node` out, unless a newer one took its place.
    fn leave(&self, node: &str, id: u64) {
        let mut g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if g.get(node).is_some_and(|s| s.id == id) {
            g.remove(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Sessions;

    /// Long enough for anything that must happen; never waited out when
    /// the code is right.
    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_newer_session_ends_the_older_one_of_its_node_only() {
        let sessions = Arc::new(Sessions::default());
        let (older, gate) = sessions.take_turn("b").await.unwrap();
        let (other_node, _other_gate) = sessions.take_turn("c").await.unwrap();

        // A second session of b ends the first and applies nothing while
        // the first one's worker still holds the gate.
        let s = sessions.clone();
        let newer = tokio::spawn(async move { s.take_turn("b").await.map(|(turn, _gate)| turn) });
        tokio::time::timeout(LIMIT, older.end.cancelled())
            .await
            .expect("the older session of b was not told to end");
        assert!(
            !newer.is_finished(),
            "the newer session went ahead of the older one's worker"
        );
        drop(gate);
        let newer = tokio::time::timeout(LIMIT, newer)
            .await
            .expect("the newer session did not start once the older one let go")
            .unwrap()
            .unwrap();
        assert!(!newer.end.is_cancelled());
        assert!(!other_node.end.is_cancelled(), "a session of another node was ended");

        // The older session's registration going away leaves the newer in place.
        drop(older);
        let (third, _gate) = tokio::time::timeout(LIMIT, async {
            let s = sessions.clone();
            let third = tokio::spawn(async move { s.take_turn("b").await });
            tokio::time::timeout(LIMIT, newer.end.cancelled())
                .await
                .expect("the registered session of b was not ended by the next one");
            drop(newer);
            third.await.unwrap().unwrap()
        })
        .await
        .unwrap();
        assert!(!third.end.is_cancelled());

        // Another node's registry (two nodes in one process) is its own.
        let elsewhere = Arc::new(Sessions::default());
        let (_turn, _gate) = tokio::time::timeout(LIMIT, elsewhere.take_turn("b"))
            .await
            .expect("a session in another registry waited on this one")
            .unwrap();
        assert!(
            !third.end.is_cancelled(),
            "a session in another registry ended this one"
        );
    }
}
