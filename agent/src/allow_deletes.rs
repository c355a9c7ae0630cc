//! The operator's one-shot permissions for a full comparison to remove
//! what the deletion guard would hold (`warmsparectl resync
//! --allow-deletes`): one per (peer, watch), taken by the first full
//! comparison of that watch towards that peer.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// The permissions not yet taken.
#[derive(Default)]
pub struct AllowDeletes {
    /// (peer, watch) pairs whose next full comparison may remove what the
    /// deletion guard would hold.
    pairs: Mutex<BTreeSet<(String, String)>>,
}

impl AllowDeletes {
    /// Lets the next full comparison of `watch` towards each of `peers`
    /// remove what the deletion guard holds.
    pub fn grant(&self, peers: impl IntoIterator<Item = String>, watch: &str) {
        let mut g = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        for p in peers {
            g.insert((p, watch.to_string()));
        }
    }

    /// Takes the operator's permission for a full comparison of `watch`
    /// towards `peer` to remove what the deletion guard holds.
    pub fn take(&self, peer: &str, watch: &str) -> bool {
        self.pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(peer.to_string(), watch.to_string()))
    }
}

#[cfg(test)]
mod tests;
