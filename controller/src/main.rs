//! `warmsparectl`: the operator's CLI for a warmspare cluster.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod demo;
mod exit;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let result = match args.command {
        cli::Command::Demo(opts) => demo::run(opts),
    };
    exit::report(result)
}
