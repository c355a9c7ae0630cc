//! Automatic failover through etcd: two real agents and three real etcd
//! members on loopback, with short timings (ttl 6 s, loop_wait 1 s,
//! retry_timeout 2 s). An `ActiveGuard` polls both nodes' health every
//! 10 ms for the whole of each test: never two 200s in one round.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use warmspare_shared::config::Endpoint;
use warmspare_shared::etcd::{Client, Role as EtcdRole};
use warmspare_shared::state::RoleState;
use warmspare_tests::{
    http_status, read, wait_until, write_file, ActiveGuard, ClusterOptions, EtcdCluster, TestCluster, CA_WATCH,
};

pub(crate) const TTL: Duration = Duration::from_secs(6);
pub(crate) const LOOP_WAIT: Duration = Duration::from_secs(1);
pub(crate) const RETRY_TIMEOUT: Duration = Duration::from_secs(2);

/// The timing lines of every test's `[etcd]` table.
pub(crate) fn timing() -> String {
    format!(
        "ttl = \"{}s\"\nloop_wait = \"{}s\"\nretry_timeout = \"{}s\"",
        TTL.as_secs(),
        LOOP_WAIT.as_secs(),
        RETRY_TIMEOUT.as_secs()
    )
}

/// Two nodes `a` (preferred active) and `b` with the `ca` watch and the
/// `[etcd]` table of `etcd`; `b_extra` goes into b's node table.
fn pair(etcd: &EtcdCluster, b_extra: &str) -> TestCluster {
    pair_with(&etcd.toml(&timing()), b_extra)
}

/// Two nodes `a` (preferred active) and `b` with the `ca` watch and the
/// `[etcd]` table `etcd_table`; `b_extra` goes into b's node table.
pub(crate) fn pair_with(etcd_table: &str, b_extra: &str) -> TestCluster {
    TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!("[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\ndebounce_ms = 5\n\n{etcd_table}"),
        node_extra: if b_extra.is_empty() {
            vec![]
        } else {
            vec![("b", b_extra.to_string())]
        },
        ..Default::default()
    })
}

pub(crate) fn guard(c: &TestCluster) -> ActiveGuard {
    ActiveGuard::start(&[("a", c.node("a").http_port), ("b", c.node("b").http_port)])
}

pub(crate) fn check(c: &TestCluster, node: &str) -> Option<u16> {
    http_status(c.node(node).http_port, "/_status/check")
}

pub(crate) fn role_file(c: &TestCluster, node: &str) -> PathBuf {
    c.node(node).root.join("var/lib/warmspare/role.json")
}

/// The role state `node` persisted.
pub(crate) fn role_of(c: &TestCluster, node: &str) -> RoleState {
    serde_json::from_slice(&read(&role_file(c, node)).expect("role.json")).expect("role.json parses")
}

/// A client of the test cluster's etcd, under the tests' prefix.
pub(crate) fn etcd_client(etcd: &EtcdCluster) -> Client {
    let endpoints = etcd.endpoints().iter().map(|e| Endpoint::parse(e).unwrap()).collect();
    Client::with_endpoints(endpoints, "/warmspare/test".into(), Duration::from_secs(3))
}

/// Runs `f` to its end on a runtime of its own.
pub(crate) fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The role etcd holds for the test cluster.
pub(crate) fn etcd_role(etcd: &EtcdCluster) -> EtcdRole {
    block_on(etcd_client(etcd).role()).expect("read the role from etcd")
}

/// Polls `cond` every 10 ms for `span` and panics the first time it fails:
/// what must stay true while something else (a lease's ttl) runs out.
pub(crate) fn holds_for(what: &str, span: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        assert!(cond(), "{what} stopped holding");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts both agents and waits until `a` is active through etcd and `b`
/// has caught up with it (see `TestCluster::wait_caught_up`).
pub(crate) fn started(c: &TestCluster) -> (warmspare_tests::Agent, warmspare_tests::Agent) {
    let a = c.start("a");
    let b = c.start("b");
    wait_until("a active through etcd", Duration::from_secs(30), || {
        check(c, "a") == Some(200)
    });
    c.wait_caught_up("b", Duration::from_secs(30));
    (a, b)
}

#[test]
fn a_killed_active_is_replaced_by_the_passive_with_what_it_acknowledged() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, "");
    let (mut a, b) = started(&c);
    let guard = guard(&c);
    assert_eq!(check(&c, "b"), Some(503));
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("signed/host{i}.pem"), format!("cert {i}\n").into_bytes()))
        .collect();
    for (path, data) in &files {
        write_file(&c.ca("a").join(path), data, 0o644);
    }
    wait_until("the files on b before the kill", Duration::from_secs(30), || {
        files
            .iter()
            .all(|(p, d)| read(&c.ca("b").join(p)).as_deref() == Some(d.as_slice()))
    });

    a.kill9();
    let killed = Instant::now();
    wait_until(
        "b active after a was killed",
        TTL + LOOP_WAIT + Duration::from_secs(10),
        || check(&c, "b") == Some(200),
    );
    let took = killed.elapsed();
    eprintln!("kill -9 of the active to the passive active: {} ms", took.as_millis());
    assert_eq!(
        role_of(&c, "b"),
        RoleState {
            epoch: 2,
            active: "b".into()
        }
    );
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (2, Some("b".to_string())));
    for (path, data) in &files {
        assert_eq!(read(&c.ca("b").join(path)).as_deref(), Some(data.as_slice()), "{path}");
    }
    assert!(b.log_text().contains("automatic failover: the leader key of a expired"));

    // The old active comes back: it adopts etcd's epoch and stays passive.
    a.restart();
    wait_until("a to adopt epoch 2 from etcd", Duration::from_secs(30), || {
        role_of(&c, "a").epoch == 2
    });
    assert_eq!(role_of(&c, "a").active, "b");
    wait_until("a's health to answer", Duration::from_secs(30), || {
        check(&c, "a").is_some()
    });
    assert_eq!(check(&c, "a"), Some(503));
    assert_eq!(check(&c, "b"), Some(200));
    let report = guard.finish();
    eprintln!("guard: {} rounds, {} with one active", report.rounds, report.one_active);
}

