//! End-to-end tests: real `warmspare-agent` processes on loopback.
//!
//! One test binary (one link, one process start-up per test under nextest);
//! the modules group the tests by feature.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic, missing_docs)]

mod after_apply;
mod auto_elect;
mod auto_failover;
mod beneath;
mod compress;
mod config;
mod controller;
mod etcd;
mod etcd_failsafe;
mod etcd_faults;
mod etcd_roles;
mod etcd_tls;
mod faults;
mod hooks;
mod hostile;
mod jobs;
mod limits;
mod monitoring;
mod passive;
mod peers;
mod puppet;
mod puppet_module;
mod reload;
mod replication;
mod safety;
mod sd;
mod sender;
mod service;
mod sparse;
mod status_load;
mod supervise;
mod undo;
