//! The active side of replication: one shipper per passive peer.
//!
//! A shipper keeps one SSH connection to its peer, reconnecting with capped
//! exponential backoff. On every (re)connect it fetches the peer's manifest
//! of each watch and ships the differences; after that it ships what the
//! watcher reports, comparing against its model of the peer's tree (the
//! manifest, updated by every acknowledged commit). The comparison and the
//! file reading run on a blocking thread; frames go to the connection
//! through a bounded queue, so a slow peer slows only its own shipper.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warmspare_shared::config::Node;
use warmspare_shared::delta;
use warmspare_shared::manifest::{self, ContentHash, Entry, EntryKind, HashCache, Hashing, Meta};
use warmspare_shared::proto::{self, FrameReader, FrameWriter, Hello, Op, Purpose, Reply, Request, CHUNK};
use warmspare_shared::ssh;

use crate::events::{Inbox, Work};
use crate::heartbeat;
use crate::live::LocalWatch;
use crate::node::Shared;

/// How often a connected shipper compares whole trees even without events.
const FULL_RESYNC: Duration = Duration::from_secs(600);
/// The first and the longest wait before changes the peer could not apply
/// (a full disk, say) are sent again.
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// The deletion guard counts the removals of this long together.
const DELETE_WINDOW: Duration = Duration::from_secs(60);
/// How often a watch root that failed its check is looked at again.
const ROOT_RECHECK: Duration = Duration::from_secs(2);
/// Ops per commit, and bytes per commit, before a commit is sent.
const OPS_PER_COMMIT: usize = 4000;
const BYTES_PER_COMMIT: u64 = 32 * 1024 * 1024;
/// Commits in flight before the shipper waits for an acknowledgement.
const COMMITS_IN_FLIGHT: usize = 4;
/// Bytes of encoded frames the worker gathers before it hands them to the
/// connection's writer as one group (sooner when it is about to wait for
/// the peer). One hand-off per frame woke the writer's task three times
/// per small file: 10% of the worker's time went to waking it.
const GROUP_BYTES: usize = 64 * 1024;
/// Groups queued for the writer before the worker waits for it.
const GROUPS_QUEUED: usize = 32;
/// The longest the worker waits for the peer: a reply (a manifest part, a
/// signature), an acknowledgement, or room in the writer's queue. A peer
/// that is connected but answers nothing for this long (a stopped process,
/// a hung disk) ends the session with an error in status, and the shipper
/// dials again. Generous: the slowest honest answer is a commit of 32 MiB
/// made durable, or the signature of a large file, on a loaded disk.
const PEER_DEADLINE: Duration = Duration::from_secs(120);

