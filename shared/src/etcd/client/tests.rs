#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn integers_and_values_read_as_the_gateway_writes_them() {
    assert_eq!(int(&json!("2324035765635821317")), 2_324_035_765_635_821_317);
    assert_eq!(int(&json!(5)), 5);
    assert_eq!(int(&Value::Null), 0);
    // Member ids are unsigned and may not fit an i64.
    assert!(nonzero(&json!("17237436191187066789")));
    assert!(nonzero(&json!("3319814642761637952")));
    assert!(!nonzero(&json!("0")) && !nonzero(&Value::Null));
    assert_eq!(text(&json!("YmFy")).unwrap(), "bar");
    assert_eq!(text(&Value::Null).unwrap(), "");
    assert!(text(&json!("!!")).is_err());
    assert_eq!(b64("/warmspare/x/leader"), "L3dhcm1zcGFyZS94L2xlYWRlcg==");
}

#[test]
fn a_refusal_that_shows_the_change_made_counts_as_done() {
    let role = |name: &str, lease, epoch| Role {
        leader: Some(Leader {
            name: name.into(),
            lease,
        }),
        epoch,
        paused: None,
        handover: None,
        revision: 9,
    };
    assert_eq!(
        settle(TxnOutcome::Refused(role("a", 7, 3)), "a", 7, 3),
        TxnOutcome::Done(3)
    );
    for other in [role("b", 7, 3), role("a", 8, 3), role("a", 7, 4)] {
        let refused = TxnOutcome::Refused(other);
        assert_eq!(settle(refused.clone(), "a", 7, 3), refused);
    }
}

#[test]
fn the_role_reads_from_a_transaction_answer() {
    let c = Client::with_endpoints(vec![], "/w".into(), Duration::from_secs(1));
    let v = json!({
        "header": { "revision": "12" },
        "succeeded": true,
        "responses": [
            { "response_range": { "kvs": [ { "key": b64("/w/leader"), "value": b64("b"), "lease": "77" } ], "count": "1" } },
            { "response_range": { "kvs": [ { "key": b64("/w/epoch"), "value": b64("4") } ] } },
        ]
    });
    let r = c.role_from(&v).unwrap();
    assert_eq!(
        r,
        Role {
            leader: Some(Leader {
                name: "b".into(),
                lease: 77
            }),
            epoch: 4,
            paused: None,
            handover: None,
            revision: 12
        }
    );
    let four = json!({
        "header": { "revision": "13" },
        "responses": [
            { "response_range": {} },
            { "response_range": { "kvs": [ { "value": b64("4") } ] } },
            { "response_range": { "kvs": [ { "value": b64("paused by operator alice") } ] } },
            { "response_range": { "kvs": [ { "value": b64("a"), "lease": "5" } ] } },
        ]
    });
    let r = c.role_from(&four).unwrap();
    assert_eq!(r.paused.as_deref(), Some("paused by operator alice"));
    assert_eq!(r.handover.as_deref(), Some("a"));
    assert_eq!((r.leader, r.epoch), (None, 4));
    let empty =
        json!({ "header": { "revision": "3" }, "responses": [ { "response_range": {} }, { "response_range": {} } ] });
    assert_eq!(
        c.role_from(&empty).unwrap(),
        Role {
            leader: None,
            epoch: 0,
            paused: None,
            handover: None,
            revision: 3
        }
    );
    let junk = json!({ "responses": [ { "response_range": {} }, { "response_range": { "kvs": [ { "value": b64("x") } ] } } ] });
    assert!(c.role_from(&junk).is_err());
}
