//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use warmspare_shared::gendocs::Sections;

/// The man pages' sections that clap cannot know about.
pub const MAN_SECTIONS: Sections = Sections {
    exit_status: &[
        ("0", "Done; for `check`, this node and every peer are ready; for `role --is-active`, this node is the confirmed active."),
        ("1", "Failed; for `check`, this node is not ready; for `role --is-active`, this node is passive or held."),
        ("2", "A usage or cluster-file error (the message names the key and line); for `role --is-active`, the local agent cannot be asked."),
        ("3", "`check` only: this node is ready but a peer is not (expected on the first node installed; see `check --local`)."),
    ],
    environment: &[
        ("RUST_LOG", "Log filter (tracing's syntax), unless --log-level is given."),
        ("NOTIFY_SOCKET, WATCHDOG_USEC", "Set by systemd: readiness, status and watchdog notifications."),
        ("HOME", "Not read: every path comes from the cluster file."),
    ],
    files: &[
        ("/etc/warmspare/cluster.toml", "The cluster file (--cluster); refused when a user other than its owner or root can write it."),
        ("/etc/warmspare/node.key", "This node's private key (`key_file`), mode 0600."),
        ("/var/lib/warmspare", "The state dir (`state_dir`): role.json, history.jsonl, roots.json, hooks/, the job spool, and diverged/, where local files are preserved before replication replaces them."),
    ],
    signals: &[
        ("SIGTERM, SIGINT", "Stop cleanly: the tasks drain, then the process exits 0."),
        ("SIGHUP", "Reload the cluster file (systemctl reload)."),
    ],
    see_also: &["warmsparectl(1)", "systemd.service(5)"],
};

/// Keeps a warm spare in step with the active node.
#[derive(Debug, Parser)]
#[command(name = "warmspare-agent", version, about)]
pub struct Args {
    /// The cluster file.
    #[arg(long, global = true, default_value = warmspare_shared::config::DEFAULT_CLUSTER_PATH)]
    pub cluster: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, global = true)]
    pub node: Option<String>,
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How the agent logs.
#[derive(Debug, Clone, ClapArgs)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level filter (overridden by RUST_LOG).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

/// Log line formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run,
    /// Generate this node's ed25519 key and print its public line.
    Keygen {
        /// Where to write the private key (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate the cluster file, this node's key, state dir, listen
    /// addresses and watch roots, then reach every peer. Exits 0 when all is
    /// well, 1 when this node is not ready, 2 on a bad cluster file, 3 when
    /// this node is ready but a peer is not.
    Check {
        /// Check only this node, not its peers (the first node installed).
        #[arg(long)]
        local: bool,
    },
    /// Write man pages and shell completions for packaging.
    #[command(hide = true)]
    Generate {
        /// The directory to write them to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Ask the local agent about this node's role (for scripts and systemd).
    Role {
        /// Exit 0 only while this node is the confirmed active (named active,
        /// its on_promote hook done); 1 when it is passive or held; 2 when the
        /// agent cannot be asked.
        #[arg(long, required = true)]
        is_active: bool,
        /// Exit 0 also while this node, named active and confirmed, runs its
        /// on_promote hook: for a service gate (`ExecStartPre=`) that the
        /// hook itself passes when it restarts the service.
        #[arg(long, requires = "is_active")]
        or_promoting: bool,
        /// How long to wait for the agent's answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Advance a Puppet CA's serial file past anything the previous active
    /// could have issued unseen (run it from on_promote).
    CaSerialGuard {
        /// The CA directory (holding `serial`, `inventory.txt`, `signed/`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// How many serials the previous active may have issued unseen.
        #[arg(long, default_value_t = 4096)]
        margin: u64,
        /// Round the next serial up to a multiple of this.
        #[arg(long, default_value_t = 4096)]
        block: u64,
        /// Print what would be written, and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show or hash the canonical cluster file.
    Config {
        /// What to print.
        #[command(subcommand)]
        what: ConfigCommand,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the canonical form of the cluster file.
    Show,
    /// Print the SHA-256 of the canonical form.
    Hash,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn every_warmspare_agent_line_in_the_docs_parses() {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let (seen, bad) = crate::doc_commands::rejected(&workspace, "warmspare-agent", |words| {
            super::Args::try_parse_from(words).map(|_| ())
        });
        assert!(
            seen >= 5,
            "only {seen} warmspare-agent lines found in the docs: is the extractor broken?"
        );
        assert!(
            bad.is_empty(),
            "command lines in the docs that warmspare-agent rejects:\n{}",
            bad.join("\n")
        );
    }
}
