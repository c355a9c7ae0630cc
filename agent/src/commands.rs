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
        Command::CaSerialGuard {
            ca_dir,
            margin,
            block,
            dry_run,
        } => {
            crate::ca_guard::run(ca_dir, u128::from(*margin), u128::from(*block), *dry_run)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Role { is_active: _, timeout } => Ok(role_is_active(&args, *timeout)),
        Command::Check => {
            let shared = Shared::load(&args.cluster, args.node.as_deref())?;
            runtime()?.block_on(check(shared))
        }
        Command::Run => {
            let shared = Shared::load(&args.cluster, args.node.as_deref())?;
            let rt = runtime()?;
            let result = rt.block_on(daemon::run(shared));
            // A blocking thread still busy (a delta being computed) must not
            // keep a stopping agent alive.
            rt.shutdown_timeout(Duration::from_secs(5));
            result?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `role --is-active`: asks the local agent's `/_status/check` (200 only on
/// the confirmed active). 0 active, 1 passive or held, 2 cannot tell.
fn role_is_active(args: &Args, timeout: Duration) -> ExitCode {
    match ask_check(args, timeout) {
        Ok((200, body)) => {
            println!("{}", body.trim());
            ExitCode::SUCCESS
        }
        Ok((503, body)) => {
            println!("{}", body.trim());
            ExitCode::from(1)
        }
        Ok((code, body)) => {
            eprintln!("error: the agent answered {code}: {}", body.trim());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn ask_check(args: &Args, timeout: Duration) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let cluster = Cluster::load(&args.cluster)?;
    let name = match &args.node {
        Some(n) => n.clone(),
        None => daemon::hostname().context("cannot tell this host's name; pass --node")?,
    };
    let me = cluster
        .node(&name)
        .with_context(|| format!("node {name:?} is not in {}", args.cluster.display()))?;
    let mut addr = me
        .http
        .with_context(|| format!("node {name} has no `http` listener in the cluster file to ask"))?;
    // A wildcard listener is asked on loopback.
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        addr = SocketAddr::new(ip, addr.port());
    }
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s =
        TcpStream::connect_timeout(&addr, left()).with_context(|| format!("cannot reach the agent at {addr}"))?;
    s.set_write_timeout(Some(left()))?;
    write!(
        s,
        "GET /_status/check HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .context("cannot ask the agent")?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()))?;
        let n = s.read(&mut buf).context("no answer from the agent in time")?;
        if n == 0 || resp.len() > 64 * 1024 {
            break;
        }
        resp.extend_from_slice(&buf[..n]);
    }
    let resp = String::from_utf8_lossy(&resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("the agent's answer is not HTTP")?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
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
    // Watch roots: an active never ships from a root that fails this check.
    let role = std::fs::read(shared.state_dir.join(warmspare_shared::state::ROLE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<warmspare_shared::state::RoleState>(&b).ok());
    let passive = match &role {
        Some(r) => r.active != shared.me.name,
        None => shared.cluster().cluster.preferred_active != shared.me.name,
    };
    for w in shared.local_watches().iter().filter(|w| w.verify_root) {
        match shared.roots.check_only(&w.name, &w.root) {
            Ok(()) => println!("watch {}: root {} ok", w.name, w.root.display()),
            Err(e) if passive && !w.root.exists() => {
                println!(
                    "watch {}: {e} (this node is passive: it is created at the first sync)",
                    w.name
                )
            }
            Err(e) => {
                all_ok = false;
                println!("watch {}: FAILED: {e}", w.name);
            }
        }
    }
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
                // The error says what failed ("unreachable: ...", "timed
                // out", "our key was refused"): no prefix of our own.
                e.to_string()
            }
        };
        println!("peer {} ({}): {verdict}", peer.name, peer.ssh);
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
