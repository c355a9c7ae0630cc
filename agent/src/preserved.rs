//! Keeps `<state_dir>/diverged/` within the cluster file's bounds
//! (`diverged_max_size`, `diverged_max_age`): at start and after each
//! batch that preserved files. See `warmspare_shared::diverged`.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use warmspare_shared::diverged::{self, Limits};

use crate::live::Live;

/// The preserved store under the state dir.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("diverged")
}

/// The session folder (`diverged/<epoch>-<time>`) a preserved file `to` was
/// moved into, if it is under the store.
pub fn folder_of(state_dir: &Path, to: &Path) -> Option<PathBuf> {
    let root = dir(state_dir);
    match to.strip_prefix(&root).ok()?.components().next()? {
        Component::Normal(name) => Some(root.join(name)),
        _ => None,
    }
}

/// Prunes the store to the configured bounds, never removing `keep` (the
/// folder just written into), and logs each folder removed.
pub fn prune(live: &Live, keep: Option<&Path>) {
    let c = live.cluster();
    let limits = Limits {
        max_size: c.cluster.diverged_max_size,
        max_age: c.cluster.diverged_max_age,
    };
    match diverged::prune(&dir(&live.state_dir), &limits, keep, SystemTime::now()) {
        Ok(report) => {
            for p in &report.pruned {
                tracing::warn!(
                    folder = p.folder,
                    files = p.files,
                    bytes = p.bytes,
                    reason = p.reason.as_str(),
                    max_size = limits.max_size,
                    max_age_s = limits.max_age.as_secs(),
                    "pruned preserved files from diverged/"
                );
            }
            for (folder, e) in &report.failed {
                tracing::error!(folder, error = %e, "cannot prune a folder of diverged/");
            }
            if report.bytes_left > limits.max_size {
                tracing::warn!(
                    bytes = report.bytes_left,
                    max_size = limits.max_size,
                    "diverged/ is over its size limit with only the newest preserved files left"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read diverged/ to prune it"),
    }
}
