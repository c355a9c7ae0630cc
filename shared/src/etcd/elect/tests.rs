#![allow(clippy::unwrap_used)]

use super::*;

const MAX: Duration = Duration::from_secs(60);

fn rec(failover: bool, lag_ms: Option<u64>) -> MemberRecord {
    MemberRecord {
        failover,
        lag_ms,
        at_ms: 1_700_000_000_000,
    }
}

#[test]
fn eligibility_table() {
    let ms = Duration::from_millis;
    let cases: &[(bool, Option<MemberRecord>, Eligibility)] = &[
        (true, Some(rec(true, Some(0))), Eligibility::Eligible { lag: ms(0) }),
        (
            true,
            Some(rec(true, Some(60_000))),
            Eligibility::Eligible { lag: ms(60_000) },
        ),
        (
            true,
            Some(rec(true, Some(60_001))),
            Eligibility::TooFarBehind {
                lag: ms(60_001),
                max: MAX,
            },
        ),
        (false, Some(rec(true, Some(0))), Eligibility::FailoverOff),
        (true, Some(rec(false, Some(0))), Eligibility::FailoverOff),
        (false, None, Eligibility::FailoverOff),
        (true, None, Eligibility::Unpublished),
        (true, Some(rec(true, None)), Eligibility::LagUnknown),
    ];
    for (failover, record, want) in cases {
        assert_eq!(
            eligibility(*failover, record.as_ref(), MAX),
            *want,
            "{failover} {record:?}"
        );
    }
}

#[test]
fn who_takes_the_role_table() {
    // (priority order with failover flags, records as (name, failover, lag), chosen)
    type Case = (
        &'static [(&'static str, bool)],
        &'static [(&'static str, bool, Option<u64>)],
        Option<&'static str>,
    );
    let cases: &[Case] = &[
        // Two nodes: the passive takes it when it is caught up enough.
        (&[("a", true), ("b", true)], &[("b", true, Some(500))], Some("b")),
        // Further behind than max_lag_on_failover: nobody.
        (&[("a", true), ("b", true)], &[("b", true, Some(60_001))], None),
        // failover = false in the file, or in its record: nobody.
        (&[("a", true), ("b", false)], &[("b", true, Some(0))], None),
        (&[("a", true), ("b", true)], &[("b", false, Some(0))], None),
        // No record at all, or no lag (the old active's record): nobody.
        (&[("a", true), ("b", true)], &[], None),
        (&[("a", true), ("b", true)], &[("a", true, None)], None),
        // The old active's record (no lag) does not stand in the way.
        (
            &[("a", true), ("b", true)],
            &[("a", true, None), ("b", true, Some(10))],
            Some("b"),
        ),
        // The most caught up wins, whatever the priority.
        (
            &[("a", true), ("b", true), ("c", true)],
            &[("b", true, Some(9_000)), ("c", true, Some(200))],
            Some("c"),
        ),
        // Lags within LAG_TIE: the priority order decides.
        (
            &[("a", true), ("b", true), ("c", true)],
            &[("b", true, Some(900)), ("c", true, Some(200))],
            Some("b"),
        ),
        (
            &[("c", true), ("a", true), ("b", true)],
            &[("b", true, Some(200)), ("c", true, Some(900))],
            Some("c"),
        ),
        // Exactly LAG_TIE apart is no longer a tie.
        (
            &[("a", true), ("b", true), ("c", true)],
            &[("b", true, Some(1_200)), ("c", true, Some(200))],
            Some("c"),
        ),
        // The best one is not eligible: the next eligible one.
        (
            &[("a", true), ("b", false), ("c", true)],
            &[("b", true, Some(0)), ("c", true, Some(30_000))],
            Some("c"),
        ),
        // A record of a name the cluster file does not list is ignored.
        (&[("a", true), ("b", true)], &[("zz", true, Some(0))], None),
    ];
    for (order, records, want) in cases {
        let records: BTreeMap<String, MemberRecord> = records
            .iter()
            .map(|(n, f, lag)| (n.to_string(), rec(*f, *lag)))
            .collect();
        assert_eq!(choose(order, &records, MAX), *want, "{order:?} {records:?}");
        for (name, _) in *order {
            assert_eq!(
                may_take(name, order, &records, MAX),
                Some(*name) == *want,
                "{name} in {order:?} {records:?}"
            );
        }
    }
}

#[test]
fn records_read_and_write_as_json() {
    let r = rec(true, Some(1500));
    let text = serde_json::to_string(&r).unwrap();
    assert_eq!(text, r#"{"failover":true,"lag_ms":1500,"at_ms":1700000000000}"#);
    assert_eq!(serde_json::from_str::<MemberRecord>(&text).unwrap(), r);
    let none: MemberRecord = serde_json::from_str(r#"{"failover":false,"lag_ms":null,"at_ms":0}"#).unwrap();
    assert_eq!(
        none,
        MemberRecord {
            failover: false,
            lag_ms: None,
            at_ms: 0
        }
    );
}

#[test]
fn priority_is_the_preferred_active_first_then_file_order() {
    let key = || crate::keys::SecretKey::generate().public().to_openssh();
    let text = |preferred: &str| {
        let mut t = format!(
            "[cluster]\nname = \"p\"\npreferred_active = \"{preferred}\"\nstate_dir = \"/var/lib/warmspare\"\nkey_file = \"/etc/warmspare/node.key\"\n"
        );
        for (i, (name, failover)) in [("a", true), ("b", false), ("c", true)].iter().enumerate() {
            t.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\nssh = \"127.0.0.1:{}\"\npublic_key = \"{}\"\nfailover = {failover}\n",
                7422 + i,
                key()
            ));
        }
        t
    };
    for (preferred, want) in [
        ("a", [("a", true), ("b", false), ("c", true)]),
        ("b", [("b", false), ("a", true), ("c", true)]),
        ("c", [("c", true), ("a", true), ("b", false)]),
    ] {
        let cluster = Cluster::parse(&text(preferred), std::path::Path::new("cluster.toml")).unwrap();
        assert_eq!(priority(&cluster), want, "preferred {preferred}");
    }
}
