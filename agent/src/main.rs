//! `warmspare-agent`: the daemon and its maintenance commands.

use std::process::ExitCode;

use clap::Parser;

mod after;
mod ca_guard;
mod cli;
mod commands;
mod control;
mod daemon;
mod events;
mod health;
mod heartbeat;
mod hooks;
mod jobs;
mod logging;
mod passive;
mod preserved;
mod receive;
mod roots;
mod sd;
mod server;
mod shell;
mod ship;
mod status;
mod undo;
mod watch;

/// The command lines the docs quote (see `cli`'s tests).
#[cfg(test)]
#[path = "../../tests/doc_commands.rs"]
mod doc_commands;

fn main() -> ExitCode {
    warmspare_shared::sys::tune_allocator();
    let args = cli::Args::parse();
    logging::init(&args.log);
    commands::dispatch(args)
}
