//! Operator sessions: what `warmsparectl` may ask of an agent.
//!
//! Only keys listed under `[[operator]]` reach this module. Role changes are
//! compare-and-swaps on the persisted role state; everything else reads
//! status or nudges the shippers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use warmspare_shared::proto::{self, FrameReader, FrameWriter, JobRun, Reply, Request};
use warmspare_shared::{state, text};

use crate::allow_deletes::AllowDeletes;
use crate::live::Live;
use crate::pause::Pause;
use crate::role::Role;
use crate::roots::Roots;
use crate::status;
use crate::telemetry::Telemetry;

/// What an operator's requests use of the node. The operator may change
/// the role, the hold, the watch roots' acceptance and the deletion
/// guard's permissions, put files back from the undo store and run jobs;
/// each of those is a handle here.
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force: the node's name, the watches, the hook
    /// time limit, the state dir (the role history).
    pub live: Arc<Live>,
    /// The role: compare-and-swap, adoption, the wait for a promotion.
    pub role: Arc<Role>,
    /// The shippers' inboxes (resync, flush) and their links' progress.
    pub telemetry: Arc<Telemetry>,
    /// The operator's hold (`pause`, `resume`).
    pub pause: Arc<Pause>,
    /// The watch roots: accepted anew by `resync --accept-root`.
    pub roots: Arc<Roots>,
    /// The deletion guard's permissions (`resync --allow-deletes`).
    pub allow_deletes: Arc<AllowDeletes>,
    /// The undo store: listed, read, and written by a restore.
    pub undo: crate::undo::Handles,
    /// What `status` is made from.
    pub status: status::Sources,
    /// The jobs (`run-job`).
    pub jobs: crate::jobs::Handles,
}

/// Runs `f` on a blocking thread: for what reads, writes and syncs files
/// (role changes, the pause marker, the undo store) from async code.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("a blocking task failed: {e}"))
}

/// Serves one operator session until the operator closes it.
pub async fn serve<R, W>(
    node: &Handles,
    operator: &str,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A file being put back (`warmsparectl undo restore`), between its
    // first and last request.
    let mut restore: Option<crate::undo::Restore> = None;
    while let Some(req) = reader.recv::<Request>().await? {
        let mut reply = match req {
            // The undo store's files are read and written on blocking
            // threads (`off_runtime`), like everything else that does I/O.
            Request::UndoList { watch } => match off_runtime({
                let store = node.undo.store.clone();
                move || store.list(watch.as_deref())
            })
            .await
            .and_then(|r| r.map_err(anyhow::Error::from))
            {
                Ok(entries) => {
                    let mut parts = entries.chunks(UNDO_LIST_PART).peekable();
                    if parts.peek().is_none() {
                        writer
                            .send(&Reply::UndoListPart {
                                entries: Vec::new(),
                                last: true,
                            })
                            .await?;
                    }
                    while let Some(p) = parts.next() {
                        let last = parts.peek().is_none();
                        writer
                            .send(&Reply::UndoListPart {
                                entries: p.to_vec(),
                                last,
                            })
                            .await?;
                    }
                    continue;
                }
                Err(e) => Reply::Refused {
                    reason: format!("cannot read the undo store: {e:#}"),
                },
            },
            Request::UndoRead { id, offset } => match off_runtime({
                let store = node.undo.store.clone();
                move || store.read(id, offset, proto::CHUNK)
            })
            .await
            .and_then(|r| r.map_err(anyhow::Error::from))
            {
                Ok((entry, data, last)) => Reply::UndoChunk {
                    entry,
                    data: ByteBuf::from(data),
                    last,
                },
                Err(e) => Reply::Refused {
                    reason: format!("cannot read undo entry {id}: {e:#}"),
                },
            },
            Request::UndoPutBegin { entry, force } => {
                let (watch, path) = (entry.watch.clone(), entry.path.clone());
                let (undo, role, roots) = (node.undo.clone(), node.role.clone(), node.roots.clone());
                let begun = off_runtime(move || crate::undo::Restore::begin(&undo, &role, &roots, entry, force))
                    .await
                    .unwrap_or_else(|e| Err(format!("{e:#}")));
                match begun {
                    Ok(r) => {
                        tracing::warn!(operator, watch, path = %text::escape_controls(&path), force, "putting a file back from an undo store");
                        restore = Some(r);
                        Reply::Done
                    }
                    Err(reason) => {
                        restore = None;
                        Reply::Refused { reason }
                    }
                }
            }
            Request::UndoPutData(chunk) => match restore.take() {
                Some(mut r) => {
                    let done = off_runtime(move || {
                        let result = r.data(&chunk);
                        (r, result)
                    })
                    .await;
                    match done {
                        Ok((r, Ok(()))) => {
                            restore = Some(r);
                            Reply::Done
                        }
                        Ok((_, Err(reason))) => Reply::Refused { reason },
                        Err(e) => failed(e),
                    }
                }
                None => Reply::Refused {
                    reason: "no file is being put back".into(),
                },
            },
            Request::UndoPutEnd => match restore.take() {
                Some(r) => match off_runtime({
                    let (undo, role) = (node.undo.clone(), node.role.clone());
                    move || r.end(&undo, &role)
                })
                .await
                {
                    Ok(Ok(replaced)) => Reply::UndoRestored { replaced },
                    Ok(Err(reason)) => Reply::Refused { reason },
                    Err(e) => failed(e),
                },
                None => Reply::Refused {
                    reason: "no file is being put back".into(),
                },
            },
            req => handle(node, operator, req).await,
        };
        if let Err(e) = proto::encode(&reply) {
            // Too large for a frame (a status with a huge diverged list):
            // say so, and keep the session.
            tracing::warn!(operator, error = %e, "a reply does not fit a frame");
            reply = Reply::Refused {
                reason: format!("the reply does not fit a frame: {e}"),
            };
        }
        writer.send(&reply).await?;
    }
    Ok(())
}

