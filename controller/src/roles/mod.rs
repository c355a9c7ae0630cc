//! Role changes: switchover, failover, failback.
//!
//! Every change is a compare-and-swap on each agent's persisted role state:
//! the controller names the epoch and active node it expects, and an agent
//! that sees anything else refuses. A switchover demotes the old active
//! first (it stops shipping at once), then promotes the target at the next
//! epoch; a failover promotes the target alone.
//!
//! With `[etcd]` the role lives in etcd: after the preflight (and the final
//! flush) each change is first one transaction there (`etcd`), and only
//! then are the agents told; an agent that misses the message follows
//! etcd by itself. A refused transaction (another change won) exits 3 and
//! changes nothing.
//!
//! This file holds the flows, which talk to the agents; `decide` the
//! decisions they act on, pure functions of the cluster file and the
//! nodes' reports, `etcd` the transactions and their decisions, and
//! `outcome` what the agents' answers mean (exit codes and messages), all
//! table-tested.

use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use warmspare_shared::proto::{Reply, Request};
use warmspare_shared::state::RoleState;

use crate::cli::{FailoverArgs, SwitchoverArgs};
use crate::client::Operator;
use crate::exit::{fail, REFUSED, USAGE};
use crate::status::NODE_TIMEOUT;

mod decide;
pub mod etcd;
mod outcome;

use decide::{already_acting, next_epoch, plan_failover, preflight, FailoverPlan};

/// How long a promotion may take to be answered: the target runs its
/// `on_promote` hook before it answers.
fn promote_wait(op: &Operator) -> Duration {
    op.cluster.cluster.hook_timeout + Duration::from_secs(60)
}

fn step(s: &str) {
    println!("--> {s}");
}

fn confirm(question: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(fail(USAGE, "not on a terminal: pass --yes to confirm"));
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(fail(REFUSED, "not confirmed"))
    }
}

