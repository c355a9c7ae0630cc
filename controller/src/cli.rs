//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// Operate a warmspare cluster: status, switchover, failover, failback.
#[derive(Debug, Parser)]
#[command(name = "warmsparectl", version, about)]
pub struct Args {
    /// The cluster file.
    #[arg(long, global = true, default_value = warmspare_shared::config::DEFAULT_CLUSTER_PATH)]
    pub cluster: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole pair on loopback in a temporary directory, narrated.
    Demo(DemoArgs),
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
