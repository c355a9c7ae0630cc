#![allow(clippy::unwrap_used)]

use super::*;
use crate::fixtures::code;

fn etcd(leader: Option<(&str, i64)>, epoch: u64, handover: Option<&str>) -> EtcdRole {
    EtcdRole {
        leader: leader.map(|(name, lease)| Leader {
            name: name.into(),
            lease,
        }),
        epoch,
        paused: None,
        handover: handover.map(str::to_string),
        revision: 1,
    }
}

/// A leader key (name, lease), if any.
type Key<'a> = Option<(&'a str, i64)>;

fn role(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.into(),
    }
}

#[test]
fn a_switchover_goes_ahead_only_when_etcd_agrees_with_the_nodes() {
    // (etcd leader, etcd epoch, handover, the nodes' role, agrees?, words of the refusal)
    type Case<'a> = (Key<'a>, u64, Option<&'a str>, RoleState, Option<&'a str>);
    let cases: &[Case] = &[
        (Some(("a", 7)), 5, None, role(5, "a"), None),
        (
            Some(("a", 7)),
            6,
            None,
            role(5, "a"),
            Some("etcd names a active at epoch 6"),
        ),
        (Some(("b", 7)), 5, None, role(5, "a"), Some("etcd names b active")),
        (None, 5, None, role(5, "a"), Some("no leader key at epoch 5")),
        (
            Some(("a", 7)),
            5,
            Some("c"),
            role(5, "a"),
            Some("switchover from c under way"),
        ),
    ];
    for (leader, epoch, handover, nodes, refusal) in cases {
        let e = etcd(*leader, *epoch, *handover);
        match (agrees(nodes, &e), refusal) {
            (Ok(l), None) => assert_eq!(
                l,
                Leader {
                    name: "a".into(),
                    lease: 7
                }
            ),
            (Err(why), Some(words)) => assert!(why.contains(words), "{e:?}: {why}"),
            (got, _) => panic!("{e:?} with {nodes:?}: {got:?}"),
        }
    }
}

#[test]
fn a_failover_takes_an_absent_key_claims_its_own_and_refuses_a_held_one() {
    // (etcd leader, etcd epoch, handover, the planned epoch, expected)
    type Case<'a> = (Key<'a>, u64, Option<&'a str>, u64, std::result::Result<Take, &'a str>);
    let cases: &[Case] = &[
        (None, 5, None, 6, Ok(Take::Seize { from: 5, to: 6 })),
        // The agents plan further (a held target, a peer unreachable).
        (None, 5, None, 105, Ok(Take::Seize { from: 5, to: 105 })),
        // etcd ahead of the agents: never below etcd's next epoch.
        (None, 9, None, 6, Ok(Take::Seize { from: 9, to: 10 })),
        (Some(("b", 3)), 5, None, 6, Ok(Take::Claim { from: 5, to: 6 })),
        (
            Some(("a", 3)),
            5,
            None,
            6,
            Ok(Take::Held(Leader {
                name: "a".into(),
                lease: 3,
            })),
        ),
        (None, 5, Some("a"), 6, Err("the old active may still act")),
    ];
    for (leader, epoch, handover, planned, want) in cases {
        let e = etcd(*leader, *epoch, *handover);
        match (plan_take(&e, "b", *planned), want) {
            (Ok(got), Ok(want)) => assert_eq!(&got, want, "{e:?}"),
            (Err(why), Err(words)) => assert!(why.contains(words), "{e:?}: {why}"),
            (got, _) => panic!("{e:?}: {got:?}"),
        }
    }
}

#[test]
fn refusals_exit_3_and_say_what_etcd_holds() {
    let a = Leader {
        name: "a".into(),
        lease: 3,
    };
    let e = held_refusal(&a, Some(4));
    assert_eq!(code(&e), REFUSED);
    assert!(
        e.to_string()
            .contains("a still holds etcd's leader key (its lease has 4s left)"),
        "{e}"
    );
    assert!(held_refusal(&a, None).to_string().contains("lapsing"));
    let e = refused(&etcd(Some(("b", 8)), 6, None));
    assert_eq!(code(&e), REFUSED);
    assert!(
        e.to_string()
            .contains("etcd is at epoch 6 with b holding the leader key")
            && e.to_string().contains("nothing was changed"),
        "{e}"
    );
    assert!(refused(&etcd(Some(("b", 8)), 6, Some("a")))
        .to_string()
        .contains("switchover from a under way"));
}

#[test]
fn an_unanswered_transaction_counts_as_made_only_when_etcd_shows_it() {
    assert_eq!(after_error(&etcd(Some(("b", 9)), 6, Some("a")), "b", 9).unwrap(), 6);
    assert_eq!(
        code(&after_error(&etcd(Some(("b", 4)), 6, None), "b", 9).unwrap_err()),
        UNKNOWN
    );
    assert_eq!(
        code(&after_error(&etcd(Some(("a", 9)), 5, None), "b", 9).unwrap_err()),
        FAILED
    );
    assert_eq!(code(&after_error(&etcd(None, 5, None), "b", 9).unwrap_err()), FAILED);
}
