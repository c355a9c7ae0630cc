//! Where this node stands with its `on_promote` hook (the promotion gate
//! behind `role::Role::is_active`) and how many role hook runs ended each
//! way; `hooks` runs the hooks and records here. Imports no other agent
//! module.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;
use warmspare_shared::config::Hook;
use warmspare_shared::proto::PROMOTE_HOOK_FAILED;

/// Why a node is held while its `on_promote` hook runs (the health check
/// says `held at epoch N: on_promote is running`; `role --is-active
/// --or-promoting` looks for it).
pub const PROMOTING: &str = "on_promote is running";

/// Where this node stands with `on_promote` for an epoch naming it active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// Nothing started yet (or the node is passive).
    Idle,
    /// The hook is running for this epoch.
    Running(u64),
    /// The node may act as active at this epoch.
    Done(u64),
    /// The hook failed at this epoch: the node stays fenced.
    Failed(u64, String),
}

/// The hooks' runtime state: the promotion and the runs counted.
pub struct Hooks {
    /// The promotion state; control sessions wait on it.
    pub promotion: watch::Sender<Promotion>,
    /// Runs since the agent started, by hook and outcome.
    counts: Mutex<BTreeMap<(Hook, bool), u64>>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            promotion: watch::channel(Promotion::Idle).0,
            counts: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Hooks {
    /// Whether this node may act as active at `epoch`.
    pub fn promoted(&self, epoch: u64) -> bool {
        *self.promotion.borrow() == Promotion::Done(epoch)
    }

    /// Runs of `hook` with the outcome `ok` since the agent started.
    pub fn count(&self, hook: Hook, ok: bool) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(hook, ok))
            .copied()
            .unwrap_or(0)
    }

    /// Counts a run of `hook` that ended with the outcome `ok`.
    pub fn counted(&self, hook: Hook, ok: bool) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((hook, ok))
            .or_default() += 1;
    }

    /// Why a node named active at `epoch` does not act as active yet.
    pub fn held(&self, epoch: u64) -> Option<String> {
        match &*self.promotion.borrow() {
            Promotion::Done(e) if *e == epoch => None,
            Promotion::Running(e) if *e == epoch => Some(PROMOTING.into()),
            Promotion::Failed(e, detail) if *e == epoch => Some(format!("{PROMOTE_HOOK_FAILED}: {detail}")),
            _ => Some("starting its active side".into()),
        }
    }
}
