//! The operator's role changes through etcd: `warmsparectl switchover`,
//! `failover`, `failback`, `pause` and `resume` with `[etcd]`, against two
//! real agents and three real etcd members on loopback (ttl 6 s, loop_wait
//! 1 s, retry_timeout 2 s). An `ActiveGuard` polls both nodes' health every
//! 10 ms for the whole of each test: never two 200s in one round.

use std::time::Duration;

use warmspare_shared::etcd::Watched;
use warmspare_shared::state::RoleState;
use warmspare_tests::{exit_code, output_text, wait_until, ClusterOptions, EtcdCluster, TestCluster, CA_WATCH};

use crate::auto_failover::{
    block_on, check, etcd_client, etcd_role, guard, holds_for, role_of, timing, LOOP_WAIT, TTL,
};

/// Two nodes `a` (preferred active) and `b` with the `ca` watch and the
/// `[etcd]` table of `etcd`; `extra` goes into the named nodes' tables.
fn pair(etcd: &EtcdCluster, extra: &[(&'static str, &str)]) -> TestCluster {
    TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{CA_WATCH}\"\ndebounce_ms = 5\n\n{}",
            etcd.toml(&timing())
        ),
        node_extra: extra.iter().map(|(n, e)| (*n, e.to_string())).collect(),
        ..Default::default()
    })
}

fn state(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.into(),
    }
}

/// Every change of the leader key since `revision` (exclusive), in order:
/// the name it held after each, `None` for a deletion.
fn leader_changes(etcd: &EtcdCluster, revision: i64) -> Vec<Option<String>> {
    block_on(async {
        let mut watch = etcd_client(etcd)
            .watch_leader(revision + 1)
            .await
            .expect("watch the leader key");
        let mut seen = Vec::new();
        while let Watched::Change(e) = watch.next_within(Duration::from_millis(500)).await.expect("the watch") {
            seen.push(e.leader.map(|l| l.name));
        }
        seen
    })
}

/// Starts both agents and waits until `a` is active through etcd and
/// linked to `b`, and `b` has caught up with it.
fn started(c: &TestCluster) -> (warmspare_tests::Agent, warmspare_tests::Agent) {
    let a = c.start("a");
    let b = c.start("b");
    wait_until("a active through etcd", Duration::from_secs(30), || {
        check(c, "a") == Some(200)
    });
    c.wait_linked("a", Duration::from_secs(30));
    c.wait_caught_up("b", Duration::from_secs(30));
    (a, b)
}

/// Waits until etcd, both agents' role states and their health agree that
/// `active` is active at `epoch`.
fn agreed(c: &TestCluster, etcd: &EtcdCluster, epoch: u64, active: &str) {
    let passive = if active == "a" { "b" } else { "a" };
    wait_until(
        &format!("etcd and both nodes at epoch {epoch} with {active} active"),
        Duration::from_secs(30),
        || {
            let r = etcd_role(etcd);
            r.epoch == epoch
                && r.leader.is_some_and(|l| l.name == active)
                && role_of(c, "a") == state(epoch, active)
                && role_of(c, "b") == state(epoch, active)
                && check(c, active) == Some(200)
                && check(c, passive) == Some(503)
        },
    );
}

/// The merged history, as `warmsparectl history --json` shows it.
fn history(c: &TestCluster) -> Vec<serde_json::Value> {
    let out = c.ctl(&["history", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("history --json parses")
}

/// The history line of `epoch`: (reason, by).
fn change_at(c: &TestCluster, epoch: u64) -> (String, String) {
    let h = history(c);
    let e = h
        .iter()
        .find(|e| e["epoch"] == epoch)
        .unwrap_or_else(|| panic!("no history entry for epoch {epoch}: {h:?}"));
    (
        e["reason"].as_str().unwrap_or_default().to_string(),
        e["by"].as_str().unwrap_or_default().to_string(),
    )
}

/// Two switchovers at once: etcd's transaction lets exactly one through;
/// the other exits 3 having changed nothing. The leader key moves straight
/// from a to b: it is never absent in between (no moment in which another
/// node could take it).
#[test]
fn of_two_concurrent_switchovers_one_wins_and_the_other_exits_3() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, &[]);
    let (_a, _b) = started(&c);
    let guard = guard(&c);
    let before = etcd_role(&etcd);
    assert_eq!(
        (before.epoch, before.leader.as_ref().map(|l| l.name.as_str())),
        (1, Some("a"))
    );
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| c.ctl(&["switchover", "--to", "b", "--yes", "--skip-jobs"])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut codes: Vec<i32> = outs.iter().map(exit_code).collect();
    codes.sort_unstable();
    let texts: Vec<String> = outs.iter().map(output_text).collect();
    assert_eq!(codes, vec![0, 3], "{texts:#?}");
    let loser = &texts[outs.iter().position(|o| exit_code(o) == 3).unwrap()];
    eprintln!("the switchover that lost:\n{loser}");
    // Refused by etcd: by the transaction, or at the preflight when etcd
    // had already moved on.
    assert!(loser.contains("refused") && loser.contains("etcd"), "{loser}");
    agreed(&c, &etcd, 2, "b");
    // One transaction moved the key: it named b next, and was never
    // deleted (the old active's lease went without taking the key along).
    let changes = leader_changes(&etcd, before.revision);
    assert!(!changes.is_empty(), "the leader key did not change");
    assert!(
        changes.iter().all(|n| n.as_deref() == Some("b")),
        "the leader key went through {changes:?}"
    );
    assert_eq!(change_at(&c, 2).0, "switchover");
    guard.finish();
}