/// Runs `switchover`.
pub async fn switchover(op: &Operator, args: &SwitchoverArgs, reason: &str) -> Result<()> {
    let deadline = Instant::now() + args.timeout;
    // A name that is not in the cluster file is a usage error, as for
    // failover.
    if op.cluster.node(&args.to).is_none() {
        return Err(fail(USAGE, format!("{:?} is not a node of the cluster", args.to)));
    }
    let views = op.gather(NODE_TIMEOUT).await;
    // Already there (and acting as active): nothing to do, as for failover.
    if let Some(epoch) = already_acting(&views, &args.to) {
        println!("{} is already the active node at epoch {epoch}: nothing to do", args.to);
        return Ok(());
    }
    let (role, good) = match preflight(&op.cluster, &views, &args.to) {
        Ok(r) => r,
        Err(bad) => {
            for b in &bad {
                println!("preflight: FAILED: {b}");
            }
            return Err(fail(
                REFUSED,
                format!("switchover to {} refused: {}", args.to, bad.join("; ")),
            ));
        }
    };
    for g in &good {
        println!("preflight: ok: {g}");
    }
    // With etcd, etcd must agree with the nodes before anything is done.
    let etcd = etcd::Etcd::of(op)?;
    let old_key = match &etcd {
        Some(e) => match etcd::agrees(&role, &e.role().await?) {
            Ok(l) => {
                println!("preflight: ok: etcd names {} active at epoch {}", l.name, role.epoch);
                Some(l)
            }
            Err(why) => {
                println!("preflight: FAILED: {why}");
                return Err(fail(REFUSED, format!("switchover to {} refused: {why}", args.to)));
            }
        },
        None => None,
    };
    let new_epoch = next_epoch(role.epoch)?;
    if args.dry_run {
        println!(
            "dry run: the switchover from {} to {} at epoch {} would go ahead",
            role.active, args.to, new_epoch
        );
        return Ok(());
    }
    confirm(
        &format!("Move the active role from {} to {}?", role.active, args.to),
        args.yes,
    )?;
    let next = RoleState {
        epoch: new_epoch,
        active: args.to.clone(),
    };
    let old = op
        .cluster
        .node(&role.active)
        .ok_or_else(|| anyhow!("{} is not a node", role.active))?;
    let target = op
        .cluster
        .node(&args.to)
        .ok_or_else(|| anyhow!("{} is not a node", args.to))?;

    let mut s_old = op.connect(old, NODE_TIMEOUT).await?;
    // Final dumps: each dump job runs once more on the old active; the flush
    // below ships them, and the target must have restored them.
    let mut expect_restored: Vec<(String, u64)> = Vec::new();
    if !args.skip_jobs {
        for job in op.cluster.job.iter().filter(|j| j.dump.is_some()) {
            step(&format!("final dump of {} on {}", job.name, old.name));
            let wait = job.timeout() + Duration::from_secs(30);
            match s_old.call_with(&Request::RunJob { name: job.name.clone() }, wait).await {
                Ok(Reply::JobDone(run)) if run.ok => {
                    println!("    generation {}, {} bytes", run.generation, run.bytes);
                    if job.restore.is_some() {
                        expect_restored.push((job.name.clone(), run.generation));
                    }
                }
                Ok(Reply::JobDone(run)) => {
                    return Err(fail(
                        REFUSED,
                        format!(
                            "the final dump of {} failed, nothing was changed (--skip-jobs goes ahead without it): {}",
                            job.name, run.detail
                        ),
                    ));
                }
                Ok(other) => {
                    return Err(fail(
                        REFUSED,
                        format!(
                            "the final dump of {} did not run, nothing was changed: {other:?}",
                            job.name
                        ),
                    ))
                }
                Err(e) => {
                    return Err(fail(
                        REFUSED,
                        format!(
                            "the final dump of {} did not finish, nothing was changed: {e:#}",
                            job.name
                        ),
                    ))
                }
            }
        }
    }

    step(&format!(
        "flushing {}: shipping pending changes and comparing every watch with every peer",
        old.name
    ));
    let left = deadline.saturating_duration_since(Instant::now());
    let flush = s_old
        .call_with(
            &Request::Flush {
                timeout_ms: left.as_millis() as u64,
            },
            left + Duration::from_secs(5),
        )
        .await;
    println!("    {}", outcome::flushed(&old.name, flush)?.join("; "));
    if !expect_restored.is_empty() {
        step(&format!("waiting for {} to restore the final dumps", target.name));
        wait_restored(op, &target.name, &expect_restored, deadline).await?;
    }

    let demote = match (&etcd, &old_key) {
        (Some(e), Some(key)) => {
            step(&format!(
                "moving the role in etcd: {} at epoch {} -> {} at epoch {} (one transaction)",
                old.name, role.epoch, target.name, next.epoch
            ));
            e.switch(key, &target.name, role.epoch).await?;
            // etcd decided: the old active follows (it may have already,
            // on its own renewal).
            Request::Adopt {
                state: next.clone(),
                reason: reason.into(),
            }
        }
        _ => Request::SetRole {
            expect: role.clone(),
            next: next.clone(),
            reason: reason.into(),
        },
    };
    step(&format!(
        "demoting {} (epoch {} -> {})",
        old.name, role.epoch, next.epoch
    ));
    let demotion = s_old.call(&demote).await;
    outcome::demoted(&old.name, &next, demotion)?;

    step(&format!("promoting {} to active at epoch {}", target.name, next.epoch));
    let promoted = async {
        let mut s = op.connect(target, NODE_TIMEOUT).await?;
        s.call_with(
            &Request::SetRole {
                expect: role.clone(),
                next: next.clone(),
                reason: reason.into(),
            },
            promote_wait(op),
        )
        .await
    }
    .await;
    outcome::promoted_after_demotion(&old.name, &target.name, &next, promoted)?;

    step(&format!(
        "waiting for {} to reach {} as the new active",
        target.name, old.name
    ));
    let caught_up = wait_connected(op, &target.name, &old.name, deadline).await;
    if caught_up {
        println!(
            "done: {} is active at epoch {}; {} is passive and receiving",
            target.name, next.epoch, old.name
        );
    } else {
        println!(
            "done: {} is active at epoch {}; it has not yet reported a connection to {} (see status)",
            target.name, next.epoch, old.name
        );
    }
    Ok(())
}