/// The most undo entries in one [`Reply::UndoListPart`] (each well under
/// 8 KiB: paths are at most 4 KiB).
const UNDO_LIST_PART: usize = 256;

/// What a blocking task's failure becomes for the operator.
fn failed(e: anyhow::Error) -> Reply {
    Reply::Refused {
        reason: format!("{e:#}"),
    }
}

async fn handle(node: &Handles, operator: &str, req: Request) -> Reply {
    let by = format!("operator {operator}");
    // Whatever reads or writes files runs on a blocking thread
    // (`off_runtime`): role changes persist and fsync before they publish.
    match req {
        Request::Ping => Reply::Pong,
        Request::Status => match status::node_status_off_runtime(&node.status).await {
            Ok(s) => Reply::Status(Box::new(s)),
            Err(e) => failed(e),
        },
        Request::History => match off_runtime({
            let state_dir = node.live.state_dir.clone();
            move || state::read_history(&state_dir)
        })
        .await
        {
            Ok(h) => Reply::History(proto::newest_that_fit(h, |n| state::HistoryEntry {
                time: 0,
                epoch: 0,
                from: String::new(),
                to: String::new(),
                reason: format!(
                    "{n} older entries left out (the reply is limited to the newest that fit); \
                     the whole history is in history.jsonl under the state dir"
                ),
                by: node.live.me.name.clone(),
            })),
            Err(e) => failed(e),
        },
        Request::SetRole { expect, next, reason } => match off_runtime({
            let (role, by) = (node.role.clone(), by.clone());
            move || {
                role.compare_and_swap(&expect, next, &reason, &by)
                    .map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("{e:#}")))
        {
            Ok(now) if now.active == node.live.me.name => {
                // Promoted: answer once on_promote has run (or failed).
                let limit = node.live.cluster().cluster.hook_timeout + Duration::from_secs(30);
                match node.role.wait_promoted(now.epoch, limit).await {
                    Ok(()) => Reply::Role(now),
                    Err(reason) => {
                        tracing::error!(operator, reason, "the promotion did not complete");
                        Reply::Refused { reason }
                    }
                }
            }
            Ok(now) => Reply::Role(now),
            Err(reason) => {
                tracing::warn!(operator, reason, "refused a role change");
                Reply::Refused { reason }
            }
        },
        Request::Adopt { state, reason } => match off_runtime({
            let role = node.role.clone();
            move || role.adopt(state, &reason, &by)
        })
        .await
        .and_then(|r| r)
        {
            Ok(now) => Reply::Role(now),
            Err(e) => Reply::Refused {
                reason: format!("{e:#}"),
            },
        },
        Request::Pause | Request::Resume => {
            let pause = matches!(req, Request::Pause);
            let hold = node.pause.clone();
            match off_runtime(move || hold.set_paused(pause)).await.and_then(|r| r) {
                Ok(()) => Reply::Done,
                Err(e) => Reply::Refused {
                    reason: format!("cannot record the pause: {e:#}"),
                },
            }
        }
        Request::Resync {
            watch,
            accept_root,
            allow_deletes,
        } => {
            if !node.role.is_active() {
                return Reply::Refused {
                    reason: format!("{} is not the active node", node.live.me.name),
                };
            }
            let names: Vec<String> = match watch {
                Some(w) if !node.live.local_watches().iter().any(|l| l.name == w) => {
                    return Reply::Refused {
                        reason: format!("there is no watch {w:?}"),
                    };
                }
                Some(w) => vec![w],
                None => node.live.local_watches().into_iter().map(|w| w.name).collect(),
            };
            if accept_root {
                for w in node
                    .live
                    .local_watches()
                    .iter()
                    .filter(|w| w.verify_root && names.contains(&w.name))
                {
                    if let Err(reason) = node.roots.accept(&w.name, &w.root) {
                        return Reply::Refused { reason };
                    }
                    tracing::warn!(operator, watch = w.name, "watch root accepted");
                }
                // The watcher watches the accepted roots anew.
                node.roots.recovered.notify_one();
            }
            if allow_deletes {
                for w in &names {
                    tracing::warn!(
                        operator,
                        watch = w,
                        "the next comparison may remove what the deletion guard held"
                    );
                    let peers: Vec<String> = node.telemetry.runtime().inboxes.keys().cloned().collect();
                    node.allow_deletes.grant(peers, w);
                }
            }
            for inbox in node.telemetry.runtime().inboxes.values() {
                for w in &names {
                    inbox.add_full(w);
                }
            }
            Reply::Done
        }
        Request::Flush { timeout_ms } => flush(node, Duration::from_millis(timeout_ms)).await,
        Request::JobHistory { name } => {
            let runs = crate::jobs::history(&node.live.state_dir, &name);
            let Some(first) = runs.first().cloned() else {
                return Reply::JobHistory(runs);
            };
            Reply::JobHistory(proto::newest_that_fit(runs, |n| JobRun {
                ok: false,
                end_ms: first.start_ms,
                bytes: 0,
                generation: 0,
                detail: format!("{n} older runs left out (the reply is limited to the newest that fit)"),
                ..first
            }))
        }
        Request::RunJob { name } => match crate::jobs::run_now(&node.jobs, &name).await {
            Ok(run) => Reply::JobDone(run),
            Err(e) => Reply::Refused {
                reason: format!("{e:#}"),
            },
        },
        other => Reply::Refused {
            reason: format!("not a control request: {other:?}"),
        },
    }
}

/// Compares every watch with every peer and waits until each peer has
/// acknowledged everything asked of it before the flush began.
async fn flush(node: &Handles, timeout: Duration) -> Reply {
    if !node.role.is_active() {
        return Reply::Refused {
            reason: format!("{} is not the active node", node.live.me.name),
        };
    }
    if node.pause.is_paused() {
        return Reply::Refused {
            reason: "replication is paused; resume it first".into(),
        };
    }
    if let Some(reason) = node.role.held() {
        return Reply::Refused { reason };
    }
    let mut targets = Vec::new();
    for (peer, inbox) in node.telemetry.runtime().inboxes.iter() {
        let mut gen = 0;
        for w in node.live.local_watches() {
            gen = inbox.add_full(&w.name);
        }
        targets.push((peer.clone(), gen));
    }
    let mut progress = node.telemetry.progress.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !node.role.is_active() {
            return Reply::Refused {
                reason: "the role changed during the flush".into(),
            };
        }
        let lagging: Vec<String> = {
            let rt = node.telemetry.runtime();
            targets
                .iter()
                .filter(|(peer, gen)| rt.links.get(peer).is_none_or(|l| l.done_generation < *gen))
                .map(|(peer, _)| peer.clone())
                .collect()
        };
        if lagging.is_empty() {
            // A watch whose root failed its check, or a peer that keeps files
            // the deletion guard holds, is not a copy of this node: the
            // operator decides first.
            let mut held: Vec<String> = node
                .roots
                .problems()
                .into_iter()
                .map(|(w, p)| format!("watch {w} is not shipped: {p}"))
                .collect();
            held.extend({
                let rt = node.telemetry.runtime();
                targets
                    .iter()
                    .filter_map(|(p, _)| rt.links.get(p).map(|l| (p, l)))
                    .flat_map(|(p, l)| {
                        l.deletions_held
                            .iter()
                            .map(move |(w, n)| format!("{p}: deletions held in {w} ({n} files; see `warmsparectl resync --watch {w} --allow-deletes`)"))
                    })
                    .collect::<Vec<String>>()
            });
            if !held.is_empty() {
                return Reply::Flushed {
                    caught_up: false,
                    detail: held,
                };
            }
            let detail = targets.iter().map(|(p, _)| format!("{p}: caught up")).collect();
            return Reply::Flushed {
                caught_up: true,
                detail,
            };
        }
        if tokio::time::timeout_at(deadline, progress.changed()).await.is_err() {
            let rt = node.telemetry.runtime();
            let detail = targets
                .iter()
                .map(|(p, _)| match rt.links.get(p) {
                    Some(l) if !lagging.contains(p) => format!("{p}: caught up (connected: {})", l.connected),
                    Some(l) => format!(
                        "{p}: not caught up (connected: {}{})",
                        l.connected,
                        l.last_error
                            .as_deref()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    ),
                    None => format!("{p}: never connected"),
                })
                .collect();
            return Reply::Flushed {
                caught_up: false,
                detail,
            };
        }
    }
}
