//! The sync ledger: per watch, the content each file had when this node and
//! its peer last agreed on it.
//!
//! A receiver consults it before it overwrites or deletes a file: a local
//! file whose content is not the one last agreed (a certificate a stale
//! primary signed after the last sync, or an edit made on a passive) is moved
//! to the diverged folder first, so nothing is lost. Agreement is recorded
//! when a file is applied or acknowledged, and for a whole watch after a full
//! comparison has been applied without failures.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::manifest::{ContentHash, PathHasher};
use crate::relpath::is_under;

/// The ledger of one watch, persisted in one file.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    map: HashMap<Box<str>, ContentHash, PathHasher>,
    dirty: bool,
}

impl Ledger {
    /// Loads the ledger at `path`; a missing or unreadable one is empty (every
    /// differing file is then preserved: the safe side).
    pub fn load(path: &Path) -> Ledger {
        let map = match fs::read(path) {
            Ok(bytes) => Ledger::decode(&bytes),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the sync ledger; starting it empty");
                }
                HashMap::default()
            }
        };
        Ledger {
            path: path.to_path_buf(),
            map,
            dirty: false,
        }
    }

    /// Decodes persisted ledger bytes; bytes that do not decode give an empty map.
    pub fn decode(bytes: &[u8]) -> HashMap<Box<str>, ContentHash, PathHasher> {
        crate::persist::decode_persisted(bytes).unwrap_or_default()
    }

    /// The agreed content of `rel`, if any.
    pub fn get(&self, rel: &str) -> Option<ContentHash> {
        self.map.get(rel).copied()
    }

    /// Every agreed path with its content.
    pub fn entries(&self) -> impl Iterator<Item = (&str, ContentHash)> {
        self.map.iter().map(|(p, h)| (&**p, *h))
    }

    /// Records that `rel` is agreed to hold `hash`.
    pub fn set(&mut self, rel: &str, hash: ContentHash) {
        if self.map.get(rel) != Some(&hash) {
            self.map.insert(rel.into(), hash);
            self.dirty = true;
        }
    }

    /// Forgets `rel` alone (a file or a link, with nothing below it).
    pub fn forget_path(&mut self, rel: &str) {
        self.dirty |= self.map.remove(rel).is_some();
    }

    /// Forgets `rel` and everything below it.
    pub fn forget_tree(&mut self, rel: &str) {
        let before = self.map.len();
        self.map.retain(|k, _| !is_under(k, rel));
        self.dirty |= before != self.map.len();
    }

    /// Forgets every path of `rels` and everything below each, in one pass
    /// over the ledger ([`Ledger::forget_tree`] is a pass each: a batch
    /// that removed thousands of files paid for thousands of passes).
    pub fn forget_trees(&mut self, rels: &[&str]) {
        match rels {
            [] => {}
            [one] => self.forget_tree(one),
            _ if rels.contains(&"") => self.forget_tree(""),
            _ => {
                let gone: std::collections::HashSet<&str> = rels.iter().copied().collect();
                let before = self.map.len();
                // A path goes when it, or one of its ancestors, is in the set.
                self.map
                    .retain(|k, _| !gone.contains(&**k) && !k.match_indices('/').any(|(i, _)| gone.contains(&k[..i])));
                self.dirty |= before != self.map.len();
            }
        }
    }

    /// Replaces the whole ledger with `entries`.
    pub fn reset(&mut self, entries: impl IntoIterator<Item = (String, ContentHash)>) {
        let map: HashMap<Box<str>, ContentHash, PathHasher> =
            entries.into_iter().map(|(p, h)| (p.into_boxed_str(), h)).collect();
        if map != self.map {
            self.map = map;
            self.dirty = true;
        }
    }

    /// Replaces the whole ledger with `entries`, as [`Ledger::reset`] does,
    /// without copying anything when the ledger already holds exactly them
    /// (after a full comparison that changed nothing, the usual case: with
    /// 100,000 files a copy was two strings and a map entry per file).
    pub fn reset_from<'a>(&mut self, entries: impl Iterator<Item = (&'a str, ContentHash)> + Clone) {
        let mut n = 0;
        let same = entries.clone().all(|(p, h)| {
            n += 1;
            self.map.get(p) == Some(&h)
        });
        if same && n == self.map.len() {
            return;
        }
        self.reset(entries.map(|(p, h)| (p.to_string(), h)));
    }

    /// Persists the ledger when it changed, its entries in path order (see
    /// [`Ledgers::agree`]).
    pub fn save(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut sorted: Vec<(&str, &ContentHash)> = self.map.iter().map(|(p, h)| (&**p, h)).collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let bytes = encode(sorted.into_iter())?;
        crate::persist::write_atomic(&self.path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

/// The bytes of a ledger holding `entries`, in the order given: what
/// [`Ledger::save`] writes, and what a map of them decodes from.
fn encode<'a>(entries: impl Iterator<Item = (&'a str, &'a ContentHash)>) -> io::Result<Vec<u8>> {
    /// The entries as a map (a length, then each key and value), as a map
    /// of them is written.
    struct AsMap<I>(std::cell::RefCell<Option<I>>);
    impl<'a, I: Iterator<Item = (&'a str, &'a ContentHash)>> serde::Serialize for AsMap<I> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            // The length must be known (`encode`'s callers pass exact iterators).
            match self.0.borrow_mut().take() {
                Some(entries) => s.collect_map(entries),
                None => s.collect_map(std::iter::empty::<(&str, &ContentHash)>()),
            }
        }
    }
    let it = AsMap(std::cell::RefCell::new(Some(entries)));
    bincode::serde::encode_to_vec(&it, bincode::config::standard()).map_err(io::Error::other)
}

