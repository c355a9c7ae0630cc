//! The worker's side of one replication session ([`SessionIo`]: frames
//! gathered into groups for the async writer, bounded waits on the peer),
//! the manifest fetch, and the commit window (commits in flight,
//! acknowledgements) with the batch's counters ([`BatchStats`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use tokio::sync::mpsc;
use warmspare_shared::compress::Packer;
use warmspare_shared::manifest::{self, ContentHash, Entry};
use warmspare_shared::proto::{self, Op, Reply, Request};

use crate::progress::Stamp;

/// The blocking worker's handles on the connection.
pub(super) struct SessionIo {
    /// The runtime the connection's tasks run on (the worker waits on its
    /// channels with a deadline).
    pub(super) rt: tokio::runtime::Handle,
    /// How long the worker waits for the peer (see [`PEER_DEADLINE`]).
    pub(super) deadline: Duration,
    pub(super) frames: mpsc::Sender<Group>,
    /// Frames encoded and not yet handed to the writer (see [`GROUP_BYTES`]),
    /// each with whether it goes through the compressor.
    pub(super) group: Vec<(Bytes, bool)>,
    pub(super) group_bytes: usize,
    /// The session's compressed stream, when the hellos agreed on
    /// compression (see `warmspare_shared::compress`).
    pub(super) packer: Option<Packer>,
    /// Set while a file's content that the probe found not worth
    /// compressing is being sent: its frames go as they are.
    pub(super) plain: bool,
    pub(super) replies: mpsc::Receiver<Reply>,
    pub(super) acks: mpsc::Receiver<Reply>,
    pub(super) next_batch: u64,
    /// Commits sent and not yet acknowledged.
    pub(super) outstanding: Vec<Outstanding>,
    /// Paths the peer could not apply, per watch, to forget in the model.
    pub(super) failures: Vec<(String, String)>,
    /// Why the first of them failed, as the peer said.
    pub(super) failure_reason: Option<String>,
    /// The shipper's progress stamp: every frame sent and every second of
    /// a wait on the peer stamps it (see [`crate::progress`]).
    pub(super) stamp: Arc<Stamp>,
}

/// Frames for the writer: what goes on the wire, and the bytes they stand
/// for before compression (lengths included), for the counters.
pub(super) struct Group {
    pub(super) frames: Vec<Bytes>,
    pub(super) raw: u64,
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
        self.stamp.stamp();
        let body = proto::encode(req)?;
        let n = body.len() as u64 + 4;
        self.group_bytes += body.len();
        self.group.push((body, !self.plain));
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
        let raw = group.iter().map(|(f, _)| f.len() as u64 + 4).sum();
        let frames = match &mut self.packer {
            Some(packer) => pack_group(packer, group)?,
            None => group.into_iter().map(|(f, _)| f).collect(),
        };
        let group = Group { frames, raw };
        let (frames, limit) = (&self.frames, self.deadline);
        match wait(&self.rt, &self.stamp, limit, frames.send(group)) {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(Closed.into()),
            None => Err(Unanswered("room to send", limit).into()),
        }
    }

    pub(super) fn reply(&mut self) -> Result<Reply> {
        self.flush()?;
        let (replies, limit) = (&mut self.replies, self.deadline);
        match wait(&self.rt, &self.stamp, limit, replies.recv()) {
            Some(r) => Ok(r.ok_or(Closed)?),
            None => Err(Unanswered("a reply", limit).into()),
        }
    }

    pub(super) fn ack(&mut self) -> Result<Reply> {
        self.flush()?;
        let (acks, limit) = (&mut self.acks, self.deadline);
        match wait(&self.rt, &self.stamp, limit, acks.recv()) {
            Some(r) => Ok(r.ok_or(Closed)?),
            None => Err(Unanswered("an acknowledgement", limit).into()),
        }
    }
}

