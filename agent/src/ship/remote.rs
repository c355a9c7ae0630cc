//! The shipper's model of one watch on the peer ([`Remote`]): what the
//! peer holds ([`Held`]) at each path.
//!
//! With 100,000 files per watch the model is the agent's largest
//! structure, and the one it keeps while idle. It is kept in two parts: a
//! frozen, sorted part (every path in one string, every [`Held`] in one
//! vector: three allocations, which the allocator maps on their own and
//! gives back whole), built from the peer's manifest at each full
//! comparison and rebuilt by [`Remote::compact`] after it; and the changes
//! recorded since (what was sent, what the peer removed), in a small map
//! over it. A model made of one allocation per path and per tree node, as
//! it was, was built while a full comparison's scans and manifests were
//! alive, so its pieces ended spread over pages that the transient data
//! had also used: the allocator could not give those pages back (the
//! agent that made an initial sync of 100,000 files idled at 52.6 MiB, a
//! fresh agent on the same synced pair at 26.5 MiB).

use std::collections::BTreeMap;
use std::ops::Bound;

use warmspare_shared::manifest::{Entry, EntryKind, Meta};

/// What the shipper believes the peer holds at one path (the path is the
/// key it is stored under: an [`Entry`] would keep it twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) kind: EntryKind,
    pub(super) meta: Meta,
}

impl Held {
    pub(super) fn of(e: &Entry) -> Held {
        Held {
            kind: e.kind.clone(),
            meta: e.meta,
        }
    }
}

/// The frozen part of a model: paths in order, one after the other in
/// `text`, path `i` ending at `ends[i]`, with what the peer holds there in
/// `held[i]`.
#[derive(Debug, Default)]
struct Frozen {
    text: String,
    ends: Vec<usize>,
    held: Vec<Held>,
}

impl Frozen {
    /// From entries sorted by path, without duplicates; `text_len` is the
    /// sum of their paths' lengths (so that every part is allocated once, at
    /// its size).
    fn build<P: AsRef<str>>(sorted: impl ExactSizeIterator<Item = (P, Held)>, text_len: usize) -> Frozen {
        let n = sorted.len();
        let mut f = Frozen {
            text: String::with_capacity(text_len),
            ends: Vec::with_capacity(n),
            held: Vec::with_capacity(n),
        };
        for (path, held) in sorted {
            f.text.push_str(path.as_ref());
            f.ends.push(f.text.len());
            f.held.push(held);
        }
        f
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn path(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    /// The index of the first path not below `bound` in path order.
    fn lower(&self, bound: Bound<&str>) -> usize {
        match bound {
            Bound::Unbounded => 0,
            Bound::Included(b) => partition(self.len(), |i| self.path(i) < b),
            Bound::Excluded(b) => partition(self.len(), |i| self.path(i) <= b),
        }
    }

    /// The index of `path`, if it is there.
    fn find(&self, path: &str) -> Option<usize> {
        let i = self.lower(Bound::Included(path));
        (i < self.len() && self.path(i) == path).then_some(i)
    }
}

/// The first index in `0..n` for which `before` is false (it must be true
/// for a prefix of the range and false after it).
fn partition(n: usize, before: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The peer's entries of one watch, by path: a frozen part and the changes
/// recorded since (see the module's documentation).
#[derive(Debug, Default)]
pub(super) struct Remote {
    frozen: Frozen,
    /// What changed since `frozen` was built: what the peer holds now at
    /// each path, or `None` where it no longer holds anything.
    changes: BTreeMap<Box<str>, Option<Held>>,
}

impl FromIterator<(Box<str>, Held)> for Remote {
    /// The model of what the peer listed (the last of a repeated path wins).
    fn from_iter<I: IntoIterator<Item = (Box<str>, Held)>>(iter: I) -> Remote {
        let mut all: Vec<(Box<str>, Held)> = iter.into_iter().collect();
        // Stable: among equal paths the last one listed stays last, and
        // takes the place of the first.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        let text_len = all.iter().map(|(p, _)| p.len()).sum();
        let frozen = Frozen::build(all.into_iter(), text_len);
        Remote {
            frozen,
            changes: BTreeMap::new(),
        }
    }
}

impl Remote {
    /// The model of what the peer listed in its manifest. The peer's scan
    /// lists its entries sorted by path, each once (`manifest::Scan`): the
    /// frozen part is then built from them in one pass, with no sort and
    /// no path copied on its own first (at 100,000 files the sort alone was
    /// 2.5% of the active's CPU in a full comparison). A manifest out of
    /// order or with a path twice (a hostile or broken peer) is sorted as
    /// any list is, the last of a repeated path winning.
    pub(super) fn from_manifest(entries: Vec<Entry>) -> Remote {
        if !entries.windows(2).all(|w| w[0].path < w[1].path) {
            return entries
                .into_iter()
                .map(|e| {
                    (
                        e.path.into_boxed_str(),
                        Held {
                            kind: e.kind,
                            meta: e.meta,
                        },
                    )
                })
                .collect();
        }
        let text_len = entries.iter().map(|e| e.path.len()).sum();
        let frozen = Frozen::build(
            entries.into_iter().map(|e| {
                (
                    e.path,
                    Held {
                        kind: e.kind,
                        meta: e.meta,
                    },
                )
            }),
            text_len,
        );
        Remote {
            frozen,
            changes: BTreeMap::new(),
        }
    }

    /// What the peer holds at `path`.
    pub(super) fn get(&self, path: &str) -> Option<&Held> {
        match self.changes.get(path) {
            Some(now) => now.as_ref(),
            None => self.frozen.find(path).map(|i| &self.frozen.held[i]),
        }
    }

    /// Records that the peer holds `held` at `path`.
    pub(super) fn insert(&mut self, path: Box<str>, held: Held) {
        self.changes.insert(path, Some(held));
    }

    /// Records that the peer holds nothing at `path` (and nothing changes
    /// below it: see [`Remote::remove_tree`]).
    pub(super) fn remove(&mut self, path: &str) {
        if self.frozen.find(path).is_some() {
            self.changes.insert(path.into(), None);
        } else {
            self.changes.remove(path);
        }
    }

    /// Records that the peer holds nothing at or below `path`.
    pub(super) fn remove_tree(&mut self, path: &str) {
        let doomed: Vec<String> = self.subtree(path).map(|(p, _)| p.to_string()).collect();
        for p in doomed {
            self.remove(&p);
        }
    }

    /// Every entry, in path order.
    pub(super) fn iter(&self) -> Entries<'_> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// What the peer holds at every path.
    pub(super) fn values(&self) -> impl Iterator<Item = &Held> {
        self.iter().map(|(_, h)| h)
    }

    /// The entry at `prefix` and everything below it, in path order (the
    /// whole model for `""`).
    pub(super) fn subtree<'a>(&'a self, prefix: &str) -> impl Iterator<Item = (&'a str, &'a Held)> + 'a {
        let (at, below) = if prefix.is_empty() {
            (None, self.iter())
        } else {
            let at = self.get(prefix).map(|h| {
                // The key as stored, so that the item borrows the model only.
                let stored = match self.changes.get_key_value(prefix) {
                    Some((k, _)) => &**k,
                    None => self.frozen.find(prefix).map_or("", |i| self.frozen.path(i)),
                };
                (stored, h)
            });
            let (from, to) = (format!("{prefix}/"), format!("{prefix}0"));
            (at, self.range(Bound::Included(&from), Bound::Excluded(&to)))
        };
        at.into_iter().chain(below)
    }

    /// The entries with paths between `from` and `to`, in path order.
    fn range(&self, from: Bound<&str>, to: Bound<&str>) -> Entries<'_> {
        let lo = self.frozen.lower(from);
        let hi = match to {
            Bound::Unbounded => self.frozen.len(),
            Bound::Included(b) => self.frozen.lower(Bound::Excluded(b)),
            Bound::Excluded(b) => self.frozen.lower(Bound::Included(b)),
        }
        .max(lo);
        Entries {
            frozen: &self.frozen,
            next: lo,
            end: hi,
            changes: self.changes.range::<str, _>((from, to)).peekable(),
        }
    }

