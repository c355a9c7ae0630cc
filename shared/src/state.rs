//! What an agent persists about its role: the epoch and the active node.
//!
//! The state is a small JSON file written atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves either the old or the
//! new state, never a torn one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::persist::write_atomic;

/// Why the role state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is not valid state.
    #[error("{path}: not a valid role state: {source}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Who is active, in which epoch. Persisted by every agent, and sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleState {
    /// Increases by one at every role change.
    pub epoch: u64,
    /// The node that is active in `epoch`.
    pub active: String,
}

/// One role change, as recorded in every agent's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When, in seconds since the Unix epoch.
    pub time: i64,
    /// The new epoch.
    pub epoch: u64,
    /// The active node before.
    pub from: String,
    /// The active node after.
    pub to: String,
    /// Why (switchover, failover, failback, fencing, ...).
    pub reason: String,
    /// Who ordered it (an operator, or the node that pushed a higher epoch).
    pub by: String,
}

/// How the reason of a node's adoption of the role etcd holds begins
/// (`etcd names <node> active at epoch <n>`): history shows the change
/// itself (an automatic take, an operator's) rather than such an adoption.
pub const ETCD_ADOPTION: &str = "etcd names ";

/// The file, under the state dir, that holds the role state.
pub const ROLE_FILE: &str = "role.json";

impl RoleState {
    /// Loads the role state from `state_dir`, or creates it with
    /// `preferred_active` active at epoch 1 when there is none yet.
    pub fn load_or_init(state_dir: &Path, preferred_active: &str) -> Result<RoleState, StateError> {
        let path = state_dir.join(ROLE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let s = RoleState {
                    epoch: 1,
                    active: preferred_active.to_string(),
                };
                s.store(state_dir)?;
                Ok(s)
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Persists the role state atomically.
    pub fn store(&self, state_dir: &Path) -> Result<(), StateError> {
        let path = state_dir.join(ROLE_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes).map_err(|source| StateError::Io { path, source })
    }
}

/// The most an epoch may rise in one step that an agent learns from a peer
/// or an operator. The controller raises the epoch by one per role change; a
/// node that was down through many changes may be this far behind and still
/// catch up in one step. A claim beyond it (a hostile or broken peer claiming
/// `u64::MAX`) is refused: adopting it would leave no epoch for the next change.
pub const MAX_EPOCH_JUMP: u64 = 1000;

/// The highest epoch an agent accepts; far below `u64::MAX`, so that the
/// controller can always make the next one.
pub const MAX_EPOCH: u64 = u64::MAX / 2;

/// Why an epoch cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    /// The next epoch would pass [`MAX_EPOCH`].
    #[error(
        "epoch {current} is the highest allowed; no further role change can be recorded (edit role.json on every node)"
    )]
    Exhausted {
        /// The epoch there is no successor for.
        current: u64,
    },
    /// A claimed epoch is further above this node's than any controller could have made.
    #[error("epoch {claimed} is more than {MAX_EPOCH_JUMP} above this node's epoch {current} (or above {MAX_EPOCH}): refused")]
    TooFar {
        /// This node's epoch.
        current: u64,
        /// The epoch claimed.
        claimed: u64,
    },
}

/// The epoch after `current`, with checked arithmetic.
pub fn next_epoch(current: u64) -> Result<u64, EpochError> {
    current
        .checked_add(1)
        .filter(|n| *n <= MAX_EPOCH)
        .ok_or(EpochError::Exhausted { current })
}

/// Checks that `claimed` (from a peer or an operator) is a step up from
/// `current` that a controller could have made: at most [`MAX_EPOCH_JUMP`]
/// above it and at most [`MAX_EPOCH`]. A claim at or below `current` is not
/// a step up and passes (the callers compare epochs themselves).
pub fn check_epoch_step(current: u64, claimed: u64) -> Result<(), EpochError> {
    if claimed <= current {
        return Ok(());
    }
    let limit = current.saturating_add(MAX_EPOCH_JUMP).min(MAX_EPOCH);
    if claimed > limit {
        return Err(EpochError::TooFar { current, claimed });
    }
    Ok(())
}

/// The file, under the state dir, that holds the role history (JSON lines).
pub const HISTORY_FILE: &str = "history.jsonl";

/// Appends one role change to the history and makes it durable.
pub fn append_history(state_dir: &Path, entry: &HistoryEntry) -> io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = crate::perms::append_private_file(&state_dir.join(HISTORY_FILE))?;
    f.write_all(&line)?;
    f.sync_data()
}

/// Reads the role history; unreadable lines are skipped.
pub fn read_history(state_dir: &Path) -> Vec<HistoryEntry> {
    fs::read_to_string(state_dir.join(HISTORY_FILE))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_checked() {
        assert_eq!(next_epoch(1), Ok(2));
        assert_eq!(next_epoch(MAX_EPOCH - 1), Ok(MAX_EPOCH));
        assert_eq!(next_epoch(MAX_EPOCH), Err(EpochError::Exhausted { current: MAX_EPOCH }));
        assert_eq!(next_epoch(u64::MAX), Err(EpochError::Exhausted { current: u64::MAX }));
        assert_eq!(check_epoch_step(5, 3), Ok(()));
        assert_eq!(check_epoch_step(5, 6), Ok(()));
        assert_eq!(check_epoch_step(5, 5 + MAX_EPOCH_JUMP), Ok(()));
        assert!(check_epoch_step(5, 6 + MAX_EPOCH_JUMP).is_err());
        assert!(check_epoch_step(1, u64::MAX).is_err());
        assert!(check_epoch_step(u64::MAX - 3, u64::MAX).is_err());
        assert!(check_epoch_step(MAX_EPOCH, MAX_EPOCH + 1).is_err());
    }

    #[test]
    fn init_store_and_reload() {
        let d = tempfile::tempdir().unwrap();
        let s = RoleState::load_or_init(d.path(), "a").unwrap();
        assert_eq!(
            s,
            RoleState {
                epoch: 1,
                active: "a".into()
            }
        );
        RoleState {
            epoch: 2,
            active: "b".into(),
        }
        .store(d.path())
        .unwrap();
        let again = RoleState::load_or_init(d.path(), "a").unwrap();
        assert_eq!(again.epoch, 2);
        assert_eq!(again.active, "b");
        let e = HistoryEntry {
            time: 1,
            epoch: 2,
            from: "a".into(),
            to: "b".into(),
            reason: "test".into(),
            by: "me".into(),
        };
        append_history(d.path(), &e).unwrap();
        append_history(d.path(), &e).unwrap();
        assert_eq!(read_history(d.path()), vec![e.clone(), e]);
        use std::os::unix::fs::PermissionsExt;
        for f in [ROLE_FILE, HISTORY_FILE] {
            let mode = fs::metadata(d.path().join(f)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600, "{f}");
        }
        fs::write(d.path().join(ROLE_FILE), b"{").unwrap();
        assert!(matches!(
            RoleState::load_or_init(d.path(), "a"),
            Err(StateError::Corrupt { .. })
        ));
    }
}
