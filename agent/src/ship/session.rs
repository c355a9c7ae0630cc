//! One replication session: the hello that confirms a held active's
//! epoch, the async reader and writer beside the blocking worker
//! ([`SessionIo`]: grouped frames, bounded waits on the peer), and the
//! commit window (commits in flight, acknowledgements).

use super::*;

/// One connected session: hello, then the sync loop on a blocking thread.
pub(super) async fn session(
    shared: &Arc<Shared>,
    peer: &Node,
    dialed: ssh::Dialed,
    inbox: &Arc<Inbox>,
    live: &heartbeat::Liveness,
    cancel: &CancellationToken,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let ssh::Dialed { handle, stream } = dialed;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let hello = shared.hello(Purpose::Replicate);
    writer.send(&Request::Hello(hello)).await.context("cannot send hello")?;
    let theirs = match reader.recv::<Reply>().await.context("no hello from the peer")? {
        Some(Reply::Hello(h)) => h,
        Some(Reply::Refused { reason }) => bail!("the peer refused replication: {reason}"),
        Some(Reply::Stale(role)) => {
            // Fencing: the peer knows a newer epoch, so this node is not active any more.
            let (r, by) = (role.clone(), peer.name.clone());
            shared
                .off_runtime(move |s| s.adopt(r, "a peer has a newer epoch", &by))
                .await??;
            bail!(
                "{} reports epoch {} with {} active: this node stepped down",
                peer.name,
                role.epoch,
                role.active
            );
        }
        Some(other) => bail!("unexpected first reply {other:?}"),
        None => bail!("the peer closed the session before hello"),
    };
    check_peer_hello(shared, peer, &theirs)?;
    if shared.is_unconfirmed() {
        // The peer admitted this node as the active of its epoch: it holds
        // the same epoch naming this node (or adopted it from our hello).
        let mine = shared.role();
        if theirs.epoch == mine.epoch && theirs.active == shared.live.me.name {
            shared.confirm(&peer.name);
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

    let (frame_tx, mut frame_rx) = mpsc::channel::<Vec<Bytes>>(GROUPS_QUEUED);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(64);
    // A peer owes at most COMMITS_IN_FLIGHT acknowledgements; one that sends
    // more than this waits (and the worker's deadline ends the session).
    let (ack_tx, ack_rx) = mpsc::channel::<Reply>(COMMITS_IN_FLIGHT * 4);
    let bytes_sent = shared.bytes_sent.clone();

    let write_task = async move {
        while let Some(group) = frame_rx.recv().await {
            let mut n = 0;
            for frame in group
                .into_iter()
                .chain(std::iter::from_fn(|| frame_rx.try_recv().ok()).flatten())
            {
                n += frame.len() as u64 + 4;
                writer.feed(frame).await?;
            }
            writer.flush().await?;
            bytes_sent.fetch_add(n, Ordering::Relaxed);
        }
        Ok::<(), proto::FrameError>(())
    };
    let adopt_shared = shared.clone();
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
                Some(Reply::Refused { reason }) => bail!("the peer refused: {reason}"),
                Some(Reply::Stale(role)) => {
                    let (r, by) = (role.clone(), adopt_peer.clone());
                    adopt_shared
                        .off_runtime(move |s| s.adopt(r, "a peer has a newer epoch", &by))
                        .await??;
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

    let worker_shared = shared.clone();
    let worker_inbox = inbox.clone();
    let peer_name = peer.name.clone();
    let io = SessionIo {
        rt: tokio::runtime::Handle::current(),
        deadline: peer_deadline(),
        frames: frame_tx,
        group: Vec::new(),
        group_bytes: 0,
        replies: reply_rx,
        acks: ack_rx,
        next_batch: 0,
        outstanding: Vec::new(),
        failures: Vec::new(),
        failure_reason: None,
    };
    let worker = tokio::task::spawn_blocking(move || sync_loop(&worker_shared, &peer_name, io, &worker_inbox, owners));

    let interrupt = inbox.clone();
    let result = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        r = write_task => r.map_err(|e| anyhow!("cannot write to the peer: {e}")),
        r = read_task => r.and_then(|()| Err(anyhow!("the peer closed the connection"))),
        // The peer's probe has had no answer for a while: the peer is
        // stopped, hung or cut off, and this session waits on it in vain
        // (see `heartbeat`).
        reason = live.silent(started) => {
            shared.link(&peer.name, |l| {
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

pub(super) fn check_peer_hello(shared: &Shared, peer: &Node, theirs: &Hello) -> Result<()> {
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
    shared.live.compare_config(&peer.name, &theirs.config_hash);
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

/// The blocking worker's handles on the connection.
pub(super) struct SessionIo {
    /// The runtime the connection's tasks run on (the worker waits on its
    /// channels with a deadline).
    pub(super) rt: tokio::runtime::Handle,
    /// How long the worker waits for the peer (see [`PEER_DEADLINE`]).
    pub(super) deadline: Duration,
    pub(super) frames: mpsc::Sender<Vec<Bytes>>,
    /// Frames encoded and not yet handed to the writer (see [`GROUP_BYTES`]).
    pub(super) group: Vec<Bytes>,
    pub(super) group_bytes: usize,
    pub(super) replies: mpsc::Receiver<Reply>,
    pub(super) acks: mpsc::Receiver<Reply>,
    pub(super) next_batch: u64,
    /// Commits sent and not yet acknowledged.
    pub(super) outstanding: Vec<Outstanding>,
    /// Paths the peer could not apply, per watch, to forget in the model.
    pub(super) failures: Vec<(String, String)>,
    /// Why the first of them failed, as the peer said.
    pub(super) failure_reason: Option<String>,
}

/// Changes the peer could not apply, waiting to be sent again.
pub(super) struct Retry {
    pub(super) paths: BTreeSet<(String, String)>,
    pub(super) at: Option<Instant>,
    pub(super) backoff: Duration,
}

/// The peer went away while the worker was using the connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection closed")]
pub(super) struct Closed;

/// The peer answered nothing within the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the peer did not answer within {} s while the shipper waited for {what}", .1.as_secs(), what = .0)]
pub(super) struct Unanswered(&'static str, Duration);

impl SessionIo {
    /// Queues a request; it reaches the peer at the next [`SessionIo::flush`]
    /// at the latest.
    pub(super) fn send(&mut self, req: &Request) -> Result<u64> {
        let body = proto::encode(req)?;
        let n = body.len() as u64 + 4;
        self.group_bytes += body.len();
        self.group.push(body);
        if self.group_bytes >= GROUP_BYTES {
            self.flush()?;
        }
        Ok(n)
    }

    /// Hands every queued frame to the writer. Whatever waits for the peer
    /// calls this first: the peer cannot answer what it has not been sent.
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        self.group_bytes = 0;
        let group = std::mem::take(&mut self.group);
        let (frames, limit) = (&self.frames, self.deadline);
        match self.rt.block_on(tokio::time::timeout(limit, frames.send(group))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closed.into()),
            Err(_) => Err(Unanswered("room to send", limit).into()),
        }
    }

    pub(super) fn reply(&mut self) -> Result<Reply> {
        self.flush()?;
        let (replies, limit) = (&mut self.replies, self.deadline);
        match self.rt.block_on(tokio::time::timeout(limit, replies.recv())) {
            Ok(r) => Ok(r.ok_or(Closed)?),
            Err(_) => Err(Unanswered("a reply", limit).into()),
        }
    }

    pub(super) fn ack(&mut self) -> Result<Reply> {
        self.flush()?;
        let (acks, limit) = (&mut self.acks, self.deadline);
        match self.rt.block_on(tokio::time::timeout(limit, acks.recv())) {
            Ok(r) => Ok(r.ok_or(Closed)?),
            Err(_) => Err(Unanswered("an acknowledgement", limit).into()),
        }
    }
}

/// A commit sent and not yet acknowledged.
pub(super) struct Outstanding {
    pub(super) batch: u64,
    /// The watch its operations were about.
    pub(super) watch: String,
}

pub(super) fn fetch_manifest(io: &mut SessionIo, watch: &str) -> Result<Vec<Entry>> {
    io.send(&Request::GetManifest {
        watch: watch.to_string(),
    })?;
    let mut entries = Vec::new();
    loop {
        match io.reply()? {
            Reply::ManifestPart {
                watch: w,
                entries: mut part,
                last,
            } if w == watch => {
                manifest::check_peer_entries(&part).with_context(|| format!("the peer's manifest of {watch}"))?;
                entries.append(&mut part);
                if last {
                    return Ok(entries);
                }
            }
            other => bail!("expected a manifest of {watch}, got {other:?}"),
        }
    }
}

pub(super) fn emit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str, op: Op) -> Result<()> {
    let n = io.send(&Request::Op(op))?;
    stats.wire_bytes += n;
    stats.pending_bytes += n;
    maybe_commit(io, stats, watch)
}

pub(super) fn maybe_commit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str) -> Result<()> {
    stats.pending_ops += 1;
    stats.ops += 1;
    if stats.pending_ops >= OPS_PER_COMMIT || stats.pending_bytes >= BYTES_PER_COMMIT {
        flush_commit(io, stats, watch)?;
    }
    Ok(())
}

pub(super) fn flush_commit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str) -> Result<()> {
    if stats.pending_ops == 0 {
        return Ok(());
    }
    while io.outstanding.len() >= COMMITS_IN_FLIGHT {
        wait_ack(io, "")?;
    }
    let batch = io.next_batch;
    io.next_batch += 1;
    stats.wire_bytes += io.send(&Request::Commit { batch })?;
    io.outstanding.push(Outstanding {
        batch,
        watch: watch.to_string(),
    });
    stats.pending_ops = 0;
    stats.pending_bytes = 0;
    Ok(())
}

pub(super) fn wait_ack(io: &mut SessionIo, peer: &str) -> Result<()> {
    let Reply::Committed { batch, failed, .. } = io.ack()? else {
        return Err(Closed.into());
    };
    let pos = io
        .outstanding
        .iter()
        .position(|o| o.batch == batch)
        .ok_or_else(|| anyhow!("acknowledgement of unknown batch {batch}"))?;
    let done = io.outstanding.remove(pos);
    for (path, why) in failed {
        tracing::warn!(
            peer,
            watch = done.watch,
            path,
            reason = why,
            "the peer could not apply a change; it is sent again after a pause"
        );
        if io.failure_reason.is_none() {
            io.failure_reason = Some(why);
        }
        io.failures.push((done.watch.clone(), path));
    }
    Ok(())
}