/// The first and the longest wait before dialing a peer again after a
/// failure (each with a jitter of a quarter either way). A peer coming back
/// is dialed sooner: its probe wakes the shipper (see [`crate::heartbeat`]).
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(5);
/// The longest a dial of the replication session may take.
const DIAL_LIMIT: Duration = Duration::from_secs(10);

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
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session: hello, then the sync loop on a blocking thread.
async fn session(
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

fn check_peer_hello(shared: &Shared, peer: &Node, theirs: &Hello) -> Result<()> {
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
fn peer_deadline() -> Duration {
    std::env::var("WARMSPARE_PEER_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(PEER_DEADLINE, Duration::from_millis)
}

/// The blocking worker's handles on the connection.
struct SessionIo {
    /// The runtime the connection's tasks run on (the worker waits on its
    /// channels with a deadline).
    rt: tokio::runtime::Handle,
    /// How long the worker waits for the peer (see [`PEER_DEADLINE`]).
    deadline: Duration,
    frames: mpsc::Sender<Vec<Bytes>>,
    /// Frames encoded and not yet handed to the writer (see [`GROUP_BYTES`]).
    group: Vec<Bytes>,
    group_bytes: usize,
    replies: mpsc::Receiver<Reply>,
    acks: mpsc::Receiver<Reply>,
    next_batch: u64,
    /// Commits sent and not yet acknowledged.
    outstanding: Vec<Outstanding>,
    /// Paths the peer could not apply, per watch, to forget in the model.
    failures: Vec<(String, String)>,
    /// Why the first of them failed, as the peer said.
    failure_reason: Option<String>,
}

/// Changes the peer could not apply, waiting to be sent again.
struct Retry {
    paths: BTreeSet<(String, String)>,
    at: Option<Instant>,
    backoff: Duration,
}

/// The peer went away while the worker was using the connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection closed")]
struct Closed;

/// The peer answered nothing within the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the peer did not answer within {} s while the shipper waited for {what}", .1.as_secs(), what = .0)]
struct Unanswered(&'static str, Duration);

impl SessionIo {
    /// Queues a request; it reaches the peer at the next [`SessionIo::flush`]
    /// at the latest.
    fn send(&mut self, req: &Request) -> Result<u64> {
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
    fn flush(&mut self) -> Result<()> {
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

    fn reply(&mut self) -> Result<Reply> {
        self.flush()?;
        let (replies, limit) = (&mut self.replies, self.deadline);
        match self.rt.block_on(tokio::time::timeout(limit, replies.recv())) {
            Ok(r) => Ok(r.ok_or(Closed)?),
            Err(_) => Err(Unanswered("a reply", limit).into()),
        }
    }

    fn ack(&mut self) -> Result<Reply> {
        self.flush()?;
        let (acks, limit) = (&mut self.acks, self.deadline);
        match self.rt.block_on(tokio::time::timeout(limit, acks.recv())) {
            Ok(r) => Ok(r.ok_or(Closed)?),
            Err(_) => Err(Unanswered("an acknowledgement", limit).into()),
        }
    }
}

/// A commit sent and not yet acknowledged.
struct Outstanding {
    batch: u64,
    /// The watch its operations were about.
    watch: String,
}

/// What the shipper believes the peer holds at one path (the path is the
/// key it is stored under: an [`Entry`] would keep it twice, and with 100,000
/// files per watch the model is the agent's largest structure).
#[derive(Debug, Clone)]
struct Held {
    kind: EntryKind,
    meta: Meta,
}

impl Held {
    fn of(e: &Entry) -> Held {
        Held {
            kind: e.kind.clone(),
            meta: e.meta,
        }
    }
}

/// The peer's entries of one watch, by path.
type Remote = BTreeMap<Box<str>, Held>;

/// The shipper's picture of one peer: what it holds, per watch.
type Model = HashMap<String, Remote>;

/// Rebuilds `remote` with full nodes. Entries inserted one at a time in
/// order (as a full comparison with an empty peer does) leave every node
/// about half full: 16.6 MiB of nodes for 100,000 files, against about
/// 10 MiB when built from the sorted entries in one go.
fn compact(remote: &mut Remote) {
    *remote = std::mem::take(remote).into_iter().collect();
}

fn sync_loop(shared: &Shared, peer: &str, mut io: SessionIo, inbox: &Inbox, owners: bool) -> Result<()> {
    let watches = shared.live.local_watches();
    let mut caches: HashMap<String, HashCache> = watches
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                HashCache::load(&shared.live.cache_path(&w.name, "send")),
            )
        })
        .collect();
    let mut model: Model = HashMap::new();
    // Watches whose hash cache waits on disk between full comparisons (see
    // below); their in-memory cache holds only what was learnt since.
    let mut on_disk: std::collections::HashSet<String> = std::collections::HashSet::new();
    for w in &watches {
        inbox.add_full(&w.name);
    }
    let mut retry = Retry {
        paths: BTreeSet::new(),
        at: None,
        backoff: RETRY_MIN,
    };
    let mut next_full = Instant::now() + FULL_RESYNC;
    // Watches whose root failed its check: nothing of theirs ships until it
    // passes again (looked at every ROOT_RECHECK), then they are compared whole.
    let mut bad_roots: BTreeSet<String> = BTreeSet::new();
    let mut root_recheck: Option<Instant> = None;
    // Removals the deletion guard holds, per watch: path, files under it.
    let mut held: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    // Files removed on the peer per watch in the last DELETE_WINDOW: an `rm
    // -r` slower than the debounce arrives in several batches, and the guard
    // counts them together.
    let mut removed_lately: HashMap<String, Vec<(Instant, u64)>> = HashMap::new();
    let mut unreadable = Unreadable::default();
    loop {
        if shared.is_paused() {
            inbox.wait_interrupt(Duration::from_secs(1));
            if io.frames.is_closed() {
                return Err(Closed.into());
            }
            continue;
        }
        if retry.at.is_some_and(|at| Instant::now() >= at) {
            retry.at = None;
            for (watch, path) in std::mem::take(&mut retry.paths) {
                if path.is_empty() {
                    // The peer left failures out of an acknowledgement (see
                    // `proto::bound_failures`): compare the whole watch,
                    // with a fresh manifest of the peer.
                    inbox.add_full(&watch);
                } else {
                    inbox.add_paths(&watch, [path]);
                }
            }
        }
        if root_recheck.is_some_and(|at| Instant::now() >= at) {
            root_recheck = None;
            bad_roots.retain(|name| {
                let Some(w) = watches.iter().find(|w| &w.name == name) else {
                    return false;
                };
                if shared.roots.verify(&w.name, &w.root).is_ok() {
                    inbox.add_full(&w.name);
                    return false;
                }
                true
            });
            if !bad_roots.is_empty() {
                root_recheck = Some(Instant::now() + ROOT_RECHECK);
            }
        }
        let wake = retry.at.map_or(next_full, |at| at.min(next_full));
        let wake = root_recheck.map_or(wake, |at| at.min(wake));
        // At most a second at a time: an interrupt that came while the
        // worker was busy is not seen by `take`, and a closed connection
        // must end the worker (or the agent could not stop).
        if io.frames.is_closed() {
            return Err(Closed.into());
        }
        let wait = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let work = match inbox.take(wait) {
            Some(w) => w,
            None if io.frames.is_closed() => return Err(Closed.into()),
            None if shared.is_paused() || Instant::now() < next_full => continue,
            None => {
                // Periodic safety net: compare everything.
                let mut w = Work::default();
                w.full.extend(watches.iter().map(|w| w.name.clone()));
                w
            }
        };
        if !work.full.is_empty() {
            next_full = Instant::now() + FULL_RESYNC;
        }
        shared.link(peer, |l| l.in_progress = Some(work.clone()));
        let started = Instant::now();
        let mut stats = BatchStats::default();
        let mut settled: Vec<(String, Vec<(String, ContentHash)>)> = Vec::new();
        // Files a full comparison left on the peer because the guard held their removal.
        let mut held_except: Vec<(String, Vec<String>)> = Vec::new();
        let result = (|| -> Result<()> {
            for w in &watches {
                let full = work.full.contains(&w.name);
                let paths = work.paths.get(&w.name);
                if !full && paths.is_none() {
                    continue;
                }
                if w.verify_root && shared.roots.verify(&w.name, &w.root).is_err() {
                    // Never ship a tree from a root that failed its check:
                    // it would look empty and empty the peer. The error is
                    // logged, and shown in status, metrics and `check`.
                    bad_roots.insert(w.name.clone());
                    root_recheck.get_or_insert_with(|| Instant::now() + ROOT_RECHECK);
                    continue;
                }
                let cache = caches.entry(w.name.clone()).or_default();
                if full && on_disk.remove(&w.name) {
                    let since = std::mem::take(cache);
                    *cache = HashCache::load(&shared.live.cache_path(&w.name, "send"));
                    cache.absorb(since);
                }
                if full || !model.contains_key(&w.name) {
                    let remote = fetch_manifest(&mut io, &w.name)?;
                    model.insert(
                        w.name.clone(),
                        remote
                            .into_iter()
                            .map(|e| {
                                let held = Held::of(&e);
                                (e.path.into_boxed_str(), held)
                            })
                            .collect(),
                    );
                }
                let prefixes: Vec<String> = if full {
                    vec![String::new()]
                } else {
                    top_most(paths.into_iter().flatten())
                };
                let remote = model.entry(w.name.clone()).or_default();
                let plans: Vec<Plan> = prefixes.iter().map(|p| plan_prefix(w, p, cache, remote)).collect();
                // The deletion guard: counted against the peer's files in
                // this watch, over the whole batch.
                let deleting: u64 = plans
                    .iter()
                    .flat_map(|p| &p.removals)
                    .filter(|r| r.deletion)
                    .map(|r| r.files)
                    .sum();
                let peer_files = remote
                    .values()
                    .filter(|h| matches!(h.kind, EntryKind::File { .. }))
                    .count() as u64;
                let allowed = full && shared.take_allow_deletes(peer, &w.name);
                let lately = removed_lately.entry(w.name.clone()).or_default();
                lately.retain(|(at, _)| at.elapsed() < DELETE_WINDOW);
                let before: u64 = lately.iter().map(|(_, n)| n).sum();
                let hold = !allowed && deleting > 0 && w.max_delete.holds(before + deleting, peer_files + before);
                if !hold && deleting > 0 {
                    lately.push((Instant::now(), deleting));
                }
                let held_here = held.entry(w.name.clone()).or_default();
                if full {
                    held_here.clear();
                } else {
                    held_here.retain(|path, _| !prefixes.iter().any(|p| manifest::is_under(path, p)));
                }
                if hold {
                    tracing::error!(
                        peer,
                        watch = w.name,
                        files = deleting,
                        of = peer_files,
                        limit = %w.max_delete,
                        "deletions held: this would remove more of the peer's files than max_delete allows; \
                         nothing is removed until `warmsparectl resync --watch {} --allow-deletes`",
                        w.name
                    );
                } else if allowed && deleting > 0 {
                    tracing::warn!(
                        peer,
                        watch = w.name,
                        files = deleting,
                        "removing what the deletion guard held, as the operator allowed"
                    );
                }
                let mut except: Vec<String> = Vec::new();
                for mut plan in plans {
                    if hold {
                        plan.removals.retain(|r| {
                            if r.deletion {
                                held_here.insert(r.path.clone(), r.files);
                                except.extend(
                                    manifest::subtree(remote, &r.path)
                                        .filter(|(_, h)| matches!(h.kind, EntryKind::File { .. }))
                                        .map(|(p, _)| p.to_string()),
                                );
                            }
                            !r.deletion
                        });
                    }
                    let local = ship_prefix(&mut io, w, plan, cache, remote, &mut stats, owners)?;
                    if full {
                        settled.push((w.name.clone(), local));
                    }
                }
                if full {
                    held_except.push((w.name.clone(), except));
                }
                let count: u64 = held_here.values().sum();
                shared.link(peer, |l| {
                    if count == 0 {
                        l.deletions_held.remove(&w.name);
                    } else {
                        l.deletions_held.insert(w.name.clone(), count);
                    }
                });
                flush_commit(&mut io, &mut stats, &w.name)?;
            }
            while !io.outstanding.is_empty() {
                wait_ack(&mut io, peer)?;
            }
            // Full comparisons applied: both sides agree on every file but
            // the failures and what this node could not read.
            for (watch, _) in &settled {
                let except: Vec<String> = io
                    .failures
                    .iter()
                    .filter(|(w, _)| w == watch)
                    .map(|(_, p)| p.clone())
                    .chain(
                        held_except
                            .iter()
                            .filter(|(w, _)| w == watch)
                            .flat_map(|(_, e)| e.iter().cloned()),
                    )
                    .chain(
                        stats
                            .unreadable
                            .iter()
                            .filter(|(w, _, _)| w == watch)
                            .map(|(_, p, _)| p.clone()),
                    )
                    .collect();
                io.send(&Request::Op(Op::Settled {
                    watch: watch.clone(),
                    except,
                }))?;
            }
            // The loop waits for the next work after this: nothing may stay queued.
            io.flush()
        })();
        for (name, cache) in caches.iter_mut() {
            // A partial cache must not replace the whole one on disk.
            if on_disk.contains(name) {
                continue;
            }
            if let Err(e) = cache.save(&shared.live.cache_path(name, "send")) {
                tracing::warn!(watch = name, error = %e, "cannot save the hash cache");
            }
        }
        let failures: Vec<(String, String)> = io.failures.drain(..).collect();
        // What the peer could not apply is forgotten, so the next comparison resends it.
        for (watch, path) in &failures {
            if let Some(m) = model.get_mut(watch) {
                remote_remove_tree(m, path);
            }
        }
        if let Err(e) = result {
            inbox.put_back(work);
            shared.link(peer, |l| l.in_progress = None);
            return Err(e);
        }
        unreadable.update(&stats);
        let unread: Vec<(String, String)> = stats
            .unreadable
            .iter()
            .map(|(w, p, _)| (w.clone(), p.clone()))
            .collect();
        record_agreement(shared, &stats.touched, &settled, &[&failures[..], &unread[..]].concat());
        if !work.full.is_empty() {
            // A full comparison's scans and manifests are gone: give the memory back.
            drop(settled);
            for name in &work.full {
                if let Some(remote) = model.get_mut(name) {
                    compact(remote);
                }
                // The hash cache is only read in bulk by the next full
                // comparison (events hash the files they name, which
                // changed): it waits on disk, just saved, until then. With
                // 100,000 files that is 15 MB less while idle.
                if let Some(cache) = caches.get_mut(name) {
                    if !cache.is_dirty() {
                        *cache = HashCache::default();
                        on_disk.insert(name.clone());
                    }
                }
            }
            warmspare_shared::sys::release_free_memory();
        }
        if stats.ops > 0 {
            tracing::info!(
                peer,
                ops = stats.ops,
                files = stats.files,
                wire_bytes = stats.wire_bytes,
                ms = started.elapsed().as_millis() as u64,
                "batch replicated"
            );
        }
        let unapplied = if failures.is_empty() {
            retry.backoff = RETRY_MIN;
            unreadable.summary()
        } else {
            let wait = retry.backoff;
            retry.paths.extend(failures.iter().cloned());
            retry.at = Some(Instant::now() + wait);
            retry.backoff = (wait * 2).min(RETRY_MAX);
            let (watch, path) = &failures[0];
            Some(format!(
                "{} change(s) not applied on {peer}, first {watch}/{path}: {}; retrying in {} s",
                failures.len(),
                io.failure_reason.take().unwrap_or_default(),
                wait.as_secs()
            ))
        };
        let now = std::time::SystemTime::now();
        shared.link(peer, |l| {
            l.in_progress = None;
            l.last_error = unapplied;
            l.done_generation = l.done_generation.max(work.generation);
            for w in work.full.iter().chain(work.paths.keys()) {
                // A watch whose root failed its check shipped nothing.
                if !bad_roots.contains(w) {
                    l.last_success.insert(w.clone(), now);
                }
            }
        });
    }
}

/// Records in the ledger what the peer acknowledged (for divergence checks
/// after a role change).
fn record_agreement(
    shared: &Shared,
    touched: &[(String, String, Option<ContentHash>)],
    settled: &[(String, Vec<(String, ContentHash)>)],
    failures: &[(String, String)],
) {
    let failed = |w: &str, p: &str| failures.iter().any(|(fw, fp)| fw == w && manifest::is_under(p, fp));
    let mut ledgers = shared.ledgers.lock().unwrap_or_else(|p| p.into_inner());
    for (watch, local) in settled {
        let entries = local.iter().filter(|(p, _)| !failed(watch, p)).cloned();
        ledgers.watch(watch).reset(entries);
    }
    for (watch, path, hash) in touched {
        if failed(watch, path) {
            continue;
        }
        match hash {
            Some(h) => ledgers.watch(watch).set(path, *h),
            None => ledgers.watch(watch).forget_tree(path),
        }
    }
    if let Err(e) = ledgers.save_if_due(Duration::from_secs(2)) {
        tracing::warn!(error = %e, "cannot save the sync ledger");
    }
}

#[derive(Default)]
struct BatchStats {
    ops: u64,
    files: u64,
    wire_bytes: u64,
    pending_ops: usize,
    pending_bytes: u64,
    /// Files shipped (with their hash) and paths removed, per watch.
    touched: Vec<(String, String, Option<ContentHash>)>,
    /// Prefixes compared, per watch (what [`Unreadable`] learnt anew).
    scanned: Vec<(String, String)>,
    /// Paths this node could not read (or that are not regular files any
    /// more when opened), with why, per watch: the peer's copies there are
    /// left alone.
    unreadable: Vec<(String, String, String)>,
}

/// The paths of this node that could not be read, as last seen, per watch
/// and path: reported in the link's status until a comparison reads them.
#[derive(Default)]
struct Unreadable {
    paths: BTreeMap<(String, String), String>,
}

impl Unreadable {
    /// Takes in a batch's findings: what it compared is replaced by what it
    /// found there.
    fn update(&mut self, stats: &BatchStats) {
        for (watch, prefix) in &stats.scanned {
            self.paths
                .retain(|(w, p), _| w != watch || !manifest::is_under(p, prefix));
        }
        for (watch, path, why) in &stats.unreadable {
            self.paths.insert((watch.clone(), path.clone()), why.clone());
        }
    }

    /// A line for the link's `last_error`, when anything is unreadable.
    fn summary(&self) -> Option<String> {
        let ((watch, path), why) = self.paths.iter().next()?;
        Some(format!(
            "{} path(s) cannot be read on this node, first {watch}/{path}: {why}; the peer's copies are kept",
            self.paths.len()
        ))
    }
}

fn fetch_manifest(io: &mut SessionIo, watch: &str) -> Result<Vec<Entry>> {
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

/// The paths of `paths` that have no ancestor in the set.
fn top_most<'a>(paths: impl Iterator<Item = &'a String>) -> Vec<String> {
    let sorted: BTreeSet<&String> = paths.collect();
    let mut out: Vec<String> = Vec::new();
    for p in sorted {
        if out.last().is_some_and(|last| manifest::is_under(p, last)) {
            continue;
        }
        out.push(p.clone());
    }
    out
}

/// One prefix of a batch, scanned and compared, before anything is sent.
struct Plan {
    /// The prefix compared.
    prefix: String,
    scan: manifest::Scan,
    /// What this node could not read there (path, why): kept on the peer.
    unreadable: Vec<(String, String)>,
    /// What the peer has there that must go, top-most only.
    removals: Vec<Removal>,
}

/// One path the peer must remove.
struct Removal {
    path: String,
    /// Nothing is there locally (a deletion, which the guard counts), as
    /// opposed to something of another type taking its place.
    deletion: bool,
    /// Regular files the peer holds at or under it.
    files: u64,
}

/// Scans `prefix` locally and lists what the peer must remove under it.
fn plan_prefix(w: &LocalWatch, prefix: &str, cache: &mut HashCache, remote: &Remote) -> Plan {
    // A file is read before it is sent only when the peer has a file of the
    // same size there (the hashes decide whether to send it); the others are
    // sent anyway, and hashed as they are read to be sent.
    let same_size_there = |path: &str, size: u64| {
        remote
            .get(path)
            .is_some_and(|r| matches!(r.kind, EntryKind::File { size: s, .. } if s == size))
    };
    let scan = manifest::scan_with(&w.root, prefix, &w.excludes, cache, Hashing::Only(&same_size_there));
    // What could not be read is unknown, not gone: the peer's copies at and
    // below those paths are left alone (no removal, no replacement).
    let mut unknown: Vec<&str> = Vec::new();
    let mut unreadable: Vec<(String, String)> = Vec::new();
    for s in &scan.skipped {
        tracing::warn!(watch = w.name, skipped = ?s, "not replicated");
        if let Some(p) = s.unknown_path() {
            unknown.push(p);
            let why = match s {
                manifest::Skipped::Unreadable(_, why) => why.clone(),
                _ => "not a regular file, directory or link".to_string(),
            };
            unreadable.push((p.to_string(), why));
        }
    }
    let local: BTreeMap<&str, &Entry> = scan.entries.iter().map(|e| (e.path.as_str(), e)).collect();

    // What the peer has that we do not, or of another type.
    let mut removals: Vec<Removal> = Vec::new();
    for (path, r) in manifest::subtree(remote, prefix) {
        let path: &str = path;
        let is_file = matches!(r.kind, EntryKind::File { .. });
        if let Some(last) = removals.last_mut().filter(|last| manifest::is_under(path, &last.path)) {
            last.files += u64::from(is_file);
            continue;
        }
        let (gone, deletion) = match local.get(path) {
            None => (true, true),
            Some(l) => (
                kind_tag(&l.kind) != kind_tag(&r.kind) && !(matches!(l.kind, EntryKind::File { .. }) && is_file),
                false,
            ),
        };
        if unknown.iter().any(|u| manifest::is_under(path, u)) {
            tracing::debug!(watch = w.name, path, "kept on the peer: this node cannot read it");
            continue;
        }
        if gone {
            removals.push(Removal {
                path: path.to_string(),
                deletion,
                files: u64::from(is_file),
            });
        }
    }
    drop(local);
    drop(unknown);
    Plan {
        prefix: prefix.to_string(),
        scan,
        removals,
        unreadable,
    }
}

fn ship_prefix(
    io: &mut SessionIo,
    w: &LocalWatch,
    plan: Plan,
    cache: &mut HashCache,
    remote: &mut Remote,
    stats: &mut BatchStats,
    owners: bool,
) -> Result<Vec<(String, ContentHash)>> {
    let Plan {
        prefix,
        scan,
        removals,
        unreadable,
    } = plan;
    stats.scanned.push((w.name.clone(), prefix));
    for (path, why) in unreadable {
        stats.unreadable.push((w.name.clone(), path, why));
    }
    let local: BTreeMap<&str, &Entry> = scan.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut changed_parents: BTreeSet<String> = BTreeSet::new();
    for Removal { path, .. } in removals {
        stats.touched.push((w.name.clone(), path.clone(), None));
        emit(
            io,
            stats,
            &w.name,
            Op::Remove {
                watch: w.name.clone(),
                path: path.clone(),
            },
        )?;
        remote_remove_tree(remote, &path);
        changed_parents.insert(parent_of(&path));
    }

    // 2. Directories, links and files, parents first (the scan is sorted).
    // The hashes of files sent without being read first, by position.
    let mut learned: HashMap<usize, ContentHash> = HashMap::new();
    for (i, l) in scan.entries.iter().enumerate() {
        let r = remote.get(l.path.as_str());
        match &l.kind {
            EntryKind::Dir => {
                if r.is_none_or(|r| !l.meta.same_as(&r.meta, &l.kind, owners)) {
                    if r.is_none() {
                        changed_parents.insert(parent_of(&l.path));
                    }
                    emit(
                        io,
                        stats,
                        &w.name,
                        Op::Dir {
                            watch: w.name.clone(),
                            path: l.path.clone(),
                            meta: l.meta,
                        },
                    )?;
                    remote.insert(l.path.as_str().into(), Held::of(l));
                }
            }
            EntryKind::Symlink { target } => {
                if r.is_none_or(|r| r.kind != l.kind || !l.meta.same_as(&r.meta, &l.kind, owners)) {
                    changed_parents.insert(parent_of(&l.path));
                    emit(
                        io,
                        stats,
                        &w.name,
                        Op::Symlink {
                            watch: w.name.clone(),
                            path: l.path.clone(),
                            target: target.clone(),
                            meta: l.meta,
                        },
                    )?;
                    remote.insert(l.path.as_str().into(), Held::of(l));
                }
            }
            EntryKind::File { size, hash } => match r {
                Some(r) if r.kind == l.kind => {
                    if !l.meta.same_as(&r.meta, &l.kind, owners) {
                        emit(
                            io,
                            stats,
                            &w.name,
                            Op::SetMeta {
                                watch: w.name.clone(),
                                path: l.path.clone(),
                                meta: l.meta,
                            },
                        )?;
                        remote.insert(l.path.as_str().into(), Held::of(l));
                    }
                }
                _ => {
                    changed_parents.insert(parent_of(&l.path));
                    let base = match r.map(|r| &r.kind) {
                        Some(EntryKind::File { size: rsize, .. }) if delta::worth_a_delta(*rsize, *size) => {
                            Some(*rsize)
                        }
                        _ => None,
                    };
                    let known = (!scan.is_unhashed(i)).then_some(*hash);
                    let out = Outgoing {
                        entry: l,
                        size: *size,
                        hash: known,
                        remote_size: base,
                    };
                    let Some((size, hash, meta)) = ship_file(io, w, cache, out, stats)? else {
                        continue; // Gone since the scan, or unreadable.
                    };
                    if known.is_none() {
                        learned.insert(i, hash);
                    }
                    stats.touched.push((w.name.clone(), l.path.clone(), Some(hash)));
                    remote.insert(
                        l.path.as_str().into(),
                        Held {
                            kind: EntryKind::File { size, hash },
                            meta,
                        },
                    );
                    stats.files += 1;
                    maybe_commit(io, stats, &w.name)?;
                }
            },
        }
    }

    // 3. Parent directories get their metadata (and mtime) back after the changes.
    for dir in changed_parents {
        if dir.is_empty() {
            continue;
        }
        if let Some(l) = local
            .get(dir.as_str())
            .copied()
            .cloned()
            .or_else(|| stat_dir(&w.root, &dir))
        {
            emit(
                io,
                stats,
                &w.name,
                Op::Dir {
                    watch: w.name.clone(),
                    path: dir.clone(),
                    meta: l.meta,
                },
            )?;
            remote.insert(dir.as_str().into(), Held::of(&l));
        }
    }
    Ok(scan
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let hash = if scan.is_unhashed(i) {
                *learned.get(&i)?
            } else {
                e.hash()?
            };
            Some((e.path.clone(), hash))
        })
        .collect())
}

fn stat_dir(root: &Path, rel: &str) -> Option<Entry> {
    let md = fs::symlink_metadata(root.join(rel)).ok()?;
    md.is_dir().then(|| Entry {
        path: rel.to_string(),
        kind: EntryKind::Dir,
        meta: Meta::from_metadata(&md),
    })
}

fn parent_of(path: &str) -> String {
    path.rsplit_once('/').map(|(p, _)| p.to_string()).unwrap_or_default()
}

fn kind_tag(k: &EntryKind) -> u8 {
    match k {
        EntryKind::Dir => 0,
        EntryKind::File { .. } => 1,
        EntryKind::Symlink { .. } => 2,
    }
}

fn remote_remove_tree(remote: &mut Remote, path: &str) {
    let doomed: Vec<Box<str>> = manifest::subtree(remote, path).map(|(p, _)| p.clone()).collect();
    for p in doomed {
        remote.remove(&p);
    }
}

fn emit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str, op: Op) -> Result<()> {
    let n = io.send(&Request::Op(op))?;
    stats.wire_bytes += n;
    stats.pending_bytes += n;
    maybe_commit(io, stats, watch)
}

