//! What the agents' answers during a role change mean for the operator:
//! the exit code and message of each outcome of the final flush, the
//! demotion, the promotion and a failover, and whether the target has
//! restored the final dumps. Pure functions of the replies and reports,
//! table-tested in `outcome/tests.rs`; the flows in `roles` act on them.

use anyhow::{anyhow, Result};
use warmspare_shared::proto::{JobKind, NodeStatus, Reply, PROMOTE_HOOK_FAILED};
use warmspare_shared::state::RoleState;

use crate::client::TimedOut;
use crate::exit::{fail, FAILED, REFUSED, UNKNOWN};

/// The final flush of `old`: its detail lines when it caught up, or why the
/// switchover stops (nothing was changed yet).
pub(super) fn flushed(old: &str, reply: Result<Reply>) -> Result<Vec<String>> {
    match reply {
        Ok(Reply::Flushed {
            caught_up: true,
            detail,
        }) => Ok(detail),
        Ok(Reply::Flushed {
            caught_up: false,
            detail,
        }) => Err(fail(
            REFUSED,
            format!(
                "the final flush did not complete in time, nothing was changed: {}",
                detail.join("; ")
            ),
        )),
        Ok(Reply::Refused { reason }) => Err(fail(REFUSED, format!("{old} refused the flush: {reason}"))),
        Ok(other) => Err(anyhow!("unexpected answer to the flush: {other:?}")),
        Err(e) if e.is::<TimedOut>() => Err(fail(
            REFUSED,
            "the final flush did not answer in time, nothing was changed",
        )),
        Err(e) => Err(e),
    }
}

/// The demotion of `old` to `next` (the first step that changes anything).
pub(super) fn demoted(old: &str, next: &RoleState, reply: Result<Reply>) -> Result<()> {
    match reply {
        Ok(Reply::Role(r)) if r == *next => Ok(()),
        Ok(Reply::Refused { reason }) => Err(fail(
            REFUSED,
            format!("{old} refused the change (another change may have won): {reason}"),
        )),
        Ok(other) => Err(fail(UNKNOWN, format!("unexpected answer from {old}: {other:?}"))),
        Err(e) => Err(fail(
            UNKNOWN,
            format!("{old} did not confirm its demotion: {e:#}; run `warmsparectl status`"),
        )),
    }
}

/// The promotion of `target` to `next` once `old` was demoted (a
/// switchover): past the demotion, anything but a confirmation leaves the
/// outcome unknown, but for a failed `on_promote`.
pub(super) fn promoted_after_demotion(old: &str, target: &str, next: &RoleState, reply: Result<Reply>) -> Result<()> {
    match reply {
        Ok(Reply::Role(r)) if r == *next => Ok(()),
        Ok(Reply::Refused { reason }) if reason.starts_with(PROMOTE_HOOK_FAILED) => Err(fail(
            FAILED,
            format!("{old} was demoted, but {target} could not take over: {reason}"),
        )),
        Ok(Reply::Refused { reason }) => Err(fail(
            UNKNOWN,
            format!(
                "{target} refused its promotion after {old} was demoted: {reason}; no node is active: run \
                 `warmsparectl failover --to {target} --force`"
            ),
        )),
        Ok(other) => Err(fail(UNKNOWN, format!("unexpected answer from {target}: {other:?}"))),
        Err(e) => Err(fail(
            UNKNOWN,
            format!("{target} did not confirm its promotion: {e:#}; run `warmsparectl status`"),
        )),
    }
}

/// The promotion of `to` to `next` by a failover.
pub(super) fn failed_over(to: &str, next: &RoleState, reply: Result<Reply>) -> Result<()> {
    match reply {
        Ok(Reply::Role(r)) if r == *next => Ok(()),
        Ok(Reply::Refused { reason }) if reason.starts_with(PROMOTE_HOOK_FAILED) => {
            Err(fail(FAILED, format!("{to} could not take over: {reason}")))
        }
        Ok(Reply::Refused { reason }) => Err(fail(REFUSED, format!("{to} refused: {reason}"))),
        Ok(other) => Err(fail(UNKNOWN, format!("unexpected answer: {other:?}"))),
        Err(e) => Err(fail(UNKNOWN, format!("{to} did not confirm its promotion: {e:#}"))),
    }
}

/// The final dumps `jobs` (`(job, generation)`) that `node`'s report `st`
/// does not show restored yet, or a refusal when one of them failed to
/// restore (nothing has changed yet). Without a report (the target did not
/// answer) every one is pending: an unanswered question is not a restore.
pub(super) fn restore_pending(node: &str, st: Option<&NodeStatus>, jobs: &[(String, u64)]) -> Result<Vec<String>> {
    let Some(st) = st else {
        return Ok(jobs.iter().map(|(job, _)| job.clone()).collect());
    };
    let mut pending = Vec::new();
    for (job, generation) in jobs {
        let last = st.jobs.iter().find(|j| &j.name == job).and_then(|j| j.last.as_ref());
        match last {
            Some(r) if r.kind == JobKind::Restore && r.generation >= *generation && r.ok => {}
            Some(r) if r.kind == JobKind::Restore && r.generation >= *generation => {
                return Err(fail(
                    REFUSED,
                    format!(
                        "{node} failed to restore {job} generation {}: {}; nothing was changed",
                        r.generation, r.detail
                    ),
                ));
            }
            _ => pending.push(job.clone()),
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests;
