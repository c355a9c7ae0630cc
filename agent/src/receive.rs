//! The passive side of replication: one task per incoming SSH session.
//!
//! The session's frames are read on the async side and handed to a blocking
//! thread that owns an [`Applier`]; its replies come back through a queue to
//! the writer. A request the applier refuses (a path that leaves its root, a
//! broken protocol) ends that session with a log line; the daemon and every
//! other session carry on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warmspare_shared::apply::{Applier, Divergence, Failure, WatchRoot};
use warmspare_shared::compress::{self, Unpacker};
use warmspare_shared::ledger::Ledgers;
use warmspare_shared::local::Tracker;
use warmspare_shared::manifest::{Entry, HashCache};
use warmspare_shared::proto::{self, FrameReader, FrameWriter, Hello, Op, Purpose, Reply, Request, MANIFEST_PART};
use warmspare_shared::ssh::{Identity, IncomingSession};
use warmspare_shared::state::RoleState;

use crate::after::AfterApply;
use crate::control::{self, off_runtime};
use crate::job_state::Jobs;
use crate::live::Live;
use crate::role::Role;
use crate::sessions::Sessions;
use crate::telemetry::Telemetry;

mod admission;
use admission::Admission;

/// What the receiver uses of the node, and what it hands an operator's
/// session (`control`).
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force: the trust, the watches, the state dir.
    pub live: Arc<Live>,
    /// The role: admission by epoch, adoption of a higher one.
    pub role: Arc<Role>,
    /// Where what was applied is reported (`last_applied`).
    pub telemetry: Arc<Telemetry>,
    /// The replication sessions, one per sending node.
    pub sessions: Arc<Sessions>,
    /// The agreed content of every replicated file (divergence checks).
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// The receiver's record of its own writes.
    pub local: Arc<Tracker>,
    /// The undo store, where what the applier removes or replaces is kept.
    pub undo: crate::undo::Handles,
    /// The `after_apply` hooks, asked for a run after each commit.
    pub after: Arc<AfterApply>,
    /// The jobs' runtime, woken when something arrives in the job spool.
    pub jobs: Arc<Jobs>,
    /// What an operator's session uses.
    pub control: control::Handles,
}

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the receiver waits to hand the peer one reply: a peer that
/// reads none of its replies (acknowledgements) for this long has its
/// session dropped, its queues and apply worker with it. The same as the
/// sender's own wait on its peer.
const REPLY_DEADLINE: Duration = Duration::from_secs(120);

