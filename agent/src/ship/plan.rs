//! The plan of one prefix: from a local scan and the peer model (what the
//! shipper believes the peer holds, [`Held`] per path, [`Remote`] per
//! watch, kept in `remote`), what the peer must remove ([`removals`],
//! pure) and every step that brings the peer to the scan, in the order
//! they are sent ([`steps`], pure). `transfer` carries the steps out.

use std::collections::{BTreeSet, HashMap, HashSet};

use warmspare_shared::beneath::Dirs;
use warmspare_shared::delta;
use warmspare_shared::manifest::{self, Entry, EntryKind, HashCache, Hashing};
use warmspare_shared::relpath;

use crate::live::LocalWatch;

pub(super) use super::remote::{Held, Remote};

/// The shipper's picture of one peer: what it holds, per watch.
pub(super) type Model = HashMap<String, Remote>;

/// Folds what a full comparison recorded in `remote` into its frozen part
/// (see `remote`).
pub(super) fn compact(remote: &mut Remote) {
    remote.compact();
}

/// The paths of `paths` that have no ancestor in the set.
pub(super) fn top_most<'a>(paths: impl Iterator<Item = &'a String>) -> Vec<String> {
    let sorted: BTreeSet<&String> = paths.collect();
    let mut out: Vec<String> = Vec::new();
    for p in sorted {
        if out.last().is_some_and(|last| relpath::is_under(p, last)) {
            continue;
        }
        out.push(p.clone());
    }
    out
}

/// One prefix of a batch, scanned and compared, before anything is sent.
pub(super) struct Plan {
    /// The prefix compared.
    pub(super) prefix: String,
    pub(super) scan: manifest::Scan,
    /// What this node could not read there (path, why): kept on the peer.
    pub(super) unreadable: Vec<(String, String)>,
    /// What the peer has there that must go, top-most only.
    pub(super) removals: Vec<Removal>,
}

/// One path the peer must remove.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Removal {
    pub(super) path: String,
    /// Nothing is there locally (a deletion, which the guard counts), as
    /// opposed to something of another type taking its place.
    pub(super) deletion: bool,
    /// Regular files the peer holds at or under it.
    pub(super) files: u64,
}

/// Scans `prefix` locally, through the batch's directory handles `dirs`
/// beneath the watch's root, and lists what the peer must remove under it;
/// `tick` is called as the scan goes (see `manifest::scan_with`).
pub(super) fn plan_prefix(
    w: &LocalWatch,
    dirs: &mut Dirs,
    prefix: &str,
    cache: &mut HashCache,
    remote: &Remote,
    tick: &(dyn Fn() + Sync),
) -> Plan {
    // A file is read before it is sent only when the peer has a file of the
    // same size there (the hashes decide whether to send it); the others are
    // sent anyway, and hashed as they are read to be sent.
    let same_size_there = |path: &str, size: u64| {
        remote
            .get(path)
            .is_some_and(|r| matches!(r.kind, EntryKind::File { size: s, .. } if s == size))
    };
    let scan = manifest::scan_with(dirs, prefix, &w.excludes, cache, Hashing::Only(&same_size_there), tick);
    // What could not be read is unknown, not gone: the peer's copies at and
    // below those paths are left alone (no removal, no replacement).
    let mut unknown: Vec<&str> = Vec::new();
    let mut unreadable: Vec<(String, String)> = Vec::new();
    for s in &scan.skipped {
        tracing::warn!(watch = w.name, skipped = ?s, "not replicated");
        if let Some(p) = s.unknown_path() {
            unknown.push(p);
            let why = match s {
                manifest::Skipped::Unreadable(_, why) => why.clone(),
                _ => "not a regular file, directory or link".to_string(),
            };
            unreadable.push((p.to_string(), why));
        }
    }
    let removals = removals(&w.name, prefix, &scan.entries, &unknown, remote);
    drop(unknown);
    Plan {
        prefix: prefix.to_string(),
        scan,
        removals,
        unreadable,
    }
}

/// What the peer must remove under `prefix`, top-most first, from the local
/// scan's `entries` and the model of the peer: what the peer has that is
/// not here, or of another type (a file in place of a file is replaced, not
/// removed). Nothing at or below an `unknown` path (one this node could not
/// read) is removed. Pure: no I/O.
pub(super) fn removals(
    watch: &str,
    prefix: &str,
    entries: &[Entry],
    unknown: &[&str],
    remote: &Remote,
) -> Vec<Removal> {
    // The scan's entries come sorted by path (`manifest::Scan`), as the
    // model's do: one pass over both, with no map of the local entries
    // (its build and lookups were 1.35% of the active's CPU in a full
    // comparison of 100,000 files). Entries out of order are sorted here
    // first, so a broken promise cannot make a local file look absent.
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    if !sorted.windows(2).all(|w| w[0].path <= w[1].path) {
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
    }
    let mut local = sorted.into_iter().peekable();
    let mut removals: Vec<Removal> = Vec::new();
    for (path, r) in remote.subtree(prefix) {
        let is_file = matches!(r.kind, EntryKind::File { .. });
        if let Some(last) = removals.last_mut().filter(|last| relpath::is_under(path, &last.path)) {
            last.files += u64::from(is_file);
            continue;
        }
        while local.next_if(|l| l.path.as_str() < path).is_some() {}
        let (gone, deletion) = match local.peek().filter(|l| l.path == path) {
            None => (true, true),
            Some(l) => (
                kind_tag(&l.kind) != kind_tag(&r.kind) && !(matches!(l.kind, EntryKind::File { .. }) && is_file),
                false,
            ),
        };
        if unknown.iter().any(|u| relpath::is_under(path, u)) {
            tracing::debug!(watch, path, "kept on the peer: this node cannot read it");
            continue;
        }
        if gone {
            removals.push(Removal {
                path: path.to_string(),
                deletion,
                files: u64::from(is_file),
            });
        }
    }
    removals
}

