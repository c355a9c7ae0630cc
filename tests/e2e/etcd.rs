//! The etcd client against three real etcd members on loopback: the leader
//! key on a lease, the epoch transaction, the watch, and what a lost quorum
//! looks like to the active's self-demotion rule.

use std::time::{Duration, Instant};

use warmspare_shared::config::Endpoint;
use warmspare_shared::etcd::confirm::{Leadership, Renewal, Verdict};
use warmspare_shared::etcd::elect::MemberRecord;
use warmspare_shared::etcd::{Client, EtcdError, FailureKind, Leader, LeaderEvent, LeaderWatch, TxnOutcome, Watched};

use warmspare_tests::{free_port, wait_until, ClusterOptions, EtcdCluster, TestCluster};

/// Each call, across members, gives up after this.
const DEADLINE: Duration = Duration::from_secs(3);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(endpoints: &[String], prefix: &str) -> Client {
    let endpoints = endpoints.iter().map(|e| Endpoint::parse(e).unwrap()).collect();
    Client::with_endpoints(endpoints, prefix.to_string(), DEADLINE)
}

fn leader(name: &str, lease: i64) -> Option<Leader> {
    Some(Leader {
        name: name.into(),
        lease,
    })
}

#[test]
fn two_contenders_race_for_the_leader_key_and_exactly_one_wins() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    rt.block_on(async {
        for round in 0..5 {
            let prefix = format!("/warmspare/race{round}");
            // Each contender talks to its own member, as two nodes would.
            let a = client(&etcd.endpoints()[0..1], &prefix);
            let b = client(&etcd.endpoints()[1..2], &prefix);
            let (la, lb) = (
                a.grant(Duration::from_secs(30)).await.unwrap(),
                b.grant(Duration::from_secs(30)).await.unwrap(),
            );
            let (ra, rb) = tokio::join!(a.take("a", la, 0), b.take("b", lb, 0));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            let role = a.role().await.unwrap();
            assert_eq!(role.epoch, 1, "round {round}: {ra:?} {rb:?}");
            match (&ra, &rb) {
                (TxnOutcome::Done(1), TxnOutcome::Refused(seen)) => {
                    assert_eq!(role.leader, leader("a", la));
                    assert_eq!(seen.leader, leader("a", la));
                }
                (TxnOutcome::Refused(seen), TxnOutcome::Done(1)) => {
                    assert_eq!(role.leader, leader("b", lb));
                    assert_eq!(seen.leader, leader("b", lb));
                }
                other => panic!("round {round}: not exactly one winner: {other:?}"),
            }
        }
    });
}

#[test]
fn a_lease_that_is_not_renewed_loses_the_leader_key_after_its_ttl() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    let c = client(&etcd.endpoints(), "/warmspare/ttl");
    let lease = rt.block_on(c.grant(Duration::from_secs(2))).unwrap();
    assert_eq!(rt.block_on(c.take("a", lease, 0)).unwrap(), TxnOutcome::Done(1));
    assert_eq!(rt.block_on(c.role()).unwrap().leader, leader("a", lease));
    wait_until(
        "the leader key to lapse with its lease",
        Duration::from_secs(30),
        || rt.block_on(c.role()).unwrap().leader.is_none(),
    );
    assert_eq!(rt.block_on(c.keepalive(lease)).unwrap(), None, "the lease is gone");
    assert_eq!(
        rt.block_on(c.renew("a", lease)).unwrap(),
        Renewal::Lost,
        "a renewal after expiry says the leadership is lost"
    );
    // A lease that is renewed keeps the key past two of its TTLs (a TTL
    // of 4 s renewed every 250 ms leaves room for a loaded machine).
    let kept = rt.block_on(c.grant(Duration::from_secs(4))).unwrap();
    assert_eq!(rt.block_on(c.take("b", kept, 1)).unwrap(), TxnOutcome::Done(2));
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        assert_eq!(rt.block_on(c.renew("b", kept)).unwrap(), Renewal::Confirmed);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(rt.block_on(c.role()).unwrap().leader, leader("b", kept));
    assert!(rt.block_on(c.time_to_live(kept)).unwrap().is_some());
}