/// Switchover, failover (refused while the dead active's lease lives) and
/// failback, each through etcd: etcd and the agents agree after each. `a`
/// has `failover = false`, so only the operator promotes it.
#[test]
fn switchover_failover_and_failback_move_the_role_in_etcd() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, &[("a", "failover = false")]);
    let (_a, mut b) = started(&c);
    let guard = guard(&c);

    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("moving the role in etcd"),
        "{}",
        output_text(&out)
    );
    agreed(&c, &etcd, 2, "b");
    let (reason, by) = change_at(&c, 2);
    assert_eq!(reason, "switchover");
    assert!(by.starts_with("operator "), "{by}");

    // The active dies; while its lease lives a failover is refused.
    b.kill9();
    let out = c.ctl(&["failover", "--to", "a", "--force"]);
    assert_eq!(exit_code(&out), 3, "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.contains("b still holds etcd's leader key"), "{text}");
    assert!(text.contains("left") || text.contains("lapsing"), "{text}");
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (2, Some("b".to_string())));
    assert_eq!(role_of(&c, "a"), state(2, "b"));

    wait_until("b's lease to lapse", TTL + Duration::from_secs(10), || {
        etcd_role(&etcd).leader.is_none()
    });
    let out = c.ctl(&["failover", "--to", "a", "--force"]);
    assert!(out.status.success(), "{}", output_text(&out));
    wait_until("a active after the failover", Duration::from_secs(30), || {
        check(&c, "a") == Some(200)
    });
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (3, Some("a".to_string())));
    assert_eq!(role_of(&c, "a"), state(3, "a"));
    assert_eq!(change_at(&c, 3).0, "failover");

    // b comes back and follows etcd; then the role goes to b and back.
    b.restart();
    agreed(&c, &etcd, 3, "a");
    c.wait_linked("a", Duration::from_secs(30));
    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    agreed(&c, &etcd, 4, "b");
    c.wait_linked("b", Duration::from_secs(30));
    let out = c.ctl(&["failback", "--yes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    agreed(&c, &etcd, 5, "a");
    assert_eq!(change_at(&c, 5).0, "failback");
    guard.finish();
}

/// `pause` with etcd holds automatic failover: the active killed while
/// paused is not replaced; `resume` lets the passive take over, and history
/// shows that automatic change, by etcd, with its reason.
#[test]
fn pause_holds_automatic_failover_until_resume() {
    let etcd = EtcdCluster::start();
    let c = pair(&etcd, &[]);
    let (mut a, _b) = started(&c);
    let guard = guard(&c);
    let out = c.ctl(&["pause"]);
    assert!(out.status.success(), "{}", output_text(&out));

    a.kill9();
    wait_until("a's leader key to lapse", TTL + Duration::from_secs(10), || {
        etcd_role(&etcd).leader.is_none()
    });
    // The key is gone: without the pause b would take it within a loop.
    holds_for("b not promoted while paused", LOOP_WAIT * 4, || {
        check(&c, "b") == Some(503) && role_of(&c, "b") == state(1, "a")
    });
    assert_eq!(etcd_role(&etcd).epoch, 1);
    let status = output_text(&c.ctl(&["status"]));
    assert!(status.contains("automatic failover PAUSED"), "{status}");

    // a is down: resume reaches b alone (exit 1) but ends the pause.
    let out = c.ctl(&["resume"]);
    assert_eq!(exit_code(&out), 1, "{}", output_text(&out));
    assert!(
        output_text(&out).contains("automatic failover resumed"),
        "{}",
        output_text(&out)
    );
    wait_until("b active after the resume", LOOP_WAIT + Duration::from_secs(15), || {
        check(&c, "b") == Some(200)
    });
    let r = etcd_role(&etcd);
    assert_eq!((r.epoch, r.leader.map(|l| l.name)), (2, Some("b".to_string())));
    assert!(!output_text(&c.ctl(&["status"])).contains("automatic failover PAUSED"));
    let (reason, by) = change_at(&c, 2);
    assert_eq!(by, "etcd");
    assert_eq!(reason, "automatic failover: the leader key of a expired");
    guard.finish();
}
