#![allow(clippy::unwrap_used)]

use super::*;

const TTL: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(20);

fn role(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.into(),
    }
}

#[test]
fn a_passive_promises_only_its_active_at_its_epoch() {
    let at = Instant::now();
    // (me, failsafe, my role, probe from, probe epoch, probe window, promised?)
    type Case = (&'static str, bool, RoleState, &'static str, u64, Duration, bool);
    let cases: Vec<Case> = vec![
        ("b", true, role(3, "a"), "a", 3, WINDOW, true),
        // Failsafe off on the passive: no promise, whatever the active asks.
        ("b", false, role(3, "a"), "a", 3, WINDOW, false),
        // Another epoch, either way.
        ("b", true, role(3, "a"), "a", 2, WINDOW, false),
        ("b", true, role(3, "a"), "a", 4, WINDOW, false),
        // Not the node this one knows as active.
        ("b", true, role(3, "a"), "c", 3, WINDOW, false),
        // This node is active itself, or the probe names it.
        ("b", true, role(3, "b"), "b", 3, WINDOW, false),
        ("b", true, role(3, "b"), "a", 3, WINDOW, false),
        // A window the promise would not cover, or none.
        ("b", true, role(3, "a"), "a", 3, TTL, false),
        ("b", true, role(3, "a"), "a", 3, TTL + WINDOW, false),
        ("b", true, role(3, "a"), "a", 3, Duration::ZERO, false),
        ("b", true, role(3, "a"), "a", 3, TTL - Duration::from_millis(1), true),
    ];
    for (me, failsafe, mine, from, epoch, window, promised) in cases {
        let probe = Probe {
            from,
            epoch,
            window,
            at,
        };
        let got = answer(me, failsafe, TTL, &mine, &probe);
        assert_eq!(got.is_ok(), promised, "{me} {failsafe} {mine:?} {probe:?}: {got:?}");
        if let Ok(p) = got {
            assert_eq!(
                p,
                Promise {
                    to: from.into(),
                    epoch,
                    until: at + TTL
                }
            );
        }
    }
}

#[test]
fn a_promise_binds_until_it_lapses_and_is_never_shortened() {
    let t = Instant::now();
    let s = Duration::from_secs;
    let p = |until: u64| Promise {
        to: "a".into(),
        epoch: 1,
        until: t + s(until),
    };
    assert_eq!(binds(None, t), None);
    let why = binds(Some(&p(30)), t + s(29)).unwrap();
    assert!(why.contains("promised a (active at epoch 1)"), "{why}");
    assert_eq!(binds(Some(&p(30)), t + s(30)), None);
    assert_eq!(binds(Some(&p(30)), t + s(31)), None);
    // A newer probe extends; an older one (a late answer) does not shorten.
    assert_eq!(keep(Some(p(30)), p(40)), p(40));
    assert_eq!(keep(Some(p(40)), p(30)), p(40));
    assert_eq!(keep(None, p(30)), p(30));
}

#[test]
fn the_active_confirmation_ends_before_the_promise() {
    // The active counts a probe sent at s for WINDOW from s; the passive,
    // receiving it at r >= s, promises until r + TTL: for every delay the
    // promise still binds when the active's confirmation ends.
    let s = Instant::now();
    for delay_ms in [0u64, 1, 500, 5_000, 19_999] {
        let r = s + Duration::from_millis(delay_ms);
        let probe = Probe {
            from: "a",
            epoch: 1,
            window: WINDOW,
            at: r,
        };
        let p = answer("b", true, TTL, &role(1, "a"), &probe).unwrap();
        assert!(binds(Some(&p), s + WINDOW).is_some(), "delay {delay_ms} ms");
    }
}
