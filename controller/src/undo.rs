//! `undo list` and `undo restore`: the nodes' undo stores.
//!
//! A restore reads the entry from the node that kept it, a chunk
//! ([`proto::CHUNK`]) at a time, and passes each chunk on to the active
//! node, which writes it beneath the watch root and puts it in place at the
//! end; from there it replicates as any change does. Nothing of the file is
//! held here but the chunk in transit.

use std::io::Write;

use anyhow::{anyhow, Context as _, Result};
use serde_json::json;
use warmspare_shared::proto::{Reply, Request, UndoEntry, UndoKind};
use warmspare_shared::text::escape_controls;

use crate::cli::{UndoListArgs, UndoRestoreArgs};
use crate::client::{Operator, Session};
use crate::exit::{fail, FAILED, REFUSED, USAGE};
use crate::status::NODE_TIMEOUT;

/// Every entry of `node`'s store (of one watch, or all).
async fn entries(s: &mut Session, watch: Option<String>) -> Result<Vec<UndoEntry>> {
    let mut out = Vec::new();
    let mut reply = s.call(&Request::UndoList { watch }).await?;
    loop {
        match reply {
            Reply::UndoListPart { entries, last } => {
                out.extend(entries);
                if last {
                    return Ok(out);
                }
            }
            Reply::Refused { reason } => return Err(fail(REFUSED, format!("refused: {reason}"))),
            other => return Err(anyhow!("unexpected answer {other:?}")),
        }
        reply = s.recv().await?;
    }
}

fn time(secs: i64) -> String {
    crate::admin::utc(secs)
}

/// Runs `undo list`.
pub async fn list(op: &Operator, args: &UndoListArgs) -> Result<()> {
    let nodes: Vec<_> = match &args.node {
        Some(n) => vec![op
            .cluster
            .node(n)
            .ok_or_else(|| fail(USAGE, format!("there is no node {n:?}")))?],
        None => op.cluster.node.iter().collect(),
    };
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for n in nodes {
        let got = async {
            let mut s = op.connect(n, NODE_TIMEOUT).await?;
            entries(&mut s, args.watch.clone()).await
        }
        .await;
        match got {
            Ok(list) => rows.extend(list.into_iter().map(|e| (n.name.clone(), e))),
            Err(e) => {
                eprintln!("{}: not listed: {e:#}", n.name);
                failed.push(n.name.clone());
            }
        }
    }
    if args.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(node, e)| {
                json!({
                    "node": node,
                    "id": e.id,
                    "watch": e.watch,
                    "path": e.path,
                    "time": e.time,
                    "epoch": e.epoch,
                    "size": e.size,
                    "why": e.why.as_str(),
                    "kind": match e.kind { UndoKind::File => "file", UndoKind::Symlink => "symlink" },
                    "hash": e.hash.map(|h| h.to_string()),
                    "mode": e.meta.mode,
                    "uid": e.meta.uid,
                    "gid": e.meta.gid,
                    "mtime": e.meta.mtime,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<12} {:>8} {:<21} {:<10} {:>10} {:<9} PATH",
            "NODE", "ID", "KEPT (UTC)", "WATCH", "SIZE", "WHY"
        );
        for (node, e) in &rows {
            let path = match e.kind {
                UndoKind::File => e.path.clone(),
                UndoKind::Symlink => format!("{} (link)", e.path),
            };
            // Names come from the nodes' disks: never raw to the terminal.
            println!(
                "{:<12} {:>8} {:<21} {:<10} {:>10} {:<9} {}",
                node,
                e.id,
                time(e.time),
                escape_controls(if e.watch.is_empty() { "?" } else { &e.watch }),
                e.size,
                e.why.as_str(),
                escape_controls(if e.path.is_empty() { "?" } else { &path })
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(fail(FAILED, format!("not listed: {}", failed.join(", "))))
    }
}

/// Reads the chunk of entry `id` at `offset` from `s`.
async fn chunk(s: &mut Session, id: u64, offset: u64) -> Result<(UndoEntry, Vec<u8>, bool)> {
    match s.call(&Request::UndoRead { id, offset }).await? {
        Reply::UndoChunk { entry, data, last } => Ok((entry, data.into_vec(), last)),
        Reply::Refused { reason } => Err(fail(REFUSED, format!("refused: {reason}"))),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

/// Expects `Done` from the active node.
fn done(reply: Reply, node: &str) -> Result<()> {
    match reply {
        Reply::Done => Ok(()),
        Reply::Refused { reason } => Err(fail(REFUSED, format!("{node} refused: {reason}"))),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

/// Runs `undo restore`.
pub async fn restore(op: &Operator, args: &UndoRestoreArgs) -> Result<()> {
    let from = op
        .cluster
        .node(&args.node)
        .ok_or_else(|| fail(USAGE, format!("there is no node {:?}", args.node)))?;
    let mut src = op.connect(from, NODE_TIMEOUT).await?;
    let (entry, first, mut last) = chunk(&mut src, args.id, 0).await?;
    let shown = escape_controls(&entry.path).into_owned();
    if let Some(out) = &args.output {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        f.write_all(&first)?;
        let mut offset = first.len() as u64;
        while !last {
            let (_, data, l) = chunk(&mut src, args.id, offset).await?;
            if data.is_empty() && !l {
                return Err(fail(FAILED, "the entry ended early"));
            }
            f.write_all(&data)?;
            offset += data.len() as u64;
            last = l;
        }
        f.sync_all()?;
        println!(
            "{}: entry {} ({} in {}, {} bytes) written to {}",
            from.name,
            entry.id,
            shown,
            escape_controls(&entry.watch),
            offset,
            out.display()
        );
        return Ok(());
    }
    if entry.watch.is_empty() || entry.path.is_empty() {
        return Err(fail(
            USAGE,
            format!(
                "entry {} has no known watch and path (it was found in the store unindexed): fetch it with --output FILE",
                entry.id
            ),
        ));
    }
    let active = crate::admin::active_node(op).await?;
    let mut dst = op.connect(active, NODE_TIMEOUT).await?;
    done(
        dst.call(&Request::UndoPutBegin {
            entry: entry.clone(),
            force: args.force,
        })
        .await?,
        &active.name,
    )?;
    let mut offset = first.len() as u64;
    done(dst.call(&Request::UndoPutData(first.into())).await?, &active.name)?;
    while !last {
        let (_, data, l) = chunk(&mut src, args.id, offset).await?;
        if data.is_empty() && !l {
            return Err(fail(FAILED, "the entry ended early"));
        }
        offset += data.len() as u64;
        last = l;
        done(dst.call(&Request::UndoPutData(data.into())).await?, &active.name)?;
    }
    match dst.call(&Request::UndoPutEnd).await? {
        Reply::UndoRestored { replaced } => {
            println!(
                "{}: put {} back in {} from {}'s undo entry {} ({} bytes); it replicates from there",
                active.name,
                shown,
                escape_controls(&entry.watch),
                from.name,
                entry.id,
                offset
            );
            if let Some(id) = replaced {
                println!("{}: the file it replaced is kept as its undo entry {id}", active.name);
            }
            Ok(())
        }
        Reply::Refused { reason } => Err(fail(REFUSED, format!("{} refused: {reason}", active.name))),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}