fn maybe_commit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str) -> Result<()> {
    stats.pending_ops += 1;
    stats.ops += 1;
    if stats.pending_ops >= OPS_PER_COMMIT || stats.pending_bytes >= BYTES_PER_COMMIT {
        flush_commit(io, stats, watch)?;
    }
    Ok(())
}

fn flush_commit(io: &mut SessionIo, stats: &mut BatchStats, watch: &str) -> Result<()> {
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

fn wait_ack(io: &mut SessionIo, peer: &str) -> Result<()> {
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

/// A file to send, as the scan saw it.
struct Outgoing<'a> {
    entry: &'a Entry,
    size: u64,
    /// Its hash, unless the scan left it unread (it is learned here).
    hash: Option<ContentHash>,
    /// The size of the peer's file there, when a delta against it may pay.
    remote_size: Option<u64>,
}

/// A file's size and content hash as read now, and its content when it is
/// small enough to keep for sending.
struct Learned {
    size: u64,
    hash: ContentHash,
    content: Option<Vec<u8>>,
}

/// Reads `file` to learn its hash (and, for one chunk or less, keeps its
/// content), and caches the hash unless the file changed during the read.
fn learn(file: &fs::File, rel: &str, cache: &mut HashCache) -> io::Result<Learned> {
    let before = file.metadata()?;
    let mut learned = None;
    if before.len() <= CHUNK as u64 {
        let mut buf = Vec::with_capacity(before.len() as usize);
        file.take(CHUNK as u64 + 1).read_to_end(&mut buf)?;
        if buf.len() <= CHUNK {
            learned = Some(Learned {
                size: buf.len() as u64,
                hash: ContentHash::of(&buf),
                content: Some(buf),
            });
        }
    }
    let learned = match learned {
        Some(l) => l,
        // Large, or it grew past a chunk while read: hashed as it is read
        // (never mapped: another process may truncate it meanwhile), its
        // holes without reading them.
        None => {
            let (size, hash) = warmspare_shared::sparse::hash_file(file)?;
            Learned {
                size,
                hash,
                content: None,
            }
        }
    };
    cache.record(rel, &before, learned.hash, &file.metadata()?);
    Ok(learned)
}

/// `file`, positioned at its start.
fn rewound(file: &fs::File) -> io::Result<&fs::File> {
    let mut f = file;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(file)
}

/// Sends one file whole or as a delta. Returns the size, hash and metadata
/// it was announced with, or `None` when the file is gone or cannot be read
/// (recorded in `stats.unreadable`: the peer's copy stays).
///
/// The file is opened beneath the watch root with no symbolic link followed
/// anywhere on the way, without blocking, and only a regular file is read;
/// the metadata sent (mode, owner, mtime) and the size come from `fstat` of
/// that descriptor, never from the earlier scan, so what arrives is always
/// what was read with the metadata it had (a file moved in, or a directory
/// swapped for a link, after the scan cannot borrow another's metadata).
fn ship_file(
    io: &mut SessionIo,
    w: &LocalWatch,
    cache: &mut HashCache,
    out: Outgoing<'_>,
    stats: &mut BatchStats,
) -> Result<Option<(u64, ContentHash, Meta)>> {
    let l = out.entry;
    let abs = w.root.join(&l.path);
    let (file, md) = match warmspare_shared::beneath::open_file_beneath(&w.root, &l.path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(watch = w.name, path = l.path, error = %e, "not replicated: cannot open it; the peer's copy is kept");
            stats.unreadable.push((w.name.clone(), l.path.clone(), e.to_string()));
            return Ok(None);
        }
    };
    let meta = Meta::from_metadata(&md);
    // The scan's hash is of the file the scan saw: trusted only while the
    // open file has its size and mtime (the receiver's hash check catches
    // the rest), otherwise learned again from this descriptor.
    let seen = md.len() == out.size && meta.mtime == l.meta.mtime && meta.mtime_nsec == l.meta.mtime_nsec;
    let (mut size, mut hash, mut content) = (md.len(), out.hash.filter(|_| seen), None);
    if hash.is_none() {
        match learn(&file, &l.path, cache) {
            Ok(learned) => (size, hash, content) = (learned.size, Some(learned.hash), learned.content),
            // As when a scan cannot read a file: it is left out, and the
            // next comparison tries again; the rest of the batch goes on.
            Err(e) => {
                tracing::warn!(watch = w.name, path = l.path, error = %e, "not replicated: cannot read it; the peer's copy is kept");
                stats.unreadable.push((w.name.clone(), l.path.clone(), e.to_string()));
                return Ok(None);
            }
        }
    }
    let hash = hash.ok_or_else(|| anyhow!("{}: no content hash", l.path))?;
    let before = stats.wire_bytes;
    let mut sent_as_delta = false;
    // A file mostly of holes goes whole, its holes as holes: cheaper than
    // reading its zeros on both sides for a delta.
    let sparse = content.is_none()
        && out.remote_size.is_some()
        && warmspare_shared::sparse::data_len(&file, size).is_ok_and(|d| d < size / 2);
    if let Some(rsize) = out.remote_size.filter(|_| !sparse) {
        io.send(&Request::GetSignature {
            id: 0,
            watch: w.name.clone(),
            path: l.path.clone(),
            block_len: delta::block_len(rsize),
        })?;
        let mut sig = Vec::new();
        let mut base = None;
        loop {
            match io.reply()? {
                Reply::SignaturePart {
                    data, last, base: b, ..
                } => {
                    sig.extend_from_slice(&data);
                    if sig.len() > 64 * 1024 * 1024 {
                        bail!("the peer's signature of {} is too large", l.path);
                    }
                    base = Some(b);
                    if last {
                        break;
                    }
                }
                Reply::NoSignature { .. } => break,
                other => bail!("expected a signature, got {other:?}"),
            }
        }
        if let Some(base) = base {
            // Read, never mapped: another process may truncate the file
            // while it is diffed. A file that changed size since its hash
            // was learned goes whole (the receiver's checks refuse a stale
            // announcement either way).
            use std::os::unix::fs::FileExt;
            let now = file
                .metadata()
                .with_context(|| format!("cannot stat {}", abs.display()))?;
            let worth = now.len() == size
                && match delta::worth_diffing_at(&sig, size, |at, buf| file.read_exact_at(buf, at)) {
                    Ok(worth) => worth,
                    // Cut short under the probes, or a signature that does
                    // not parse: sent whole (the receiver checks it).
                    Err(e) => {
                        tracing::debug!(watch = w.name, path = l.path, error = %e, "no delta");
                        false
                    }
                };
            if !worth {
                tracing::debug!(
                    watch = w.name,
                    path = l.path,
                    "no delta worth computing (rewritten, or changed while read); sending it whole"
                );
            } else {
                stats.wire_bytes += io.send(&Request::Op(Op::FileBegin {
                    watch: w.name.clone(),
                    path: l.path.clone(),
                    meta,
                    size,
                    hash,
                    delta_base: Some(base),
                }))?;
                let mut sink = FrameSink {
                    io,
                    buf: Vec::with_capacity(CHUNK),
                    sent: 0,
                };
                let reader = rewound(&file).with_context(|| format!("cannot read {}", abs.display()))?;
                delta::diff_reader(&sig, reader, size, &mut sink).map_err(|e| anyhow!("{}: {e}", l.path))?;
                sink.flush_chunk()?;
                stats.wire_bytes += sink.sent;
                stats.wire_bytes += io.send(&Request::Op(Op::FileEnd))?;
                sent_as_delta = true;
            }
        }
    }
    if !sent_as_delta {
        stats.wire_bytes += io.send(&Request::Op(Op::FileBegin {
            watch: w.name.clone(),
            path: l.path.clone(),
            meta,
            size,
            hash,
            delta_base: None,
        }))?;
        match content {
            // Read already, to learn its hash: one frame.
            Some(data) => {
                if !data.is_empty() {
                    stats.wire_bytes += io.send(&Request::Op(Op::FileData(ByteBuf::from(data))))?;
                }
            }
            // Read in order, holes and runs of zeros sent as holes (a file
            // that shrinks meanwhile ends short: the receiver's size check
            // refuses it).
            None => {
                let mut sink = FrameSink {
                    io,
                    buf: Vec::with_capacity(CHUNK.min(size as usize + 1)),
                    sent: 0,
                };
                warmspare_shared::sparse::walk(&file, size, CHUNK, &mut sink)
                    .with_context(|| format!("cannot read {}", abs.display()))?;
                sink.flush_chunk()?;
                stats.wire_bytes += sink.sent;
            }
        }
        stats.wire_bytes += io.send(&Request::Op(Op::FileEnd))?;
    }
    stats.pending_bytes += stats.wire_bytes - before;
    let wire_bytes = stats.wire_bytes - before;
    // Large files get a line at info (their cost is worth seeing), the rest at debug.
    if size >= delta::DELTA_MIN_SIZE {
        tracing::info!(
            watch = w.name,
            path = l.path,
            size,
            wire_bytes,
            delta = sent_as_delta,
            "large file shipped"
        );
    } else {
        tracing::debug!(
            watch = w.name,
            path = l.path,
            size,
            wire_bytes,
            delta = sent_as_delta,
            "file shipped"
        );
    }
    Ok(Some((size, hash, meta)))
}

