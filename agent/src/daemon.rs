//! The daemon: one supervisor owning every long-lived task.
//!
//! The SSH server (and with it the receiver) runs on every node. The watcher
//! and one shipper per peer run only while this node is the active one: the
//! role is a `watch` channel, and a change of role starts or cancels the
//! active-side tasks without a restart. SIGTERM or SIGINT cancels the root
//! token; every task stops on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::apply;
use warmspare_shared::config::{Cluster, Node};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::manifest::Excludes;
use warmspare_shared::proto::{Hello, Purpose, PROTOCOL_VERSION};
use warmspare_shared::ssh::{Identity, Trust};
use warmspare_shared::state::RoleState;

use crate::events::Inbox;
use crate::ship::LocalWatch;
use crate::{server, ship, watch as watcher};

/// What every task of the daemon shares.
pub struct Shared {
    /// The validated cluster file.
    pub cluster: Cluster,
    /// This node's entry.
    pub me: Node,
    /// This node's private key.
    pub key: SecretKey,
    /// The SHA-256 of the canonical cluster file.
    pub config_hash: String,
    /// This node's state directory.
    pub state_dir: PathBuf,
    /// The current role state; persisted before it changes here.
    role: watch::Sender<RoleState>,
    /// Bytes written to peers, frames included.
    pub bytes_sent: Arc<AtomicU64>,
    /// When each peer last acknowledged a complete batch.
    last_success: Mutex<HashMap<String, SystemTime>>,
}

impl Shared {
    /// Loads the cluster file, finds this node, and loads and checks its key.
    pub fn load(cluster_path: &Path, node: Option<&str>) -> Result<Shared> {
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
        let (role, _) = watch::channel(RoleState {
            epoch: 0,
            active: String::new(),
        });
        Ok(Shared {
            config_hash: cluster.hash(),
            cluster,
            me,
            key,
            state_dir,
            role,
            bytes_sent: Arc::new(AtomicU64::new(0)),
            last_success: Mutex::new(HashMap::new()),
        })
    }

    /// The current role state.
    pub fn role(&self) -> RoleState {
        self.role.borrow().clone()
    }

    /// Persists and publishes a new role state.
    pub fn set_role(&self, next: RoleState, reason: &str) -> Result<()> {
        next.store(&self.state_dir)?;
        let prev = self.role.send_replace(next.clone());
        tracing::warn!(
            from_epoch = prev.epoch,
            from_active = prev.active,
            epoch = next.epoch,
            active = next.active,
            reason,
            "role changed"
        );
        Ok(())
    }

    /// A hello describing this node.
    pub fn hello(&self, purpose: Purpose) -> Hello {
        let role = self.role();
        Hello {
            protocol: PROTOCOL_VERSION,
            version: warmspare_shared::VERSION.to_string(),
            node: self.me.name.clone(),
            epoch: role.epoch,
            active: role.active,
            config_hash: self.config_hash.clone(),
            purpose,
            owners: warmspare_shared::apply::can_chown(),
        }
    }

    /// The keys this node's SSH server trusts.
    pub fn trust(&self) -> Trust {
        let mut t = Trust::default();
        for n in &self.cluster.node {
            if n.name == self.me.name {
                continue;
            }
            if let Ok(k) = n.key() {
                t.add(k, Identity::Node(n.name.clone()));
            }
        }
        for o in &self.cluster.operator {
            if let Ok(k) = warmspare_shared::keys::PublicKey::parse(&o.public_key) {
                t.add(k, Identity::Operator(o.name.clone()));
            }
        }
        t
    }

    /// The watches with this node's local roots.
    pub fn local_watches(&self) -> Vec<LocalWatch> {
        self.cluster
            .watch
            .iter()
            .filter_map(|w| {
                let excludes = Excludes::new(&w.exclude).ok()?;
                Some(LocalWatch {
                    name: w.name.clone(),
                    root: self.me.local_path(&w.path),
                    excludes,
                })
            })
            .collect()
    }

