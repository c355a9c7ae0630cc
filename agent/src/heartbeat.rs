//! Peer liveness: a probe session per peer, answering pings, beside the
//! replication session.
//!
//! A peer whose process is stopped (`SIGSTOP`), hung or cut off leaves its
//! TCP connections open, and the replication session alone cannot tell it
//! from a peer busy applying a large batch: in both the peer reads nothing
//! more of the data channel for a while. So each shipper keeps a second,
//! small SSH connection to its peer (`Purpose::Probe`) and sends a ping
//! every [`PING_EVERY`]. The peer answers it from its async runtime, which
//! keeps running while its apply thread works through a batch; a stopped or
//! hung process, or a cut link, answers nothing. No answer for
//! [`DEAD_AFTER`] marks the peer down: the link shows it at once
//! (`connected: false` and the reason in `last_error`) and the replication
//! session is ended, to be dialed again.
//!
//! While the peer is down the probe dials it again every [`PING_EVERY`];
//! the first answer wakes the shipper, which dials at once instead of
//! waiting out its backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warmspare_shared::config::Node;
use warmspare_shared::keys::PublicKey;
use warmspare_shared::proto::{FrameReader, FrameWriter, Purpose, Reply, Request};
use warmspare_shared::ssh;

use crate::live::Live;
use crate::role::Role;

/// How often the probe pings a connected peer, and dials a peer that is down.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// A peer that answered no ping (nor a dial) for this long is down.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// The longest a probe dial (TCP, SSH handshake, hello) may take.
const DIAL_LIMIT: Duration = Duration::from_secs(3);

/// What the probe knows about a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Whether the probe session is up and answering.
    pub up: bool,
    /// How many times the peer came back (went from down, or unknown, to up).
    pub ups: u64,
    /// When the peer last answered (a probe dial or a ping).
    pub answered: Option<Instant>,
    /// Why the probe last failed.
    pub reason: Option<String>,
}

/// One peer's liveness, shared by its shipper and its probe.
#[derive(Debug)]
pub struct Liveness {
    state: watch::Sender<State>,
    /// `NAME (ADDRESS)`, for messages.
    label: String,
}

impl Liveness {
    /// The liveness of `peer`, unknown until its probe answers.
    pub fn new(peer: &Node) -> Liveness {
        Liveness::labelled(format!("{} ({})", peer.name, peer.ssh))
    }

    fn labelled(label: String) -> Liveness {
        Liveness {
            state: watch::channel(State::default()).0,
            label,
        }
    }

    /// The state now.
    pub fn now(&self) -> State {
        self.state.borrow().clone()
    }

    /// Waits until the peer has come back more than `seen` times (the
    /// shipper dials at once then); returns the new count.
    pub async fn answered_after(&self, seen: u64) -> u64 {
        let mut rx = self.state.subscribe();
        let ups = rx.wait_for(|s| s.ups > seen).await.map(|s| s.ups);
        match ups {
            Ok(n) => n,
            Err(_) => std::future::pending().await,
        }
    }

    /// Resolves, with the reason, once the peer has answered nothing for
    /// [`DEAD_AFTER`], counting from `since` at the earliest (the start of
    /// a replication session, which is an answer too). A peer whose probe
    /// was already failing when the session began is given as long.
    pub async fn silent(&self, since: Instant) -> String {
        self.silent_for(since, DEAD_AFTER).await
    }

    async fn silent_for(&self, since: Instant, limit: Duration) -> String {
        loop {
            let last = self.state.borrow().answered.map_or(since, |a| a.max(since));
            if last + limit <= Instant::now() {
                return format!(
                    "{} answered no ping for {} s: stopped, hung or cut off",
                    self.label,
                    limit.as_secs()
                );
            }
            tokio::time::sleep_until(last + limit).await;
        }
    }

    fn answered(&self) {
        self.state.send_modify(|s| {
            if !s.up {
                s.up = true;
                s.ups += 1;
            }
            s.answered = Some(Instant::now());
        });
    }

    /// Marks the probe down; true when it was up.
    fn failed(&self, reason: &str) -> bool {
        self.state.send_if_modified(|s| {
            let was = s.up;
            s.up = false;
            s.reason = Some(reason.to_string());
            was
        })
    }
}

