//! Maintenance commands: pause, resume, resync, history.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use warmspare_shared::config::{Job, Node, RunOn};
use warmspare_shared::proto::{Reply, Request};
use warmspare_shared::state::HistoryEntry;

use crate::client::Operator;
use crate::exit::{fail, FAILED, REFUSED};
use crate::status::NODE_TIMEOUT;

/// Sends `req` to every node; fails if any node could not be reached or refused.
pub async fn everywhere(op: &Operator, req: Request, what: &str) -> Result<()> {
    let mut failed = Vec::new();
    for n in &op.cluster.node {
        let outcome = async {
            let mut s = op.connect(n, NODE_TIMEOUT).await?;
            match s.call(&req).await? {
                Reply::Done => Ok(()),
                Reply::Refused { reason } => Err(anyhow!("refused: {reason}")),
                other => Err(anyhow!("unexpected answer {other:?}")),
            }
        }
        .await;
        match outcome {
            Ok(()) => println!("{}: {what}", n.name),
            Err(e) => {
                println!("{}: FAILED: {e:#}", n.name);
                failed.push(n.name.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(fail(FAILED, format!("not done on {}", failed.join(", "))))
    }
}

/// Runs `pause` (`hold`) or `resume`. With `[etcd]`, `pause` first writes
/// the pause key (no automatic failover while it is set; if etcd cannot be
/// written, nothing is paused), then holds replication on every node;
/// `resume` releases replication first, then deletes the key, even when a
/// node could not be reached: a dead active must not keep automatic
/// failover off (that node resumes when told again).
pub async fn pause(op: &Operator, hold: bool) -> Result<()> {
    let etcd = crate::roles::etcd::Etcd::of(op)?;
    if hold {
        if let Some(e) = &etcd {
            e.set_paused(Some(&pause_note(op))).await?;
            println!("etcd: automatic failover paused");
        }
        return everywhere(op, Request::Pause, "paused").await;
    }
    let resumed = everywhere(op, Request::Resume, "resumed").await;
    if let Some(e) = &etcd {
        e.set_paused(None).await?;
        println!("etcd: automatic failover resumed");
    }
    resumed
}

/// The note of the pause key: who paused, and when.
fn pause_note(op: &Operator) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    format!("paused by operator {} at {} UTC", op.name, utc(now))
}

/// The reachable node that reports itself active at the highest epoch, as
/// the nodes' hellos announce it (no status is asked for: see
/// [`Operator::roles`]).
pub async fn active_node(op: &Operator) -> Result<&warmspare_shared::config::Node> {
    let roles = op.roles(NODE_TIMEOUT).await;
    let active = roles
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|r| (n, r)))
        .filter(|(n, r)| r.active == n.name)
        .max_by_key(|(_, r)| r.epoch)
        .ok_or_else(|| fail(FAILED, "no reachable node is active"))?;
    op.cluster
        .node(&active.0.name)
        .ok_or_else(|| anyhow!("{} is not a node", active.0.name))
}

/// Runs `resync` on the active node.
pub async fn resync(op: &Operator, args: &crate::cli::ResyncArgs) -> Result<()> {
    if let Some(w) = &args.watch {
        if op.cluster.watch(w).is_none() {
            return Err(fail(crate::exit::USAGE, format!("there is no watch {w:?}")));
        }
    }
    let node = active_node(op).await?;
    let mut s = op.connect(node, NODE_TIMEOUT).await?;
    let watch = args.watch.clone();
    let req = Request::Resync {
        watch: watch.clone(),
        accept_root: args.accept_root,
        allow_deletes: args.allow_deletes,
    };
    match s.call(&req).await? {
        Reply::Done => {
            let what = watch.as_deref().unwrap_or("every watch");
            if args.accept_root {
                println!("{}: accepted the root of {what} as it is now", node.name);
            }
            if args.allow_deletes {
                println!(
                    "{}: this comparison of {what} may remove what the deletion guard held",
                    node.name
                );
            }
            println!("{}: comparing {what} with every peer now", node.name);
            Ok(())
        }
        Reply::Refused { reason } => Err(fail(FAILED, format!("{} refused: {reason}", node.name))),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

/// Runs `history`: every reachable node's record, merged.
pub async fn history(op: &Operator, json: bool) -> Result<()> {
    let mut merged: Vec<HistoryEntry> = Vec::new();
    let mut reached = 0;
    for n in &op.cluster.node {
        let Ok(mut s) = op.connect(n, NODE_TIMEOUT).await else {
            continue;
        };
        if let Ok(Reply::History(entries)) = s.call(&Request::History).await {
            reached += 1;
            merged.extend(entries);
        }
    }
    if reached == 0 {
        return Err(fail(FAILED, "no node could be reached"));
    }
    // One line per epoch: the same change is recorded by every node that made
    // or learned it; the record of the change itself (ordered by an operator,
    // made through etcd, or the first start) is shown rather than a node's
    // adoption of it.
    // An automatic change through etcd (by "etcd", not a node adopting
    // etcd's role) is made as well.
    let made = |e: &HistoryEntry| {
        e.by.starts_with("operator ")
            || e.from.is_empty()
            || (e.by == "etcd" && !e.reason.starts_with(warmspare_shared::state::ETCD_ADOPTION))
    };
    // Hook failures are not role changes: each is shown as recorded.
    let is_hook = |e: &HistoryEntry| {
        warmspare_shared::config::Hook::ALL
            .iter()
            .any(|h| e.reason.starts_with(&format!("{} failed", h.name())))
    };
    let (hook_failures, merged): (Vec<HistoryEntry>, Vec<HistoryEntry>) = merged.into_iter().partition(is_hook);
    let mut by_epoch: BTreeMap<u64, HistoryEntry> = BTreeMap::new();
    for e in merged {
        by_epoch
            .entry(e.epoch)
            .and_modify(|old| {
                if (made(&e), std::cmp::Reverse(e.time)) > (made(old), std::cmp::Reverse(old.time)) {
                    *old = e.clone();
                }
            })
            .or_insert(e);
    }
    let mut entries: Vec<HistoryEntry> = by_epoch.into_values().collect();
    entries.extend(hook_failures);
    entries.sort_by_key(|e| (e.epoch, e.time));
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<21} {:<14} {:<14} {:<28} BY",
        "EPOCH", "TIME (UTC)", "FROM", "TO", "REASON"
    );
    for e in entries {
        let line = format!(
            "{:<6} {:<21} {:<14} {:<14} {:<28} {}",
            e.epoch,
            utc(e.time),
            if e.from.is_empty() { "-" } else { &e.from },
            e.to,
            e.reason,
            e.by
        );
        // The entries come from the nodes' files: never raw to the terminal.
        println!("{}", warmspare_shared::text::escape_controls(&line));
    }
    Ok(())
}

