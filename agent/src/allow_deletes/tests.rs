//! Tests of the `allow_deletes` module.

use super::*;

#[test]
fn a_permission_is_per_peer_and_watch_and_taken_once() {
    let a = AllowDeletes::default();
    a.grant(["b".to_string(), "c".to_string()], "www");
    assert!(!a.take("b", "ca"), "another watch has no permission");
    assert!(!a.take("d", "www"), "a peer not granted has no permission");
    assert!(a.take("b", "www"));
    assert!(!a.take("b", "www"), "a permission is taken once");
    assert!(a.take("c", "www"));
}
