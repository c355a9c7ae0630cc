//! `[etcd] failsafe = true`: an active that cannot confirm its leadership
//! with etcd keeps its role while every passive answers its failsafe
//! probe, and a passive that answered does not take the leader key.
//! Timings as in `auto_failover`; an `ActiveGuard` polls both nodes
//! throughout.

use std::time::{Duration, Instant};

use warmspare_tests::etcd_proxy::{EtcdProxies, Fault};
use warmspare_tests::{wait_until, EtcdCluster};

use crate::auto_failover::{
    check, etcd_role, guard, holds_for, pair_with, role_of, started, timing, LOOP_WAIT, RETRY_TIMEOUT, TTL,
};

fn failsafe_timing() -> String {
    format!("{}\nfailsafe = true", timing())
}

/// The `endpoints = [...]` line of an `[etcd]` table naming `endpoints`.
fn endpoints_line(endpoints: &[String]) -> String {
    let list = endpoints.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>();
    format!("endpoints = [{}]", list.join(", "))
}

/// etcd stopped whole (every member SIGSTOPped): with failsafe the active
/// keeps answering 200 past its window and past the lease's ttl, for as
/// long as it reaches b; once b's agent is gone it demotes within its
/// window. With etcd back, exactly one node is active.
#[test]
fn failsafe_keeps_the_active_through_an_etcd_outage_while_it_reaches_the_passive() {
    let etcd = EtcdCluster::start();
    let c = pair_with(&etcd.toml(&failsafe_timing()), "");
    let (a, mut b) = started(&c);
    let guard = guard(&c);
    wait_until("b to promise a's failsafe probe", Duration::from_secs(30), || {
        b.log_text().contains("promised the failsafe probe")
    });
    for i in 0..3 {
        etcd.signal(i, "-STOP");
    }
    holds_for("a active through the etcd outage", TTL + LOOP_WAIT * 2, || {
        check(&c, "a") == Some(200) && check(&c, "b") == Some(503)
    });
    assert!(a.log_text().contains("kept by failsafe"), "{}", a.log_text());

    // Cut a from b as well: it demotes within its window of b's last answer.
    b.kill9();
    let cut = Instant::now();
    wait_until(
        "a to answer 503 cut off from etcd and from b",
        LOOP_WAIT + RETRY_TIMEOUT + Duration::from_secs(3),
        || check(&c, "a") == Some(503),
    );
    eprintln!("b killed to a answering 503: {} ms", cut.elapsed().as_millis());
    assert!(a.log_text().contains("this node demotes itself"), "{}", a.log_text());

    for i in 0..3 {
        etcd.signal(i, "-CONT");
    }
    b.restart();
    wait_until(
        "exactly one node active with etcd back",
        Duration::from_secs(60),
        || (check(&c, "a") == Some(200)) != (check(&c, "b") == Some(200)),
    );
    let active = if check(&c, "a") == Some(200) { "a" } else { "b" };
    assert_eq!(etcd_role(&etcd).leader.map(|l| l.name).as_deref(), Some(active));
    let report = guard.finish();
    eprintln!("guard: {} rounds, {} with one active", report.rounds, report.one_active);
}

/// Only the active's etcd access fails (its proxies hang) while b reaches
/// etcd directly: a keeps its role by failsafe, its lease lapses on the
/// server, and b, which sees the key gone, does not take it while a still
/// probes it. Once a is gone (killed), b's promise lapses and b takes over.
#[test]
fn with_failsafe_the_passive_does_not_take_the_key_while_the_active_reaches_it() {
    let etcd = EtcdCluster::start();
    let proxies = EtcdProxies::start(&etcd);
    let c = pair_with(&proxies.toml(&failsafe_timing()), "");
    let b_file = c.cluster_file_variant(
        "b",
        &endpoints_line(&proxies.endpoints()),
        &endpoints_line(&etcd.endpoints()),
    );
    let mut a = c.start("a");
    let b = c.start_with_cluster_file("b", &b_file);
    wait_until("a active through etcd", Duration::from_secs(30), || {
        check(&c, "a") == Some(200)
    });
    c.wait_caught_up("b", Duration::from_secs(30));
    let guard = guard(&c);
    wait_until("b to promise a's failsafe probe", Duration::from_secs(30), || {
        b.log_text().contains("promised the failsafe probe")
    });
    proxies.set(Fault::Hang);
    let hung = Instant::now();
    wait_until(
        "a's leader key to lapse on the server",
        TTL + Duration::from_secs(5),
        || etcd_role(&etcd).leader.is_none_or(|l| l.name != "a"),
    );
    eprintln!(
        "a's etcd access hung to its key lapsing: {} ms",
        hung.elapsed().as_millis()
    );
    holds_for("a active and b passive with the key gone", LOOP_WAIT * 4, || {
        check(&c, "a") == Some(200) && check(&c, "b") == Some(503)
    });
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader), (1, None));
    assert_eq!(role_of(&c, "b").epoch, 1);
    assert!(
        b.log_text()
            .contains("the leader key is gone, not taking it: promised a"),
        "{}",
        b.log_text()
    );

    a.kill9();
    let killed = Instant::now();
    wait_until(
        "b active once a is gone",
        TTL + LOOP_WAIT + Duration::from_secs(10),
        || check(&c, "b") == Some(200),
    );
    eprintln!("a killed to b active: {} ms", killed.elapsed().as_millis());
    assert_eq!(etcd_role(&etcd).leader.map(|l| l.name).as_deref(), Some("b"));
    let report = guard.finish();
    eprintln!("guard: {} rounds, {} with one active", report.rounds, report.one_active);
}

/// Without failsafe the same fault is a failover: a demotes within its
/// window, and b takes the key once a's lease lapsed.
#[test]
fn without_failsafe_an_active_cut_off_from_etcd_alone_is_replaced() {
    let etcd = EtcdCluster::start();
    let proxies = EtcdProxies::start(&etcd);
    let c = pair_with(&proxies.toml(&timing()), "");
    let b_file = c.cluster_file_variant(
        "b",
        &endpoints_line(&proxies.endpoints()),
        &endpoints_line(&etcd.endpoints()),
    );
    let _a = c.start("a");
    let _b = c.start_with_cluster_file("b", &b_file);
    wait_until("a active through etcd", Duration::from_secs(30), || {
        check(&c, "a") == Some(200)
    });
    c.wait_caught_up("b", Duration::from_secs(30));
    let guard = guard(&c);
    proxies.set(Fault::Hang);
    wait_until(
        "a to answer 503 cut off from etcd",
        LOOP_WAIT + RETRY_TIMEOUT + Duration::from_secs(3),
        || check(&c, "a") == Some(503),
    );
    wait_until(
        "b active after a's lease lapsed",
        TTL + LOOP_WAIT + Duration::from_secs(10),
        || check(&c, "b") == Some(200),
    );
    assert_eq!(etcd_role(&etcd).leader.map(|l| l.name).as_deref(), Some("b"));
    guard.finish();
}