/// The ledgers of every watch of a node, each loaded on first use and let
/// go of once saved.
#[derive(Debug)]
pub struct Ledgers {
    dir: PathBuf,
    by_watch: HashMap<String, Ledger>,
    saved_at: Option<std::time::Instant>,
}

impl Ledgers {
    /// Ledgers kept under `dir` (one file per watch, loaded on first use).
    pub fn new(dir: PathBuf) -> Ledgers {
        Ledgers {
            dir,
            by_watch: HashMap::new(),
            saved_at: None,
        }
    }

    /// The ledger of `watch`.
    pub fn watch(&mut self, watch: &str) -> &mut Ledger {
        let dir = &self.dir;
        self.by_watch
            .entry(watch.to_string())
            .or_insert_with(|| Ledger::load(&dir.join(watch)))
    }

    /// Replaces the ledger of `watch` with `entries`, as [`Ledger::reset_from`]
    /// does, after a full comparison. When that ledger waits on disk (saved,
    /// let go of) and `entries` come in path order, as a scan lists them,
    /// they are first written out as the ledger's bytes and compared with
    /// the file: equal (nothing changed since the last comparison, the
    /// usual case), the ledger is not read at all. Reading it meant
    /// decoding every path into a map, comparing and freeing it again: at
    /// 100,000 files 15% of the active's CPU in a full comparison. A file
    /// that holds the same entries in another order (written by an earlier
    /// version) is written again in path order, once.
    pub fn agree<'a>(&mut self, watch: &str, entries: impl Iterator<Item = (&'a str, ContentHash)> + Clone) {
        if !self.by_watch.contains_key(watch) {
            let listed: Vec<(&str, ContentHash)> = entries.clone().collect();
            let same = listed.windows(2).all(|w| w[0].0 < w[1].0)
                && encode(listed.iter().map(|(p, h)| (*p, h)))
                    .is_ok_and(|bytes| fs::read(self.dir.join(watch)).is_ok_and(|on_disk| on_disk == bytes));
            drop(listed);
            if same {
                return;
            }
            let ledger = self.watch(watch);
            ledger.reset_from(entries);
            // The same entries in another order: written again, sorted.
            ledger.dirty = true;
            return;
        }
        self.watch(watch).reset_from(entries);
    }

    /// Persists every changed ledger, then lets go of them: a saved ledger
    /// is read back on its next use. Between bursts of changes an agent
    /// holds no ledger in memory (about 10 MiB for 100,000 files); a busy
    /// one reads each ledger back at most once per save.
    pub fn save(&mut self) -> io::Result<()> {
        for l in self.by_watch.values_mut() {
            l.save()?;
        }
        self.saved_at = Some(std::time::Instant::now());
        if !self.by_watch.is_empty() {
            self.by_watch.clear();
            crate::sys::release_free_memory();
        }
        Ok(())
    }

    /// Persists every changed ledger unless that was done less than
    /// `interval` ago (a ledger is rewritten whole; a busy sender would
    /// otherwise rewrite it at every batch).
    pub fn save_if_due(&mut self, interval: std::time::Duration) -> io::Result<()> {
        if self.saved_at.is_some_and(|t| t.elapsed() < interval) {
            return Ok(());
        }
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_forget_reset_and_persist() {
        let d = tempfile::tempdir().unwrap();
        let mut ls = Ledgers::new(d.path().to_path_buf());
        let h = ContentHash::of(b"x");
        ls.watch("ca").set("a/b", h);
        ls.watch("ca").set("a/c", h);
        ls.watch("ca").set("ab", h);
        ls.watch("ca").forget_tree("a");
        assert_eq!(ls.watch("ca").get("a/b"), None);
        assert_eq!(ls.watch("ca").get("ab"), Some(h));
        ls.save().unwrap();
        // Saved ledgers are let go of and read back on their next use.
        assert!(ls.by_watch.is_empty());
        assert_eq!(ls.watch("ca").get("ab"), Some(h));
        assert_eq!(ls.watch("ca").get("a/c"), None);
        let mut again = Ledgers::new(d.path().to_path_buf());
        assert_eq!(again.watch("ca").get("ab"), Some(h));
        again.watch("ca").reset([("z".to_string(), h)]);
        assert_eq!(again.watch("ca").get("ab"), None);
    }

    #[test]
    fn forgetting_many_trees_at_once_forgets_what_one_at_a_time_would() {
        let d = tempfile::tempdir().unwrap();
        let h = ContentHash::of(b"x");
        let paths = ["a", "a/b", "a/b/c", "ab", "a.b/c", "b/c", "b/cd", "c/d/e", "c/de"];
        for rels in [
            vec![],
            vec!["a"],
            vec!["a/b", "b/c"],
            vec!["c/d", "ab", "nope", "a/b/c/d"],
            vec!["c", ""],
        ] {
            let (mut one, mut all) = (Ledger::load(&d.path().join("1")), Ledger::load(&d.path().join("2")));
            for p in paths {
                one.set(p, h);
                all.set(p, h);
            }
            (one.dirty, all.dirty) = (false, false);
            for r in &rels {
                one.forget_tree(r);
            }
            all.forget_trees(&rels);
            let sorted = |l: &Ledger| {
                let mut v: Vec<&str> = l.entries().map(|(p, _)| p).collect();
                v.sort_unstable();
                v.into_iter().map(str::to_string).collect::<Vec<_>>()
            };
            assert_eq!(sorted(&all), sorted(&one), "{rels:?}");
            assert_eq!(all.dirty, one.dirty, "{rels:?}");
        }
    }

    #[test]
    fn agreeing_on_what_the_file_holds_reads_nothing_and_anything_else_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let (h, g) = (ContentHash::of(b"x"), ContentHash::of(b"y"));
        let path = d.path().join("ca");
        // Written by an earlier version: the same entries in a map's order.
        let unsorted = vec![("b/c", &g), ("b", &h), ("a", &h)];
        fs::write(&path, encode(unsorted.into_iter()).unwrap()).unwrap();
        let mut ls = Ledgers::new(d.path().to_path_buf());
        let same = [("a", h), ("b", h), ("b/c", g)];
        // Other bytes, the same entries: read, and written again in order.
        ls.agree("ca", same.into_iter());
        assert!(ls.by_watch["ca"].dirty);
        ls.save().unwrap();
        let sorted = fs::read(&path).unwrap();
        assert_eq!(sorted, encode(same.iter().map(|(p, h)| (*p, h))).unwrap());
        // Now the same bytes: nothing is read.
        ls.agree("ca", same.into_iter());
        assert!(ls.by_watch.is_empty(), "a ledger equal to its file was read");
        // Another hash, an entry gone, an entry more, or entries out of
        // order with one changed: each is recorded.
        let cases: [Vec<(&str, ContentHash)>; 4] = [
            vec![("a", h), ("b", h), ("b/c", h)],
            vec![("a", h), ("b", h)],
            vec![("a", h), ("b", h), ("b/c", g), ("c", g)],
            vec![("b/c", g), ("a", g), ("b", h)],
        ];
        for (i, want) in cases.into_iter().enumerate() {
            ls.agree("ca", want.clone().into_iter());
            ls.save().unwrap();
            let mut got: Vec<(&str, ContentHash)> = Vec::new();
            let back = Ledger::load(&path);
            got.extend(back.entries());
            got.sort_by(|a, b| a.0.cmp(b.0));
            let mut want = want;
            want.sort_by(|a, b| a.0.cmp(b.0));
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn reset_from_changes_only_what_differs() {
        let d = tempfile::tempdir().unwrap();
        let (h, g) = (ContentHash::of(b"x"), ContentHash::of(b"y"));
        let mut l = Ledger::load(&d.path().join("ca"));
        l.reset_from([("a", h), ("b", h)].into_iter());
        assert!(l.dirty);
        l.save().unwrap();
        // The same entries: nothing to write.
        l.reset_from([("b", h), ("a", h)].into_iter());
        assert!(!l.dirty);
        // Another hash, one entry fewer, one entry more: each replaces it.
        for (i, want) in [vec![("a", h), ("b", g)], vec![("a", h)], vec![("a", h), ("c", h)]]
            .into_iter()
            .enumerate()
        {
            l.reset_from(want.clone().into_iter());
            assert!(l.dirty, "case {i}");
            let mut got: Vec<(&str, ContentHash)> = l.entries().collect();
            got.sort_by(|a, b| a.0.cmp(b.0));
            assert_eq!(got, want, "case {i}");
            l.save().unwrap();
        }
    }
}