/// Writes bytes as [`Op::FileData`] frames of at most [`CHUNK`] bytes.
struct FrameSink<'a> {
    io: &'a mut SessionIo,
    buf: Vec<u8>,
    sent: u64,
}

impl FrameSink<'_> {
    fn flush_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The next chunk's buffer is allocated when it is first written: a
        // fresh 256 KiB buffer after the last chunk of every small file would
        // cost an mmap and munmap per file.
        let data = std::mem::take(&mut self.buf);
        self.sent += self.io.send(&Request::Op(Op::FileData(ByteBuf::from(data))))?;
        Ok(())
    }
}

impl warmspare_shared::sparse::Pieces for FrameSink<'_> {
    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data)
    }

    fn hole(&mut self, len: u64) -> io::Result<()> {
        self.flush_chunk().map_err(io::Error::other)?;
        self.sent += self
            .io
            .send(&Request::Op(Op::FileHole(len)))
            .map_err(io::Error::other)?;
        Ok(())
    }
}

impl Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CHUNK);
        }
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_chunk().map_err(io::Error::other)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_most_drops_descendants() {
        let v = [
            "a/b".to_string(),
            "a".to_string(),
            "ab".to_string(),
            "c/d".to_string(),
            "c/d/e".to_string(),
        ];
        assert_eq!(top_most(v.iter()), ["a", "ab", "c/d"]);
    }
}
