//! The leadership task's decisions, table-tested.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use warmspare_shared::config::Cluster;
use warmspare_shared::etcd::elect::MemberRecord;
use warmspare_shared::etcd::{Leader, Role as EtcdRole};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::state::RoleState;

use super::decide::{as_active, as_passive, eligible, Step};

/// Nodes a, b, c in this order; `failover = false` on those named.
fn cluster(no_failover: &[&str]) -> Cluster {
    let mut text = "[cluster]\nname = \"t\"\npreferred_active = \"a\"\nstate_dir = \"/var/lib/warmspare\"\n\
                    key_file = \"/etc/warmspare/node.key\"\n\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n"
        .to_string();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        text += &format!(
            "[[node]]\nname = \"{name}\"\nssh = \"127.0.0.1:{}\"\npublic_key = \"{}\"\n",
            7422 + i,
            SecretKey::generate().public().to_openssh()
        );
        if no_failover.contains(name) {
            text += "failover = false\n";
        }
        text += "\n";
    }
    Cluster::parse(&text, Path::new("t.toml")).unwrap()
}

fn local(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.into(),
    }
}

fn etcd(leader: Option<&str>, epoch: u64) -> EtcdRole {
    EtcdRole {
        leader: leader.map(|n| Leader {
            name: n.into(),
            lease: 7,
        }),
        epoch,
        paused: None,
        handover: None,
        revision: 1,
    }
}

/// `etcd(leader, epoch)` paused with a note, or during a switchover from
/// `old`.
fn marked(leader: Option<&str>, epoch: u64, paused: bool, old: Option<&str>) -> EtcdRole {
    EtcdRole {
        paused: paused.then(|| "paused by operator alice".to_string()),
        handover: old.map(str::to_string),
        ..etcd(leader, epoch)
    }
}

#[test]
fn a_node_named_active_claims_takes_adopts_or_waits() {
    let c = cluster(&[]);
    // (local epoch, etcd leader, etcd epoch, expected step's kind and epochs)
    let seize = |from, to, moved: bool| (from, to, moved);
    type Case<'a> = (u64, Option<&'a str>, u64, &'a str, Option<(u64, u64, bool)>);
    let cases: Vec<Case> = vec![
        // A restart: the key still names a at its epoch, on the old lease.
        (5, Some("a"), 5, "claim", Some(seize(5, 5, false))),
        // An operator named a again at a higher epoch.
        (6, Some("a"), 5, "claim", Some(seize(5, 6, false))),
        // The first start (etcd empty), or etcd behind after an operator's change.
        (1, None, 0, "seize", Some(seize(0, 1, false))),
        (6, None, 5, "seize", Some(seize(5, 6, false))),
        (9, None, 5, "seize", Some(seize(5, 9, false))),
        // The key lapsed at a's own epoch: a takes it again at the next.
        (5, None, 5, "seize", Some(seize(5, 6, true))),
        // Another node holds it: wait (a switchover's old active not yet gone).
        (6, Some("b"), 5, "wait", None),
        (5, Some("b"), 5, "wait", None),
        // etcd moved on: adopt, or wait when nobody holds the key.
        (5, Some("b"), 6, "adopt", None),
        (5, None, 6, "wait", None),
    ];
    for (e, leader, n, kind, epochs) in cases {
        let step = as_active("a", &c, &local(e, "a"), &etcd(leader, n));
        let what = format!("local {e}, etcd {leader:?} at {n}: {step:?}");
        match (kind, &step) {
            ("claim", Step::Claim { from, to }) => assert_eq!(Some((*from, *to, false)), epochs, "{what}"),
            ("seize", Step::Seize { from, to, local }) => {
                assert_eq!(Some((*from, *to, local.is_some())), epochs, "{what}")
            }
            ("adopt", Step::Adopt(next)) => assert_eq!(*next, local(n, "b"), "{what}"),
            ("wait", Step::Wait(_)) => {}
            _ => panic!("expected {kind}: {what}"),
        }
    }
}

