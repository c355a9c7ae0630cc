//! The role's compare-and-swap on a node built from a temporary cluster
//! file: each refusal, and a move that persists.

use std::path::Path;
use std::sync::Arc;

use warmspare_shared::keys::SecretKey;
use warmspare_shared::state::{RoleState, MAX_EPOCH_JUMP};

use super::{Role, SwapError};
use crate::live::Live;
use crate::telemetry::Telemetry;

/// A cluster of `a` and `b` under `dir`, each node with its own root and
/// key; the role of `a`, at epoch 3 with `a` active.
fn role_of_a(dir: &Path) -> Role {
    let mut text = String::from(
        "[cluster]\nname = \"test\"\npreferred_active = \"a\"\nstate_dir = \"/var/lib/warmspare\"\n\
         key_file = \"/etc/warmspare/node.key\"\n\n",
    );
    for (name, port) in [("a", 1), ("b", 2)] {
        let root = dir.join(name);
        std::fs::create_dir_all(root.join("var/lib/warmspare")).unwrap();
        let key = SecretKey::generate();
        key.save(&root.join("etc/warmspare/node.key")).unwrap();
        text += &format!(
            "[[node]]\nname = \"{name}\"\nssh = \"127.0.0.1:{port}\"\npublic_key = \"{}\"\nroot = \"{}\"\n\n",
            key.public().to_openssh(),
            root.display()
        );
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, text).unwrap();
    let live = Live::load(&file, Some("a")).unwrap();
    let role = Role::new(Arc::new(live), Arc::new(Telemetry::default()));
    role.start(at(3, "a"));
    role
}

fn at(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.to_string(),
    }
}

#[test]
fn a_stale_expectation_is_refused_with_both_states() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    let e = role
        .compare_and_swap(&at(2, "a"), at(4, "b"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::Stale { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "expected epoch 2 with a active, but this node is at epoch 3 with a active"
    );
    assert_eq!(role.current(), at(3, "a"));
}

#[test]
fn an_epoch_not_above_the_current_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    for epoch in [2, 3] {
        let e = role
            .compare_and_swap(&at(3, "a"), at(epoch, "b"), "test", "op")
            .unwrap_err();
        assert!(matches!(e, SwapError::NotAbove { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("the new epoch {epoch} is not above 3"));
    }
    assert_eq!(role.current(), at(3, "a"));
}

#[test]
fn an_epoch_jump_too_large_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    let e = role
        .compare_and_swap(&at(3, "a"), at(3 + MAX_EPOCH_JUMP + 1, "b"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::TooFar(_)), "{e:?}");
    assert!(e.to_string().contains("above this node's epoch 3"), "{e}");
    assert_eq!(role.current(), at(3, "a"));
}

#[test]
fn an_unknown_node_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    let e = role
        .compare_and_swap(&at(3, "a"), at(4, "c"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::UnknownNode(ref n) if n == "c"), "{e:?}");
    assert_eq!(e.to_string(), "\"c\" is not a node of the cluster");
    assert_eq!(role.current(), at(3, "a"));
}

#[test]
fn a_state_that_cannot_be_persisted_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    // The state dir is a file: nothing can be written under it.
    let state_dir = d.path().join("a/var/lib/warmspare");
    std::fs::remove_dir(&state_dir).unwrap();
    std::fs::write(&state_dir, b"not a directory").unwrap();
    let e = role
        .compare_and_swap(&at(3, "a"), at(4, "b"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::NotPersisted(_)), "{e:?}");
    assert!(e.to_string().starts_with("cannot record the new role: "), "{e}");
    assert_eq!(role.current(), at(3, "a"));
}

#[test]
fn a_valid_move_is_persisted_then_published() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    let now = role.compare_and_swap(&at(3, "a"), at(4, "b"), "test", "op").unwrap();
    assert_eq!(now, at(4, "b"));
    assert_eq!(role.current(), at(4, "b"));
    let stored = RoleState::load_or_init(&d.path().join("a/var/lib/warmspare"), "a").unwrap();
    assert_eq!(stored, at(4, "b"));
}

#[test]
fn a_promotion_that_finds_this_node_already_there_is_done_and_nothing_else_is() {
    let d = tempfile::tempdir().unwrap();
    let role = role_of_a(d.path());
    // a is at {3, a}: a promotion to exactly that, from any expectation, is done.
    assert_eq!(
        role.compare_and_swap(&at(2, "b"), at(3, "a"), "test", "op").unwrap(),
        at(3, "a")
    );
    // a at another epoch than asked: refused.
    let e = role
        .compare_and_swap(&at(2, "b"), at(2, "a"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::Stale { .. }), "{e:?}");
    // A demotion that finds a already moved to b: still refused.
    role.compare_and_swap(&at(3, "a"), at(4, "b"), "test", "op").unwrap();
    let e = role
        .compare_and_swap(&at(3, "a"), at(4, "b"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::Stale { .. }), "{e:?}");
    // Another refusal is never taken as done.
    let e = role
        .compare_and_swap(&at(4, "b"), at(4, "a"), "test", "op")
        .unwrap_err();
    assert!(matches!(e, SwapError::NotAbove { .. }), "{e:?}");
    assert_eq!(role.current(), at(4, "b"));
}