/// Waits until `active` reports a connected, acknowledged link to `peer`.
async fn wait_connected(op: &Operator, active: &str, peer: &str, deadline: Instant) -> bool {
    let Some(node) = op.cluster.node(active) else {
        return false;
    };
    while Instant::now() < deadline {
        if let Ok(mut s) = op.connect(node, NODE_TIMEOUT).await {
            if let Ok(Reply::Status(st)) = s.call(&Request::Status).await {
                let links: Vec<_> = st.links.iter().filter(|l| l.peer == peer).collect();
                if links.iter().all(|l| l.connected && l.last_success.is_some()) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Runs `failover`.
pub async fn failover(op: &Operator, args: &FailoverArgs) -> Result<()> {
    if op.cluster.node(&args.to).is_none() {
        return Err(fail(USAGE, format!("{:?} is not a node of the cluster", args.to)));
    }
    if !args.force {
        return Err(fail(
            REFUSED,
            "failover promotes a node without the active node's agreement; changes the active made since the last \
             sync stay on it (they are preserved under diverged/ when it rejoins). Pass --force to go ahead, or use \
             switchover if both nodes are up",
        ));
    }
    let views = op.gather(args.timeout).await;
    let (role, expect, mut next) = match plan_failover(&views, &args.to)? {
        FailoverPlan::Already { epoch } => {
            println!("{} is already active at epoch {epoch}", args.to);
            return Ok(());
        }
        FailoverPlan::Promote {
            from,
            expect,
            next,
            retry,
        } => {
            if let Some(why) = &retry {
                step(&format!(
                    "{} holds epoch {} but is fenced ({why}): promoting it again",
                    args.to, from.epoch
                ));
            }
            (from, expect, next)
        }
    };
    if let Some(e) = etcd::Etcd::of(op)? {
        let take = etcd::plan_take(&e.role().await?, &args.to, next.epoch).map_err(|why| fail(REFUSED, why))?;
        step(&format!("taking the role in etcd for {} ({take:?})", args.to));
        next.epoch = e.take(&take, &args.to).await?;
    }
    if role.active == args.to {
        step(&format!("promoting {} to active at epoch {}", args.to, next.epoch));
    } else {
        step(&format!(
            "promoting {} to active at epoch {} ({} is unreachable)",
            args.to, next.epoch, role.active
        ));
    }
    let node = op
        .cluster
        .node(&args.to)
        .ok_or_else(|| anyhow!("{} is not a node", args.to))?;
    let mut s = op.connect(node, args.timeout).await?;
    let promotion = s
        .call_with(
            &Request::SetRole {
                expect,
                next: next.clone(),
                reason: "failover".into(),
            },
            promote_wait(op),
        )
        .await;
    outcome::failed_over(&args.to, &next, promotion)?;
    // Other reachable passives learn the new epoch now rather than at the next push.
    for v in &views {
        if v.node.name != args.to && v.status.is_ok() {
            if let Ok(mut s) = op.connect(&v.node, args.timeout).await {
                let _ = s
                    .call(&Request::Adopt {
                        state: next.clone(),
                        reason: "failover".into(),
                    })
                    .await;
            }
        }
    }
    if role.active == args.to {
        println!(
            "done: {} is active at epoch {}. A peer that comes back at a lower epoch adopts this one.",
            args.to, next.epoch
        );
    } else {
        println!(
            "done: {} is active at epoch {}. When {} comes back it steps down at once, and files it changed after the last sync are kept under its diverged/ folder.",
            args.to, next.epoch, role.active
        );
    }
    Ok(())
}

/// Waits until `node` has restored each `(job, generation)`; a failed restore
/// of one of them refuses the switchover (nothing has changed yet).
async fn wait_restored(op: &Operator, node: &str, jobs: &[(String, u64)], deadline: Instant) -> Result<()> {
    let n = op.cluster.node(node).ok_or_else(|| anyhow!("{node} is not a node"))?;
    loop {
        let mut report = None;
        if let Ok(mut s) = op.connect(n, NODE_TIMEOUT).await {
            if let Ok(Reply::Status(st)) = s.call(&Request::Status).await {
                report = Some(st);
            }
        }
        let pending = outcome::restore_pending(node, report.as_deref(), jobs)?;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(
                REFUSED,
                format!(
                    "{node} did not restore {} in time; nothing was changed",
                    pending.join(", ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
