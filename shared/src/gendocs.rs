//! Man pages and shell completions from a binary's clap definitions.
//!
//! Every binary gets a page of its own and one page per subcommand
//! (`warmsparectl-status.1`, `warmspare-agent-config-show.1`: the names the
//! pages' SUBCOMMANDS sections refer to), each with the sections clap cannot
//! know about: EXIT STATUS, ENVIRONMENT, FILES, SIGNALS and SEE ALSO.

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;
use roff::{bold, roman, Roff};

/// One entry of a man page list section: the term (an exit code, a variable,
/// a path, a signal) and what it means.
pub type Entry = (&'static str, &'static str);

/// The sections of a binary's man pages that its clap definitions lack.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sections {
    /// Exit codes and their meaning.
    pub exit_status: &'static [Entry],
    /// Environment variables the binary reads.
    pub environment: &'static [Entry],
    /// Files the binary reads or writes.
    pub files: &'static [Entry],
    /// Signals the binary handles (empty for a short-lived command).
    pub signals: &'static [Entry],
    /// Other pages, as `name(section)`.
    pub see_also: &'static [&'static str],
}

/// Writes `NAME.1`, a page per subcommand (`NAME-SUB.1`, recursively), and
/// bash, zsh and fish completions for `C` into `out`.
pub fn generate<C: CommandFactory>(name: &'static str, sections: &Sections, out: &Path) -> io::Result<()> {
    fs::create_dir_all(out)?;
    let cmd = C::command().name(name);
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, name, out)?;
    }
    let mut built = cmd.disable_help_subcommand(true);
    built.build();
    write_pages(&built, name, sections, out)
}

/// The page of `cmd` and, below it, of each of its visible subcommands.
fn write_pages(cmd: &clap::Command, top: &str, sections: &Sections, out: &Path) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, top, sections, out)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if cmd.get_after_help().or(cmd.get_after_long_help()).is_some() {
        man.render_extra_section(&mut page)?;
    }
    let mut roff = Roff::new();
    list(&mut roff, "EXIT STATUS", sections.exit_status);
    list(&mut roff, "ENVIRONMENT", sections.environment);
    list(&mut roff, "FILES", sections.files);
    list(&mut roff, "SIGNALS", sections.signals);
    let page_name = man.get_filename();
    let mut see_also: Vec<String> = Vec::new();
    if page_name != format!("{top}.1") {
        see_also.push(format!("{top}(1)"));
    }
    see_also.extend(sections.see_also.iter().map(|s| s.to_string()));
    if !see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(see_also.join(", "))]);
    }
    roff.to_writer(&mut page)?;
    if cmd.get_version().or(cmd.get_long_version()).is_some() {
        man.render_version_section(&mut page)?;
    }
    let mut file = fs::File::create(out.join(page_name))?;
    file.write_all(&page)?;
    file.flush()
}

/// A section of tagged paragraphs, left out when it has no entries.
fn list(roff: &mut Roff, title: &str, entries: &[Entry]) {
    if entries.is_empty() {
        return;
    }
    roff.control("SH", [title]);
    for (term, meaning) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*meaning)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small CLI with a nested subcommand and a hidden one.
    #[derive(clap::Parser)]
    #[command(about = "a tool")]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        /// Show things.
        Show,
        /// Settings.
        Config {
            #[command(subcommand)]
            what: ConfigSub,
        },
        /// Internal.
        #[command(hide = true)]
        Secret,
    }

    #[derive(clap::Subcommand)]
    enum ConfigSub {
        /// Print the hash.
        Hash,
    }

    #[test]
    fn every_page_a_page_refers_to_exists_and_has_the_extra_sections() {
        let d = tempfile::tempdir().unwrap();
        let sections = Sections {
            exit_status: &[("0", "done"), ("2", "usage error")],
            environment: &[("HOME", "finds the key")],
            files: &[("/etc/tool.toml", "the settings")],
            signals: &[("SIGTERM", "stops")],
            see_also: &["other(8)"],
        };
        generate::<Cli>("tool", &sections, d.path()).unwrap();
        let mut pages: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".1"))
            .collect();
        pages.sort();
        assert_eq!(pages, ["tool-config-hash.1", "tool-config.1", "tool-show.1", "tool.1"]);
        for p in &pages {
            let text = fs::read_to_string(d.path().join(p)).unwrap();
            for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SIGNALS", "SEE ALSO"] {
                assert!(
                    text.contains(&format!(".SH \"{section}\"")) || text.contains(&format!(".SH {section}")),
                    "{p} lacks {section}:\n{text}"
                );
            }
            // Every page named in a page exists.
            for word in text.split(|c: char| c.is_whitespace() || c == '\\' || c == ',') {
                if let Some(name) = word.strip_suffix("(1)") {
                    let name = name.trim_start_matches("fB").trim_start_matches("fR");
                    if name.starts_with("tool") {
                        assert!(
                            pages.contains(&format!("{name}.1")),
                            "{p} refers to {name}(1), which is not generated"
                        );
                    }
                }
            }
        }
        assert!(!pages.iter().any(|p| p.contains("secret")));
        assert!(fs::read_to_string(d.path().join("tool-show.1"))
            .unwrap()
            .contains("tool(1)"));
    }
}
