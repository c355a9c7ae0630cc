//! The rules for relative paths: what a path from the wire or a manifest may
//! look like ([`check_rel_path`], [`BadPath`]), the applier's temporary names
//! ([`TEMP_PREFIX`]), and prefix arithmetic on `/`-separated paths
//! ([`is_under`], [`subtree`]).
//!
//! This module needs no file system and imports nothing of the crate, so
//! every other module can use it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The prefix of every temporary file the applier writes.
pub const TEMP_PREFIX: &str = ".warmspare-tmp.";

/// Whether a file name is one of the applier's temporary files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Why a relative path from the wire or a peer's manifest is refused (see
/// [`check_rel_path`]). A refused path ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// Empty, or longer than 4096 bytes.
    #[error("refused: bad path length {0}")]
    Length(usize),
    /// Starts with `/`.
    #[error("refused: absolute path {0:?}")]
    Absolute(String),
    /// Holds a NUL byte.
    #[error("refused: path with a NUL byte")]
    Nul,
    /// Has an empty, `.` or `..` component.
    #[error("refused: path {0:?} is not normalised or leaves its root")]
    NotNormalised(String),
    /// Has a component that is one of the applier's temporary names.
    #[error("refused: path {0:?} names a temporary file")]
    TemporaryName(String),
}

/// Checks a relative path from the wire ([`check_rel_path`]) and joins it
/// onto `root`, for display and for the fuzzers. The receiver never uses
/// such a joined path: it resolves `rel` beneath a handle on the root, with
/// no symbolic link followed (the `beneath` module).
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf, BadPath> {
    check_rel_path(rel)?;
    Ok(root.join(rel))
}

/// The checks of [`confine`] that need no file system: relative,
/// `/`-separated, no empty, `.` or `..` components, no NUL, no temporary name.
pub fn check_rel_path(rel: &str) -> Result<(), BadPath> {
    if rel.is_empty() || rel.len() > 4096 {
        return Err(BadPath::Length(rel.len()));
    }
    if rel.starts_with('/') {
        return Err(BadPath::Absolute(rel.into()));
    }
    if rel.contains('\0') {
        return Err(BadPath::Nul);
    }
    let parts: Vec<&str> = rel.split('/').collect();
    for p in &parts {
        if p.is_empty() || *p == "." || *p == ".." {
            return Err(BadPath::NotNormalised(rel.into()));
        }
        if is_temp_name(p) {
            return Err(BadPath::TemporaryName(rel.into()));
        }
    }
    Ok(())
}

/// Whether `path` is `prefix` or lies below it (an empty prefix holds everything).
pub fn is_under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'/')
}

/// The entries of `map` at `prefix` and below it, in order; all of them for
/// the empty prefix.
///
/// A subtree is not one contiguous range of the map's byte order: names
/// such as `certs-2` and `certs.old` sort between `certs` and `certs/a`. So
/// the entry itself is looked up, and its descendants are the range from
/// `certs/` up to `certs0` (`0` follows `/`).
pub fn subtree<'a, K, V>(map: &'a BTreeMap<K, V>, prefix: &str) -> Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>
where
    K: std::borrow::Borrow<str> + Ord,
{
    if prefix.is_empty() {
        return Box::new(map.iter());
    }
    let below = map.range::<str, _>((
        std::ops::Bound::Included(format!("{prefix}/").as_str()),
        std::ops::Bound::Excluded(format!("{prefix}0").as_str()),
    ));
    Box::new(map.get_key_value(prefix).into_iter().chain(below))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_skips_names_that_sort_inside_it() {
        let map: BTreeMap<String, ()> = [
            "a",
            "certs",
            "certs-2",
            "certs-2/x",
            "certs.old",
            "certs/a",
            "certs/sub/b",
            "certs0",
            "d",
        ]
        .into_iter()
        .map(|k| (k.to_string(), ()))
        .collect();
        let keys = |p: &str| subtree(&map, p).map(|(k, _)| k.as_str()).collect::<Vec<_>>();
        assert_eq!(keys("certs"), ["certs", "certs/a", "certs/sub/b"]);
        assert_eq!(keys("certs/sub"), ["certs/sub/b"]);
        assert_eq!(keys("certs-2"), ["certs-2", "certs-2/x"]);
        assert_eq!(keys("").len(), map.len());
        assert!(keys("nope").is_empty());
    }

    #[test]
    fn is_under_respects_components() {
        assert!(is_under("a/b", "a"));
        assert!(is_under("a", "a"));
        assert!(!is_under("ab", "a"));
        assert!(is_under("x", ""));
    }

    #[test]
    fn confine_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.warmspare-tmp.x",
        ] {
            assert!(confine(d.path(), bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(confine(d.path(), "a/b").unwrap(), d.path().join("a/b"));
        assert_eq!(check_rel_path("../x"), Err(BadPath::NotNormalised("../x".into())));
        assert_eq!(
            check_rel_path("/etc/passwd").unwrap_err().to_string(),
            "refused: absolute path \"/etc/passwd\""
        );
    }
}
