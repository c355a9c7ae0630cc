//! Who takes the role when the active dies, through etcd: the member
//! records each agent publishes (its lag, see the agent's `lag`), the
//! election rule over them and `max_lag_on_failover`. Real agents and a
//! real three-member etcd, the timings of `auto_failover`, and an
//! `ActiveGuard` over every node throughout.
//!
//! A passive falls behind with shipping to it held on the active
//! (`WARMSPARE_TEST_HOLD_SHIP`: while `<dir>/<peer>` exists, the active's
//! shipper to that peer ships nothing; the probe still answers, so the
//! passive keeps hearing from the active and its lag grows).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use warmspare_shared::state::RoleState;
use warmspare_tests::{
    read, wait_until, write_file, ActiveGuard, Agent, ClusterOptions, EtcdCluster, TestCluster, CA_WATCH,
};

use super::auto_failover::{check, etcd_role, holds_for, role_of, LOOP_WAIT, RETRY_TIMEOUT, TTL};

/// `max_lag_on_failover` in these tests.
const MAX_LAG: Duration = Duration::from_secs(3);

/// Nodes `names` (the first preferred active) with the `ca` watch and the
/// `[etcd]` table of `etcd`.
fn cluster(etcd: &EtcdCluster, names: Vec<&'static str>) -> TestCluster {
    let settings = format!(
        "ttl = \"{}s\"\nloop_wait = \"{}s\"\nretry_timeout = \"{}s\"\nmax_lag_on_failover = \"{}s\"",
        TTL.as_secs(),
        LOOP_WAIT.as_secs(),
        RETRY_TIMEOUT.as_secs(),
        MAX_LAG.as_secs()
    );
    TestCluster::new(ClusterOptions {
        nodes: names,
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\ndebounce_ms = 5\n\n{}",
            etcd.toml(&settings)
        ),
        ..Default::default()
    })
}

/// Whether `node` shows as eligible with a lag within `MAX_LAG`.
fn eligible(s: &BTreeMap<String, (Option<u64>, String)>, node: &str) -> bool {
    s.get(node)
        .is_some_and(|(lag, e)| e == "eligible" && lag.is_some_and(|ms| ms <= MAX_LAG.as_millis() as u64))
}

/// Whether `node` shows as too far behind, with a lag above `MAX_LAG`.
fn too_far_behind(s: &BTreeMap<String, (Option<u64>, String)>, node: &str) -> bool {
    s.get(node).is_some_and(|(lag, e)| {
        e.contains("more than max_lag_on_failover") && lag.is_some_and(|ms| ms > MAX_LAG.as_millis() as u64)
    })
}

/// Starts every agent (`a` able to hold its shipping to a peer through
/// `hold`), waits until `a` is active through etcd and every passive shows
/// as eligible, `a` as the active without a lag.
fn started(c: &TestCluster, hold: &Path) -> Vec<Agent> {
    let hold = hold.display().to_string();
    let agents: Vec<Agent> = c
        .nodes
        .iter()
        .map(|n| match n.name.as_str() {
            "a" => c.start_with_env("a", &[("WARMSPARE_TEST_HOLD_SHIP", hold.as_str())]),
            other => c.start(other),
        })
        .collect();
    wait_until("a active through etcd", Duration::from_secs(30), || {
        check(c, "a") == Some(200)
    });
    let passives: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).filter(|n| *n != "a").collect();
    wait_until(
        "every passive eligible, the active without a lag",
        Duration::from_secs(30),
        || {
            let s = c.etcd_standings();
            passives.iter().all(|n| eligible(&s, n))
                && s.get("a").is_some_and(|(lag, e)| lag.is_none() && e.contains("active"))
        },
    );
    agents
}

fn guard(c: &TestCluster) -> ActiveGuard {
    let nodes: Vec<(&str, u16)> = c.nodes.iter().map(|n| (n.name.as_str(), n.http_port)).collect();
    ActiveGuard::start(&nodes)
}

