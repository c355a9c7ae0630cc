//! The operator's hold on replication and jobs (`warmsparectl pause`).
//!
//! A [`Pause`] is one flag, kept across restarts by a marker file under
//! the state dir: the agent starts paused when the marker is there. Setting
//! it wakes the shippers (through `telemetry`) so that they see the change
//! at once instead of at their next round.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use warmspare_shared::persist;

use crate::telemetry::Telemetry;

/// The file under the state dir that marks a paused agent.
const PAUSED_FILE: &str = "paused";

/// Whether replication and jobs are held, and the marker that keeps it.
pub struct Pause {
    /// Whether replication and jobs are held.
    paused: AtomicBool,
    /// The marker file (`state_dir/paused`).
    marker: PathBuf,
    /// Where the shippers are woken when the hold changes.
    telemetry: Arc<Telemetry>,
}

impl Pause {
    /// The hold as the state dir records it: held if the marker is there.
    pub fn load(state_dir: &Path, telemetry: Arc<Telemetry>) -> Pause {
        let marker = state_dir.join(PAUSED_FILE);
        Pause {
            paused: AtomicBool::new(marker.exists()),
            marker,
            telemetry,
        }
    }

    /// Whether replication and jobs are held.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Holds or releases replication and jobs (persisted across restarts).
    /// Writes or removes the marker file: call it off the async runtime.
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        if paused {
            persist::write_atomic(&self.marker, b"paused by warmsparectl\n")
                .with_context(|| format!("writing {}", self.marker.display()))?;
        } else if self.marker.exists() {
            std::fs::remove_file(&self.marker).with_context(|| format!("removing {}", self.marker.display()))?;
        }
        self.paused.store(paused, Ordering::SeqCst);
        self.telemetry.interrupt_shippers();
        tracing::warn!(
            paused,
            "replication and jobs {}",
            if paused { "held" } else { "released" }
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
