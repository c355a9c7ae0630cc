//! Coordination through etcd v3, for automatic failover (`[etcd]` in the
//! cluster file).
//!
//! The client speaks etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/timetolive`,
//! `/v3/watch`) over HTTP/1.1 with hyper, with client certificates when the
//! endpoints are `https` (see "etcd client" in docs/architecture.md for why
//! not gRPC). Each request opens its own connection and has a deadline.
//!
//! The role lives under the cluster's prefix in two keys: `leader` (the
//! active node's name, on its lease) and `epoch` (the current epoch, in
//! decimal). Both change only in transactions that compare the current
//! epoch and leader ([`Client::take`], [`Client::hand_over`]).
//!
//! `confirm` holds the active's self-demotion rule, a pure function of
//! monotonic times; every failure of this module maps to one
//! [`FailureKind`], and every kind takes the same path through that rule.

mod client;
pub mod confirm;
pub mod elect;
pub mod failsafe;
mod http;
mod members;
mod tls;
mod txn;

use std::time::Duration;

pub use client::{Client, Health, Leader, LeaderEvent, LeaderWatch, Role, TxnOutcome, Watched};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No answer within the request's deadline.
    #[error("{endpoint}: no answer within {after:?}")]
    Timeout {
        /// The member asked last.
        endpoint: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The connection could not be made (refused, unreachable, TLS).
    #[error("{endpoint}: cannot connect: {message}")]
    Connect {
        /// The member dialed.
        endpoint: String,
        /// Why not.
        message: String,
    },
    /// etcd answered with an error (a gRPC status through the gateway).
    #[error("{endpoint}: etcd error {code}: {message}")]
    Server {
        /// The member that answered.
        endpoint: String,
        /// The gRPC status code (14 is "unavailable", 4 "deadline exceeded").
        code: i64,
        /// etcd's message, e.g. "etcdserver: no leader".
        message: String,
    },
    /// The answer was not what the gateway sends (bad JSON, HTTP status).
    #[error("{endpoint}: unexpected answer: {message}")]
    Protocol {
        /// The member that answered.
        endpoint: String,
        /// What was wrong with it.
        message: String,
    },
    /// A watch stream ended or reported an error.
    #[error("{endpoint}: the watch broke: {message}")]
    WatchBroken {
        /// The member watched.
        endpoint: String,
        /// Why it ended.
        message: String,
    },
    /// The TLS files of `[etcd]` could not be read or used.
    #[error("etcd TLS: {0}")]
    Tls(String),
}

/// The kinds of etcd failure: what the tests inject, and what the active's
/// rule treats alike (see [`confirm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No answer in time.
    Timeout,
    /// The connection was refused or could not be made.
    Refused,
    /// etcd has no leader (no quorum) or timed the request out itself.
    NoLeader,
    /// Any other error: an unknown code, a bad answer, bad TLS files.
    Unknown,
    /// A watch broke.
    WatchBroken,
}

impl EtcdError {
    /// The kind of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            EtcdError::Timeout { .. } => FailureKind::Timeout,
            EtcdError::Connect { .. } => FailureKind::Refused,
            EtcdError::Server { code, message, .. } => {
                if *code == 14 || *code == 4 || message.contains("no leader") || message.contains("timed out") {
                    FailureKind::NoLeader
                } else {
                    FailureKind::Unknown
                }
            }
            EtcdError::Protocol { .. } | EtcdError::Tls(_) => FailureKind::Unknown,
            EtcdError::WatchBroken { .. } => FailureKind::WatchBroken,
        }
    }

    /// Whether another member may answer where this one failed.
    fn try_another(&self) -> bool {
        match self {
            EtcdError::Timeout { .. } | EtcdError::Connect { .. } | EtcdError::Protocol { .. } => true,
            EtcdError::Server { .. } => self.kind() == FailureKind::NoLeader,
            EtcdError::WatchBroken { .. } | EtcdError::Tls(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_kind() {
        let server = |code, message: &str| EtcdError::Server {
            endpoint: "e".into(),
            code,
            message: message.into(),
        };
        let cases = [
            (
                EtcdError::Timeout {
                    endpoint: "e".into(),
                    after: Duration::from_secs(1),
                },
                FailureKind::Timeout,
            ),
            (
                EtcdError::Connect {
                    endpoint: "e".into(),
                    message: "refused".into(),
                },
                FailureKind::Refused,
            ),
            (server(14, "etcdserver: no leader"), FailureKind::NoLeader),
            (server(2, "etcdserver: no leader"), FailureKind::NoLeader),
            (server(14, "etcdserver: request timed out"), FailureKind::NoLeader),
            (server(4, "context deadline exceeded"), FailureKind::NoLeader),
            (server(5, "etcdserver: requested lease not found"), FailureKind::Unknown),
            (server(99, "something new"), FailureKind::Unknown),
            (
                EtcdError::Protocol {
                    endpoint: "e".into(),
                    message: "not json".into(),
                },
                FailureKind::Unknown,
            ),
            (EtcdError::Tls("bad key".into()), FailureKind::Unknown),
            (
                EtcdError::WatchBroken {
                    endpoint: "e".into(),
                    message: "ended".into(),
                },
                FailureKind::WatchBroken,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }
}
