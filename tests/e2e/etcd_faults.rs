//! Every kind of etcd failure, injected at the agents' etcd access by the
//! harness's fault proxies (`warmspare_tests::etcd_proxy`): the agents'
//! `[etcd] endpoints` name a proxy per member, and each test switches the
//! proxies between passing and one kind of failure while etcd itself runs
//! on. Timings as in `auto_failover` (ttl 6 s, loop_wait 1 s,
//! retry_timeout 2 s); an `ActiveGuard` polls both nodes throughout.

use std::time::{Duration, Instant};

use warmspare_shared::config::Endpoint;
use warmspare_shared::etcd::Client;
use warmspare_tests::etcd_proxy::{EtcdProxies, Fault};
use warmspare_tests::{wait_until, EtcdCluster, TestCluster};

use crate::auto_failover::{
    check, etcd_role, guard, holds_for, pair_with, role_of, started, timing, LOOP_WAIT, RETRY_TIMEOUT, TTL,
};

/// Which node answers 200, when exactly one does.
fn the_active(c: &TestCluster) -> Option<&'static str> {
    match (check(c, "a") == Some(200), check(c, "b") == Some(200)) {
        (true, false) => Some("a"),
        (false, true) => Some("b"),
        _ => None,
    }
}

/// Revokes the lease of the leader key, straight at the members: the key
/// goes at once.
fn revoke_leader(etcd: &EtcdCluster) {
    let lease = etcd_role(etcd).leader.expect("a leader key").lease;
    let endpoints = etcd.endpoints().iter().map(|e| Endpoint::parse(e).unwrap()).collect();
    let client = Client::with_endpoints(endpoints, "/warmspare/test".into(), Duration::from_secs(3));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.revoke(lease))
        .expect("revoke the leader's lease");
}

/// For each kind of failure, the whole of etcd unreachable from both nodes
/// in that way (what quorum loss looks like to them): the active answers
/// 503 within its window, nobody is promoted while the fault lasts (past
/// the lease's ttl), and with the fault gone exactly one node is active,
/// the one etcd names. The active's log shows the failure it met, so each
/// kind really was injected.
#[test]
fn every_kind_of_etcd_failure_demotes_the_active_and_promotes_nobody() {
    let etcd = EtcdCluster::start();
    let proxies = EtcdProxies::start(&etcd);
    let c = pair_with(&proxies.toml(&timing()), "");
    let (a, b) = started(&c);
    let guard = guard(&c);
    let kinds = [
        (Fault::Hang, "no answer within"),
        (Fault::Refuse, "cannot connect"),
        (Fault::NoLeader, "etcd error 14: etcdserver: no leader"),
        (Fault::UnknownCode, "etcd error 99"),
    ];
    for (fault, says) in kinds {
        let active = the_active(&c).expect("one active before the fault");
        let agent = if active == "a" { &a } else { &b };
        let logged = agent.log_text().len();
        // The passive learns the epoch the active took from the active's
        // hello, a moment after the active answers 200; until both agree,
        // the snapshot below would count that catching up as a promotion.
        let held = etcd_role(&etcd).epoch;
        wait_until(
            &format!("both nodes at etcd's epoch {held} before {fault:?}"),
            Duration::from_secs(10),
            || role_of(&c, "a").epoch == held && role_of(&c, "b").epoch == held,
        );
        let epochs = (held, held);
        proxies.set(fault);
        let set = Instant::now();
        wait_until(
            &format!("{active} to answer 503 with {fault:?}"),
            LOOP_WAIT + RETRY_TIMEOUT + Duration::from_secs(3),
            || check(&c, active) == Some(503),
        );
        eprintln!(
            "{fault:?}: {active} answered 503 after {} ms",
            set.elapsed().as_millis()
        );
        // Past the lease's ttl (it lapses on the server meanwhile): nobody
        // can take the key, so nobody acts as active.
        holds_for(&format!("no node active with {fault:?}"), TTL + LOOP_WAIT, || {
            check(&c, "a") != Some(200) && check(&c, "b") != Some(200)
        });
        assert_eq!((role_of(&c, "a").epoch, role_of(&c, "b").epoch), epochs, "{fault:?}");
        let log = agent.log_text();
        let log = log.get(logged..).unwrap_or("");
        assert!(log.contains(says), "{fault:?}: {active}'s log lacks {says:?}:\n{log}");
        assert!(log.contains("this node demotes itself"), "{fault:?}:\n{log}");
        proxies.set(Fault::Pass);
        wait_until(
            &format!("exactly one node active after {fault:?}"),
            Duration::from_secs(60),
            || the_active(&c).is_some(),
        );
        let now = the_active(&c).expect("one active");
        let leader = etcd_role(&etcd).leader.map(|l| l.name);
        assert_eq!(leader.as_deref(), Some(now), "{fault:?}");
        eprintln!("{fault:?}: {now} active after the fault, {:?}", proxies.counts());
    }
    let report = guard.finish();
    eprintln!("guard: {} rounds, {} with one active", report.rounds, report.one_active);
}

/// Watches that break as soon as they are made (the active does not watch;
/// the passive does): no promotion, and no spinning either (a watch made
/// again at once each time would be cut hundreds of times a second). With
/// the watches still breaking, the passive sees the leader key deleted
/// within `loop_wait` and takes the role.
#[test]
fn a_broken_watch_neither_promotes_the_passive_nor_stalls_it() {
    let etcd = EtcdCluster::start();
    let proxies = EtcdProxies::start(&etcd);
    let c = pair_with(&proxies.toml(&timing()), "");
    let (mut a, _b) = started(&c);
    let guard = guard(&c);
    proxies.set(Fault::BreakWatches);
    let set = Instant::now();
    wait_until("a watch of b's cut", LOOP_WAIT * 3, || {
        proxies.counts().watches_cut >= 1
    });
    holds_for("a active and b passive while b's watches break", LOOP_WAIT * 4, || {
        check(&c, "a") == Some(200) && check(&c, "b") == Some(503)
    });
    assert_eq!(role_of(&c, "b").epoch, 1);
    let (cut, loops) = (
        proxies.counts().watches_cut,
        set.elapsed().as_secs() / LOOP_WAIT.as_secs(),
    );
    eprintln!("{cut} watches cut in {loops} loops");
    assert!(
        cut <= 2 * (loops + 1),
        "b made its watch again {cut} times in {loops} loops: it spins"
    );

    // The key goes at a known instant: a killed, its lease revoked.
    a.kill9();
    revoke_leader(&etcd);
    let deleted = Instant::now();
    wait_until(
        "b to take the leader key within loop_wait of its deletion",
        LOOP_WAIT + Duration::from_secs(2),
        || etcd_role(&etcd).leader.is_some_and(|l| l.name == "b"),
    );
    eprintln!(
        "leader key deleted to b holding it: {} ms",
        deleted.elapsed().as_millis()
    );
    wait_until("b active", Duration::from_secs(30), || check(&c, "b") == Some(200));
    guard.finish();
}
