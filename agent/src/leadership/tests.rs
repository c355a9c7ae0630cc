//! The leadership task's decisions, table-tested.

use std::path::Path;

use warmspare_shared::config::Cluster;
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
        revision: 1,
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
fn the_first_node_in_order_with_failover_is_the_one_eligible() {
    // (failover = false on, old active, me, eligible?)
    let cases: &[(&[&str], &str, &str, bool)] = &[
        (&[], "a", "b", true),
        (&[], "a", "c", false),
        (&[], "b", "a", true),
        (&[], "b", "c", false),
        (&["b"], "a", "b", false),
        (&["b"], "a", "c", true),
        (&["a", "c"], "b", "a", false),
        (&["b", "c"], "a", "c", false),
    ];
    for (off, old, me, yes) in cases {
        let r = eligible(&cluster(off), me, old);
        assert_eq!(r.is_ok(), *yes, "failover off on {off:?}, old {old}, me {me}: {r:?}");
    }
}