#[test]
fn a_passive_takes_only_an_absent_key_at_or_above_its_epoch() {
    let c = cluster(&[]);
    let ok = || Ok(());
    // The key lapsed at b's epoch: take it, epoch + 1, with the reason.
    match as_passive(&c, &local(5, "a"), &etcd(None, 5), ok()) {
        Step::Seize {
            from: 5,
            to: 6,
            local: Some(reason),
        } => assert_eq!(reason, "automatic failover: the leader key of a expired"),
        other => panic!("{other:?}"),
    }
    // etcd ahead with no leader: take from its epoch.
    assert!(matches!(
        as_passive(&c, &local(5, "a"), &etcd(None, 7), ok()),
        Step::Seize { from: 7, to: 8, .. }
    ));
    // The key held: nothing, or adopt when etcd is ahead.
    assert!(matches!(
        as_passive(&c, &local(5, "a"), &etcd(Some("a"), 5), ok()),
        Step::Wait(_)
    ));
    assert_eq!(
        as_passive(&c, &local(5, "a"), &etcd(Some("c"), 6), ok()),
        Step::Adopt(local(6, "c"))
    );
    // etcd names a node the cluster file does not know: no adoption.
    assert!(matches!(
        as_passive(&c, &local(5, "a"), &etcd(Some("zz"), 6), ok()),
        Step::Wait(_)
    ));
    // etcd behind the local epoch: the named active records it, not b.
    assert!(matches!(
        as_passive(&c, &local(6, "a"), &etcd(None, 5), ok()),
        Step::Wait(_)
    ));
    // Not eligible: never a take.
    assert!(matches!(
        as_passive(&c, &local(5, "a"), &etcd(None, 5), Err("no".into())),
        Step::Wait(w) if w == "no"
    ));
}

#[test]
fn a_pause_or_a_handover_holds_every_automatic_take() {
    let c = cluster(&[]);
    let ok = || Ok(());
    // (etcd leader, etcd epoch, paused, handover from, b's step: take?)
    type Case<'a> = (Option<&'a str>, u64, bool, Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        (None, 5, false, None, "seize"),
        (None, 5, true, None, "wait"),
        (None, 7, true, None, "wait"),
        (None, 5, false, Some("a"), "wait"),
        (None, 5, true, Some("a"), "wait"),
        // A higher epoch is still adopted, paused or not.
        (Some("c"), 6, true, None, "adopt"),
        (Some("a"), 5, true, None, "wait"),
    ];
    for (leader, n, paused, old, kind) in cases {
        let e = marked(*leader, *n, *paused, *old);
        let step = as_passive(&c, &local(5, "a"), &e, ok());
        let what = format!("{e:?}: {step:?}");
        match (*kind, &step) {
            ("seize", Step::Seize { .. }) | ("adopt", Step::Adopt(_)) => {}
            ("wait", Step::Wait(why)) if *paused && leader.is_none() => {
                assert!(why.contains("automatic failover is paused"), "{what}")
            }
            ("wait", Step::Wait(_)) => {}
            _ => panic!("expected {kind}: {what}"),
        }
    }
    // The target of a switchover (the key names it at its epoch) claims
    // only once the old active's lease is gone; a pause does not hold it.
    let claim = |e: &EtcdRole| as_active("b", &c, &local(6, "b"), e);
    assert!(matches!(
        claim(&marked(Some("b"), 6, false, Some("a"))),
        Step::Wait(w) if w.contains("a hands the role over")
    ));
    assert_eq!(claim(&marked(Some("b"), 6, true, None)), Step::Claim { from: 6, to: 6 });
    // The active whose key lapsed takes it again, paused or not (no other
    // node is promoted), but not while an old active may still act.
    assert!(matches!(
        as_active("a", &c, &local(5, "a"), &marked(None, 5, true, None)),
        Step::Seize { from: 5, to: 6, .. }
    ));
    assert!(matches!(
        as_active("a", &c, &local(5, "a"), &marked(None, 5, false, Some("b"))),
        Step::Wait(_)
    ));
    // The old active of a switchover adopts the new role at once.
    assert_eq!(
        as_active("a", &c, &local(5, "a"), &marked(Some("b"), 6, false, Some("a"))),
        Step::Adopt(local(6, "b"))
    );
}