/// A group's frames as they go on the wire: each run of frames that go
/// through the compressor becomes packed frames of at most
/// [`proto::PACK_MAX`] bytes; the others (a file's content not worth
/// compressing, a frame larger than that) go as they are, in their place.
fn pack_group(packer: &mut Packer, group: Vec<(Bytes, bool)>) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut run: Vec<Bytes> = Vec::new();
    let mut run_bytes = 0;
    for (frame, packable) in group {
        let n = frame.len() + 4;
        let ends_run = !packable || n > proto::PACK_MAX || run_bytes + n > proto::PACK_MAX;
        if ends_run && !run.is_empty() {
            out.push(proto::pack(packer, &run)?);
            run.clear();
            run_bytes = 0;
        }
        if !packable || n > proto::PACK_MAX {
            out.push(frame);
        } else {
            run_bytes += n;
            run.push(frame);
        }
    }
    if !run.is_empty() {
        out.push(proto::pack(packer, &run)?);
    }
    Ok(out)
}

/// How often a wait on the peer comes round to stamp the shipper's progress.
const WAIT_ROUND: Duration = Duration::from_secs(1);

/// Runs `fut` on `rt` for at most `limit` (`None` when the time ran out),
/// stamping `stamp` every [`WAIT_ROUND`] meanwhile: a worker waiting on a
/// slow but answering peer is waiting, not hung.
fn wait<F: std::future::Future>(
    rt: &tokio::runtime::Handle,
    stamp: &Stamp,
    limit: Duration,
    fut: F,
) -> Option<F::Output> {
    let deadline = Instant::now() + limit;
    let mut fut = std::pin::pin!(fut);
    loop {
        stamp.stamp();
        let left = deadline.saturating_duration_since(Instant::now());
        match rt.block_on(tokio::time::timeout(left.min(WAIT_ROUND), fut.as_mut())) {
            Ok(out) => return Some(out),
            Err(_) if left <= WAIT_ROUND => return None,
            Err(_) => {}
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

/// Ops per commit, and bytes per commit, before a commit is sent.
pub(super) const OPS_PER_COMMIT: usize = 4000;
pub(super) const BYTES_PER_COMMIT: u64 = 32 * 1024 * 1024;
/// Commits in flight before the shipper waits for an acknowledgement.
pub(super) const COMMITS_IN_FLIGHT: usize = 4;
/// Bytes of encoded frames the worker gathers before it hands them to the
/// connection's writer as one group (sooner when it is about to wait for
/// the peer). One hand-off per frame woke the writer's task three times
/// per small file: 10% of the worker's time went to waking it.
pub(super) const GROUP_BYTES: usize = 64 * 1024;
/// Groups queued for the writer before the worker waits for it.
pub(super) const GROUPS_QUEUED: usize = 32;
/// The longest the worker waits for the peer: a reply (a manifest part, a
/// signature), an acknowledgement, or room in the writer's queue. A peer
/// that is connected but answers nothing for this long (a stopped process,
/// a hung disk) ends the session with an error in status, and the shipper
/// dials again. Generous: the slowest honest answer is a commit of 32 MiB
/// made durable, or the signature of a large file, on a loaded disk.
pub(super) const PEER_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Default)]
pub(super) struct BatchStats {
    pub(super) ops: u64,
    pub(super) files: u64,
    pub(super) wire_bytes: u64,
    pub(super) pending_ops: usize,
    pub(super) pending_bytes: u64,
    /// Files shipped (with their hash) and paths removed, per watch.
    pub(super) touched: Vec<(String, String, Option<ContentHash>)>,
    /// Prefixes compared, per watch (what [`Unreadable`] learnt anew).
    pub(super) scanned: Vec<(String, String)>,
    /// Paths this node could not read (or that are not regular files any
    /// more when opened), with why, per watch: the peer's copies there are
    /// left alone.
    pub(super) unreadable: Vec<(String, String, String)>,
}

#[cfg(test)]
mod tests;
