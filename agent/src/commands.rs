//! The agent's commands, dispatched from `main`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use warmspare_shared::config::{Cluster, ConfigError};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::proto::{FrameReader, FrameWriter, Purpose, Reply, Request};
use warmspare_shared::ssh;

use crate::cli::{Args, Command, ConfigCommand};
use crate::daemon::{self, Shared};

/// Exit code for a usage or configuration error.
const EXIT_CONFIG: u8 = 2;

/// Runs the command and maps its outcome to an exit code.
pub fn dispatch(args: Args) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {ce}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        Command::Keygen { out } => {
            let key = SecretKey::generate();
            key.save(out)
                .with_context(|| format!("cannot write the key to {}", out.display()))?;
            println!("{}", key.public().to_openssh());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { out } => {
            warmspare_shared::gendocs::generate::<Args>("warmspare-agent", out)
                .with_context(|| format!("cannot write to {}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { what } => {
            let cluster = Cluster::load(&args.cluster)?;
            match what {
                ConfigCommand::Show => print!("{}", cluster.canonical()),
                ConfigCommand::Hash => println!("{}", cluster.hash()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let shared = Shared::load(&args.cluster, args.node.as_deref())?;
            runtime()?.block_on(check(shared))
        }
        Command::Run => {
            let shared = Shared::load(&args.cluster, args.node.as_deref())?;
            runtime()?.block_on(daemon::run(shared))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// `check`: the file and key are already validated by [`Shared::load`]; reach every peer.
async fn check(shared: Shared) -> Result<ExitCode> {
    println!(
        "cluster file ok: {} nodes, {} watches, {} jobs; hash {}",
        shared.cluster().node.len(),
        shared.cluster().watch.len(),
        shared.cluster().job.len(),
        shared.config_hash()
    );
    println!("this node: {} (key matches the pinned public key)", shared.me.name);
    let mut all_ok = true;
    for peer in shared.cluster().peers_of(&shared.me.name) {
        let key = peer.key()?;
        let verdict = match ssh::dial(&peer.ssh, &key, &shared.key, &shared.me.name, Duration::from_secs(5)).await {
            Ok(d) => {
                let (rd, wr) = tokio::io::split(d.stream);
                let mut r = FrameReader::new(rd);
                let mut w = FrameWriter::new(wr);
                w.send(&Request::Hello(shared.hello(Purpose::Probe))).await?;
                match r.recv::<Reply>().await {
                    Ok(Some(Reply::Hello(h))) if h.config_hash == shared.config_hash() => {
                        format!("ok (epoch {}, active {}, version {})", h.epoch, h.active, h.version)
                    }
                    Ok(Some(Reply::Hello(h))) => {
                        all_ok = false;
                        format!("reachable, but its cluster file differs (hash {})", h.config_hash)
                    }
                    Ok(other) => {
                        all_ok = false;
                        format!("refused: {other:?}")
                    }
                    Err(e) => {
                        all_ok = false;
                        format!("protocol error: {e}")
                    }
                }
            }
            Err(ssh::DialError::KeyMismatch) => {
                all_ok = false;
                "key mismatch: the peer's host key is not the one pinned in the cluster file".into()
            }
            Err(e) => {
                all_ok = false;
                format!("unreachable: {e}")
            }
        };
        println!("peer {} ({}): {verdict}", peer.name, peer.ssh);
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
