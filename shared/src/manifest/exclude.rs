//! Compiled `exclude` globs of a watch (gitignore syntax, relative to its root).

use std::fmt;
use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Compiled `exclude` globs of one watch (gitignore syntax, relative to the root).
#[derive(Clone)]
pub struct Excludes {
    matcher: Gitignore,
}

impl fmt::Debug for Excludes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Excludes({})", self.matcher.num_ignores())
    }
}

impl Default for Excludes {
    /// Nothing is excluded.
    fn default() -> Excludes {
        Excludes {
            matcher: Gitignore::empty(),
        }
    }
}

/// An `exclude` glob that does not compile.
#[derive(Debug, thiserror::Error)]
pub enum ExcludeError {
    /// The glob itself is not valid.
    #[error("invalid glob {glob:?}: {source}")]
    Glob {
        /// The glob as written.
        glob: String,
        /// Why it is not valid.
        source: globset::Error,
    },
    /// The gitignore matcher refused the glob.
    #[error("invalid glob {glob:?}: {source}")]
    Line {
        /// The glob as written.
        glob: String,
        /// Why it was refused.
        source: ignore::Error,
    },
    /// The globs together could not be compiled.
    #[error("invalid exclude globs: {0}")]
    Build(ignore::Error),
}

impl Excludes {
    /// Compiles `globs`; an invalid glob is an error naming it.
    pub fn new(globs: &[String]) -> Result<Excludes, ExcludeError> {
        let mut b = GitignoreBuilder::new("/");
        for g in globs {
            Excludes::check_glob(g)?;
            b.add_line(None, g).map_err(|source| ExcludeError::Line {
                glob: g.clone(),
                source,
            })?;
        }
        let matcher = b.build().map_err(ExcludeError::Build)?;
        Ok(Excludes { matcher })
    }

    /// Checks one glob.
    pub fn check_glob(glob: &str) -> Result<(), ExcludeError> {
        let pattern = glob.trim_start_matches('!').trim_end_matches('/');
        globset::Glob::new(pattern)
            .map(|_| ())
            .map_err(|source| ExcludeError::Glob {
                glob: glob.into(),
                source,
            })
    }

    /// Whether the relative path `rel` (or a directory above it) is excluded.
    pub fn is_excluded(&self, rel: &str, is_dir: bool) -> bool {
        if rel.is_empty() || self.matcher.is_empty() {
            return false;
        }
        self.matcher
            .matched_path_or_any_parents(Path::new("/").join(rel), is_dir)
            .is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_gitignore_style() {
        let ex = Excludes::new(&["signed/b.pem".into(), "tmp/".into(), "*.bak".into()]).unwrap();
        assert!(ex.is_excluded("signed/b.pem", false));
        assert!(!ex.is_excluded("signed/a.pem", false));
        assert!(ex.is_excluded("tmp", true));
        assert!(ex.is_excluded("tmp/x/y", false));
        assert!(ex.is_excluded("deep/x.bak", false));
        assert!(matches!(Excludes::check_glob("a["), Err(ExcludeError::Glob { .. })));
        assert!(Excludes::new(&["a[".into()])
            .unwrap_err()
            .to_string()
            .starts_with("invalid glob \"a[\": "));
    }
}
