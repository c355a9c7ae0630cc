//! Tests of the `supervise` module.

use super::*;

#[tokio::test]
async fn the_first_failure_is_kept_and_wakes_the_supervisor() {
    let f = Failure::default();
    assert_eq!(f.failure(), None);
    f.fail("the receiver stopped".into());
    f.fail("the watcher stopped".into());
    assert_eq!(f.failure().as_deref(), Some("the receiver stopped"));
    // Resolves at once now; it would hang (and the test time out) if the
    // failure had not been signalled.
    f.failed().await;
}

#[test]
fn a_heartbeat_is_recent_until_it_is_older_than_the_limit() {
    let h = Heartbeat {
        origin: Instant::now() - Duration::from_secs(60),
        last: AtomicU64::new(0),
    };
    // The last beat is a minute old.
    assert!(!h.within(Duration::from_secs(30)));
    assert!(h.within(Duration::from_secs(120)));
    h.beat();
    assert!(h.within(Duration::from_secs(30)));
}
