//! Watch roots are verified before anything ships from them, and never
//! created on the active.
//!
//! A root that is missing, is not a directory, or sits on another file
//! system than when it was last seen (an unmounted mount point shows up as
//! the directory beneath it, on the parent's device) would look like an
//! empty tree, and shipping it would empty every passive. Such a watch
//! stops shipping instead, with the reason in the log, status, metrics and
//! `check`, until the root is back or an operator accepts it
//! (`warmsparectl resync --watch NAME --accept-root`).
//!
//! The device each root was last seen on is kept in `roots.json` under the
//! state dir. The passive's receiver still creates a missing root at the
//! first sync: a passive root that is missing loses nothing.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio::sync::Notify;
use warmspare_shared::persist;

/// The file, under the state dir, that records each root's device.
pub const ROOTS_FILE: &str = "roots.json";

/// The roots of this node's watches: where they were last seen, and what is
/// wrong with them now.
pub struct Roots {
    file: PathBuf,
    inner: Mutex<Inner>,
    /// Woken when a root that had a problem is fine again (the watcher
    /// watches it anew).
    pub recovered: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    /// The device id each root was last seen on, by watch.
    seen: BTreeMap<String, u64>,
    /// What is wrong with a root now, by watch.
    problems: BTreeMap<String, String>,
}

/// What a root is now.
enum Found {
    Dir(u64),
    Problem(String),
}

