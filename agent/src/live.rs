//! The live configuration: the cluster file in force (swapped as a whole
//! by an accepted reload), this node's entry, key and state dir, the keys
//! its SSH server trusts, and its watches as the watcher and the shippers
//! see them. Every task that needs the configuration takes this handle
//! ([`Live`]), and nothing here knows about the tasks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::sync::watch;
use warmspare_shared::config::{Cluster, DeleteLimit, Node};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::manifest::Excludes;
use warmspare_shared::ssh::{Identity, Trust};

/// The internal watch that carries the dump jobs' spool.
pub const SPOOL_WATCH: &str = "_jobs";

/// The job spool under `state_dir`.
pub fn spool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("spool")
}

/// One watch as the watcher and the shippers see it on this node.
pub struct LocalWatch {
    /// The watch's name.
    pub name: String,
    /// Its local root.
    pub root: PathBuf,
    /// Its exclusions.
    pub excludes: Excludes,
    /// Quiet time that ends a batch of events.
    pub debounce: Duration,
    /// The deletion guard's limit (`max_delete`).
    pub max_delete: DeleteLimit,
    /// Whether the root is checked before shipping (see `roots`); the
    /// agent's own job spool is not.
    pub verify_root: bool,
}

/// The configuration in force and this node's identity.
pub struct Live {
    /// The validated cluster file and its hash (replaced on reload).
    config: RwLock<(Arc<Cluster>, String)>,
    /// Where the cluster file is read from (SIGHUP reads it again).
    pub cluster_path: PathBuf,
    /// This node's entry as the agent started. A reload may change its
    /// `env` only (see [`Live::reload`]): read that with [`Live::env`].
    pub me: Node,
    /// This node's private key.
    pub key: SecretKey,
    /// This node's state directory.
    pub state_dir: PathBuf,
    /// Bumped by every accepted reload: open sessions check that their key
    /// is still trusted (see `receive`).
    pub reloads: watch::Sender<u64>,
}

impl Live {
    /// Loads the cluster file, finds this node, and loads and checks its key.
    pub fn load(cluster_path: &Path, node: Option<&str>) -> Result<Live> {
        let cluster = Cluster::load(cluster_path)?;
        let name = match node {
            Some(n) => n.to_string(),
            None => hostname().context("cannot tell this host's name; pass --node")?,
        };
        let Some(me) = cluster.node(&name).cloned() else {
            bail!("node {name:?} is not in {} (pass --node NAME)", cluster_path.display());
        };
        let key_path = cluster.key_file(&me);
        let key = SecretKey::load(&key_path)
            .with_context(|| format!("cannot load this node's key {}", key_path.display()))?;
        if key.public() != me.key().context("the pinned key does not parse")? {
            bail!(
                "{} is not the key pinned for node {name} in the cluster file",
                key_path.display()
            );
        }
        warn_if_readable(cluster_path);
        warn_if_readable(&key_path);
        let state_dir = cluster.state_dir(&me);
        Ok(Live {
            config: RwLock::new((Arc::new(cluster.clone()), cluster.hash())),
            cluster_path: cluster_path.to_path_buf(),
            me,
            key,
            state_dir,
            reloads: watch::channel(0).0,
        })
    }

    /// The cluster file in force.
    pub fn cluster(&self) -> Arc<Cluster> {
        let g = self.config.read().unwrap_or_else(|p| p.into_inner());
        g.0.clone()
    }

    /// The SHA-256 of the canonical cluster file in force.
    pub fn config_hash(&self) -> String {
        self.config.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// Reads the cluster file again; applies it when only what can change
    /// live changed (watches, jobs, operators, node environments).
    pub fn reload(&self) -> Result<bool> {
        let next = Cluster::load(&self.cluster_path)?;
        let current = self.cluster();
        if next == *current {
            return Ok(false);
        }
        let fixed = |c: &Cluster| {
            let mut c = c.clone();
            c.watch.clear();
            c.job.clear();
            c.operator.clear();
            for n in &mut c.node {
                n.env.clear();
            }
            c
        };
        if fixed(&next) != fixed(&current) {
            bail!(
                "the [cluster] table or a node's name, address, key or root changed: restart the agent to apply that"
            );
        }
        let hash = next.hash();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(next), hash);
        self.reloads.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// This node's `env` in the cluster file in force (a reload may change it).
    pub fn env(&self) -> BTreeMap<String, String> {
        self.cluster()
            .node(&self.me.name)
            .map_or_else(|| self.me.env.clone(), |n| n.env.clone())
    }

    /// Resolves once a reload leaves `key` no longer trusted as `who`
    /// (an operator removed or given another key); never otherwise.
    pub async fn revoked(&self, who: &Identity, key: &warmspare_shared::keys::PublicKey) {
        let mut rx = self.reloads.subscribe();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.trust().identify_key(key).as_ref() != Some(who) {
                return;
            }
        }
    }

    /// Warns when a peer's cluster file (by its hash) is not ours: replication
    /// goes on (a rolling update of the file is normal), but status flags it.
    pub fn compare_config(&self, peer: &str, theirs: &str) {
        let ours = self.config_hash();
        if theirs != ours {
            tracing::warn!(peer, theirs, ours, "the peer's cluster file differs from ours");
        }
    }

    /// The keys this node's SSH server trusts.
    pub fn trust(&self) -> Trust {
        let mut t = Trust::default();
        for n in &self.cluster().node {
            if n.name == self.me.name {
                continue;
            }
            if let Ok(k) = n.key() {
                t.add(k, Identity::Node(n.name.clone()));
            }
        }
        for o in &self.cluster().operator {
            if let Ok(k) = warmspare_shared::keys::PublicKey::parse(&o.public_key) {
                t.add(k, Identity::Operator(o.name.clone()));
            }
        }
        t
    }

    /// The watches with this node's local roots, plus the job spool (the
    /// internal watch that carries dumps) when the cluster has dump jobs.
    pub fn local_watches(&self) -> Vec<LocalWatch> {
        let mut out: Vec<LocalWatch> = self
            .cluster()
            .watch
            .iter()
            .filter_map(|w| {
                let excludes = Excludes::new(&w.exclude).ok()?;
                Some(LocalWatch {
                    name: w.name.clone(),
                    root: self.me.local_path(&w.path),
                    excludes,
                    debounce: Duration::from_millis(w.debounce_ms),
                    max_delete: w.max_delete,
                    verify_root: true,
                })
            })
            .collect();
        if self.cluster().job.iter().any(|j| j.dump.is_some()) {
            out.push(LocalWatch {
                name: SPOOL_WATCH.to_string(),
                root: spool_dir(&self.state_dir),
                excludes: Excludes::default(),
                debounce: Duration::from_millis(10),
                // Dumps replace one another: never held.
                max_delete: DeleteLimit::Share(100),
                verify_root: false,
            });
        }
        out
    }

    /// Where the hash cache of `watch` for `side` ("send" or "recv") lives.
    pub fn cache_path(&self, watch: &str, side: &str) -> PathBuf {
        self.state_dir.join("cache").join(format!("{watch}.{side}"))
    }
}

/// This host's short name (the default node name).
pub fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.split('.').next().unwrap_or(h).to_string())
}

fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path) {
        if md.permissions().mode() & 0o004 != 0 {
            tracing::warn!(path = %path.display(), "readable by every user on this host; consider chmod o-r");
        }
    }
}
