//! The warmspare library: everything the agent and the controller share.
//!
//! - [`config`]: the cluster file (parse, validate, canonical form and hash).
//! - [`keys`]: ed25519 node and operator keys.
//! - [`proto`]: wire types and framing (the only place wire types live).
//! - [`compress`]: per-link compression of the replication stream (setting, probe, zstd stream).
//! - [`manifest`]: tree scans, content hashes and their cache, exclusions.
//! - [`delta`]: signatures, deltas and patching, memory maps.
//! - [`apply`]: the receiver's confined, atomic application of changes.
//! - [`beneath`]: directory handles beneath a watch root (no path re-resolved).
//! - [`ledger`]: the content each file had when the peers last agreed (divergence).
//! - [`local`]: the receiver's record of its own writes, and local changes flagged on a passive.
//! - [`ssh`]: russh server and client glue with pinned keys.
//! - [`etcd`]: the etcd v3 client (JSON gateway) for automatic failover, and the active's self-demotion rule.
//! - [`state`]: the persisted role state (epoch and active node) and the role history.
//! - [`persist`]: atomic private writes and the bounded decoder for the agent's own files.
//! - [`relpath`]: the rules for relative paths (wire checks, temporary names, prefixes).
//! - [`sys`]: the few system calls std does not wrap.
//! - `fuzzing` (feature `fuzzing`, and in the crate's tests): entry points for the fuzzers and their replay tests.
//! - [`undo`]: the undo store of files replication removed or replaced.

pub mod apply;
pub mod beneath;
pub mod compress;
pub mod config;
pub mod delta;
pub mod diverged;
pub mod etcd;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(feature = "gendocs")]
pub mod gendocs;
pub mod keys;
pub mod ledger;
pub mod local;
pub mod manifest;
pub mod perms;
pub mod persist;
pub mod proto;
pub mod relpath;
pub mod sparse;
pub mod ssh;
pub mod state;
pub mod sys;
pub mod text;
pub mod undo;

/// The software version, as carried in hellos and shown in status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