fn look(root: &Path) -> Found {
    match std::fs::metadata(root) {
        Ok(md) if md.is_dir() => Found::Dir(md.dev()),
        Ok(_) => Found::Problem(format!("watch root {} is not a directory", root.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Found::Problem(format!("watch root {} is missing", root.display()))
        }
        Err(e) => Found::Problem(format!("cannot read watch root {}: {e}", root.display())),
    }
}

impl Roots {
    /// Loads the recorded devices from `state_dir` (none when the file is
    /// missing or unreadable: every root is then taken as first seen).
    pub fn load(state_dir: &Path) -> Roots {
        let file = state_dir.join(ROOTS_FILE);
        let seen = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Roots {
            file,
            inner: Mutex::new(Inner {
                seen,
                problems: BTreeMap::new(),
            }),
            recovered: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, seen: &BTreeMap<String, u64>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(seen).context("cannot encode the watch roots")?;
        persist::write_atomic(&self.file, &bytes).with_context(|| format!("cannot write {}", self.file.display()))
    }

    /// Records the device of `root` when none is recorded yet and it is a
    /// directory (at start-up, on every node; nothing else is checked).
    pub fn observe(&self, watch: &str, root: &Path) {
        if let Found::Dir(dev) = look(root) {
            let mut g = self.lock();
            if !g.seen.contains_key(watch) {
                g.seen.insert(watch.to_string(), dev);
                let seen = g.seen.clone();
                drop(g);
                if let Err(e) = self.save(&seen) {
                    tracing::warn!(watch, error = format!("{e:#}"), "cannot record the watch root");
                }
            }
        }
    }

    /// Whether `root` may be shipped from: a directory on the device it was
    /// last seen on (recorded now when it was never seen). `Err` says why
    /// not; the first failure after a success is logged as an error.
    pub fn verify(&self, watch: &str, root: &Path) -> std::result::Result<(), String> {
        let mut g = self.lock();
        let outcome = match look(root) {
            Found::Problem(p) => Err(p),
            Found::Dir(dev) => match g.seen.get(watch) {
                Some(&last) if last != dev => Err(format!(
                    "watch root {} is on another file system than when last seen (device {dev:#x}, was {last:#x}): \
                     an unmounted file system? Accept it with `warmsparectl resync --watch {watch} --accept-root`",
                    root.display()
                )),
                Some(_) => Ok(None),
                None => {
                    g.seen.insert(watch.to_string(), dev);
                    Ok(Some(g.seen.clone()))
                }
            },
        };
        match outcome {
            Err(p) => {
                if g.problems.get(watch) != Some(&p) {
                    tracing::error!(
                        watch,
                        problem = p,
                        "not shipping this watch: its root failed the check; the passives keep their copy"
                    );
                    g.problems.insert(watch.to_string(), p.clone());
                }
                Err(p)
            }
            Ok(record) => {
                let was = g.problems.remove(watch);
                drop(g);
                if let Some(seen) = record {
                    if let Err(e) = self.save(&seen) {
                        tracing::warn!(watch, error = format!("{e:#}"), "cannot record the watch root");
                    }
                }
                if was.is_some() {
                    tracing::warn!(watch, root = %root.display(), "watch root is fine again; shipping resumes");
                    self.recovered.notify_one();
                }
                Ok(())
            }
        }
    }

    /// The operator accepts `root` as it is now: created (one level, with
    /// mode 0700) when missing, and its device recorded.
    pub fn accept(&self, watch: &str, root: &Path) -> std::result::Result<(), String> {
        if let Found::Problem(_) = look(root) {
            if !root.exists() {
                use std::os::unix::fs::DirBuilderExt as _;
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(root)
                    .map_err(|e| format!("cannot create watch root {}: {e}", root.display()))?;
                tracing::warn!(watch, root = %root.display(), "created an empty watch root, as the operator asked");
            }
        }
        let dev = match look(root) {
            Found::Dir(dev) => dev,
            Found::Problem(p) => return Err(p),
        };
        let seen = {
            let mut g = self.lock();
            g.seen.insert(watch.to_string(), dev);
            g.seen.clone()
        };
        self.save(&seen).map_err(|e| format!("{e:#}"))?;
        tracing::warn!(watch, root = %root.display(), device = dev, "watch root accepted by the operator");
        self.verify(watch, root)
    }

    /// What is wrong with each root now, by watch (as last verified).
    pub fn problems(&self) -> BTreeMap<String, String> {
        self.lock().problems.clone()
    }

    /// Checks every root without recording anything (for `check`).
    pub fn check_only(&self, watch: &str, root: &Path) -> std::result::Result<(), String> {
        let g = self.lock();
        match look(root) {
            Found::Problem(p) => Err(p),
            Found::Dir(dev) => match g.seen.get(watch) {
                Some(&last) if last != dev => Err(format!(
                    "watch root {} is on another file system than when last seen (device {dev:#x}, was {last:#x})",
                    root.display()
                )),
                _ => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_verified_recorded_and_accepted() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let root = d.path().join("ca");
        let roots = Roots::load(&state);
        assert!(roots.verify("ca", &root).unwrap_err().contains("missing"));
        assert!(!root.exists(), "a check must never create the root");
        assert!(roots.problems().contains_key("ca"));
        std::fs::create_dir(&root).unwrap();
        roots.verify("ca", &root).unwrap();
        assert!(roots.problems().is_empty());
        // Recorded across restarts; another device is refused.
        let text = std::fs::read_to_string(state.join(ROOTS_FILE)).unwrap();
        let mut seen: BTreeMap<String, u64> = serde_json::from_str(&text).unwrap();
        *seen.get_mut("ca").unwrap() ^= 1;
        std::fs::write(state.join(ROOTS_FILE), serde_json::to_vec(&seen).unwrap()).unwrap();
        let roots = Roots::load(&state);
        assert!(roots.verify("ca", &root).unwrap_err().contains("another file system"));
        assert!(roots.check_only("ca", &root).is_err());
        roots.accept("ca", &root).unwrap();
        roots.verify("ca", &root).unwrap();
        // A file where the root should be.
        std::fs::remove_dir(&root).unwrap();
        std::fs::write(&root, b"x").unwrap();
        assert!(roots.verify("ca", &root).unwrap_err().contains("not a directory"));
        assert!(roots.accept("ca", &root).is_err());
        // Accepting a missing root creates it, empty.
        std::fs::remove_file(&root).unwrap();
        roots.accept("ca", &root).unwrap();
        assert!(root.is_dir());
    }
}
