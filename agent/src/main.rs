//! `warmspare-agent`: parses the command line and runs the command (the
//! daemon and its maintenance commands live in the library, `lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use warmspare_agent::{cli, commands, logging};

fn main() -> ExitCode {
    warmspare_shared::sys::tune_allocator();
    let args = cli::Args::parse();
    logging::init(&args.log);
    commands::dispatch(args)
}