/// Unix seconds as a UTC date and time, `2026-11-22 03:15:00`.
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs `run-job`. A dump job runs on the active node (its restore, when
/// `--on` names a passive). A `run` job runs where its `on` says: the active
/// node, every reachable passive, or every reachable node; `--on NODE` picks
/// one of those, and a node outside them refuses.
pub async fn run_job(op: &Operator, name: &str, on: Option<&str>) -> Result<()> {
    let job = op
        .cluster
        .job
        .iter()
        .find(|j| j.name == name)
        .ok_or_else(|| fail(crate::exit::USAGE, format!("there is no job {name:?}")))?;
    let targets: Vec<&Node> = match on {
        Some(n) => vec![op
            .cluster
            .node(n)
            .ok_or_else(|| fail(crate::exit::USAGE, format!("there is no node {n:?}")))?],
        None if job.run.is_some() && job.on.is_some_and(|o| o != RunOn::Active) => {
            let views = op.gather(NODE_TIMEOUT).await;
            let mut out = Vec::new();
            for v in &views {
                match &v.status {
                    Ok(s) if job.on == Some(RunOn::All) || s.role.active != s.node => {
                        out.extend(op.cluster.node(&v.node.name));
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("{}: not reached, {name} not run there: {e}", v.node.name),
                }
            }
            if out.is_empty() {
                return Err(fail(FAILED, format!("no reachable node to run {name} on")));
            }
            out
        }
        None => vec![active_node(op).await?],
    };
    let mut failed = Vec::new();
    let mut refused = Vec::new();
    for target in targets {
        match run_job_on(op, job, target).await {
            Ok(()) => {}
            Err(e) if e.downcast_ref::<crate::exit::Exit>().is_some_and(|x| x.code == REFUSED) => {
                eprintln!("{e:#}");
                refused.push(target.name.clone());
            }
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(target.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        Err(fail(FAILED, format!("{name} failed on {}", failed.join(", "))))
    } else if !refused.is_empty() {
        Err(fail(REFUSED, format!("{name} was refused by {}", refused.join(", "))))
    } else {
        Ok(())
    }
}

/// Runs job `job` on `target` and prints the outcome.
async fn run_job_on(op: &Operator, job: &Job, target: &Node) -> Result<()> {
    let name = &job.name;
    let mut s = op.connect(target, NODE_TIMEOUT).await?;
    let wait = job.timeout() + std::time::Duration::from_secs(30);
    match s.call_with(&Request::RunJob { name: name.to_string() }, wait).await? {
        Reply::JobDone(run) => {
            let what = format!("{:?}", run.kind).to_lowercase();
            let secs = (run.end_ms - run.start_ms) as f64 / 1000.0;
            if run.ok {
                println!(
                    "{}: {what} of {name} succeeded in {secs:.1}s (generation {}, {} bytes)",
                    target.name, run.generation, run.bytes
                );
                Ok(())
            } else {
                Err(fail(
                    FAILED,
                    format!(
                        "{}: {what} of {name} failed after {secs:.1}s: {}",
                        target.name, run.detail
                    ),
                ))
            }
        }
        Reply::Refused { reason } => Err(fail(REFUSED, format!("{} refused: {reason}", target.name))),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}
