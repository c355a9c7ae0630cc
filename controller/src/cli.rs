//! Command-line definitions.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use warmspare_shared::gendocs::Sections;

/// The man pages' sections that clap cannot know about.
pub const MAN_SECTIONS: Sections = Sections {
    exit_status: &[
        ("0", "Done, or nothing to do (moving the role where it already is); for `status`, exactly one reachable node is active."),
        ("1", "Failed; for `status`, no reachable active node or more than one; for a role change, the target holds the new epoch but its on_promote hook failed."),
        ("2", "A usage or configuration error: a bad cluster file, a missing operator key, an unknown node, watch or job name."),
        ("3", "Refused by a safety check; nothing was changed."),
        ("4", "Outcome unknown: timed out in the middle of a change. Run `warmsparectl status` before anything else."),
    ],
    environment: &[(
        "HOME",
        "Finds the default operator key, ~/.config/warmspare/operator.key; without it, pass --key.",
    )],
    files: &[
        ("/etc/warmspare/cluster.toml", "The cluster file (--cluster)."),
        ("~/.config/warmspare/operator.key", "The operator's private key (--key), mode 0600."),
    ],
    signals: &[
        ("SIGINT", "Stops `status --watch`; Ctrl-C on `demo` reaches its agents too (they share its process group)."),
        ("SIGPIPE", "Output closed (`status --watch | head`): the command ends quietly."),
    ],
    see_also: &["warmspare-agent(1)"],
};

