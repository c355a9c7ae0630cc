//! `warmspare-agent`: the daemon and its maintenance commands.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod control;
mod daemon;
mod events;
mod health;
mod jobs;
mod logging;
mod receive;
mod sd;
mod server;
mod ship;
mod status;
mod watch;

fn main() -> ExitCode {
    warmspare_shared::sys::tune_allocator();
    let args = cli::Args::parse();
    logging::init(&args.log);
    commands::dispatch(args)
}
