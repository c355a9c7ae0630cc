//! Test fixtures: a two-node cluster and the nodes' reports about
//! themselves, built in memory, for the table tests of the decisions that
//! work on what the nodes report (`roles`, `status`).

use std::sync::OnceLock;

use warmspare_shared::config::Cluster;
use warmspare_shared::keys::SecretKey;
use warmspare_shared::proto::{LinkStatus, NodeStatus, UndoStatus, WatchStatus, PROTOCOL_VERSION};
use warmspare_shared::state::RoleState;

use crate::client::NodeView;

/// A cluster of nodes `a` and `b` with one watch, `ca`.
pub fn cluster() -> Cluster {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    let (key_a, key_b) = KEYS.get_or_init(|| {
        (
            SecretKey::generate().public().to_openssh(),
            SecretKey::generate().public().to_openssh(),
        )
    });
    let text = format!(
        r#"
[cluster]
name = "test"
preferred_active = "a"
state_dir = "/var/lib/warmspare"
key_file = "/etc/warmspare/node.key"

[[node]]
name = "a"
ssh = "127.0.0.1:7422"
public_key = "{key_a}"

[[node]]
name = "b"
ssh = "127.0.0.1:7423"
public_key = "{key_b}"

[[watch]]
name = "ca"
path = "/etc/puppetlabs/puppet/ssl/ca"
"#
    );
    match Cluster::parse(&text, std::path::Path::new("cluster.toml")) {
        Ok(c) => c,
        Err(e) => panic!("the fixture cluster file does not parse: {e}"),
    }
}

/// The role state "epoch `epoch`, `active` active".
pub fn role(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.into(),
    }
}

/// A healthy report from `node` of `cluster`: same version and cluster file
/// as everyone, at `role`, with no watches, links, jobs or warnings.
pub fn status(cluster: &Cluster, node: &str, role: RoleState) -> NodeStatus {
    NodeStatus {
        node: node.into(),
        version: "1.0.0".into(),
        protocol: PROTOCOL_VERSION,
        config_hash: cluster.hash(),
        role,
        paused: false,
        watches: Vec::new(),
        links: Vec::new(),
        diverged: Vec::new(),
        started: 0,
        jobs: Vec::new(),
        held: None,
        hooks: Vec::new(),
        undo: UndoStatus::default(),
    }
}

/// A connected link to `peer` for watch `ca`, `lag` seconds behind.
pub fn link(peer: &str, lag: f64) -> LinkStatus {
    LinkStatus {
        peer: peer.into(),
        watch: "ca".into(),
        connected: true,
        pending_changes: 0,
        lag_bytes: 0,
        lag_seconds: lag,
        last_success: Some(0),
        last_error: None,
        deletions_held: 0,
        compressed: false,
    }
}

/// Watch `ca` with nothing to report.
pub fn watch() -> WatchStatus {
    WatchStatus {
        name: "ca".into(),
        files: 0,
        bytes: 0,
        last_applied: None,
        root_error: None,
        after_apply: None,
        local_changes: Default::default(),
    }
}

/// What `gather` would return: each node of `cluster` with its report, or
/// unreachable when `reports` has none for it.
pub fn views(cluster: &Cluster, reports: Vec<NodeStatus>) -> Vec<NodeView> {
    cluster
        .node
        .iter()
        .map(|n| NodeView {
            node: n.clone(),
            status: reports
                .iter()
                .find(|s| s.node == n.name)
                .cloned()
                .ok_or_else(|| "connection refused".to_string()),
        })
        .collect()
}

/// The exit code an error carries (`FAILED` for one without).
pub fn code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<crate::exit::Exit>()
        .map_or(crate::exit::FAILED, |x| x.code)
}
