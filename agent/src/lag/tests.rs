use super::*;

#[test]
fn lag_table() {
    let t0 = Instant::now();
    let at = |s: u64| Some(t0 + Duration::from_secs(s));
    let secs = |s: u64| Some(Duration::from_secs(s));
    // (heard, caught_up, lag)
    let cases: &[(Option<Instant>, Option<Instant>, Option<Duration>)] = &[
        // Never caught up: unknown, however recently the active was heard.
        (None, None, None),
        (at(5), None, None),
        // Caught up at the last contact: no lag.
        (at(5), at(5), secs(0)),
        // Heard from for 40 s after the last catch-up (shipping held).
        (at(45), at(5), secs(40)),
        // A marker applied after the last ping: no lag, never negative.
        (at(5), at(7), secs(0)),
        (None, at(7), secs(0)),
    ];
    for (heard, caught_up, want) in cases {
        assert_eq!(lag(*heard, *caught_up), *want, "{heard:?} {caught_up:?}");
    }
}

#[test]
fn the_lag_grows_only_while_the_active_is_heard_from() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut f = Freshness::default();
    assert_eq!(f.lag(), None);
    f.heard(s(1));
    assert_eq!(f.lag(), None);
    f.caught_up(s(2));
    assert_eq!(f.lag(), Some(Duration::ZERO));
    // Shipping held: pings go on, no marker.
    for n in 3..=9 {
        f.heard(s(n));
    }
    assert_eq!(f.lag(), Some(Duration::from_secs(7)));
    // The active dies: nothing is heard any more, the lag stays.
    assert_eq!(f.lag(), Some(Duration::from_secs(7)));
    // A late, older ping changes nothing; a marker catches up.
    f.heard(s(4));
    assert_eq!(f.lag(), Some(Duration::from_secs(7)));
    f.caught_up(s(10));
    assert_eq!(f.lag(), Some(Duration::ZERO));
    // An older marker applied late does not move caught_up back.
    f.caught_up(s(8));
    assert_eq!(f.lag(), Some(Duration::ZERO));
}
