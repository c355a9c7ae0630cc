//! The agent's commands, dispatched from `main`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use warmspare_shared::config::{Cluster, ConfigError};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::proto::{FrameReader, FrameWriter, Purpose, Reply, Request};
use warmspare_shared::ssh;

use crate::cli::{Args, Command, ConfigCommand};
use crate::daemon;
use crate::live::Live;
use crate::role::Role;
use crate::roots::Roots;

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
            warmspare_shared::gendocs::generate::<Args>("warmspare-agent", &crate::cli::MAN_SECTIONS, out)
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
        Command::Role {
            is_active: _,
            or_promoting,
            timeout,
        } => Ok(role_is_active(&args, *or_promoting, *timeout)),
        Command::Check { local } => {
            let live = Live::load(&args.cluster, args.node.as_deref())?;
            runtime()?.block_on(check(std::sync::Arc::new(live), *local))
        }
        Command::Run => {
            let rt = runtime()?;
            let result = rt.block_on(daemon::run(&args.cluster, args.node.as_deref()));
            // A blocking thread still busy (a delta being computed) must not
            // keep a stopping agent alive.
            rt.shutdown_timeout(Duration::from_secs(5));
            result?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `role --is-active`: asks the local agent's `/_status/check` (200 only on
/// the confirmed active). 0 active, 1 passive or held, 2 cannot tell. With
/// `or_promoting`, 0 also while the node's `on_promote` runs (the check
/// answers 503 `held at epoch N: on_promote is running`).
fn role_is_active(args: &Args, or_promoting: bool, timeout: Duration) -> ExitCode {
    match ask_check(args, timeout) {
        Ok((200, body)) => {
            println!("{}", body.trim());
            ExitCode::SUCCESS
        }
        Ok((503, body)) if or_promoting && is_promoting(&body) => {
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

/// Whether a `/_status/check` answer says the node's `on_promote` is running.
fn is_promoting(body: &str) -> bool {
    body.trim_end()
        .split_once(": ")
        .is_some_and(|(head, why)| head.starts_with("held at epoch ") && why == crate::promotion::PROMOTING)
}

fn ask_check(args: &Args, timeout: Duration) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let cluster = Cluster::load(&args.cluster)?;
    let name = match &args.node {
        Some(n) => n.clone(),
        None => crate::live::hostname().context("cannot tell this host's name; pass --node")?,
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

/// Exit code of `check` when this node is ready but a peer is not.
const EXIT_PEERS: u8 = 3;

/// `check`: the file and key are already validated by [`Live::load`].
/// First this node's own readiness (state dir, listen addresses, watch
/// roots), then, unless `local`, every peer. Exits 0 when all is well, 1
/// when this node is not ready, 3 when it is but a peer is not.
async fn check(live: std::sync::Arc<Live>, local: bool) -> Result<ExitCode> {
    // What the agent would start with: the watch roots as last seen, and
    // a role at epoch 0 (a probe's hello carries this node's name and hash).
    let roots = Roots::load(&live.state_dir);
    let probe_role = Role::new(live.clone(), Default::default());
    println!(
        "cluster file ok: {} nodes, {} watches, {} jobs; hash {}",
        live.cluster().node.len(),
        live.cluster().watch.len(),
        live.cluster().job.len(),
        live.config_hash()
    );
    println!("this node: {} (key matches the pinned public key)", live.me.name);
    let mut node_ok = true;
    let mut fail = |what: String| {
        node_ok = false;
        println!("  FAILED: {what}");
    };
    match state_dir_writable(&live.state_dir) {
        Ok(note) => println!("  state dir {}: {note}", live.state_dir.display()),
        Err(e) => fail(format!("state dir {}: {e:#}", live.state_dir.display())),
    }
    let own_agent = own_agent_answers(&live).await;
    let mut listeners = vec![("ssh", live.me.listen_addr())];
    listeners.extend(live.me.http.map(|a| ("http", a)));
    for (what, addr) in listeners {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => println!("  {what} listen address {addr}: free"),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && own_agent => {
                println!("  {what} listen address {addr}: in use by this node's running agent")
            }
            Err(e) => fail(format!("{what} listen address {addr}: {e}")),
        }
    }
    if let Some(w) = crate::startup::loopback_warning_of(&live).await {
        println!("  warning: {w}");
    }
    // Watch roots: an active never ships from a root that fails this check.
    let role = std::fs::read(live.state_dir.join(warmspare_shared::state::ROLE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<warmspare_shared::state::RoleState>(&b).ok());
    let passive = match &role {
        Some(r) => r.active != live.me.name,
        None => live.cluster().cluster.preferred_active != live.me.name,
    };
    for w in live.local_watches().iter().filter(|w| w.verify_root) {
        match roots.check_only(&w.name, &w.root) {
            Ok(()) => println!("  watch {}: root {} ok", w.name, w.root.display()),
            Err(e) if passive && !w.root.exists() => {
                println!(
                    "  watch {}: {e} (this node is passive: it is created at the first sync)",
                    w.name
                )
            }
            Err(e) => fail(format!("watch {}: {e}", w.name)),
        }
    }
    for job in &live.cluster().job {
        if let Some(next) = job
            .schedule
            .as_deref()
            .and_then(|s| s.parse::<cron::Schedule>().ok())
            .and_then(|s| s.upcoming(chrono::Local).next())
        {
            println!(
                "  job {}: next run {} (this host's local time)",
                job.name,
                next.format("%Y-%m-%d %H:%M:%S %:z")
            );
        }
    }
    println!("this node is {}", if node_ok { "ready" } else { "NOT ready" });
    if local {
        return Ok(if node_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let mut peers_ok = true;
    for peer in live.cluster().peers_of(&live.me.name) {
        let key = peer.key()?;
        let verdict = match ssh::dial(&peer.ssh, &key, &live.key, &live.me.name, Duration::from_secs(5)).await {
            Ok(d) => {
                let (rd, wr) = tokio::io::split(d.stream);
                let mut r = FrameReader::new(rd);
                let mut w = FrameWriter::new(wr);
                w.send(&Request::Hello(probe_role.hello(Purpose::Probe))).await?;
                match r.recv::<Reply>().await {
                    Ok(Some(Reply::Hello(h))) if h.config_hash == live.config_hash() => {
                        format!("ok (epoch {}, active {}, version {})", h.epoch, h.active, h.version)
                    }
                    Ok(Some(Reply::Hello(h))) => {
                        peers_ok = false;
                        format!("reachable, but its cluster file differs (hash {})", h.config_hash)
                    }
                    Ok(other) => {
                        peers_ok = false;
                        format!("refused: {other:?}")
                    }
                    Err(e) => {
                        peers_ok = false;
                        format!("protocol error: {e}")
                    }
                }
            }
            Err(ssh::DialError::KeyMismatch) => {
                peers_ok = false;
                "key mismatch: the peer's host key is not the one pinned in the cluster file".into()
            }
            Err(e) => {
                peers_ok = false;
                // The error says what failed ("unreachable: ...", "timed
                // out", "our key was refused"): no prefix of our own.
                e.to_string()
            }
        };
        println!("peer {} ({}): {verdict}", peer.name, peer.ssh);
    }
    let etcd_ok = match &live.cluster().etcd {
        Some(etcd) => check_etcd(etcd).await,
        None => true,
    };
    Ok(match (node_ok, peers_ok, etcd_ok) {
        (false, _, _) => ExitCode::FAILURE,
        (true, false, _) => {
            println!("this node is ready; a peer is not (on a first install that is expected: use `check --local`)");
            ExitCode::from(EXIT_PEERS)
        }
        (true, true, false) => {
            println!("this node is ready; etcd has no quorum this node can reach");
            ExitCode::from(EXIT_PEERS)
        }
        (true, true, true) => ExitCode::SUCCESS,
    })
}

/// Asks every etcd member of `[etcd]` for its status (each within 5 s),
/// prints one line per member and a summary, and says whether a majority
/// of them answered and knows a raft leader. TLS files that cannot be used
/// are reported (naming their key) as etcd not reached.
async fn check_etcd(etcd: &warmspare_shared::config::Etcd) -> bool {
    let client = match warmspare_shared::etcd::Client::new(etcd, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            println!("etcd: FAILED: {e}");
            return false;
        }
    };
    let members = client.health().await;
    let mut healthy = 0;
    for m in &members {
        let verdict = match (&m.error, &m.version) {
            (Some(e), _) => format!("FAILED: {e}"),
            (None, version) if m.has_leader => {
                healthy += 1;
                format!("ok (etcd {}, leader known)", version.as_deref().unwrap_or("?"))
            }
            (None, _) => "FAILED: it answers but knows no leader (no quorum)".to_string(),
        };
        println!("etcd {}: {verdict}", m.endpoint);
    }
    let quorum = healthy > members.len() / 2;
    println!(
        "etcd: {healthy} of {} members healthy, {} (prefix {})",
        members.len(),
        if quorum { "quorum" } else { "NO quorum" },
        etcd.prefix
    );
    quorum
}

/// Whether the state dir can be written: it exists as a directory the agent
/// can create files in, or it is missing and its nearest existing ancestor
/// can take it.
fn state_dir_writable(dir: &std::path::Path) -> Result<&'static str> {
    match std::fs::metadata(dir) {
        Ok(md) if md.is_dir() => {
            // An unnamed temporary file: nothing is left behind.
            tempfile::tempfile_in(dir).context("cannot create a file in it")?;
            Ok("writable")
        }
        Ok(_) => anyhow::bail!("not a directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The agent makes the missing levels: the nearest existing
            // ancestor must take them.
            let existing = dir
                .ancestors()
                .skip(1)
                .find(|a| a.is_dir())
                .context("missing, and no ancestor of it exists")?;
            tempfile::tempfile_in(existing)
                .with_context(|| format!("missing, and {} cannot be written", existing.display()))?;
            Ok("missing; the agent creates it at start")
        }
        Err(e) => Err(e).context("cannot stat it"),
    }
}

/// Whether this node's own agent answers on its SSH address: its host key is
/// this node's key (a refusal of our key still proves who answered).
async fn own_agent_answers(live: &Live) -> bool {
    let own = live.key.public();
    match ssh::dial(&live.me.ssh, &own, &live.key, &live.me.name, Duration::from_secs(3)).await {
        Ok(_) | Err(ssh::DialError::AuthRefused) | Err(ssh::DialError::SubsystemRefused) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_promoting;

    #[test]
    fn only_a_running_on_promote_counts_as_promoting() {
        assert!(is_promoting("held at epoch 2: on_promote is running\n"));
        assert!(!is_promoting("held at epoch 2: on_promote failed\n"));
        assert!(!is_promoting("held at epoch 2: starting its active side\n"));
        assert!(!is_promoting(
            "held at epoch 1: no peer has confirmed epoch 1 since this agent started\n"
        ));
        assert!(!is_promoting("passive at epoch 2 (a is active)\n"));
        assert!(!is_promoting("on_promote is running"));
    }
}