/// One step of sending a planned prefix, as [`steps`] orders them: indices
/// into the plan's removals and the scan's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Remove `removals[i]`, and everything below it, on the peer.
    Remove(usize),
    /// Create the directory `entries[i]` on the peer, or set its metadata.
    Dir(usize),
    /// Create or replace the link `entries[i]`.
    Symlink(usize),
    /// Set the metadata of the file `entries[i]`, whose content the peer has.
    SetMeta(usize),
    /// Send the content of the file `entries[i]`: as a delta against the
    /// peer's file of `base` bytes when one may pay, whole otherwise.
    File { entry: usize, base: Option<u64> },
    /// Give a directory its metadata (and mtime) back after the changes in
    /// it: from `entries[i]` when the scan has it, otherwise (a directory
    /// above the prefix) from the disk when it is sent.
    Parent { path: String, entry: Option<usize> },
}

/// Every step that brings the peer's tree under a prefix (`remote`, the
/// model) to the local scan's `entries`, in the order they are sent:
///
/// 1. the `removals`, as listed (top-most only; a type change is removed
///    here and created again in 2); the model forgets what they remove
///    before anything is compared below;
/// 2. directories, links and files in the scan's order, so a directory
///    always comes before what is in it: what the peer lacks, or has with
///    other content or of another type, is sent; what it has with other
///    metadata gets only its metadata (a file whose content the peer has is
///    never sent again);
/// 3. every directory that gained or lost an entry in 1 or 2, once, in path
///    order and after all of it, so its mtime ends as it is here (the top of
///    the watch excepted).
///
/// `owners` compares owners too. Pure: no I/O; the model is read, never
/// changed (`transfer` records in it what it sends).
pub(super) fn steps(removals: &[Removal], entries: &[Entry], remote: &Remote, owners: bool) -> Vec<Step> {
    let removed: HashSet<&str> = removals.iter().map(|r| r.path.as_str()).collect();
    // Whether a removal of step 1 takes `path` with it: the path itself or
    // one of its ancestors is removed.
    let is_removed = |path: &str| {
        !removed.is_empty()
            && (removed.contains("")
                || removed.contains(path)
                || path.match_indices('/').any(|(i, _)| removed.contains(&path[..i])))
    };
    let mut out: Vec<Step> = Vec::new();
    let mut parents: BTreeSet<String> = BTreeSet::new();
    for (i, r) in removals.iter().enumerate() {
        out.push(Step::Remove(i));
        parents.insert(parent_of(&r.path));
    }
    for (i, l) in entries.iter().enumerate() {
        let r = remote.get(l.path.as_str()).filter(|_| !is_removed(&l.path));
        match &l.kind {
            EntryKind::Dir => {
                if r.is_none_or(|r| !l.meta.same_as(&r.meta, &l.kind, owners)) {
                    if r.is_none() {
                        parents.insert(parent_of(&l.path));
                    }
                    out.push(Step::Dir(i));
                }
            }
            EntryKind::Symlink { .. } => {
                if r.is_none_or(|r| r.kind != l.kind || !l.meta.same_as(&r.meta, &l.kind, owners)) {
                    parents.insert(parent_of(&l.path));
                    out.push(Step::Symlink(i));
                }
            }
            EntryKind::File { size, .. } => match r {
                Some(r) if r.kind == l.kind => {
                    if !l.meta.same_as(&r.meta, &l.kind, owners) {
                        out.push(Step::SetMeta(i));
                    }
                }
                _ => {
                    parents.insert(parent_of(&l.path));
                    let base = match r.map(|r| &r.kind) {
                        Some(EntryKind::File { size: rsize, .. }) if delta::worth_a_delta(*rsize, *size) => {
                            Some(*rsize)
                        }
                        _ => None,
                    };
                    out.push(Step::File { entry: i, base });
                }
            },
        }
    }
    parents.remove("");
    if !parents.is_empty() {
        let mut found: HashMap<&str, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if parents.contains(e.path.as_str()) {
                found.insert(e.path.as_str(), i);
            }
        }
        for path in parents {
            let entry = found.get(path.as_str()).copied();
            out.push(Step::Parent { path, entry });
        }
    }
    out
}

/// The directory `path` is in (`""` for the top of the watch).
fn parent_of(path: &str) -> String {
    path.rsplit_once('/').map(|(p, _)| p.to_string()).unwrap_or_default()
}

/// An entry's type, without its content.
fn kind_tag(k: &EntryKind) -> u8 {
    match k {
        EntryKind::Dir => 0,
        EntryKind::File { .. } => 1,
        EntryKind::Symlink { .. } => 2,
    }
}

/// Forgets `path` and everything below it in the model.
pub(super) fn remote_remove_tree(remote: &mut Remote, path: &str) {
    remote.remove_tree(path);
}

#[cfg(test)]
mod tests;