/// [`REPLY_DEADLINE`], or `WARMSPARE_PEER_DEADLINE_MS` from the environment
/// (for tests of peers that stop reading).
fn reply_deadline() -> Duration {
    std::env::var("WARMSPARE_PEER_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(REPLY_DEADLINE, Duration::from_millis)
}

/// Serves one incoming session until it ends.
pub async fn handle(node: Handles, session: IncomingSession) {
    let who = session.identity.clone();
    let peer = session.peer;
    if let Err(e) = serve(node, session).await {
        tracing::warn!(%who, ?peer, error = format!("{e:#}"), "session ended");
    }
}

async fn serve(node: Handles, session: IncomingSession) -> Result<()> {
    let (rd, wr) = tokio::io::split(session.stream);
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.recv_hello()).await {
        Err(_) => bail!("no hello within {HELLO_TIMEOUT:?}"),
        Ok(Err(proto::FrameError::OtherProtocol(p))) => {
            // Its hello does not decode here, but the peer can read why.
            let reason = format!(
                "protocol {p} is not supported (this agent speaks {})",
                proto::PROTOCOL_VERSION
            );
            let _ = writer.send(&Reply::Refused { reason: reason.clone() }).await;
            let _ = writer.close().await;
            bail!("refused: {reason}");
        }
        Ok(r) => match r.context("bad hello")? {
            Some(Request::Hello(h)) => h,
            Some(_) => bail!("the first request was not a hello"),
            None => return Ok(()),
        },
    };
    let admission = match admit(&node, &session.identity, &hello) {
        // The new epoch is persisted (written and synced) on a blocking thread.
        Admission::Adopt(next) => {
            let (role, from) = (node.role.clone(), hello.node.clone());
            match off_runtime(move || role.adopt(next, "a peer pushed at a higher epoch", &from))
                .await
                .and_then(|r| r)
            {
                Ok(_) => Admission::Accept,
                Err(e) => Admission::Refuse(format!("cannot record the new epoch: {e:#}")),
            }
        }
        other => other,
    };
    match admission {
        Admission::Accept | Admission::Adopt(_) => {}
        Admission::Stale(role) => {
            tracing::warn!(who = %session.identity, epoch = hello.epoch, current = role.epoch, active = role.active, "refused a push at a stale epoch");
            let _ = writer.send(&Reply::Stale(role)).await;
            let _ = writer.close().await;
            return Ok(());
        }
        Admission::Refuse(reason) => {
            tracing::warn!(who = %session.identity, node = hello.node, epoch = hello.epoch, reason, "refused a session");
            let _ = writer.send(&Reply::Refused { reason: reason.clone() }).await;
            let _ = writer.close().await;
            bail!("refused: {reason}");
        }
    }
    writer.send(&Reply::Hello(node.role.hello(Purpose::Probe))).await?;
    match (hello.purpose, &session.identity) {
        (Purpose::Probe, _) => {
            while let Some(req) = reader.recv::<Request>().await? {
                match req {
                    Request::Ping => {
                        heard_from(&node, &hello.node);
                        writer.send(&Reply::Pong).await?
                    }
                    Request::Failsafe { epoch, window_ms } => {
                        heard_from(&node, &hello.node);
                        let reply = failsafe_probe(&node, &session.identity, epoch, window_ms).await;
                        writer.send(&reply).await?;
                    }
                    other => bail!("a probe session sent {}", request_name(&other)),
                }
            }
            return Ok(());
        }
        (Purpose::Control, Identity::Operator(name)) => {
            // A reload that removes the operator's key ends the session.
            return tokio::select! {
                r = control::serve(&node.control, name, &mut reader, &mut writer) => r,
                () = node.live.revoked(&session.identity, &session.key) => {
                    tracing::warn!(who = %session.identity, "the cluster file no longer trusts this key: closing its session");
                    let _ = writer.close().await;
                    bail!("the key is no longer trusted")
                }
            };
        }
        (Purpose::Control, _) | (Purpose::Replicate, _) => {}
    }
    let (turn, gate) = match node.sessions.take_turn(&hello.node).await {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("{e:#}");
            let _ = writer.send(&Reply::Refused { reason: reason.clone() }).await;
            let _ = writer.close().await;
            bail!("refused: {reason}");
        }
    };
    tracing::info!(from = hello.node, epoch = hello.epoch, "replication session opened");

    // Requests travel to the worker in batches of what has already arrived
    // (see `FrameReader::recv_batch`): one wake-up per batch, not per frame.
    // Each batch carries when it arrived: a caught-up marker counts from
    // its arrival, not from when the apply thread reached it (see `lag`).
    let (req_tx, req_rx) = mpsc::channel::<(Instant, Vec<Request>)>(16);
    let (reply_tx, mut reply_rx) = mpsc::channel::<Reply>(64);
    let worker_shared = node.clone();
    let session_role = RoleState {
        epoch: hello.epoch,
        active: hello.node.clone(),
    };
    let runtime = tokio::runtime::Handle::current();
    let worker_end = turn.end.clone();
    let worker = tokio::task::spawn_blocking(move || {
        // The gate is let go of only when the applier is gone (its temp
        // files removed): a newer session of this node applies nothing
        // before that.
        let _gate = gate;
        apply_loop(&worker_shared, &runtime, &session_role, &worker_end, req_rx, reply_tx)
    });
    let deadline = reply_deadline();
    let write_task = async move {
        while let Some(reply) = reply_rx.recv().await {
            let refused = matches!(reply, Reply::Refused { .. } | Reply::Stale(_));
            // A peer that reads no replies (its acknowledgements) has its
            // session dropped rather than held open for ever: the queues
            // behind this writer are bounded, so the worker stops too.
            match tokio::time::timeout(deadline, writer.send(&reply)).await {
                Ok(sent) => sent?,
                Err(_) => return Ok(Sent::Stuck),
            }
            if refused {
                // End our side cleanly so the refusal reaches the peer before the close.
                writer.close().await?;
                return Ok(Sent::Refused);
            }
        }
        Ok::<Sent, proto::FrameError>(Sent::Done)
    };
    // The sender compresses only when both hellos allow it; a packed frame
    // in a session that does not is refused (see `proto::expand`).
    let mine = node.live.cluster().compress_of(&node.live.me);
    let mut unpacker = match compress::accepted(mine, hello.compress) {
        true => Some(Unpacker::new().context("cannot start decompression")?),
        false => None,
    };
    let read_task = async move {
        let mut forwarding = true;
        loop {
            let batch = reader.recv_batch::<Request>(BATCH_MAX, BATCH_MAX_BYTES).await?;
            if batch.is_empty() {
                break;
            }
            let batch = proto::expand(unpacker.as_mut(), batch)?;
            // After the worker stops, keep reading until the peer closes.
            forwarding = forwarding && req_tx.send((Instant::now(), batch)).await.is_ok();
        }
        Ok::<(), proto::FrameError>(())
    };
    let mut read_task = Box::pin(read_task);
    let result = tokio::select! {
        r = write_task => match r.context("cannot write to the peer") {
            Ok(Sent::Stuck) => Err(anyhow::anyhow!("the peer read no reply within {deadline:?}; dropping the session")),
            other => other,
        },
        r = &mut read_task => r.map(|()| Sent::Done).context("cannot read from the peer"),
        () = turn.end.cancelled() => Err(anyhow::anyhow!("a newer replication session from {} replaced this one", hello.node)),
    };
    if matches!(result, Ok(Sent::Refused)) {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut read_task).await;
    }
    // The reader holds the request queue: dropping it (even when the writer
    // failed first, the connection being gone) stops the worker, and its
    // applier removes its temp files. Waiting for the worker with the reader
    // still alive would wait forever.
    drop(read_task);
    let worker_result = worker.await.context("the apply worker panicked")?;
    // When the connection ended first, its reason explains the worker's
    // ("the session closed").
    result?;
    worker_result
}

