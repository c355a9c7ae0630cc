//! Dialing a peer: the shipper's loop, which connects with jittered,
//! capped backoff (cut short when the peer's probe answers), and, per
//! connection, the hello that confirms a held active's epoch, the async
//! reader and writer, and the worker on a blocking thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warmspare_shared::compress::{self, Packer};
use warmspare_shared::config::Node;
use warmspare_shared::proto::{self, FrameReader, FrameWriter, Hello, Purpose, Reply, Request};
use warmspare_shared::ssh;
use warmspare_shared::state::RoleState;

use crate::events::Inbox;
use crate::heartbeat;
use crate::progress::Stamp;
use crate::role::Role;

use super::handles::Handles;
use super::session::{Group, SessionIo, COMMITS_IN_FLIGHT, GROUPS_QUEUED, PEER_DEADLINE};
use super::worker::sync_loop;

/// The first and the longest wait before dialing a peer again after a
/// failure (each with a jitter of a quarter either way). A peer coming back
/// is dialed sooner: its probe wakes the shipper (see [`crate::heartbeat`]).
pub(super) const REDIAL_MIN: Duration = Duration::from_millis(100);
pub(super) const REDIAL_MAX: Duration = Duration::from_secs(5);
/// The longest a dial of the replication session may take.
pub(super) const DIAL_LIMIT: Duration = Duration::from_secs(10);
/// How long a shipper may go without stamping its progress before the
/// watchdog stops being fed. Between sessions a round is a dial (at most
/// [`DIAL_LIMIT`]) and a wait (at most [`REDIAL_MAX`] and its jitter); in a
/// session the worker stamps at every round (at least once a second), at
/// every second of a wait on the peer, and as it scans, hashes and sends
/// (per directory, per file, per 256 KiB read).
pub(super) const SHIPPER_LIMIT: Duration = Duration::from_secs(30);

