//! Talking to agents as an operator: one SSH session per node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use russh::ChannelStream;
use tokio::io::{ReadHalf, WriteHalf};
use warmspare_shared::config::{Cluster, Node};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::proto::{FrameReader, FrameWriter, Hello, NodeStatus, Purpose, Reply, Request, PROTOCOL_VERSION};
use warmspare_shared::ssh;
use warmspare_shared::state::RoleState;

use crate::exit;

type Stream = ChannelStream<russh::client::Msg>;

/// The cluster as the operator sees it: the file and the operator's key.
pub struct Operator {
    /// The validated cluster file.
    pub cluster: Cluster,
    /// The operator's private key.
    pub key: SecretKey,
    /// The name under which the key is listed.
    pub name: String,
}

impl Operator {
    /// Loads the cluster file and the operator key, and checks the key is listed.
    pub fn load(cluster: &Path, key: &Path) -> Result<Operator> {
        let cluster = Cluster::load(cluster)?;
        // A missing, unreadable or unlisted key is a configuration error
        // (exit 2), like a bad cluster file.
        let key = SecretKey::load(key).map_err(|e| {
            exit::fail(
                exit::USAGE,
                format!("cannot load the operator key {}: {e}", key.display()),
            )
        })?;
        let public = key.public().to_openssh();
        let name = cluster
            .operator
            .iter()
            .find(|o| o.public_key == public)
            .map(|o| o.name.clone())
            .ok_or_else(|| {
                exit::fail(
                    exit::USAGE,
                    "the operator key is not listed under [[operator]] in the cluster file",
                )
            })?;
        Ok(Operator { cluster, key, name })
    }

    /// Opens a control session to `node`.
    pub async fn connect(&self, node: &Node, timeout: Duration) -> Result<Session> {
        let pinned = node.key()?;
        let d = ssh::dial(&node.ssh, &pinned, &self.key, &self.name, timeout).await?;
        let (rd, wr) = tokio::io::split(d.stream);
        let mut s = Session {
            reader: FrameReader::new(rd),
            writer: FrameWriter::new(wr),
            _handle: d.handle,
            timeout,
            role: RoleState {
                epoch: 0,
                active: String::new(),
            },
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            version: warmspare_shared::VERSION.to_string(),
            node: format!("warmsparectl:{}", self.name),
            epoch: 0,
            active: String::new(),
            config_hash: self.cluster.hash(),
            purpose: Purpose::Control,
            owners: false,
            compress: warmspare_shared::compress::Compress::Auto,
        };
        match s.call(&Request::Hello(hello)).await? {
            Reply::Hello(h) => {
                s.role = RoleState {
                    epoch: h.epoch,
                    active: h.active,
                };
                Ok(s)
            }
            Reply::Refused { reason } => bail!("{} refused the session: {reason}", node.name),
            other => bail!("{} answered hello with {other:?}", node.name),
        }
    }

    /// The status of every node, concurrently; unreachable nodes carry the error.
    pub async fn gather(&self, timeout: Duration) -> Vec<NodeView> {
        let calls = self.cluster.node.iter().map(|n| async move {
            let result = async {
                let mut s = self.connect(n, timeout).await?;
                match s.call(&Request::Status).await? {
                    Reply::Status(st) => Ok(*st),
                    other => Err(anyhow!("unexpected answer {other:?}")),
                }
            }
            .await;
            NodeView {
                node: n.clone(),
                status: result.map_err(|e| format!("{e:#}")),
            }
        });
        futures_util::future::join_all(calls).await
    }

    /// The role state of every node as its hello announced it, concurrently;
    /// unreachable nodes carry the error. Cheaper than [`Operator::gather`]
    /// for a command that only needs to know who is active: a status walks
    /// every watch tree to count its files (with 100,000 files, a quarter of
    /// the CPU of the full comparison `resync` asks for went to that walk on
    /// the active, and as much on the passive).
    pub async fn roles(&self, timeout: Duration) -> Vec<(Node, std::result::Result<RoleState, String>)> {
        let calls = self.cluster.node.iter().map(|n| async move {
            let role = self.connect(n, timeout).await.map(|s| s.role);
            (n.clone(), role.map_err(|e| format!("{e:#}")))
        });
        futures_util::future::join_all(calls).await
    }
}

/// One node's status, or why it could not be had.
pub struct NodeView {
    /// The node.
    pub node: Node,
    /// Its status, or the error.
    pub status: std::result::Result<NodeStatus, String>,
}

/// A control session.
pub struct Session {
    reader: FrameReader<ReadHalf<Stream>>,
    writer: FrameWriter<WriteHalf<Stream>>,
    _handle: russh::client::Handle<ssh::PinnedHost>,
    timeout: Duration,
    /// The node's role state as its hello announced it.
    role: RoleState,
}

impl Session {
    /// Sends one request and waits for its reply.
    pub async fn call(&mut self, req: &Request) -> Result<Reply> {
        self.call_with(req, self.timeout).await
    }

    /// Waits for one more reply (a request answered in parts).
    pub async fn recv(&mut self) -> Result<Reply> {
        match tokio::time::timeout(self.timeout, self.reader.recv::<Reply>()).await {
            Err(_) => Err(anyhow!(TimedOut)),
            Ok(r) => r
                .context("cannot read the reply")?
                .ok_or_else(|| anyhow!("the agent closed the session")),
        }
    }

    /// Sends one request and waits at most `timeout` for its reply.
    pub async fn call_with(&mut self, req: &Request, timeout: Duration) -> Result<Reply> {
        self.writer.send(req).await.context("cannot send the request")?;
        match tokio::time::timeout(timeout, self.reader.recv::<Reply>()).await {
            Err(_) => Err(anyhow!(TimedOut)),
            Ok(r) => r
                .context("cannot read the reply")?
                .ok_or_else(|| anyhow!("the agent closed the session")),
        }
    }
}

/// A reply did not come in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer in time")]
pub struct TimedOut;

/// The default operator key: `~/.config/warmspare/operator.key`.
///
/// Without a `HOME` (a cron job, a bare systemd unit) there is no default:
/// the key would otherwise be looked up relative to the current directory.
pub fn default_key() -> Result<PathBuf> {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() && Path::new(&home).is_absolute() => {
            Ok(PathBuf::from(home).join(".config/warmspare/operator.key"))
        }
        _ => Err(exit::fail(
            exit::USAGE,
            "HOME is not set to an absolute path, so there is no default operator key: pass --key PATH",
        )),
    }
}
