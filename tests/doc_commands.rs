//! The command lines the README and `docs/` quote, so that each binary's
//! unit tests can parse them with its real clap definitions (a renamed flag
//! or subcommand then fails a test instead of leaving a page wrong).
//!
//! This file is compiled into the unit tests of `warmspare-agent` and
//! `warmsparectl` with `#[path]`; it is not part of any library.

use std::fs;
use std::path::{Path, PathBuf};

/// One quoted command line.
#[derive(Debug)]
pub struct Quoted {
    /// `file:line`, for the failure message.
    pub place: String,
    /// The words, the program's name first, with synopsis brackets removed
    /// and placeholders given example values.
    pub words: Vec<String>,
    /// Whether it stood in a code block (a command to run, which must parse
    /// whole) rather than in running text (which may name a subcommand
    /// without its required arguments).
    pub in_block: bool,
}

/// The README and every Markdown page under `docs/`, relative to the
/// workspace root.
fn pages(workspace: &Path) -> Vec<PathBuf> {
    let mut out = vec![workspace.join("README.md")];
    let mut dirs = vec![workspace.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every command line of `program` quoted in the README and `docs/`.
pub fn quoted_commands(workspace: &Path, program: &str) -> Vec<Quoted> {
    let mut found = Vec::new();
    for page in pages(workspace) {
        let Ok(text) = fs::read_to_string(&page) else { continue };
        let name = page.strip_prefix(workspace).unwrap_or(&page).display().to_string();
        let mut fence: Option<String> = None;
        let mut pending = String::new();
        let mut span: Option<(String, String)> = None;
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if let Some(info) = trimmed.strip_prefix("```") {
                span = None;
                fence = match fence {
                    Some(_) => None,
                    None => Some(info.trim().to_string()),
                };
                continue;
            }
            let place = format!("{name}:{}", i + 1);
            match &fence {
                Some(info) if is_shell(info) => {
                    // Join continuation lines.
                    if let Some(head) = line.strip_suffix('\\') {
                        pending.push_str(head);
                        pending.push(' ');
                        continue;
                    }
                    pending.push_str(line);
                    let whole = std::mem::take(&mut pending);
                    for words in commands_in(&whole, program) {
                        found.push(Quoted {
                            place: place.clone(),
                            words,
                            in_block: true,
                        });
                    }
                }
                Some(_) => {}
                None => {
                    // Inline code spans, which may run on over a line break.
                    for (k, piece) in line.split('`').enumerate() {
                        if k > 0 {
                            match span.take() {
                                Some((text, at)) => {
                                    // A span may hold a shell list
                                    // (`... check --local && systemctl ...`).
                                    for words in commands_in(&text, program) {
                                        found.push(Quoted {
                                            place: at.clone(),
                                            words,
                                            in_block: false,
                                        });
                                    }
                                }
                                None => span = Some((String::new(), place.clone())),
                            }
                        }
                        if let Some((text, _)) = &mut span {
                            text.push_str(piece);
                        }
                    }
                    if let Some((text, _)) = &mut span {
                        text.push(' ');
                    }
                }
            }
        }
    }
    found
}

/// Whether a code block's info string is a shell (or unnamed) block.
fn is_shell(info: &str) -> bool {
    matches!(info, "" | "sh" | "shell" | "bash" | "console" | "ini" | "systemd")
}

/// The invocations of `program` in one shell line: wherever it stands in
/// command position (start of line, after `sudo`, a pipe or list operator or
/// `$(`, possibly behind a directory or an `Exec...=` key), up to the next
/// operator, redirection or comment.
fn commands_in(line: &str, program: &str) -> Vec<Vec<String>> {
    let line = line.trim_start().trim_start_matches("$ ");
    let code = if line.starts_with('#') {
        ""
    } else {
        line.find(" #").map_or(line, |p| &line[..p])
    };
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(rel) = code[from..].find(program) {
        let at = from + rel;
        let (before, after) = (&code[..at], &code[at + program.len()..]);
        // The word the name ends (`/usr/bin/warmspare-agent`,
        // `ExecStart=warmspare-agent`) must itself stand in command position.
        let word_start = before.rfind(char::is_whitespace).map_or(0, |p| p + 1);
        let prefix = &before[word_start..];
        let prefix_ok = prefix.is_empty() || prefix.ends_with(['/', '=', '(']);
        let head = before[..word_start].trim_end();
        let in_command_position =
            prefix_ok && (head.is_empty() || head.ends_with("sudo") || head.ends_with(['|', '&', ';', '(']));
        if in_command_position && after.chars().next().is_none_or(char::is_whitespace) {
            let end = after.find(['|', '&', ';', ')', '>', '<']).unwrap_or(after.len());
            let mut words = vec![program.to_string()];
            words.extend(words_of(&after[..end]));
            out.push(words);
        }
        from = at + program.len();
    }
    out
}

/// Splits on white space (honouring simple quotes), removes synopsis
/// brackets, takes the first of `a|b` alternatives, and gives placeholders
/// example values.
fn words_of(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    words
        .into_iter()
        .map(|w| w.replace(['[', ']'], ""))
        .filter(|w| !w.is_empty() && w != "..." && w != "…")
        .map(|w| w.split('|').next().unwrap_or("").to_string())
        .map(|w| match w.as_str() {
            "DUR" | "DURATION" => "60s".to_string(),
            "N" | "COUNT" => "3".to_string(),
            _ => w,
        })
        .collect()
}

/// Every quoted command of `program` that `parse` rejects, as
/// `place: command: error` lines. Text may name a subcommand without its
/// required arguments; a code block must hold a whole command.
pub fn rejected(
    workspace: &Path,
    program: &str,
    parse: impl Fn(&[String]) -> Result<(), clap::Error>,
) -> (usize, Vec<String>) {
    let quoted = quoted_commands(workspace, program);
    let mut bad = Vec::new();
    for q in &quoted {
        if let Err(e) = parse(&q.words) {
            use clap::error::ErrorKind::*;
            let tolerated = match e.kind() {
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand => true,
                MissingRequiredArgument | MissingSubcommand => !q.in_block,
                _ => false,
            };
            if !tolerated {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                bad.push(format!("{}: `{}`: {first}", q.place, q.words.join(" ")));
            }
        }
    }
    (quoted.len(), bad)
}
