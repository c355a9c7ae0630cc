//! Table tests of what each answer during a role change means: exit code
//! and message.

use anyhow::anyhow;
use warmspare_shared::proto::{JobKind, JobRun, JobStatus, Reply, PROMOTE_HOOK_FAILED};

use super::*;
use crate::exit::{FAILED, REFUSED, UNKNOWN};
use crate::fixtures::{cluster, code, role, status};

/// Each reply, and the exit code and message start it must give (`None`:
/// it went through).
type Cases<M> = Vec<(Result<Reply>, Option<(u8, M)>)>;

/// The jobs a node reports, and the jobs still pending or the start of the
/// refusal.
type RestoreCases = Vec<(Vec<JobStatus>, std::result::Result<Vec<&'static str>, &'static str>)>;

fn refused(reason: &str) -> Result<Reply> {
    Ok(Reply::Refused { reason: reason.into() })
}

/// The exit code and message of `r`, or `None` when it went through.
fn outcome(r: Result<()>) -> Option<(u8, String)> {
    r.err().map(|e| (code(&e), format!("{e:#}")))
}

#[test]
fn flush_outcomes() {
    let cases: Cases<&str> = vec![
        (
            Ok(Reply::Flushed {
                caught_up: true,
                detail: vec!["b: caught up".into()],
            }),
            None,
        ),
        (
            Ok(Reply::Flushed {
                caught_up: false,
                detail: vec!["b: 3 pending".into(), "c: down".into()],
            }),
            Some((
                REFUSED,
                "the final flush did not complete in time, nothing was changed: b: 3 pending; c: down",
            )),
        ),
        (refused("paused"), Some((REFUSED, "a refused the flush: paused"))),
        (
            Ok(Reply::Role(role(1, "a"))),
            Some((FAILED, "unexpected answer to the flush: Role")),
        ),
        (
            Err(TimedOut.into()),
            Some((REFUSED, "the final flush did not answer in time, nothing was changed")),
        ),
        (Err(anyhow!("connection reset")), Some((FAILED, "connection reset"))),
    ];
    for (reply, want) in cases {
        let got = flushed("a", reply);
        match (got, want) {
            (Ok(detail), None) => assert_eq!(detail, vec!["b: caught up".to_string()]),
            (Err(e), Some((c, m))) => {
                assert_eq!(code(&e), c, "{e:#}");
                assert!(format!("{e:#}").starts_with(m), "{e:#} does not start with {m}");
            }
            (got, want) => panic!("{got:?} where {want:?} was wanted"),
        }
    }
}

#[test]
fn demotion_outcomes() {
    let next = role(2, "b");
    let cases: Cases<&str> = vec![
        (Ok(Reply::Role(role(2, "b"))), None),
        (
            refused("expected epoch 1"),
            Some((
                REFUSED,
                "a refused the change (another change may have won): expected epoch 1",
            )),
        ),
        (
            Ok(Reply::Role(role(3, "b"))),
            Some((UNKNOWN, "unexpected answer from a: Role")),
        ),
        (
            Err(anyhow!("reset")),
            Some((
                UNKNOWN,
                "a did not confirm its demotion: reset; run `warmsparectl status`",
            )),
        ),
    ];
    for (reply, want) in cases {
        let got = outcome(demoted("a", &next, reply));
        let want = want.map(|(c, m)| (c, m.to_string()));
        match (&got, &want) {
            (None, None) => {}
            (Some((gc, gm)), Some((wc, wm))) if gc == wc && gm.starts_with(wm.as_str()) => {}
            _ => panic!("{got:?} where {want:?} was wanted"),
        }
    }
}