/// Holds `a`'s shipping to `peer`, writes a file on `a`, and waits until
/// `peer` shows as too far behind (with the file not there); returns the
/// file's path in the watch.
fn fall_behind(c: &TestCluster, hold: &Path, peer: &str) -> PathBuf {
    write_file(&hold.join(peer), b"", 0o644);
    let late = PathBuf::from("signed/late.pem");
    write_file(&c.ca("a").join(&late), b"written while shipping is held\n", 0o644);
    wait_until(
        &format!("{peer} too far behind in status"),
        Duration::from_secs(30),
        || too_far_behind(&c.etcd_standings(), peer),
    );
    assert_eq!(read(&c.ca(peer).join(&late)), None, "shipping to {peer} was not held");
    late
}

/// Two nodes; with `held`, b falls further behind than
/// `max_lag_on_failover` before a is killed.
fn two_nodes_a_killed(held: bool) {
    let etcd = EtcdCluster::start();
    let c = cluster(&etcd, vec!["a", "b"]);
    let hold = c.dir.path().join("hold");
    std::fs::create_dir_all(&hold).unwrap();
    let mut agents = started(&c, &hold);
    let guard = guard(&c);
    if held {
        fall_behind(&c, &hold, "b");
    } else {
        let late = c.ca("a").join("signed/late.pem");
        write_file(&late, b"written and shipped\n", 0o644);
        wait_until("the file on b", Duration::from_secs(30), || {
            read(&c.ca("b").join("signed/late.pem")).is_some()
        });
        // A round of the records after the write: b still caught up.
        wait_until("b eligible after the write", Duration::from_secs(30), || {
            eligible(&c.etcd_standings(), "b")
        });
    }
    agents[0].kill9();
    if held {
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
        // Its lag did not shrink or vanish with the active gone.
        let s = c.etcd_standings();
        assert!(too_far_behind(&s, "b"), "{s:?}");
        let log = agents[1].log_text();
        assert!(
            log.contains("not taking the role: b is not eligible") && log.contains("more than max_lag_on_failover"),
            "{log}"
        );
    } else {
        wait_until(
            "b active after a was killed",
            TTL + LOOP_WAIT + Duration::from_secs(10),
            || check(&c, "b") == Some(200),
        );
        assert_eq!(
            role_of(&c, "b"),
            RoleState {
                epoch: 2,
                active: "b".into()
            }
        );
    }
    guard.finish();
}

#[test]
fn a_passive_further_behind_than_max_lag_on_failover_is_not_promoted() {
    two_nodes_a_killed(true);
}

/// The control of the test above: the same passive, caught up, is promoted.
#[test]
fn a_caught_up_passive_is_promoted() {
    two_nodes_a_killed(false);
}

#[test]
fn of_three_nodes_the_caught_up_passive_takes_over_and_the_other_adopts_its_epoch() {
    let etcd = EtcdCluster::start();
    let c = cluster(&etcd, vec!["a", "b", "c"]);
    let hold = c.dir.path().join("hold");
    std::fs::create_dir_all(&hold).unwrap();
    let mut agents = started(&c, &hold);
    let guard = guard(&c);
    // b, first in the file's order after a, falls behind; c stays caught up.
    let late = fall_behind(&c, &hold, "b");
    wait_until("the file on c", Duration::from_secs(30), || {
        read(&c.ca("c").join(&late)).is_some()
    });
    let s = c.etcd_standings();
    assert!(eligible(&s, "c"), "{s:?}");

    agents[0].kill9();
    wait_until(
        "c active after a was killed",
        TTL + LOOP_WAIT + Duration::from_secs(10),
        || check(&c, "c") == Some(200),
    );
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (2, Some("c".to_string())));
    assert_eq!(
        role_of(&c, "c"),
        RoleState {
            epoch: 2,
            active: "c".into()
        }
    );
    wait_until("b to adopt epoch 2 naming c", Duration::from_secs(30), || {
        role_of(&c, "b")
            == RoleState {
                epoch: 2,
                active: "c".into(),
            }
    });
    assert_eq!(check(&c, "b"), Some(503));
    // The new active ships to b what it missed.
    wait_until("the late file on b from c", Duration::from_secs(30), || {
        read(&c.ca("b").join(&late)).is_some()
    });
    guard.finish();
}
