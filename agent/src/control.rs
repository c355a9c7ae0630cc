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

use crate::node::Shared;
use crate::status;

/// Serves one operator session until the operator closes it.
pub async fn serve<R, W>(
    shared: &Arc<Shared>,
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
            Request::UndoList { watch } => match shared
                .off_runtime(move |s| s.undo.list(watch.as_deref()))
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
            Request::UndoRead { id, offset } => match shared
                .off_runtime(move |s| s.undo.read(id, offset, proto::CHUNK))
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
                let begun = shared
                    .off_runtime(move |s| crate::undo::Restore::begin(s, entry, force))
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
                    let done = shared
                        .off_runtime(move |_| {
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
                Some(r) => match shared.off_runtime(move |s| r.end(s)).await {
                    Ok(Ok(replaced)) => Reply::UndoRestored { replaced },
                    Ok(Err(reason)) => Reply::Refused { reason },
                    Err(e) => failed(e),
                },
                None => Reply::Refused {
                    reason: "no file is being put back".into(),
                },
            },
            req => handle(shared, operator, req).await,
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

async fn handle(shared: &Arc<Shared>, operator: &str, req: Request) -> Reply {
    let by = format!("operator {operator}");
    // Whatever reads or writes files runs on a blocking thread
    // (`off_runtime`): role changes persist and fsync before they publish.
    match req {
        Request::Ping => Reply::Pong,
        Request::Status => match status::node_status_off_runtime(shared).await {
            Ok(s) => Reply::Status(Box::new(s)),
            Err(e) => failed(e),
        },
        Request::History => match shared.off_runtime(|s| state::read_history(&s.live.state_dir)).await {
            Ok(h) => Reply::History(proto::newest_that_fit(h, |n| state::HistoryEntry {
                time: 0,
                epoch: 0,
                from: String::new(),
                to: String::new(),
                reason: format!(
                    "{n} older entries left out (the reply is limited to the newest that fit); \
                     the whole history is in history.jsonl under the state dir"
                ),
                by: shared.live.me.name.clone(),
            })),
            Err(e) => failed(e),
        },
        Request::SetRole { expect, next, reason } => match shared
            .off_runtime({
                let by = by.clone();
                move |s| {
                    s.role
                        .compare_and_swap(&expect, next, &reason, &by)
                        .map_err(|e| e.to_string())
                }
            })
            .await
            .unwrap_or_else(|e| Err(format!("{e:#}")))
        {
            Ok(now) if now.active == shared.live.me.name => {
                // Promoted: answer once on_promote has run (or failed).
                let limit = shared.live.cluster().cluster.hook_timeout + Duration::from_secs(30);
                match shared.role.wait_promoted(now.epoch, limit).await {
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
        Request::Adopt { state, reason } => match shared
            .off_runtime(move |s| s.role.adopt(state, &reason, &by))
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
            match shared.off_runtime(move |s| s.set_paused(pause)).await.and_then(|r| r) {
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
            if !shared.role.is_active() {
                return Reply::Refused {
                    reason: format!("{} is not the active node", shared.live.me.name),
                };
            }
            let names: Vec<String> = match watch {
                Some(w) if !shared.live.local_watches().iter().any(|l| l.name == w) => {
                    return Reply::Refused {
                        reason: format!("there is no watch {w:?}"),
                    };
                }
                Some(w) => vec![w],
                None => shared.live.local_watches().into_iter().map(|w| w.name).collect(),
            };
            if accept_root {
                for w in shared
                    .live
                    .local_watches()
                    .iter()
                    .filter(|w| w.verify_root && names.contains(&w.name))
                {
                    if let Err(reason) = shared.roots.accept(&w.name, &w.root) {
                        return Reply::Refused { reason };
                    }
                    tracing::warn!(operator, watch = w.name, "watch root accepted");
                }
                // The watcher watches the accepted roots anew.
                shared.roots.recovered.notify_one();
            }
            if allow_deletes {
                for w in &names {
                    tracing::warn!(
                        operator,
                        watch = w,
                        "the next comparison may remove what the deletion guard held"
                    );
                    shared.allow_deletes(w);
                }
            }
            for inbox in shared.telemetry.runtime().inboxes.values() {
                for w in &names {
                    inbox.add_full(w);
                }
            }
            Reply::Done
        }
        Request::Flush { timeout_ms } => flush(shared, Duration::from_millis(timeout_ms)).await,
        Request::JobHistory { name } => {
            let runs = crate::jobs::history(&shared.live.state_dir, &name);
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
        Request::RunJob { name } => match crate::jobs::run_now(shared, &name).await {
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
async fn flush(shared: &Shared, timeout: Duration) -> Reply {
    if !shared.role.is_active() {
        return Reply::Refused {
            reason: format!("{} is not the active node", shared.live.me.name),
        };
    }
    if shared.is_paused() {
        return Reply::Refused {
            reason: "replication is paused; resume it first".into(),
        };
    }
    if let Some(reason) = shared.role.held() {
        return Reply::Refused { reason };
    }
    let mut targets = Vec::new();
    for (peer, inbox) in shared.telemetry.runtime().inboxes.iter() {
        let mut gen = 0;
        for w in shared.live.local_watches() {
            gen = inbox.add_full(&w.name);
        }
        targets.push((peer.clone(), gen));
    }
    let mut progress = shared.telemetry.progress.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !shared.role.is_active() {
            return Reply::Refused {
                reason: "the role changed during the flush".into(),
            };
        }
        let lagging: Vec<String> = {
            let rt = shared.telemetry.runtime();
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
            let mut held: Vec<String> = shared
                .roots
                .problems()
                .into_iter()
                .map(|(w, p)| format!("watch {w} is not shipped: {p}"))
                .collect();
            held.extend({
                let rt = shared.telemetry.runtime();
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
            let rt = shared.telemetry.runtime();
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