    /// Folds the changes into the frozen part, so that the model is again
    /// three allocations of their exact sizes (called after a full
    /// comparison; at most one extra copy of the entries is alive meanwhile).
    pub(super) fn compact(&mut self) {
        if self.changes.is_empty() && self.frozen.text.capacity() == self.frozen.text.len() {
            return;
        }
        let (mut n, mut text_len) = (0, 0);
        for (p, _) in self.iter() {
            n += 1;
            text_len += p.len();
        }
        let frozen = Frozen::build(Counted(self.iter().map(|(p, h)| (p, h.clone())), n), text_len);
        self.frozen = frozen;
        self.changes = BTreeMap::new();
    }
}

/// An iterator whose length is known beforehand.
struct Counted<I>(I, usize);

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        let item = self.0.next()?;
        self.1 = self.1.saturating_sub(1);
        Some(item)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.1, Some(self.1))
    }
}

impl<I: Iterator> ExactSizeIterator for Counted<I> {}

/// The entries of a model in path order: the frozen part merged with the
/// changes, a change replacing (or, as `None`, hiding) the frozen entry at
/// its path.
pub(super) struct Entries<'a> {
    frozen: &'a Frozen,
    next: usize,
    end: usize,
    changes: std::iter::Peekable<std::collections::btree_map::Range<'a, Box<str>, Option<Held>>>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, &'a Held);

    fn next(&mut self) -> Option<(&'a str, &'a Held)> {
        loop {
            let frozen = (self.next < self.end).then(|| self.frozen.path(self.next));
            let change = self.changes.peek().map(|(k, _)| &***k);
            let take_change = match (frozen, change) {
                (None, None) => return None,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(f), Some(c)) => {
                    if f == c {
                        // The change replaces the frozen entry.
                        self.next += 1;
                    }
                    c <= f
                }
            };
            if take_change {
                let (k, v) = self.changes.next()?;
                if let Some(h) = v {
                    return Some((&**k, h));
                }
            } else {
                let i = self.next;
                self.next += 1;
                return Some((self.frozen.path(i), &self.frozen.held[i]));
            }
        }
    }
}

#[cfg(test)]
mod tests;
