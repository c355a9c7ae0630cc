//! Tests of the `pause` module.

use super::*;

#[test]
fn the_hold_is_kept_by_its_marker_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = Arc::new(Telemetry::default());
    let pause = Pause::load(dir.path(), telemetry.clone());
    assert!(!pause.is_paused());

    pause.set_paused(true).unwrap();
    assert!(pause.is_paused());
    assert!(dir.path().join(PAUSED_FILE).exists());
    assert!(
        Pause::load(dir.path(), telemetry.clone()).is_paused(),
        "a restart stays held"
    );

    pause.set_paused(false).unwrap();
    assert!(!pause.is_paused());
    assert!(!dir.path().join(PAUSED_FILE).exists());
    assert!(
        !Pause::load(dir.path(), telemetry.clone()).is_paused(),
        "a restart stays released"
    );

    // Releasing what is not held is no error.
    pause.set_paused(false).unwrap();
    assert!(!pause.is_paused());
}
