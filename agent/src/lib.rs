//! The warmspare agent as a library: the daemon (watch, ship, receive,
//! apply, jobs, health) and the maintenance commands. The binary
//! `warmspare-agent` (`main.rs`) only parses its command line and calls
//! [`commands::dispatch`]; tests and other programs start a node in
//! their own process with [`serve`].

mod active;
mod after;
mod allow_deletes;
mod ca_guard;
pub mod cli;
mod clock;
pub mod commands;
mod control;
mod counts;
mod daemon;
mod events;
mod files;
mod health;
mod heartbeat;
mod hooks;
mod job_state;
mod jobs;
mod lag;
mod leadership;
mod live;
pub mod logging;
mod node;
mod passive;
mod pause;
mod preserved;
mod progress;
mod promotion;
mod receive;
mod role;
mod roots;
mod sd;
mod server;
mod sessions;
mod shell;
mod ship;
mod startup;
mod status;
mod supervise;
mod telemetry;
mod undo;
mod watch;

/// Runs one node of the cluster file at `cluster` (`node`: its name, or
/// `None` to find it by host name, as `--node` does) in this process, on
/// listeners the caller bound: `ssh` for peers and operators, `health` (if
/// any) for the HTTP status endpoints. The node's `listen` and `http`
/// addresses are not bound again. It runs until `shutdown` resolves, then
/// stops every task as on SIGTERM; `Err` when the cluster file, key or
/// state dir cannot be used or when a task the agent needs stopped.
pub async fn serve(
    cluster: &std::path::Path,
    node: Option<&str>,
    ssh: tokio::net::TcpListener,
    health: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let shared = node::Shared::load(cluster, node)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let serving = daemon::serve(shared, ssh, health, cancel.clone());
    tokio::pin!(serving);
    tokio::select! {
        ended = &mut serving => return ended,
        () = shutdown => cancel.cancel(),
    }
    serving.await
}

/// The command lines the docs quote (see `cli`'s tests).
#[cfg(test)]
#[path = "../../tests/doc_commands.rs"]
mod doc_commands;
