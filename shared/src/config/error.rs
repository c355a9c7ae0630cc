//! The cluster file's errors, located by file, line, column and key, and
//! the [`Locator`] that turns a span of the text into such a place.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;

/// A problem with the cluster file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// The 1-based column, when the problem has a place in the file.
    pub column: Option<usize>,
    /// The dotted key the problem is about, e.g. `node[1].name`.
    pub key: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where the text being validated came from, to locate errors in it.
pub(super) struct Locator<'a> {
    /// The whole text of the file.
    pub(super) text: &'a str,
    /// The file, for the errors.
    pub(super) file: &'a Path,
}

impl Locator<'_> {
    /// An error about `key` at byte range `span` (no place for an empty span at 0:
    /// a default value).
    pub(super) fn err(&self, span: std::ops::Range<usize>, key: String, message: String) -> ConfigError {
        let (line, column) = if span.end == 0 {
            (None, None)
        } else {
            let (l, c) = line_col(self.text, span.start);
            (Some(l), Some(c))
        };
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: Some(key),
            message,
        }
    }

    /// An error about `key`, located at `value`.
    pub(super) fn at<T>(&self, value: &Spanned<T>, key: String, message: String) -> ConfigError {
        self.err(value.span(), key, message)
    }
}

/// The key a `key = value` line assigns, when byte offset `pos` is in that
/// line's value: a wrong type (`keep = "3"`) is then reported with its key.
pub(super) fn key_on_line(text: &str, pos: usize) -> Option<String> {
    let pos = pos.min(text.len());
    let start = text[..pos].rfind('\n').map_or(0, |nl| nl + 1);
    let line = &text[start..];
    let line = line.split('\n').next().unwrap_or(line);
    let (key, _) = line.split_once('=')?;
    if start + key.len() >= pos {
        return None;
    }
    let key = key.trim().trim_matches('"');
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then(|| key.to_string())
}

/// 1-based line and column of byte offset `pos` in `text`.
pub(super) fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(pos, |nl| pos - nl - 1) + 1;
    (line, column)
}
