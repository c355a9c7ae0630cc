//! The active side of replication: one shipper per passive peer.
//!
//! A shipper keeps one SSH connection to its peer, reconnecting with capped
//! exponential backoff. On every (re)connect it fetches the peer's manifest
//! of each watch and ships the differences; after that it ships what the
//! watcher reports, comparing against its model of the peer's tree (the
//! manifest, updated by every acknowledged commit). The comparison and the
//! file reading run on a blocking thread; frames go to the connection
//! through a bounded queue, so a slow peer slows only its own shipper.
//!
//! A shipper takes only [`Handles`] of the node. Each module imports only
//! those below it: `dial` (connections) uses `worker` (the loop of a
//! session), which uses `transfer` (sending a planned prefix), which uses
//! `session` (frames and commits) and `plan` (what to remove and what to
//! send), which uses `remote` (the peer model); `dial` and `worker` use
//! `handles`.

mod dial;
mod handles;
mod plan;
mod remote;
mod session;
mod transfer;
mod worker;

pub use dial::run;
pub use handles::Handles;