/// Probes `peer` until `cancel` fires, publishing what it finds in `live`
/// and, when the peer goes down, on the link in status.
pub async fn run(
    node: Arc<Live>,
    role: Arc<Role>,
    peer: Node,
    server_key: PublicKey,
    live: Arc<Liveness>,
    cancel: CancellationToken,
) {
    loop {
        let reason = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe(&node, &role, &peer, &server_key, &live) => r,
        };
        let reason = format!("{} {reason}", live.label);
        if live.failed(&reason) {
            tracing::warn!(peer = peer.name, reason, "the peer's probe failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PING_EVERY) => {}
        }
    }
}

/// One probe session: dial, hello, then a ping every [`PING_EVERY`] until
/// an answer is late; returns why it ended.
async fn probe(node: &Live, role: &Role, peer: &Node, server_key: &PublicKey, live: &Liveness) -> String {
    let dialed = tokio::time::timeout(DIAL_LIMIT, async {
        let d = ssh::dial(&peer.ssh, server_key, &node.key, &node.me.name, DIAL_LIMIT).await?;
        let (rd, wr) = tokio::io::split(d.stream);
        let (mut reader, mut writer) = (FrameReader::new(rd), FrameWriter::new(wr));
        writer.send(&Request::Hello(role.hello(Purpose::Probe))).await?;
        match reader.recv::<Reply>().await? {
            Some(Reply::Hello(_)) => Ok::<_, anyhow::Error>((reader, writer, d.handle)),
            Some(other) => bail!("answered the probe's hello with {other:?}"),
            None => bail!("closed the probe session"),
        }
    })
    .await;
    let (mut reader, mut writer, _handle) = match dialed {
        Err(_) => return format!("did not answer within {} s", DIAL_LIMIT.as_secs()),
        Ok(Err(e)) => return format!("cannot be reached: {e:#}"),
        Ok(Ok(x)) => x,
    };
    live.answered();
    let mut answered = Instant::now();
    loop {
        let deadline = answered + DEAD_AFTER;
        let pinged = tokio::time::timeout_at(deadline, async {
            writer.send(&Request::Ping).await?;
            loop {
                match reader.recv::<Reply>().await? {
                    Some(Reply::Pong) => return Ok(()),
                    Some(_) => continue,
                    None => bail!("closed the probe session"),
                }
            }
        })
        .await;
        match pinged {
            Err(_) => {
                return format!(
                    "answered no ping for {} s: stopped, hung or cut off",
                    DEAD_AFTER.as_secs()
                )
            }
            Ok(Err(e)) => return format!("{e:#}"),
            Ok(Ok(())) => {
                answered = Instant::now();
                live.answered();
            }
        }
        tokio::time::sleep_until(answered + PING_EVERY).await;
    }
}

/// A delay of about `base`, give or take a quarter, so that shippers that
/// failed together do not dial again together.
pub fn jitter(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is randomly keyed: enough for a jitter.
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let f = 0.75 + (r % 1_000) as f64 / 2_000.0;
    base.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comebacks_count_once() {
        let l = Liveness::labelled("b (b:22)".into());
        l.answered();
        l.answered();
        assert_eq!(l.now().ups, 1);
        assert!(l.failed("gone"));
        assert!(!l.failed("still gone"));
        let s = l.now();
        assert_eq!((s.up, s.reason.as_deref()), (false, Some("still gone")));
        l.answered();
        assert_eq!(l.now().ups, 2);
    }

    #[tokio::test]
    async fn a_session_is_given_its_own_time() {
        let limit = Duration::from_millis(300);
        let l = Liveness::labelled("b (b:22)".into());
        // Never answered: the session's start counts as an answer.
        let start = Instant::now();
        let reason = l.silent_for(start, limit).await;
        assert!(start.elapsed() >= limit);
        assert!(reason.starts_with("b (b:22) answered no ping"), "{reason}");
        // An answer after the start pushes the end out: silence counts
        // from the last answer.
        let start = Instant::now();
        tokio::time::sleep(limit / 2).await;
        l.answered();
        let answered = Instant::now();
        l.silent_for(start, limit).await;
        assert!(
            answered.elapsed() >= limit,
            "ended {:?} after the answer",
            answered.elapsed()
        );
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(4));
            assert!(d >= Duration::from_secs(3) && d <= Duration::from_secs(5), "{d:?}");
        }
    }
}
