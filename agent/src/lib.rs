//! The warmspare agent as a library: the daemon (watch, ship, receive,
//! apply, jobs, health) and the maintenance commands. The binary
//! `warmspare-agent` (`main.rs`) only parses its command line and calls
//! [`commands::dispatch`].

mod after;
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
mod live;
pub mod logging;
mod node;
mod passive;
mod preserved;
mod promotion;
mod receive;
mod role;
mod roots;
mod sd;
mod server;
mod sessions;
mod shell;
mod ship;
mod status;
mod telemetry;
mod undo;
mod watch;

/// The command lines the docs quote (see `cli`'s tests).
#[cfg(test)]
#[path = "../../tests/doc_commands.rs"]
mod doc_commands;