#[test]
fn the_epoch_transaction_refuses_a_stale_epoch_or_leader() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&etcd.endpoints(), "/warmspare/epoch");
        let la = c.grant(Duration::from_secs(30)).await.unwrap();
        let lb = c.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(c.take("a", la, 0).await.unwrap(), TxnOutcome::Done(1));
        // Taken while held: refused, whatever the epoch.
        assert!(matches!(c.take("b", lb, 1).await.unwrap(), TxnOutcome::Refused(r) if r.leader == leader("a", la)));
        // The lease ends: the key is gone, but the epoch stays.
        c.revoke(la).await.unwrap();
        let role = c.role().await.unwrap();
        assert_eq!((role.leader.clone(), role.epoch), (None, 1));
        // A contender that read epoch 0 before is refused.
        match c.take("b", lb, 0).await.unwrap() {
            TxnOutcome::Refused(r) => assert_eq!((r.leader, r.epoch), (None, 1)),
            done => panic!("a stale epoch took the role: {done:?}"),
        }
        assert_eq!(c.take("b", lb, 1).await.unwrap(), TxnOutcome::Done(2));
        // Hand-over: only by the leader, only at the current epoch.
        let la2 = c.grant(Duration::from_secs(30)).await.unwrap();
        assert!(matches!(
            c.hand_over("a", "a", la2, 2).await.unwrap(),
            TxnOutcome::Refused(_)
        ));
        assert!(matches!(c.hand_over("b", "a", la2, 1).await.unwrap(), TxnOutcome::Refused(r) if r.epoch == 2));
        assert_eq!(c.hand_over("b", "a", la2, 2).await.unwrap(), TxnOutcome::Done(3));
        let role = c.role().await.unwrap();
        assert_eq!((role.leader, role.epoch), (leader("a", la2), 3));
        assert_eq!(c.renew("a", la2).await.unwrap(), Renewal::Confirmed);
        assert_eq!(
            c.renew("b", lb).await.unwrap(),
            Renewal::Lost,
            "b no longer holds the key"
        );
    });
}

/// The watch's next event, within a generous bound.
async fn next_event(w: &mut LeaderWatch) -> Result<LeaderEvent, EtcdError> {
    match w.next_within(Duration::from_secs(30)).await? {
        Watched::Change(e) => Ok(e),
        Watched::Silent(after) => panic!("no watch event within {after:?}"),
    }
}

#[test]
fn a_watch_on_the_leader_key_sees_each_change_and_a_dead_member_breaks_it() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&etcd.endpoints(), "/warmspare/watch");
        // The watch is on member 0 alone, so that killing it breaks it.
        let watcher = client(&etcd.endpoints()[0..1], "/warmspare/watch");
        let start = c.role().await.unwrap();
        let mut watch = watcher.watch_leader(start.revision + 1).await.unwrap();
        let lease = c.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(c.take("a", lease, 0).await.unwrap(), TxnOutcome::Done(1));
        assert_eq!(next_event(&mut watch).await.unwrap().leader, leader("a", lease));
        c.revoke(lease).await.unwrap();
        assert_eq!(next_event(&mut watch).await.unwrap().leader, None);
        etcd.signal(0, "-KILL");
        let err = next_event(&mut watch).await.unwrap_err();
        assert_eq!(err.kind(), FailureKind::WatchBroken, "{err}");
    });
}

#[test]
fn a_silent_watch_is_noticed_within_its_limit_and_still_sees_later_changes() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&etcd.endpoints(), "/warmspare/silent");
        let watcher = client(&etcd.endpoints()[0..1], "/warmspare/silent");
        let start = c.role().await.unwrap();
        let mut watch = watcher.watch_leader(start.revision + 1).await.unwrap();
        // Nothing changes: the wait ends at its limit, as its own outcome.
        let quiet = Duration::from_millis(300);
        assert_eq!(watch.next_within(quiet).await.unwrap(), Watched::Silent(quiet));
        // A silent wait loses nothing: the next change still arrives.
        let lease = c.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(c.take("a", lease, 0).await.unwrap(), TxnOutcome::Done(1));
        assert_eq!(next_event(&mut watch).await.unwrap().leader, leader("a", lease));
        // The watched member stops answering without closing the stream
        // (SIGSTOP): a change made through the others is not seen, and the
        // wait still ends, silent, where an unbounded one would hang.
        etcd.signal(0, "-STOP");
        c.revoke(lease).await.unwrap();
        let limit = Duration::from_secs(2);
        assert_eq!(watch.next_within(limit).await.unwrap(), Watched::Silent(limit));
        etcd.signal(0, "-CONT");
        assert_eq!(next_event(&mut watch).await.unwrap().leader, None);
    });
}