/// A probe session's ping from `from`: when `from` is the active this node
/// names, the active was heard from now (see `lag`).
fn heard_from(node: &Handles, from: &str) {
    let role = node.role.current();
    if role.active == from && from != node.live.me.name {
        node.telemetry.runtime().freshness.heard(Instant::now());
    }
}

/// How the writer of a replication session ended.
enum Sent {
    /// The worker ended and every reply was sent.
    Done,
    /// A refusal was sent and the writer closed.
    Refused,
    /// The peer read no reply within the deadline.
    Stuck,
}

/// Answers a failsafe probe from `who`: a promise only to a node (see
/// `Role::failsafe_probe`), recorded before the answer goes out.
async fn failsafe_probe(node: &Handles, who: &Identity, epoch: u64, window_ms: u64) -> Reply {
    let Identity::Node(from) = who else {
        return Reply::Promise {
            epoch,
            refused: Some(format!("{who} is not a node")),
        };
    };
    let (role, from) = (node.role.clone(), from.clone());
    let window = Duration::from_millis(window_ms);
    let answer = off_runtime(move || {
        let answer = role.failsafe_probe(&from, epoch, window);
        match &answer {
            Ok(()) => tracing::debug!(from, epoch, "promised the failsafe probe"),
            Err(why) => tracing::debug!(from, epoch, "refused a failsafe probe: {why}"),
        }
        answer
    })
    .await;
    let refused = match answer {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(e) => Some(format!("{e:#}")),
    };
    Reply::Promise { epoch, refused }
}

/// Decides whether a session may proceed: the rule of [`admission`], after
/// noting a replicating peer's configuration hash.
fn admit(node: &Handles, who: &Identity, hello: &Hello) -> Admission {
    let mine = node.role.current();
    let verdict = admission::decide(who, hello, &mine);
    if admission::pushes_as_itself(who, hello) && hello.protocol == proto::PROTOCOL_VERSION {
        node.live.compare_config(&hello.node, &hello.config_hash);
    }
    verdict
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello(_) => "hello",
        Request::GetManifest { .. } => "get-manifest",
        Request::GetSignature { .. } => "get-signature",
        Request::Op(_) => "op",
        Request::Commit { .. } => "commit",
        Request::Ping => "ping",
        _ => "a control request",
    }
}