/// Operate a warmspare cluster: status, switchover, failover, failback.
#[derive(Debug, Parser)]
#[command(name = "warmsparectl", version, about)]
pub struct Args {
    /// The cluster file.
    #[arg(long, global = true, default_value = warmspare_shared::config::DEFAULT_CLUSTER_PATH)]
    pub cluster: PathBuf,
    /// The operator's private key (default: ~/.config/warmspare/operator.key).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show every node: reachability, role, epoch, version, config hash, lag, diverged files.
    Status(StatusArgs),
    /// Move the active role to another node, planned, with both nodes up.
    Switchover(SwitchoverArgs),
    /// Promote a node when the active one is unreachable (needs --force).
    Failover(FailoverArgs),
    /// Switch back to the preferred active node once it has caught up.
    Failback(FailbackArgs),
    /// Hold replication and jobs on every node (for maintenance).
    Pause,
    /// Release what `pause` held.
    Resume,
    /// Run a job now: its dump on the active (shipped and restored as usual),
    /// its restore on a passive, or its command.
    RunJob(RunJobArgs),
    /// Compare whole trees now instead of waiting for changes.
    Resync(ResyncArgs),
    /// List every role change: time, epoch, from, to, reason, who.
    History(HistoryArgs),
    /// Files replication removed or replaced on a node, kept in its undo
    /// store: list them, or put one back on the active node.
    #[command(subcommand)]
    Undo(UndoCommand),
    /// Run a whole pair on loopback in a temporary directory, narrated.
    Demo(DemoArgs),
    /// Generate an operator key (mode 0600) and print its public line for
    /// `[[operator]]` in the cluster file.
    Keygen {
        /// Where to write the private key (default: ~/.config/warmspare/operator.key).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write man pages and shell completions for packaging.
    #[command(hide = true)]
    Generate {
        /// The directory to write them to.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Options of `status`.
#[derive(Debug, Clone, ClapArgs)]
pub struct StatusArgs {
    /// Print JSON for machines.
    #[arg(long)]
    pub json: bool,
    /// Refresh every two seconds until interrupted.
    #[arg(long)]
    pub watch: bool,
}

/// Options of `switchover`.
#[derive(Debug, Clone, ClapArgs)]
pub struct SwitchoverArgs {
    /// The node to make active.
    #[arg(long)]
    pub to: String,
    /// Do not ask for confirmation (needed when not on a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Run the preflight checks only.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not run each dump job one last time (and its restore on the target).
    #[arg(long)]
    pub skip_jobs: bool,
    /// How long the whole change may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Options of `failover`.
#[derive(Debug, Clone, ClapArgs)]
pub struct FailoverArgs {
    /// The node to promote.
    #[arg(long)]
    pub to: String,
    /// Confirm that the active node is down and may have changes not yet replicated.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for each node.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Options of `failback`.
#[derive(Debug, Clone, ClapArgs)]
pub struct FailbackArgs {
    /// Do not ask for confirmation (needed when not on a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Do not run each dump job one last time (and its restore on the target).
    #[arg(long)]
    pub skip_jobs: bool,
    /// How long the whole change may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Options of `run-job`.
#[derive(Debug, Clone, ClapArgs)]
pub struct RunJobArgs {
    /// The job.
    pub name: String,
    /// The node to run it on (default: the active node).
    #[arg(long)]
    pub on: Option<String>,
}

/// Options of `resync`.
#[derive(Debug, Clone, ClapArgs)]
pub struct ResyncArgs {
    /// Only this watch (default: every watch).
    #[arg(long)]
    pub watch: Option<String>,
    /// Accept the watch root as it is now after its check stopped shipping
    /// (missing: created empty; on another file system: recorded). Look
    /// first: an empty or wrong root empties the passives (the deletion
    /// guard still holds mass removals).
    #[arg(long)]
    pub accept_root: bool,
    /// Let this comparison remove on the passives what the deletion guard
    /// held (`max_delete`), after you have checked that the removals are wanted.
    #[arg(long)]
    pub allow_deletes: bool,
}

/// Options of `history`.
#[derive(Debug, Clone, ClapArgs)]
pub struct HistoryArgs {
    /// Print JSON for machines.
    #[arg(long)]
    pub json: bool,
}

/// The `undo` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum UndoCommand {
    /// List what every node's undo store holds (id, time, watch, path,
    /// size, why), oldest first.
    List(UndoListArgs),
    /// Put a kept file back: onto the active node's watch root (from which
    /// it replicates to the passives), or with --output into a local file.
    Restore(UndoRestoreArgs),
}

/// Options of `undo list`.
#[derive(Debug, Clone, ClapArgs)]
pub struct UndoListArgs {
    /// Only this node's store.
    #[arg(long)]
    pub node: Option<String>,
    /// Only files of this watch.
    #[arg(long)]
    pub watch: Option<String>,
    /// Print JSON for machines.
    #[arg(long)]
    pub json: bool,
}

/// Options of `undo restore`.
#[derive(Debug, Clone, ClapArgs)]
pub struct UndoRestoreArgs {
    /// The entry's id, as `undo list` shows it.
    pub id: u64,
    /// The node whose store holds the entry.
    #[arg(long)]
    pub node: String,
    /// Replace a file that exists at that path on the active node (it is
    /// kept in the active node's own undo store first).
    #[arg(long)]
    pub force: bool,
    /// Write the content to this new local file instead (a link: its
    /// target); nothing changes on any node.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Options of `demo`.
#[derive(Debug, Clone, ClapArgs)]
pub struct DemoArgs {
    /// How many certificates to sign into the active's CA directory.
    #[arg(long, default_value_t = 3)]
    pub certs: usize,
    /// Keep the temporary directory (and print where it is).
    #[arg(long)]
    pub keep: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn every_warmsparectl_line_in_the_docs_parses() {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let (seen, bad) = crate::doc_commands::rejected(&workspace, "warmsparectl", |words| {
            super::Args::try_parse_from(words).map(|_| ())
        });
        assert!(
            seen >= 10,
            "only {seen} warmsparectl lines found in the docs: is the extractor broken?"
        );
        assert!(
            bad.is_empty(),
            "command lines in the docs that warmsparectl rejects:\n{}",
            bad.join("\n")
        );
    }
}