/// Runs the shipper for `peer` until `cancel` fires.
pub async fn run(handles: Handles, peer: Node, inbox: Arc<Inbox>, cancel: CancellationToken) {
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
        handles.live.clone(),
        handles.role.clone(),
        peer.clone(),
        server_key.clone(),
        live.clone(),
        cancel.child_token(),
    ));
    let _probe = AbortOnDrop(probe);
    let stamp = handles
        .loops
        .register(format!("the shipper to {}", peer.name), SHIPPER_LIMIT);
    let mut quiet = false;
    loop {
        stamp.stamp();
        let started = Instant::now();
        let mut progressed = false;
        let seen = live.now();
        let dialed = tokio::select! {
            _ = cancel.cancelled() => return,
            d = ssh::dial(&peer.ssh, &server_key, &handles.live.key, &handles.live.me.name, DIAL_LIMIT) => Some(d),
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
                handles.telemetry.link(&peer.name, |l| {
                    l.connected = true;
                    before = l.last_success.values().max().copied();
                });
                let result = session(&handles, &peer, d, &inbox, &live, &stamp, &cancel).await;
                handles.telemetry.link(&peer.name, |l| {
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
                handles.telemetry.link(&peer.name, |l| {
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

/// One connected session: hello, then the sync loop on a blocking thread.
pub(super) async fn session(
    handles: &Handles,
    peer: &Node,
    dialed: ssh::Dialed,
    inbox: &Arc<Inbox>,
    live: &heartbeat::Liveness,
    stamp: &Arc<Stamp>,
    cancel: &CancellationToken,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let ssh::Dialed {
        handle,
        stream,
        peer: addr,
    } = dialed;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let hello = handles.role.hello(Purpose::Replicate);
    writer.send(&Request::Hello(hello)).await.context("cannot send hello")?;
    let theirs = match reader.recv::<Reply>().await.context("no hello from the peer")? {
        Some(Reply::Hello(h)) => h,
        Some(Reply::Refused { reason }) => bail!("the peer refused replication: {reason}"),
        Some(Reply::Stale(role)) => {
            // Fencing: the peer knows a newer epoch, so this node is not active any more.
            let (r, by) = (role.clone(), peer.name.clone());
            adopt(&handles.role, r, by).await?;
            bail!(
                "{} reports epoch {} with {} active: this node stepped down",
                peer.name,
                role.epoch,
                role.active
            );
        }
        Some(other) => bail!("unexpected first reply {other:?}"),
        None => bail!("the peer closed the session before hello (a peer of an older protocol version does so)"),
    };
    check_peer_hello(handles, peer, &theirs)?;
    if handles.role.is_unconfirmed() {
        // The peer admitted this node as the active of its epoch: it holds
        // the same epoch naming this node (or adopted it from our hello).
        let mine = handles.role.current();
        if theirs.epoch == mine.epoch && theirs.active == handles.live.me.name {
            handles.role.confirm(&peer.name);
        } else {
            bail!(
                "{} answers at epoch {} with {} active, which does not confirm epoch {}: still held",
                peer.name,
                theirs.epoch,
                theirs.active,
                mine.epoch
            );
        }
    }
    let owners = theirs.owners;
    let mine = handles.live.cluster().compress_of(&handles.live.me);
    let loopback = addr.is_some_and(|a| a.ip().is_loopback());
    let packer = if compress::negotiate(mine, theirs.compress, loopback) {
        Some(Packer::new().context("cannot start compression")?)
    } else {
        None
    };
    tracing::debug!(peer = peer.name, mine = %mine, theirs = %theirs.compress, loopback, compressed = packer.is_some(), "compression");
    handles.telemetry.link(&peer.name, |l| l.compressed = packer.is_some());

    let (frame_tx, mut frame_rx) = mpsc::channel::<Group>(GROUPS_QUEUED);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(64);
    // A peer owes at most COMMITS_IN_FLIGHT acknowledgements; one that sends
    // more than this waits (and the worker's deadline ends the session).
    let (ack_tx, ack_rx) = mpsc::channel::<Reply>(COMMITS_IN_FLIGHT * 4);
    let bytes_sent = handles.telemetry.bytes_sent.clone();
    let bytes_raw = handles.telemetry.bytes_uncompressed.clone();

    let write_task = async move {
        while let Some(group) = frame_rx.recv().await {
            let (mut n, mut raw) = (0, group.raw);
            let more = std::iter::from_fn(|| frame_rx.try_recv().ok()).flat_map(|g| {
                raw += g.raw;
                g.frames
            });
            for frame in group.frames.into_iter().chain(more) {
                n += frame.len() as u64 + 4;
                writer.feed(frame).await?;
            }
            writer.flush().await?;
            bytes_sent.fetch_add(n, Ordering::Relaxed);
            bytes_raw.fetch_add(raw, Ordering::Relaxed);
        }
        Ok::<(), proto::FrameError>(())
    };
    let adopt_role = handles.role.clone();
    let adopt_peer = peer.name.clone();
    let read_task = async move {
        loop {
            match reader.recv::<Reply>().await? {
                None => return Ok::<(), anyhow::Error>(()),
                Some(r @ Reply::Committed { .. }) => {
                    if ack_tx.send(r).await.is_err() {
                        return Ok(());
                    }
                }
                // The answer to a caught-up marker (see `worker`): nothing waits for it.
                Some(Reply::Pong) => {}
                Some(Reply::Refused { reason }) => bail!("the peer refused: {reason}"),
                Some(Reply::Stale(role)) => {
                    let (r, by) = (role.clone(), adopt_peer.clone());
                    adopt(&adopt_role, r, by).await?;
                    bail!(
                        "{adopt_peer} reports epoch {} with {} active: this node stepped down",
                        role.epoch,
                        role.active
                    );
                }
                Some(r) => {
                    if reply_tx.send(r).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    };

    let worker_handles = handles.clone();
    let worker_inbox = inbox.clone();
    let peer_name = peer.name.clone();
    let io = SessionIo {
        rt: tokio::runtime::Handle::current(),
        deadline: peer_deadline(),
        frames: frame_tx,
        group: Vec::new(),
        group_bytes: 0,
        packer,
        plain: false,
        replies: reply_rx,
        acks: ack_rx,
        next_batch: 0,
        outstanding: Vec::new(),
        failures: Vec::new(),
        failure_reason: None,
        stamp: stamp.clone(),
    };
    let worker = tokio::task::spawn_blocking(move || sync_loop(&worker_handles, &peer_name, io, &worker_inbox, owners));

    let interrupt = inbox.clone();
    let result = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        r = write_task => r.map_err(|e| anyhow!("cannot write to the peer: {e}")),
        r = read_task => r.and_then(|()| Err(anyhow!("the peer closed the connection"))),
        // The peer's probe has had no answer for a while: the peer is
        // stopped, hung or cut off, and this session waits on it in vain
        // (see `heartbeat`).
        reason = live.silent(started) => {
            handles.telemetry.link(&peer.name, |l| {
                l.connected = false;
                l.last_error = Some(reason.clone());
            });
            Err(anyhow!("{reason}"))
        }
    };
    // Whatever ended the session, stop the worker. Its channels are closed, so
    // it stops at its next send or receive; one busy computing a delta is left
    // to finish on its own rather than hold up the reconnection.
    interrupt.interrupt();
    drop(handle);
    let worker_result = match tokio::time::timeout(Duration::from_secs(1), worker).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!(
                peer = peer.name,
                "the previous worker is still busy; reconnecting without it"
            );
            Ok(Err(anyhow!("the replication worker was still busy")))
        }
    };
    match (result, worker_result) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(Err(e))) if !cancel.is_cancelled() => Err(e),
        (Ok(()), _) if cancel.is_cancelled() => Ok(()),
        (Ok(()), Ok(_)) => Err(anyhow!("the replication worker stopped")),
        (Ok(()), Err(e)) => Err(anyhow!("the replication worker failed: {e}")),
    }
}

pub(super) fn check_peer_hello(handles: &Handles, peer: &Node, theirs: &Hello) -> Result<()> {
    if theirs.protocol != proto::PROTOCOL_VERSION {
        bail!(
            "the peer speaks protocol {}, this agent {}",
            theirs.protocol,
            proto::PROTOCOL_VERSION
        );
    }
    if theirs.node != peer.name {
        bail!("the peer says it is {:?}, expected {:?}", theirs.node, peer.name);
    }
    handles.live.compare_config(&peer.name, &theirs.config_hash);
    Ok(())
}

/// Adopts the newer role a peer reported (`by`), on a blocking thread: the
/// role persists and syncs before it publishes.
async fn adopt(role: &Arc<Role>, next: RoleState, by: String) -> Result<()> {
    let role = role.clone();
    tokio::task::spawn_blocking(move || role.adopt(next, "a peer has a newer epoch", &by))
        .await
        .map_err(|e| anyhow!("a blocking task failed: {e}"))??;
    Ok(())
}

/// [`PEER_DEADLINE`], or `WARMSPARE_PEER_DEADLINE_MS` from the environment
/// (for tests that stop a peer).
pub(super) fn peer_deadline() -> Duration {
    std::env::var("WARMSPARE_PEER_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(PEER_DEADLINE, Duration::from_millis)
}