#[test]
fn without_quorum_a_renewal_fails_within_the_deadline_and_is_unconfirmed() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    let c = client(&etcd.endpoints(), "/warmspare/quorum");
    let window = Duration::from_secs(4);
    let granted_at = Instant::now();
    let lease = rt.block_on(c.grant(Duration::from_secs(30))).unwrap();
    assert_eq!(rt.block_on(c.take("a", lease, 0)).unwrap(), TxnOutcome::Done(1));
    let mut leadership = Leadership::new(granted_at, window);
    let sent = Instant::now();
    assert_eq!(rt.block_on(c.renew("a", lease)).unwrap(), Renewal::Confirmed);
    leadership.record(sent, Renewal::Confirmed);

    etcd.signal(1, "-STOP");
    etcd.signal(2, "-STOP");
    let sent = Instant::now();
    let result = rt.block_on(c.renew("a", lease));
    let took = sent.elapsed();
    let err = result.expect_err("a renewal without quorum succeeded");
    // The deadline is enforced by the client; the bound here is generous
    // (renew makes two calls, each within DEADLINE) and only proves it ends.
    assert!(took < DEADLINE * 2 + Duration::from_secs(5), "took {took:?}: {err}");
    assert!(
        matches!(err.kind(), FailureKind::Timeout | FailureKind::NoLeader),
        "{err} is {:?}",
        err.kind()
    );
    leadership.record(sent, Renewal::Failed(err.kind()));
    // Unconfirmed: the failure did not extend the window, which runs out
    // exactly as with no answer at all.
    let last = leadership.last_success_send();
    assert!(last < sent);
    assert_eq!(
        leadership.verdict(last + window + Duration::from_millis(1)),
        Verdict::Demote
    );

    // With the members back, renewals confirm again.
    etcd.signal(1, "-CONT");
    etcd.signal(2, "-CONT");
    wait_until("a renewal to succeed with quorum back", Duration::from_secs(60), || {
        rt.block_on(c.renew("a", lease)).is_ok_and(|r| r == Renewal::Confirmed)
    });
}

#[test]
fn a_refused_connection_is_a_failure_of_its_own_kind() {
    // Nothing listens on a reserved free port.
    let c = client(&[format!("http://127.0.0.1:{}", free_port())], "/warmspare/none");
    let err: EtcdError = runtime().block_on(c.renew("a", 1)).unwrap_err();
    assert_eq!(err.kind(), FailureKind::Refused, "{err}");
}

#[test]
fn check_reports_each_etcd_member_and_fails_without_quorum() {
    let etcd = EtcdCluster::start();
    // One node: no peer to reach, so the exit code is etcd's alone.
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a"],
        extra: etcd.toml(""),
        ..Default::default()
    });
    let run_check = || c.check("a", &[]);
    let (code, text) = run_check();
    assert_eq!(code, Some(0), "{text}");
    for e in etcd.endpoints() {
        assert!(text.contains(&format!("etcd {e}: ok (etcd 3.")), "{e}: {text}");
    }
    assert!(
        text.contains("3 of 3 members healthy, quorum (prefix /warmspare/test)"),
        "{text}"
    );

    etcd.signal(1, "-STOP");
    etcd.signal(2, "-STOP");
    let (code, text) = run_check();
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("NO quorum"), "{text}");
    assert!(
        text.contains(&format!("etcd {}: FAILED", etcd.endpoints()[1])),
        "{text}"
    );
    assert!(text.contains("etcd has no quorum"), "{text}");
}

fn record(failover: bool, lag_ms: Option<u64>) -> MemberRecord {
    MemberRecord {
        failover,
        lag_ms,
        at_ms: 1_700_000_000_000,
    }
}

