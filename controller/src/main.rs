//! `warmsparectl`: the operator's CLI for a warmspare cluster.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;

mod admin;
mod cli;
mod client;
mod demo;
mod etcd;
mod exit;
mod roles;
mod status;
mod undo;

/// In-memory clusters and node reports for the modules' table tests.
#[cfg(test)]
mod fixtures;

/// The command lines the docs quote (see `cli`'s tests).
#[cfg(test)]
#[path = "../../tests/doc_commands.rs"]
mod doc_commands;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    exit::report(run(args))
}

fn run(args: cli::Args) -> Result<()> {
    use cli::Command;
    match &args.command {
        Command::Demo(opts) => return demo::run(opts.clone()),
        Command::Keygen { out } => {
            let out = match out.clone().or_else(|| args.key.clone()) {
                Some(path) => path,
                None => client::default_key()?,
            };
            let key = warmspare_shared::keys::SecretKey::generate();
            key.save(&out)
                .with_context(|| format!("cannot write the key to {}", out.display()))?;
            println!("{}", key.public().to_openssh());
            return Ok(());
        }
        Command::Generate { out } => {
            return warmspare_shared::gendocs::generate::<cli::Args>("warmsparectl", &cli::MAN_SECTIONS, out)
                .with_context(|| format!("cannot write to {}", out.display()));
        }
        _ => {}
    }
    let key = match args.key.clone() {
        Some(key) => key,
        None => client::default_key()?,
    };
    let op = client::Operator::load(&args.cluster, &key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        match &args.command {
            Command::Status(a) => status::run(&op, a).await,
            Command::Switchover(a) => roles::switchover(&op, a, "switchover").await,
            Command::Failover(a) => roles::failover(&op, a).await,
            Command::Failback(a) => {
                let to = op.cluster.cluster.preferred_active.clone();
                let s = cli::SwitchoverArgs {
                    to,
                    yes: a.yes,
                    dry_run: false,
                    skip_jobs: a.skip_jobs,
                    timeout: a.timeout,
                };
                roles::switchover(&op, &s, "failback").await
            }
            Command::Pause => admin::pause(&op, true).await,
            Command::Resume => admin::pause(&op, false).await,
            Command::Resync(a) => admin::resync(&op, a).await,
            Command::RunJob(a) => admin::run_job(&op, &a.name, a.on.as_deref()).await,
            Command::History(a) => admin::history(&op, a.json).await,
            Command::Undo(cli::UndoCommand::List(a)) => undo::list(&op, a).await,
            Command::Undo(cli::UndoCommand::Restore(a)) => undo::restore(&op, a).await,
            Command::Demo(_) | Command::Generate { .. } | Command::Keygen { .. } => Ok(()),
        }
    })
}