#[test]
fn an_active_cut_off_from_etcd_demotes_itself_and_nobody_is_promoted() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, "");
    let (a, b) = started(&c);
    let guard = guard(&c);
    for i in 0..3 {
        etcd.signal(i, "-STOP");
    }
    let stopped = Instant::now();
    // Its last confirmed renewal was sent at most loop_wait before the stop;
    // it demotes once loop_wait + retry_timeout passed since that send.
    wait_until(
        "a to answer 503 cut off from etcd",
        LOOP_WAIT + RETRY_TIMEOUT + Duration::from_secs(2),
        || check(&c, "a") == Some(503),
    );
    eprintln!("etcd stopped to a answering 503: {} ms", stopped.elapsed().as_millis());
    // For the lease's ttl and a loop more, with etcd stopped, nobody acts
    // as active (b cannot take a key it cannot reach).
    holds_for("no node active while etcd is stopped", TTL + LOOP_WAIT, || {
        check(&c, "a") != Some(200) && check(&c, "b") != Some(200)
    });
    assert_eq!(role_of(&c, "b").epoch, 1);
    for i in 0..3 {
        etcd.signal(i, "-CONT");
    }
    wait_until(
        "exactly one node active with etcd back",
        Duration::from_secs(60),
        || {
            let (ca, cb) = (check(&c, "a"), check(&c, "b"));
            (ca == Some(200)) != (cb == Some(200))
        },
    );
    let leader = etcd_role(&etcd).leader.map(|l| l.name);
    let active = if check(&c, "a") == Some(200) { "a" } else { "b" };
    assert_eq!(leader.as_deref(), Some(active));
    assert!(a.log_text().contains("this node demotes itself"), "{}", a.log_text());
    drop(b);
    let report = guard.finish();
    eprintln!("guard: {} rounds, {} with one active", report.rounds, report.one_active);
}

#[test]
fn restarting_both_agents_keeps_the_leader_and_the_epoch() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, "");
    let (mut a, mut b) = started(&c);
    let guard = guard(&c);
    let before = etcd_role(&etcd);
    assert_eq!(before.epoch, 1);
    assert_eq!(before.leader.as_ref().map(|l| l.name.as_str()), Some("a"));
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    a.restart();
    b.restart();
    wait_until("a active again after the restart", Duration::from_secs(30), || {
        check(&c, "a") == Some(200)
    });
    let after = etcd_role(&etcd);
    assert_eq!(after.epoch, 1);
    let leader = after.leader.expect("a leader key");
    assert_eq!(leader.name, "a");
    // The key moved to the restarted agent's own lease.
    assert_ne!(Some(leader.lease), before.leader.map(|l| l.lease));
    for n in ["a", "b"] {
        assert_eq!(
            role_of(&c, n),
            RoleState {
                epoch: 1,
                active: "a".into()
            },
            "{n}"
        );
    }
    assert_eq!(check(&c, "b"), Some(503));
    guard.finish();
}

#[test]
fn a_passive_with_failover_false_is_not_promoted() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, "failover = false");
    let (mut a, _b) = started(&c);
    let guard = guard(&c);
    a.kill9();
    wait_until("a's leader key to go", TTL + Duration::from_secs(10), || {
        etcd_role(&etcd).leader.is_none_or(|l| l.name != "a")
    });
    // The key is gone: an eligible passive would take it within a loop.
    holds_for("b not active", LOOP_WAIT * 3, || check(&c, "b") == Some(503));
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader), (1, None));
    assert_eq!(
        role_of(&c, "b"),
        RoleState {
            epoch: 1,
            active: "a".into()
        }
    );
    guard.finish();
}

/// The guard itself: two nodes answering 200 in one round fail the test.
#[test]
fn the_guard_fails_a_test_in_which_two_nodes_answer_200() {
    use std::io::{Read as _, Write as _};
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    // The whole request, so that the close sends no reset.
                    let mut got = Vec::new();
                    let mut buf = [0u8; 512];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nactive at epoch 1\n");
                }
            });
            port
        })
        .collect();
    let guard = ActiveGuard::start(&[("x", ports[0]), ("y", ports[1])]);
    wait_until("both ports answering 200", Duration::from_secs(10), || {
        ports.iter().all(|p| http_status(*p, "/_status/check") == Some(200))
    });
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guard.finish()));
    let message = failed.expect_err("the guard let two actives pass");
    let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("two nodes answered 200 in the same round"), "{text}");
}

/// `warmsparectl switchover` with etcd: the old active revokes its lease as
/// it is demoted, and the target holds the key at the new epoch.
#[test]
fn a_switchover_moves_the_leader_key_with_the_role() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, "");
    let (_a, _b) = started(&c);
    c.wait_linked("a", Duration::from_secs(30));
    let guard = guard(&c);
    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert!(out.status.success(), "{}", warmspare_tests::output_text(&out));
    wait_until("b active after the switchover", Duration::from_secs(30), || {
        check(&c, "b") == Some(200)
    });
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (2, Some("b".to_string())));
    assert_eq!(check(&c, "a"), Some(503));
    guard.finish();
}