    /// Where the hash cache of `watch` for `side` ("send" or "recv") lives.
    pub fn cache_path(&self, watch: &str, side: &str) -> PathBuf {
        self.state_dir.join("cache").join(format!("{watch}.{side}"))
    }

    /// Records that `peer` acknowledged a complete batch.
    pub fn note_success(&self, peer: &str) {
        if let Ok(mut m) = self.last_success.lock() {
            m.insert(peer.to_string(), SystemTime::now());
        }
    }
}

fn hostname() -> Option<String> {
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

/// Binds the SSH endpoint of this node.
pub async fn bind(shared: &Shared) -> Result<TcpListener> {
    let addr = &shared.me.ssh;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(shared: Shared) -> Result<()> {
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });
    let listener = bind(&shared).await?;
    serve(shared, listener, cancel).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the daemon on a bound listener until `cancel` fires.
pub async fn serve(shared: Shared, listener: TcpListener, cancel: CancellationToken) -> Result<()> {
    std::fs::create_dir_all(&shared.state_dir)
        .with_context(|| format!("cannot create the state dir {}", shared.state_dir.display()))?;
    let role = RoleState::load_or_init(&shared.state_dir, &shared.cluster.cluster.preferred_active)?;
    shared.role.send_replace(role.clone());
    for w in shared.local_watches() {
        std::fs::create_dir_all(&w.root).with_context(|| format!("cannot create watch root {}", w.root.display()))?;
        let removed = apply::clean_temps(&w.root)
            .with_context(|| format!("cannot clean temporary files under {}", w.root.display()))?;
        if removed > 0 {
            tracing::info!(
                watch = w.name,
                removed,
                "removed temporary files left by an earlier run"
            );
        }
    }
    let shared = Arc::new(shared);
    tracing::info!(
        node = shared.me.name,
        ssh = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        epoch = role.epoch,
        active = role.active,
        version = warmspare_shared::VERSION,
        "agent started"
    );

    let mut tasks = JoinSet::new();
    tasks.spawn(server::run(shared.clone(), listener, cancel.clone()));

    let mut roles = shared.role.subscribe();
    let mut active: Option<CancellationToken> = None;
    loop {
        let is_active = roles.borrow_and_update().active == shared.me.name;
        match (is_active, &active) {
            (true, None) => {
                tracing::info!("this node is active: watching and shipping");
                let token = cancel.child_token();
                start_active(&shared, &mut tasks, &token);
                active = Some(token);
            }
            (false, Some(token)) => {
                tracing::warn!("this node is no longer active: stopped shipping");
                token.cancel();
                active = None;
            }
            _ => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = roles.changed() => if changed.is_err() { break },
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
        tasks.abort_all();
    }
    Ok(())
}

fn start_active(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, token: &CancellationToken) {
    let mut inboxes = Vec::new();
    for peer in shared.cluster.peers_of(&shared.me.name) {
        let inbox = Arc::new(Inbox::default());
        inboxes.push(inbox.clone());
        let stop = inbox.clone();
        let t = token.clone();
        tasks.spawn(async move {
            t.cancelled().await;
            stop.interrupt();
        });
        tasks.spawn(ship::run(shared.clone(), peer.clone(), inbox, token.clone()));
    }
    let targets = shared
        .local_watches()
        .into_iter()
        .zip(&shared.cluster.watch)
        .map(|(w, c)| watcher::Target {
            name: w.name,
            root: w.root,
            debounce: Duration::from_millis(c.debounce_ms),
        })
        .collect();
    let t = token.clone();
    tasks.spawn(async move {
        if let Err(e) = watcher::run(targets, inboxes, t).await {
            tracing::error!(
                error = format!("{e:#}"),
                "the watcher stopped; changes are found only by periodic comparison"
            );
        }
    });
}