#[test]
fn status_reads_the_role_and_the_members_from_etcd_and_shows_etcd_out_of_reach() {
    let etcd = EtcdCluster::start();
    // Agents are not started: status reads etcd directly.
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: etcd.toml("max_lag_on_failover = \"5s\""),
        ..Default::default()
    });
    let status = || {
        let out = c.ctl(&["status"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = status();
    assert!(text.contains("etcd (prefix /warmspare/test):"), "{text}");
    assert!(text.contains("NO leader, epoch 0"), "{text}");
    assert!(text.contains("next without a leader: nobody eligible"), "{text}");

    let rt = runtime();
    let cl = client(&etcd.endpoints(), "/warmspare/test");
    let (la, lb) = rt.block_on(async {
        let la = cl.grant(Duration::from_secs(30)).await.unwrap();
        let lb = cl.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(cl.take("a", la, 0).await.unwrap(), TxnOutcome::Done(1));
        cl.publish_member("a", &record(true, None), la).await.unwrap();
        cl.publish_member("b", &record(true, Some(1500)), lb).await.unwrap();
        (la, lb)
    });
    let (records, _) = rt.block_on(cl.members()).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records["b"], record(true, Some(1500)));

    let text = status();
    assert!(text.contains("leader a, lease "), "{text}");
    assert!(text.contains(" left, epoch 1"), "{text}");
    assert!(line_of(&text, "a").contains("active: holds the leader key"), "{text}");
    assert!(
        line_of(&text, "b").contains("lag 1.5s") && line_of(&text, "b").contains("eligible"),
        "{text}"
    );
    assert!(!line_of(&text, "b").contains("not eligible"), "{text}");
    assert!(text.contains("next without a leader: b"), "{text}");

    // The JSON form holds the same.
    let out = c.ctl(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["etcd"]["leader"], "a", "{json}");
    assert_eq!(json["etcd"]["epoch"], 1, "{json}");
    assert!(
        json["etcd"]["lease_left_s"].as_i64().is_some_and(|s| s > 0 && s <= 30),
        "{json}"
    );
    assert_eq!(json["etcd"]["members"][1]["lag_ms"], 1500, "{json}");

    // Further behind than max_lag_on_failover: shown, and nobody is next.
    rt.block_on(cl.publish_member("b", &record(true, Some(9000)), lb))
        .unwrap();
    let text = status();
    assert!(
        text.contains("not eligible: 9.0s behind, more than max_lag_on_failover 5.0s"),
        "{text}"
    );
    assert!(text.contains("next without a leader: nobody eligible"), "{text}");

    // The leader's lease revoked: its key and its record go.
    rt.block_on(cl.revoke(la)).unwrap();
    rt.block_on(cl.publish_member("b", &record(true, Some(100)), lb))
        .unwrap();
    let text = status();
    assert!(text.contains("NO leader, epoch 1"), "{text}");
    assert!(line_of(&text, "a").contains("no record in etcd"), "{text}");

    // etcd out of reach: shown, and the nodes are still reported.
    for i in 0..3 {
        etcd.signal(i, "-STOP");
    }
    let text = status();
    assert!(text.contains("UNREACHABLE"), "{text}");
    // The nodes' table is there too (both down here: reachable "NO").
    for node in ["a", "b"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{node} ")) && l.contains(" NO ")),
            "{text}"
        );
    }
    for i in 0..3 {
        etcd.signal(i, "-CONT");
    }
}

fn line_of(text: &str, node: &str) -> String {
    text.lines()
        .find(|l| l.trim_start().starts_with(&format!("{node} ")) && l.contains(" lag "))
        .unwrap_or_else(|| panic!("no line for {node}: {text}"))
        .to_string()
}

#[test]
fn a_leader_records_its_own_epoch_and_claims_its_key_again_on_a_new_lease() {
    let etcd = EtcdCluster::start();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&etcd.endpoints(), "/warmspare/claim");
        let old = c.grant(Duration::from_secs(30)).await.unwrap();
        // etcd empty, the node at epoch 5: it records its epoch.
        assert_eq!(c.seize("a", old, 0, 5).await.unwrap(), TxnOutcome::Done(5));
        // A second seize finds the key present.
        let other = c.grant(Duration::from_secs(30)).await.unwrap();
        assert!(matches!(
            c.seize("b", other, 5, 6).await.unwrap(),
            TxnOutcome::Refused(_)
        ));
        // Another node cannot claim a's key.
        assert!(matches!(
            c.claim("b", other, 5, 5).await.unwrap(),
            TxnOutcome::Refused(_)
        ));
        // a, restarted, claims it on a new lease at the same epoch.
        let new = c.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(c.claim("a", new, 5, 5).await.unwrap(), TxnOutcome::Done(5));
        let role = c.role().await.unwrap();
        assert_eq!((role.leader, role.epoch), (leader("a", new), 5));
        // The old lease no longer carries the key.
        c.revoke(old).await.unwrap();
        assert_eq!(c.role().await.unwrap().leader, leader("a", new));
        // A claim at a stale epoch is refused; at the current one it may move the epoch up.
        assert!(matches!(c.claim("a", new, 4, 6).await.unwrap(), TxnOutcome::Refused(_)));
        assert_eq!(c.claim("a", new, 5, 7).await.unwrap(), TxnOutcome::Done(7));
        // Epochs that go nowhere are refused before anything is sent.
        assert!(c.seize("a", new, 7, 7).await.is_err());
        assert!(c.claim("a", new, 7, 6).await.is_err());
    });
}
