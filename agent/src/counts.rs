//! The watches' file counts for status and metrics: a walk of a large
//! tree is shared by every request for a few seconds ([`TreeCounts`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::live::LocalWatch;

/// How old the file counts of the watches in a status may be: a walk of a
/// large tree is shared by every status and metrics request for this long.
const COUNT_MAX_AGE: Duration = Duration::from_secs(5);

/// Files and bytes per watch.
pub type Counts = BTreeMap<String, (u64, u64)>;

/// The files and bytes of each watch, counted at most once per
/// [`COUNT_MAX_AGE`] whatever the number of pollers.
#[derive(Default)]
pub struct TreeCounts {
    /// The last counts and when they were taken.
    last: Mutex<Option<(Instant, Counts)>>,
    /// Held by the walk under way (on a blocking thread): requests that find
    /// the counts stale meanwhile wait for its result instead of walking too.
    /// Only status requests ever take it.
    walk: Mutex<()>,
}

impl TreeCounts {
    fn fresh(&self, watches: &[LocalWatch]) -> Option<Counts> {
        let g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (at, counts) = g.as_ref()?;
        (at.elapsed() < COUNT_MAX_AGE && watches.iter().all(|w| counts.contains_key(&w.name))).then(|| counts.clone())
    }

    /// The counts of `watches`, walking their trees when the last counts
    /// are stale. Blocking: call it from a blocking thread.
    pub fn get(&self, watches: &[LocalWatch]) -> Counts {
        if let Some(c) = self.fresh(watches) {
            return c;
        }
        let _walk = self.walk.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.fresh(watches) {
            return c;
        }
        let counts: Counts = watches.iter().map(|w| (w.name.clone(), count(&w.root))).collect();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), counts.clone()));
        counts
    }
}

/// Regular files under `root` and their total size (links are not followed).
fn count(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for de in rd.flatten() {
            let Ok(ft) = de.file_type() else { continue };
            if ft.is_dir() {
                stack.push(de.path());
            } else if ft.is_file()
                && !de
                    .file_name()
                    .to_str()
                    .is_some_and(warmspare_shared::relpath::is_temp_name)
            {
                files += 1;
                bytes += de.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (files, bytes)
}