/// Member records `(name, failover, lag in ms)`.
fn records(list: &[(&str, bool, Option<u64>)]) -> BTreeMap<String, MemberRecord> {
    list.iter()
        .map(|(n, failover, lag_ms)| {
            (
                n.to_string(),
                MemberRecord {
                    failover: *failover,
                    lag_ms: *lag_ms,
                    at_ms: 1_700_000_000_000,
                },
            )
        })
        .collect()
}

#[test]
fn the_most_caught_up_eligible_node_other_than_the_old_active_takes_the_role() {
    const MAX: Duration = Duration::from_secs(3);
    type Case<'a> = (
        &'a [&'a str],
        &'a [(&'a str, bool, Option<u64>)],
        &'a str,
        &'a str,
        bool,
    );
    // (failover = false on, records, old active, me, may take?)
    let cases: &[Case] = &[
        // Two of three nodes publishing: b caught up takes over from a.
        (&[], &[("a", true, None), ("b", true, Some(200))], "a", "b", true),
        // b further behind than max_lag_on_failover: nobody (c has no record).
        (&[], &[("a", true, None), ("b", true, Some(5_000))], "a", "b", false),
        // Three nodes: c caught up, b behind: c takes it, not b (the file's
        // first failover node, which the old rule picked).
        (&[], &[("b", true, Some(5_000)), ("c", true, Some(100))], "a", "c", true),
        (
            &[],
            &[("b", true, Some(5_000)), ("c", true, Some(100))],
            "a",
            "b",
            false,
        ),
        // Both within max_lag but c more caught up by more than LAG_TIE.
        (&[], &[("b", true, Some(2_500)), ("c", true, Some(100))], "a", "c", true),
        // Within LAG_TIE: the priority order (b before c) decides.
        (&[], &[("b", true, Some(600)), ("c", true, Some(100))], "a", "b", true),
        (&[], &[("b", true, Some(600)), ("c", true, Some(100))], "a", "c", false),
        // The old active's own record never counts, even with a lag (a
        // node that still publishes as a passive at an older role state).
        (&[], &[("a", true, Some(0)), ("b", true, Some(900))], "a", "b", true),
        (&[], &[("a", true, Some(0)), ("c", true, Some(900))], "a", "c", true),
        // The picked node's record vanished (down): the next one is picked.
        (&[], &[("c", true, Some(2_000))], "a", "c", true),
        // No record of my own: not eligible, whatever the others.
        (&[], &[("c", true, Some(0))], "a", "b", false),
        // No lag measured yet: not eligible.
        (&[], &[("b", true, None)], "a", "b", false),
        // failover = false in the file, or in the record.
        (&["b"], &[("b", true, Some(0))], "a", "b", false),
        (
            &["b"],
            &[("b", true, Some(0)), ("c", true, Some(2_000))],
            "a",
            "c",
            true,
        ),
        (&[], &[("b", false, Some(0)), ("c", true, Some(2_000))], "a", "c", true),
        (&[], &[("b", false, Some(0))], "a", "b", false),
        // The old active b, c most caught up against a.
        (&[], &[("a", true, Some(1_500)), ("c", true, Some(100))], "b", "c", true),
        (
            &[],
            &[("a", true, Some(1_500)), ("c", true, Some(100))],
            "b",
            "a",
            false,
        ),
    ];
    for (off, recs, old, me, yes) in cases {
        let r = eligible(&cluster(off), me, old, &records(recs), MAX);
        assert_eq!(
            r.is_ok(),
            *yes,
            "failover off on {off:?}, records {recs:?}, old {old}, me {me}: {r:?}"
        );
    }
    // The reasons say why.
    let r = eligible(&cluster(&[]), "b", "a", &records(&[("b", true, Some(5_000))]), MAX);
    assert_eq!(
        r.unwrap_err(),
        "b is not eligible: 5000 ms behind, more than max_lag_on_failover (3000 ms)"
    );
    let r = eligible(
        &cluster(&[]),
        "b",
        "a",
        &records(&[("b", true, Some(2_500)), ("c", true, Some(100))]),
        MAX,
    );
    assert!(r.unwrap_err().starts_with("c takes the role"));
    let r = eligible(&cluster(&["b"]), "b", "a", &records(&[]), MAX);
    assert_eq!(r.unwrap_err(), "b has failover = false: only an operator promotes it");
}