/// The receiver's watch roots, with their caches.
fn watch_roots(node: &Handles) -> Result<Vec<WatchRoot>> {
    let mut out = Vec::new();
    for w in node.live.local_watches() {
        let cache_path = node.live.cache_path(&w.name, "recv");
        out.push(WatchRoot {
            name: w.name,
            root: w.root,
            excludes: w.excludes,
            cache: HashCache::load(&cache_path),
            cache_path: Some(cache_path),
        });
    }
    Ok(out)
}

/// At most this many requests travel to the apply worker in one batch.
const BATCH_MAX: usize = 1024;

/// A batch stops growing at about this many bytes of frames.
const BATCH_MAX_BYTES: usize = 1024 * 1024;

fn apply_loop(
    node: &Handles,
    runtime: &tokio::runtime::Handle,
    session: &RoleState,
    end: &CancellationToken,
    mut requests: mpsc::Receiver<(Instant, Vec<Request>)>,
    replies: mpsc::Sender<Reply>,
) -> Result<()> {
    let divergence = Divergence {
        ledgers: node.ledgers.clone(),
        dir: node
            .live
            .state_dir
            .join("diverged")
            .join(format!("{}-{}", session.epoch, crate::clock::timestamp())),
    };
    let mut applier = Applier::new(watch_roots(node)?, Some(divergence))
        .context("cannot open the watch roots")?
        .with_tracker(node.local.clone())
        .with_undo(node.undo.recorder(session.epoch));
    let send = |r: Reply| {
        replies
            .blocking_send(r)
            .map_err(|_| anyhow::anyhow!("the session closed"))
    };
    while let Some((arrived, batch)) = requests.blocking_recv() {
        for req in batch {
            // A newer session of the same node ends this one between
            // requests; what was not committed is not acknowledged, and the
            // applier removes its temp files as it is dropped.
            if end.is_cancelled() {
                bail!("replaced by a newer session of the same node");
            }
            serve_request(node, runtime, session, &mut applier, &send, (arrived, req))?;
        }
    }
    Ok(())
}

