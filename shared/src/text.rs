//! Text for people: file names and messages from disk or the wire, made
//! safe to print on a terminal.
//!
//! A file name can hold any byte but `/` and NUL: escape sequences in one
//! (a local user's `printf '\033]0;owned\007'` as a name) would otherwise
//! reach the operator's terminal raw when `warmsparectl` prints it. Control
//! characters (C0, DEL and C1) are shown as `\xNN` (`\u{NN}` for C1, which
//! are two bytes in UTF-8), and bytes that are not UTF-8 as `\xNN`.

use std::borrow::Cow;
use std::fmt::Write as _;

fn is_control(c: char) -> bool {
    let c = c as u32;
    c < 0x20 || (0x7f..=0x9f).contains(&c)
}

fn push_escaped(out: &mut String, c: char) {
    let n = c as u32;
    if n <= 0x7f {
        let _ = write!(out, "\\x{n:02x}");
    } else {
        let _ = write!(out, "\\u{{{n:02x}}}");
    }
}

/// `s` with every control character (C0, DEL, C1) escaped; borrowed when
/// there is none.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_control(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Text made of lines for a terminal (a table): every control character but
/// the line feed escaped, so a name or message from a node cannot move the
/// cursor, retitle the window or hide a line.
pub fn escape_for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && is_control(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c != '\n' && is_control(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes (a file name from disk) as printable text: valid UTF-8 with its
/// control characters escaped, other bytes as `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape_controls(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A path from disk as printable text (see [`escape_bytes`]).
pub fn escape_path(p: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    escape_bytes(p.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bad_bytes_are_escaped() {
        assert_eq!(escape_controls("signed/host.pem"), "signed/host.pem");
        assert!(matches!(escape_controls("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\x1b]0;owned\x07b"), "a\\x1b]0;owned\\x07b");
        assert_eq!(escape_controls("tab\there\nnl\rcr"), "tab\\x09here\\x0anl\\x0dcr");
        assert_eq!(escape_controls("del\x7f"), "del\\x7f");
        // C1: U+009B is the one-character CSI.
        assert_eq!(escape_controls("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(escape_controls("été ✓"), "été ✓");
        assert_eq!(escape_bytes(b"ok\xff\xfename\x1b"), "ok\\xff\\xfename\\x1b");
        assert_eq!(escape_bytes("été".as_bytes()), "été");
        // A truncated UTF-8 sequence is bytes, not a character.
        assert_eq!(escape_bytes(b"x\xc3"), "x\\xc3");
        let escaped = escape_bytes(b"\x1b[2J\x9b\xc2\x9b");
        assert!(!escaped.chars().any(is_control), "{escaped}");
        assert_eq!(
            escape_for_terminal("row one\nrow \x1b[31mtwo\r\n"),
            "row one\nrow \\x1b[31mtwo\\x0d\n"
        );
    }
}