#[test]
fn promotion_after_a_demotion_outcomes() {
    let next = role(2, "b");
    let hook = format!("{PROMOTE_HOOK_FAILED}: exit 1");
    let cases: Cases<String> = vec![
        (Ok(Reply::Role(role(2, "b"))), None),
        (
            refused(&hook),
            Some((FAILED, format!("a was demoted, but b could not take over: {hook}"))),
        ),
        (
            refused("no"),
            Some((
                UNKNOWN,
                "b refused its promotion after a was demoted: no; no node is active: run `warmsparectl failover \
                 --to b --force`"
                    .into(),
            )),
        ),
        (
            Ok(Reply::Role(role(2, "a"))),
            Some((UNKNOWN, "unexpected answer from b: Role".into())),
        ),
        (
            Err(anyhow!("reset")),
            Some((
                UNKNOWN,
                "b did not confirm its promotion: reset; run `warmsparectl status`".into(),
            )),
        ),
    ];
    for (reply, want) in cases {
        let got = outcome(promoted_after_demotion("a", "b", &next, reply));
        match (&got, &want) {
            (None, None) => {}
            (Some((gc, gm)), Some((wc, wm))) if gc == wc && gm.starts_with(wm.as_str()) => {}
            _ => panic!("{got:?} where {want:?} was wanted"),
        }
    }
}

#[test]
fn failover_outcomes() {
    let next = role(5, "b");
    let hook = format!("{PROMOTE_HOOK_FAILED}: exit 1");
    let cases: Cases<String> = vec![
        (Ok(Reply::Role(role(5, "b"))), None),
        (refused(&hook), Some((FAILED, format!("b could not take over: {hook}")))),
        (refused("stale"), Some((REFUSED, "b refused: stale".into()))),
        (
            Ok(Reply::Role(role(6, "b"))),
            Some((UNKNOWN, "unexpected answer: Role".into())),
        ),
        (
            Err(anyhow!("reset")),
            Some((UNKNOWN, "b did not confirm its promotion: reset".into())),
        ),
    ];
    for (reply, want) in cases {
        let got = outcome(failed_over("b", &next, reply));
        match (&got, &want) {
            (None, None) => {}
            (Some((gc, gm)), Some((wc, wm))) if gc == wc && gm.starts_with(wm.as_str()) => {}
            _ => panic!("{got:?} where {want:?} was wanted"),
        }
    }
}

fn job(name: &str, kind: JobKind, generation: u64, ok: bool) -> JobStatus {
    JobStatus {
        name: name.into(),
        last: Some(JobRun {
            job: name.into(),
            kind,
            start_ms: 0,
            end_ms: 0,
            ok,
            detail: if ok { String::new() } else { "exit 2".into() },
            bytes: 0,
            generation,
        }),
        next: None,
        runs_ok: 0,
        runs_failed: 0,
        generation,
    }
}

#[test]
fn restore_checks() {
    let c = cluster();
    let wanted = vec![("db".to_string(), 7), ("ldap".to_string(), 3)];
    let with = |jobs: Vec<JobStatus>| {
        let mut s = status(&c, "b", role(1, "a"));
        s.jobs = jobs;
        s
    };
    let cases: RestoreCases = vec![
        (Vec::new(), Ok(vec!["db", "ldap"])),
        (
            vec![
                job("db", JobKind::Restore, 7, true),
                job("ldap", JobKind::Restore, 4, true),
            ],
            Ok(vec![]),
        ),
        // An older generation, or the dump itself, is not the restore.
        (
            vec![
                job("db", JobKind::Restore, 6, true),
                job("ldap", JobKind::Dump, 3, true),
            ],
            Ok(vec!["db", "ldap"]),
        ),
        (
            vec![
                job("db", JobKind::Restore, 7, true),
                job("ldap", JobKind::Restore, 3, false),
            ],
            Err("b failed to restore ldap generation 3: exit 2; nothing was changed"),
        ),
        // A failed restore of an older generation is still waited for.
        (
            vec![
                job("db", JobKind::Restore, 6, false),
                job("ldap", JobKind::Restore, 3, true),
            ],
            Ok(vec!["db"]),
        ),
    ];
    for (jobs, want) in cases {
        let st = with(jobs.clone());
        match (restore_pending("b", Some(&st), &wanted), want) {
            (Ok(p), Ok(w)) => assert_eq!(p, w, "{jobs:?}"),
            (Err(e), Err(w)) => {
                assert_eq!(code(&e), REFUSED);
                assert_eq!(format!("{e:#}"), w);
            }
            (got, want) => panic!("{got:?} where {want:?} was wanted for {jobs:?}"),
        }
    }
    // Without a report (b did not answer) every dump is still pending.
    assert_eq!(restore_pending("b", None, &wanted).unwrap(), vec!["db", "ldap"]);
}