/// Serves one request of a replication session; an error ends the session.
fn serve_request(
    node: &Handles,
    runtime: &tokio::runtime::Handle,
    session: &RoleState,
    applier: &mut Applier,
    send: &impl Fn(Reply) -> Result<()>,
    (arrived, req): (Instant, Request),
) -> Result<()> {
    // A role change during the session (fencing, a switchover) ends it.
    let now = node.role.current();
    if now != *session {
        tracing::warn!(
            epoch = now.epoch,
            active = now.active,
            "the role changed; ending the replication session"
        );
        let _ = send(Reply::Stale(now));
        bail!("the role changed during the session");
    }
    let outcome: std::result::Result<(), String> = match req {
        Request::GetManifest { watch } => match applier.manifest(&watch) {
            Ok(entries) => {
                for part in manifest_parts(entries) {
                    send(Reply::ManifestPart {
                        watch: watch.clone(),
                        entries: part.0,
                        last: part.1,
                    })?;
                }
                warmspare_shared::sys::release_free_memory();
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Request::GetSignature {
            id,
            watch,
            path,
            block_len,
        } => match applier.signature(&watch, &path, block_len) {
            Ok(Some((base, sig))) => {
                tracing::debug!(
                    watch,
                    path,
                    bytes = sig.len(),
                    ms = arrived.elapsed().as_millis() as u64,
                    "signature computed"
                );
                let mut chunks = sig.chunks(proto::CHUNK).peekable();
                if chunks.peek().is_none() {
                    send(Reply::SignaturePart {
                        id,
                        base,
                        data: ByteBuf::new(),
                        last: true,
                    })?;
                }
                while let Some(c) = chunks.next() {
                    send(Reply::SignaturePart {
                        id,
                        base,
                        data: ByteBuf::from(c.to_vec()),
                        last: chunks.peek().is_none(),
                    })?;
                }
                Ok(())
            }
            Ok(None) => {
                send(Reply::NoSignature { id })?;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Request::Op(op) => {
            // A full comparison that found this node in step with the active
            // is a success too, even when nothing had to be applied: an idle
            // passive in sync must not look stale.
            let settled = match &op {
                Op::Settled { watch, except } if except.is_empty() => Some(watch.clone()),
                _ => None,
            };
            let applied = applier.apply(op).map_err(|e| e.to_string());
            if let (Ok(()), Some(watch)) = (&applied, settled) {
                node.telemetry
                    .runtime()
                    .last_applied
                    .insert(watch, std::time::SystemTime::now());
            }
            applied
        }
        Request::Commit { batch } => {
            // A hidden switch for the tests of peer liveness: a passive whose
            // apply thread is busy (a slow disk) for this long per commit.
            if let Some(ms) = std::env::var("WARMSPARE_TEST_SLOW_COMMIT_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            // Nothing is acknowledged that is not durable: the session ends
            // with the error, and the sender reconnects and compares again.
            let report = match applier.commit() {
                Ok(report) => report,
                Err(e) => {
                    let reason = format!("{e:#}");
                    let _ = send(Reply::Refused { reason: reason.clone() });
                    bail!("{reason}");
                }
            };
            if !report.touched.is_empty() {
                let now = std::time::SystemTime::now();
                let mut rt = node.telemetry.runtime();
                for w in &report.touched {
                    rt.last_applied.insert(w.clone(), now);
                }
            }
            for (watch, path, to) in &report.diverged {
                tracing::warn!(watch, path, to = %to.display(), "diverged file preserved");
            }
            if let Some((_, _, to)) = report.diverged.last() {
                // Bounded store: older folders go, never the one just written.
                let keep = crate::preserved::folder_of(&node.live.state_dir, to);
                crate::preserved::prune(&node.live, keep.as_deref());
            }
            if report.undo_kept > 0 {
                node.undo.prune();
            }
            // Hooks run beside replication, never before the acknowledgement.
            for watch in &report.touched {
                if watch == crate::live::SPOOL_WATCH {
                    node.jobs.arrived.notify_one();
                } else {
                    crate::after::request(&node.after, runtime, watch);
                }
            }
            send(Reply::Committed {
                batch,
                applied: report.applied,
                // Bounded to fit a frame; what is left out is asked for
                // again as a comparison of the whole watch.
                failed: proto::bound_failures(report.failed.into_iter().map(Failure::into_wire).collect()),
            })?;
            Ok(())
        }
        // The active's caught-up marker: it had nothing pending for this
        // node when it sent it, and everything sent before it is applied.
        Request::Ping => {
            let first = {
                let mut runtime = node.telemetry.runtime();
                let first = runtime.freshness.caught_up.is_none();
                runtime.freshness.caught_up(arrived);
                first
            };
            if first {
                // From here on this node publishes a lag (see `lag`).
                tracing::info!("caught up with the active");
            }
            send(Reply::Pong)?;
            Ok(())
        }
        Request::Hello(_) => Err("a second hello".into()),
        other => Err(format!("{} in a replication session", request_name(&other))),
    };
    if let Err(reason) = outcome {
        tracing::warn!(reason, "refused a request; dropping the session");
        let _ = send(Reply::Refused { reason: reason.clone() });
        bail!("refused a request: {reason}");
    }
    Ok(())
}

/// Splits a manifest into parts that stay well under the frame cap.
fn manifest_parts(entries: Vec<Entry>) -> Vec<(Vec<Entry>, bool)> {
    let mut parts = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0usize;
    for e in entries {
        bytes += e.path.len()
            + 96
            + match &e.kind {
                warmspare_shared::manifest::EntryKind::Symlink { target } => target.len(),
                _ => 0,
            };
        cur.push(e);
        if cur.len() >= MANIFEST_PART || bytes > proto::MAX_FRAME / 4 {
            parts.push((std::mem::take(&mut cur), false));
            bytes = 0;
        }
    }
    parts.push((cur, true));
    parts
}
