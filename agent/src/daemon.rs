//! The daemon: one supervisor owning every long-lived task.
//!
//! The SSH server (and with it the receiver) runs on every node. The watcher
//! and one shipper per peer run only while this node is the active one: the
//! role is a `watch` channel, and a change of role starts or cancels the
//! active-side tasks without a restart. SIGTERM or SIGINT cancels the root
//! token; every task stops on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::apply;
use warmspare_shared::config::{Cluster, Node};
use warmspare_shared::keys::SecretKey;
use warmspare_shared::ledger::Ledgers;
use warmspare_shared::manifest::Excludes;
use warmspare_shared::proto::{Hello, Purpose, PROTOCOL_VERSION};
use warmspare_shared::ssh::{Identity, Trust};
use warmspare_shared::state::{self, HistoryEntry, RoleState};

use crate::events::{Inbox, Work};
use crate::ship::LocalWatch;
use crate::{health, hooks, jobs, roots, sd, server, ship, watch as watcher};

/// What every task of the daemon shares.
pub struct Shared {
    /// The validated cluster file and its hash (replaced on reload).
    config: std::sync::RwLock<(Arc<Cluster>, String)>,
    /// Where the cluster file is read from (SIGHUP reads it again).
    pub cluster_path: PathBuf,
    /// This node's entry as the agent started. A reload may change its
    /// `env` only (see [`Shared::reload`]): read that with [`Shared::env`].
    pub me: Node,
    /// This node's private key.
    pub key: SecretKey,
    /// This node's state directory.
    pub state_dir: PathBuf,
    /// The current role state; persisted before it changes here.
    role: watch::Sender<RoleState>,
    /// Serialises role changes (compare-and-swap).
    role_lock: Mutex<()>,
    /// Bytes written to peers, frames included.
    pub bytes_sent: Arc<AtomicU64>,
    /// The agreed content of every replicated file (for divergence).
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// Whether replication (and jobs) are held by `warmsparectl pause`.
    paused: AtomicBool,
    /// What the running tasks report, for status and flushes.
    runtime: Mutex<Runtime>,
    /// Bumped whenever a shipper finishes work (flushes wait on it).
    pub progress: watch::Sender<u64>,
    /// When the agent started.
    pub started: SystemTime,
    /// The jobs' runtime.
    pub jobs: jobs::Jobs,
    /// The role hooks' runtime (the promotion gate).
    pub hooks: hooks::Hooks,
    /// The `after_apply` hooks' runtime (runs, counters, last outcomes).
    pub after: crate::after::AfterApply,
    /// The watches' file counts for status, shared by concurrent requests.
    pub tree_counts: crate::status::TreeCounts,
    /// Cancelled when a task the agent cannot do without stopped: the
    /// supervisor then shuts down and the agent exits non-zero.
    fatal: CancellationToken,
    /// Why (the first task that stopped).
    fatal_reason: Mutex<Option<String>>,
    /// When the supervisor's loop last went round (milliseconds since the
    /// agent started); the watchdog is fed only while it is recent.
    heartbeat: AtomicU64,
    /// The watch roots: where each was last seen, what is wrong with them.
    pub roots: roots::Roots,
    /// (peer, watch) pairs whose next full comparison may remove what the
    /// deletion guard would hold (`warmsparectl resync --allow-deletes`).
    allow_deletes: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Why this node, though its role state names it active, does not act
    /// as the active one (see [`Shared::unconfirmed`]).
    held: Mutex<Option<String>>,
    /// Bumped by every accepted reload: open sessions check that their key
    /// is still trusted (see `receive`).
    pub reloads: watch::Sender<u64>,
    /// The receiver's record of its own writes and, on a passive, the
    /// local changes flagged under the watch roots (see `passive`).
    pub local: Arc<warmspare_shared::local::Tracker>,
    /// The undo store (`state_dir/undo`): what this node's receiver removed
    /// or replaced.
    pub undo: Arc<warmspare_shared::undo::Store>,
}

/// What the running tasks report.
#[derive(Debug, Default)]
pub struct Runtime {
    /// The inbox of each peer's shipper, while this node is active.
    pub inboxes: BTreeMap<String, Arc<Inbox>>,
    /// Replication towards each peer.
    pub links: BTreeMap<String, Link>,
    /// On a passive: when a batch was last applied, per watch.
    pub last_applied: BTreeMap<String, SystemTime>,
}

/// Replication towards one peer.
#[derive(Debug, Default, Clone)]
pub struct Link {
    /// Whether a session is up.
    pub connected: bool,
    /// The last error, cleared by a success.
    pub last_error: Option<String>,
    /// When the peer last acknowledged a complete batch, per watch.
    pub last_success: BTreeMap<String, SystemTime>,
    /// Work taken from the inbox and not yet acknowledged.
    pub in_progress: Option<Work>,
    /// The inbox generation the peer is known to be up to.
    pub done_generation: u64,
    /// Files the deletion guard keeps on the peer, per watch.
    pub deletions_held: BTreeMap<String, u64>,
}

/// The file under the state dir that marks a paused agent.
const PAUSED_FILE: &str = "paused";

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
        let (progress, _) = watch::channel(0);
        Ok(Shared {
            config: std::sync::RwLock::new((Arc::new(cluster.clone()), cluster.hash())),
            cluster_path: cluster_path.to_path_buf(),
            ledgers: Arc::new(Mutex::new(Ledgers::new(state_dir.join("ledger")))),
            paused: AtomicBool::new(state_dir.join(PAUSED_FILE).exists()),
            me,
            key,
            state_dir: state_dir.clone(),
            role,
            role_lock: Mutex::new(()),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            runtime: Mutex::new(Runtime::default()),
            progress,
            started: SystemTime::now(),
            jobs: jobs::Jobs::default(),
            hooks: hooks::Hooks::default(),
            after: crate::after::AfterApply::default(),
            tree_counts: crate::status::TreeCounts::default(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
            roots: roots::Roots::load(&state_dir),
            allow_deletes: Mutex::new(Default::default()),
            held: Mutex::new(None),
            reloads: watch::channel(0).0,
            local: Arc::new(Default::default()),
            undo: crate::undo::store(&state_dir),
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

    /// A task the agent cannot do without stopped (returned or panicked)
    /// outside a shutdown: the agent stops and exits non-zero, so that the
    /// service manager starts it again whole (`Restart=on-failure`).
    pub fn fail(&self, why: String) {
        tracing::error!(
            reason = why,
            "a task the agent needs stopped; exiting so that it is restarted"
        );
        self.fatal_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        self.fatal.cancel();
    }

    /// Records that the supervisor's loop went round.
    fn beat(&self) {
        let ms = self.started.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0);
        self.heartbeat.store(ms, Ordering::Relaxed);
    }

    /// Whether the supervisor's loop went round within `limit`.
    pub fn heartbeat_within(&self, limit: Duration) -> bool {
        let now = self.started.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0);
        now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)) <= limit.as_millis() as u64
    }

    /// The runtime reports, if nobody holds their lock right now (never
    /// waits: for the watchdog, which must not hang on a stuck lock).
    pub fn try_runtime(&self) -> Option<MutexGuard<'_, Runtime>> {
        match self.runtime.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The runtime reports, locked.
    pub fn runtime(&self) -> MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the link towards `peer`.
    pub fn link(&self, peer: &str, f: impl FnOnce(&mut Link)) {
        f(self.runtime().links.entry(peer.to_string()).or_default());
        self.progress.send_modify(|n| *n += 1);
    }

    /// Whether this node acts as the active one now: it is named active and
    /// its `on_promote` hook (if any) succeeded for the current epoch.
    pub fn is_active(&self) -> bool {
        let role = self.role.borrow();
        role.active == self.me.name && self.hooks.promoted(role.epoch) && !self.is_unconfirmed()
    }

    /// Why this node, though named active, does not act as active (no
    /// peer confirmed its epoch yet, or its `on_promote` hook); `None` when
    /// it does or when it is passive.
    pub fn held(&self) -> Option<String> {
        let role = self.role();
        if role.active != self.me.name {
            return None;
        }
        self.unconfirmed().or_else(|| self.hooks.held(role.epoch))
    }

    /// Waits (at most `limit`) until this node has acted on its promotion
    /// to `epoch`: `Ok` once it acts as active, `Err` with the reason when
    /// its `on_promote` failed, the role moved on, or the time ran out.
    pub async fn wait_promoted(&self, epoch: u64, limit: Duration) -> std::result::Result<(), String> {
        let mut rx = self.hooks.promotion.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let role = self.role();
            if role.epoch != epoch || role.active != self.me.name {
                return Err(format!(
                    "the role moved on to epoch {} with {} active",
                    role.epoch, role.active
                ));
            }
            match &*rx.borrow_and_update() {
                hooks::Promotion::Done(e) if *e == epoch => return Ok(()),
                hooks::Promotion::Failed(e, detail) if *e == epoch => {
                    return Err(format!(
                        "{}: {detail}; {} holds epoch {epoch} but stays fenced until an operator retries \
                         (`warmsparectl failover --to {} --force`) or moves the role elsewhere",
                        warmspare_shared::proto::PROMOTE_HOOK_FAILED,
                        self.me.name,
                        self.me.name
                    ))
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(format!("{} did not finish its promotion in time", self.me.name));
            }
        }
    }

    /// Whether this node's role state names it active but no peer has yet
    /// confirmed that epoch since the agent started: it might be a stale
    /// active whose peers moved on while it was down. A held node answers
    /// 503 on health, runs no jobs and sends no changes; its shippers only
    /// say hello, which confirms the epoch (the hold ends) or fences it.
    pub fn is_unconfirmed(&self) -> bool {
        self.unconfirmed().is_some()
    }

    /// Why this node is held for want of a confirmation, while it is.
    pub fn unconfirmed(&self) -> Option<String> {
        if self.role.borrow().active != self.me.name {
            return None;
        }
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_held(&self, reason: Option<String>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.progress.send_modify(|n| *n += 1);
    }

    /// A peer confirmed this node's epoch (or an operator promoted it): the
    /// hold ends and the active side goes to work.
    pub fn confirm(&self, by: &str) {
        let was = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if was.is_some() {
            tracing::warn!(
                by,
                epoch = self.role().epoch,
                "epoch confirmed: acting as the active node"
            );
            self.progress.send_modify(|n| *n += 1);
            for inbox in self.runtime().inboxes.values() {
                inbox.interrupt();
            }
        }
    }

    /// The receiver applied something in the job spool.
    pub fn jobs_arrived(&self) {
        self.jobs.arrived.notify_one();
    }

    /// Whether replication and jobs are held.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Holds or releases replication and jobs (persisted across restarts).
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        let marker = self.state_dir.join(PAUSED_FILE);
        if paused {
            state::write_atomic(&marker, b"paused by warmsparectl\n")?;
        } else if marker.exists() {
            std::fs::remove_file(&marker)?;
        }
        self.paused.store(paused, Ordering::SeqCst);
        for inbox in self.runtime().inboxes.values() {
            inbox.interrupt();
        }
        tracing::warn!(
            paused,
            "replication and jobs {}",
            if paused { "held" } else { "released" }
        );
        Ok(())
    }

    /// Compare-and-swap of the role: moves from `expect` to `next` (a higher
    /// epoch), persisting before publishing; `Err` says why not.
    pub fn cas_role(
        &self,
        expect: &RoleState,
        next: RoleState,
        reason: &str,
        by: &str,
    ) -> std::result::Result<RoleState, String> {
        let _g = self.role_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.role();
        if current != *expect {
            return Err(format!(
                "expected epoch {} with {} active, but this node is at epoch {} with {} active",
                expect.epoch, expect.active, current.epoch, current.active
            ));
        }
        if next.epoch <= current.epoch {
            return Err(format!("the new epoch {} is not above {}", next.epoch, current.epoch));
        }
        state::check_epoch_step(current.epoch, next.epoch).map_err(|e| e.to_string())?;
        if self.cluster().node(&next.active).is_none() {
            return Err(format!("{:?} is not a node of the cluster", next.active));
        }
        self.set_role(next.clone(), reason, by)
            .map_err(|e| format!("cannot record the new role: {e:#}"))?;
        // An operator's promotion needs no peer's confirmation.
        self.confirm(by);
        Ok(next)
    }

    /// Adopts `next` if its epoch is above ours (fencing); returns the state after.
    pub fn adopt(&self, next: RoleState, reason: &str, by: &str) -> Result<RoleState> {
        let _g = self.role_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.role().epoch;
        if next.epoch > current {
            // A peer or an operator cannot move this node further than a
            // controller could have (see `MAX_EPOCH_JUMP`).
            if let Err(e) = state::check_epoch_step(current, next.epoch) {
                tracing::error!(epoch = next.epoch, current, by, error = %e, "refused an epoch");
                return Err(e.into());
            }
            self.set_role(next, reason, by)?;
        }
        Ok(self.role())
    }

    /// Runs `f` with this `Shared` on a blocking thread: for what writes
    /// and syncs files (role changes, the pause marker) from async code.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Result<T> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| anyhow::anyhow!("a blocking task failed: {e}"))
    }

    /// The current role state.
    pub fn role(&self) -> RoleState {
        self.role.borrow().clone()
    }

    /// Persists, records and publishes a new role state (callers hold `role_lock`).
    fn set_role(&self, next: RoleState, reason: &str, by: &str) -> Result<()> {
        let prev = self.role();
        next.store(&self.state_dir)?;
        let entry = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: next.epoch,
            from: prev.active.clone(),
            to: next.active.clone(),
            reason: reason.to_string(),
            by: by.to_string(),
        };
        if let Err(e) = state::append_history(&self.state_dir, &entry) {
            tracing::warn!(error = %e, "cannot append to the role history");
        }
        self.role.send_replace(next.clone());
        // Waiters on progress (flushes) re-check the role.
        self.progress.send_modify(|n| *n += 1);
        tracing::warn!(
            from_epoch = prev.epoch,
            from_active = prev.active,
            epoch = next.epoch,
            active = next.active,
            reason,
            by,
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
            config_hash: self.config_hash(),
            purpose,
            owners: warmspare_shared::apply::can_chown(),
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
                name: jobs::SPOOL_WATCH.to_string(),
                root: jobs::spool_dir(&self.state_dir),
                excludes: Excludes::default(),
                debounce: Duration::from_millis(10),
                // Dumps replace one another: never held.
                max_delete: warmspare_shared::config::DeleteLimit::Share(100),
                verify_root: false,
            });
        }
        out
    }

    /// Lets the next full comparison of `watch` towards every current peer
    /// remove what the deletion guard holds.
    pub fn allow_deletes(&self, watch: &str) {
        let peers: Vec<String> = self.runtime().inboxes.keys().cloned().collect();
        let mut g = self.allow_deletes.lock().unwrap_or_else(|p| p.into_inner());
        for p in peers {
            g.insert((p, watch.to_string()));
        }
    }

    /// Takes the operator's permission for a full comparison of `watch`
    /// towards `peer` to remove what the deletion guard holds.
    pub fn take_allow_deletes(&self, peer: &str, watch: &str) -> bool {
        self.allow_deletes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(peer.to_string(), watch.to_string()))
    }

    /// Where the hash cache of `watch` for `side` ("send" or "recv") lives.
    pub fn cache_path(&self, watch: &str, side: &str) -> PathBuf {
        self.state_dir.join("cache").join(format!("{watch}.{side}"))
    }
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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

/// Binds the SSH endpoint of this node: its `listen` address, by default
/// every IPv4 address on the port of its `ssh` address.
pub async fn bind(shared: &Shared) -> Result<TcpListener> {
    let addr = shared.me.listen_addr();
    if let Some(warning) = loopback_warning_of(shared).await {
        tracing::warn!("{warning}");
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// How long name lookups for [`loopback_warning`] may take before the
/// warning is given up (a resolver can hang; start-up must not).
const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

/// [`loopback_warning`] for this node, on a blocking thread and within
/// [`LOOKUP_DEADLINE`]: no warning when the lookups take longer.
pub async fn loopback_warning_of(shared: &Shared) -> Option<String> {
    let cluster = shared.cluster().clone();
    let me = shared.me.name.clone();
    let lookup = tokio::task::spawn_blocking(move || loopback_warning(&cluster, &me));
    match tokio::time::timeout(LOOKUP_DEADLINE, lookup).await {
        Ok(Ok(warning)) => warning,
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::debug!("name lookups for the loopback check took too long; skipped");
            None
        }
    }
}

/// A warning when this node's `ssh` name resolves only to loopback while a
/// peer's does not: peers on other hosts would then dial themselves (Debian
/// maps a host's own name to 127.0.1.1 in /etc/hosts). Resolves names, so it
/// blocks; a cluster all on loopback (a lab) gets no warning.
pub fn loopback_warning(cluster: &warmspare_shared::config::Cluster, me: &str) -> Option<String> {
    use std::net::ToSocketAddrs as _;
    let loopback_only = |addr: &str| -> Option<bool> {
        let ips: Vec<_> = addr.to_socket_addrs().ok()?.map(|a| a.ip()).collect();
        (!ips.is_empty()).then(|| ips.iter().all(|ip| ip.is_loopback()))
    };
    let node = cluster.node(me)?;
    if loopback_only(&node.ssh) != Some(true) {
        return None;
    }
    let remote_peer = cluster.peers_of(me).find(|p| loopback_only(&p.ssh) != Some(true))?;
    Some(format!(
        "this node's ssh address {} resolves to loopback here, but peer {}'s ({}) does not: \
         peers dial {} by that name, so make it resolve to an address they can reach",
        node.ssh, remote_peer.name, remote_peer.ssh, node.ssh
    ))
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
    let http = match shared.me.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    serve(shared, listener, http, cancel).await
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
pub async fn serve(
    shared: Shared,
    listener: TcpListener,
    http: Option<TcpListener>,
    cancel: CancellationToken,
) -> Result<()> {
    // Private whatever the umask: the state dir holds dumps, diverged files
    // and what the passive preserved of the CA. An existing state dir keeps
    // its mode (a unit's StateDirectoryMode= sets it); the folders the agent
    // keeps beneath it are made 0700.
    warmspare_shared::perms::create_private_dir_all(&shared.state_dir)
        .with_context(|| format!("cannot create the state dir {}", shared.state_dir.display()))?;
    for dir in [
        shared.state_dir.join("diverged"),
        shared.state_dir.join("undo"),
        crate::jobs::spool_dir(&shared.state_dir),
        shared.state_dir.join("jobs"),
    ] {
        warmspare_shared::perms::ensure_private_dir(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::preserved::prune(&shared, None);
    crate::undo::prune(&shared);
    let persisted = shared.state_dir.join(state::ROLE_FILE).exists();
    let role = RoleState::load_or_init(&shared.state_dir, &shared.cluster().cluster.preferred_active)?;
    shared.role.send_replace(role.clone());
    if persisted && role.active == shared.me.name && shared.cluster().peers_of(&shared.me.name).next().is_some() {
        // A node that comes back active may be a stale primary: its peers may
        // have moved on (a failover while it was down). It acts as the active
        // one only once a peer confirms its epoch, or an operator promotes it.
        let reason = format!(
            "no peer has confirmed epoch {} since this agent started (`warmsparectl failover --to {} --force` promotes it)",
            role.epoch, shared.me.name
        );
        tracing::warn!(epoch = role.epoch, "{reason}");
        shared.set_held(Some(reason));
    }
    let history = state::read_history(&shared.state_dir);
    if history.is_empty() {
        let first = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: role.epoch,
            from: String::new(),
            to: role.active.clone(),
            reason: "cluster initialised".into(),
            by: shared.me.name.clone(),
        };
        let _ = state::append_history(&shared.state_dir, &first);
    }
    for w in shared.local_watches() {
        if w.name == jobs::SPOOL_WATCH {
            // The job spool is the agent's own, under the state dir.
            std::fs::create_dir_all(&w.root)
                .with_context(|| format!("cannot create the job spool {}", w.root.display()))?;
        } else if w.root.is_dir() {
            shared.roots.observe(&w.name, &w.root);
        } else {
            // Never created here: on the active, shipping an empty root
            // would empty the passives (see `roots`); a passive's receiver
            // creates it at the first sync.
            tracing::warn!(
                watch = w.name,
                root = %w.root.display(),
                "watch root is missing or not a directory; not created (a passive creates it at the first sync, an active does not ship it)"
            );
            continue;
        }
        // Never fatal: a tree the walk cannot enter (too deep, unreadable,
        // a root that is a link) is reported, and the agent starts.
        match apply::clean_temps(&w.root) {
            Ok(cleaned) => {
                if cleaned.removed > 0 {
                    tracing::info!(
                        watch = w.name,
                        removed = cleaned.removed,
                        "removed temporary files left by an earlier run"
                    );
                }
                if cleaned.skipped > 0 {
                    tracing::warn!(
                        watch = w.name,
                        skipped = cleaned.skipped,
                        "could not look for temporary files everywhere under the watch root"
                    );
                }
            }
            Err(e) => tracing::warn!(watch = w.name, error = %e, "cannot clean temporary files under the watch root"),
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

    // Every task says what it was when it ends; the supervisor reaps each
    // as it ends (see the loop below). Only the cache warm-up may end on
    // its own; jobs end when a reload cancels their token.
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    let (s, c) = (shared.clone(), cancel.clone());
    tasks.spawn(async move {
        server::run(s, listener, c).await;
        "the SSH server"
    });
    if role.active != shared.me.name {
        let s = shared.clone();
        tasks.spawn(async move {
            warm_send_caches(s).await;
            WARM_CACHES
        });
    }
    if let Some(http) = http {
        let (s, c) = (shared.clone(), cancel.clone());
        tasks.spawn(async move {
            health::run(s, http, c).await;
            "the HTTP listener"
        });
    }
    let (s, c) = (shared.clone(), cancel.clone());
    tasks.spawn(async move {
        sd::run(s, c).await;
        "the watchdog"
    });
    // Jobs and the active side restart on every accepted reload.
    let mut config_token = cancel.child_token();
    tasks.spawn(run_jobs(shared.clone(), config_token.clone()));
    let mut hangups =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot handle SIGHUP")?;
    sd::ready(&shared);

    let mut roles = shared.role.subscribe();
    let mut active: Option<ActiveSide> = None;
    // While this node is passive: the watcher of local changes.
    let mut passive: Option<CancellationToken> = None;
    // The last role-change task (active side, demotion): the next waits for it.
    let mut last: Option<tokio::task::JoinHandle<()>> = None;
    if role.active != shared.me.name {
        let (s, epoch, now) = (shared.clone(), role.epoch, role.active.clone());
        last = Some(tokio::spawn(
            async move { hooks::recover_passive(&s, epoch, &now).await },
        ));
    }
    // The active node before this one (WARMSPARE_FROM): from the history
    // entry that named this node when it starts active.
    let mut previous = if role.active == shared.me.name {
        state::read_history(&shared.state_dir)
            .iter()
            .rev()
            .find(|e| e.epoch == role.epoch && e.to == role.active)
            .map(|e| e.from.clone())
            .unwrap_or_default()
    } else {
        role.active.clone()
    };
    loop {
        let role = roles.borrow_and_update().clone();
        let mine = role.active == shared.me.name;
        match &passive {
            None if !mine => {
                let token = config_token.child_token();
                let (s, t) = (shared.clone(), token.clone());
                tasks.spawn(async move {
                    crate::passive::run(s, t).await;
                    PASSIVE_WATCHER
                });
                passive = Some(token);
            }
            Some(token) if mine => {
                // This node's tree is now the one that counts.
                token.cancel();
                passive = None;
                shared.local.clear_pending();
            }
            _ => {}
        }
        match &active {
            None if mine => {
                tracing::info!(epoch = role.epoch, "this node is named active");
                active = Some(ActiveSide::start(&shared, &config_token, &role, &previous, last.take()));
            }
            Some(side) if mine && side.epoch != role.epoch => {
                if shared.hooks.promoted(side.epoch) {
                    // Still this node, at a higher epoch: nothing to redo.
                    shared.hooks.promotion.send_replace(hooks::Promotion::Done(role.epoch));
                    if let Some(side) = active.as_mut() {
                        side.epoch = role.epoch;
                    }
                } else if let Some(side) = active.take() {
                    // An operator named this held node again: a new promotion.
                    side.token.cancel();
                    let from = side.from.clone();
                    active = Some(ActiveSide::start(
                        &shared,
                        &config_token,
                        &role,
                        &from,
                        Some(side.handle),
                    ));
                }
            }
            Some(_) if !mine => {
                if let Some(side) = active.take() {
                    tracing::warn!("this node is no longer active: stopping shipping");
                    side.token.cancel();
                    shared.runtime().inboxes.clear();
                    last = Some(side.demote(&shared, &role));
                }
            }
            _ => {}
        }
        previous = role.active.clone();
        shared.beat();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.fatal.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
            Some(ended) = tasks.join_next() => match ended {
                Ok(WARM_CACHES) | Ok(JOBS) | Ok(PASSIVE_WATCHER) => {}
                Ok(what) => shared.fail(format!("{what} stopped")),
                Err(e) if e.is_panic() => shared.fail(format!("a task panicked: {e}")),
                Err(_) => {}
            },
            changed = roles.changed() => if changed.is_err() { break },
            _ = hangups.recv() => {
                sd::reloading();
                match shared.reload() {
                    Ok(true) => {
                        tracing::warn!(path = %shared.cluster_path.display(), hash = shared.config_hash(), "cluster file reloaded; restarting jobs and the active side");
                        config_token.cancel();
                        shared.runtime().inboxes.clear();
                        // The loop starts the passive watcher again, on the new watches.
                        passive = None;
                        config_token = cancel.child_token();
                        tasks.spawn(run_jobs(shared.clone(), config_token.clone()));
                        // The loop starts the active side again under the new
                        // token; a promotion already done is not redone.
                        if let Some(side) = active.take() {
                            last = Some(side.handle);
                        }
                    }
                    Ok(false) => tracing::info!("cluster file unchanged"),
                    Err(e) => tracing::error!(path = %shared.cluster_path.display(), error = format!("{e:#}"), "reload refused; running on the previous cluster file"),
                }
                sd::ready(&shared);
            }
        }
    }
    sd::stopping();
    if let Some(side) = active.take() {
        side.token.cancel();
        last = Some(side.handle);
    }
    if let Some(h) = last.take() {
        // A hook still running is cut off here (its record has no end, so it
        // runs again at the next start); the shipper drains within 10 s.
        if tokio::time::timeout(Duration::from_secs(10), h).await.is_err() {
            tracing::warn!("the role change in progress did not stop in time");
        }
    }
    // after_apply runs are cut off: their process groups are killed.
    shared.after.shutdown(Duration::from_secs(5)).await;
    if let Err(e) = shared.ledgers.lock().unwrap_or_else(|p| p.into_inner()).save() {
        tracing::warn!(error = %e, "cannot save the sync ledger");
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
    let failed = shared.fatal_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(why) = failed {
        tracing::error!(reason = why, "stopped after a failure");
        bail!("stopped because {why}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the supervisor's loop goes round when nothing happens (its
/// heartbeat, which the watchdog checks).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the cache warm-up task says when it ends (it may).
const WARM_CACHES: &str = "the cache warm-up";
/// What the jobs task says when it ends (a reload cancels it).
const JOBS: &str = "the jobs";
/// The passive watcher's name as a task: it ends when the node becomes
/// active or a reload restarts it (and, on an inotify failure, it logs why).
const PASSIVE_WATCHER: &str = "the passive watcher";

async fn run_jobs(shared: Arc<Shared>, token: CancellationToken) -> &'static str {
    jobs::run(shared, token).await;
    JOBS
}

/// Scans the local watches once to fill their send-side hash caches, so that
/// the first comparison after a switchover to this node reads only what
/// changed. Only a node that starts passive runs it, beside its other work:
/// an active node's first comparison fills the same caches as it goes, and
/// waiting for a separate pass first would only delay it.
async fn warm_send_caches(shared: Arc<Shared>) {
    let done = tokio::task::spawn_blocking(move || {
        for w in shared.local_watches() {
            let path = shared.cache_path(&w.name, "send");
            let mut cache = warmspare_shared::manifest::HashCache::load(&path);
            let _ = warmspare_shared::manifest::scan(&w.root, "", &w.excludes, &mut cache);
            if let Err(e) = cache.save(&path) {
                tracing::warn!(watch = w.name, error = %e, "cannot save the hash cache");
            }
        }
        warmspare_shared::sys::release_free_memory();
    })
    .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, "the scan that warms the hash caches failed");
    }
}

/// How long a role-change task waits for the one before it: the longest a
/// hook may run, plus the active side's drain and some slack.
fn chain_limit(shared: &Shared) -> Duration {
    shared.cluster().cluster.hook_timeout * 2 + Duration::from_secs(30)
}

async fn wait_previous(shared: &Shared, previous: Option<tokio::task::JoinHandle<()>>) {
    if let Some(h) = previous {
        if tokio::time::timeout(chain_limit(shared), h).await.is_err() {
            tracing::error!("the previous role change did not finish in time; going on");
        }
    }
}

/// The active side of this node for one epoch: `on_promote`, then the
/// watcher and the shippers until its token is cancelled.
struct ActiveSide {
    /// The epoch it was started for.
    epoch: u64,
    /// The active node before this one.
    from: String,
    /// Cancelled when the role leaves this node (or on reload).
    token: CancellationToken,
    /// Ends once the hook has run and the shippers and watcher have stopped.
    handle: tokio::task::JoinHandle<()>,
}

impl ActiveSide {
    fn start(
        shared: &Arc<Shared>,
        parent: &CancellationToken,
        role: &RoleState,
        from: &str,
        previous: Option<tokio::task::JoinHandle<()>>,
    ) -> ActiveSide {
        let token = parent.child_token();
        let (s, t, epoch, prev) = (shared.clone(), token.clone(), role.epoch, from.to_string());
        let handle = tokio::spawn(async move {
            wait_previous(&s, previous).await;
            if t.is_cancelled() || !hooks::promote(&s, epoch, &prev).await || t.is_cancelled() {
                return;
            }
            tracing::info!("this node is active: watching and shipping");
            let mut set = JoinSet::new();
            start_active(&s, &mut set, &t);
            // Every task of the active side runs until the token is
            // cancelled: one that returns or panics before is a failure of
            // the agent (it exits non-zero and systemd restarts it), never
            // a node that says "active" while nothing ships.
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    Some(ended) = set.join_next() => {
                        if t.is_cancelled() {
                            break;
                        }
                        s.fail(match ended {
                            Ok(what) => format!("{what} of the active side stopped"),
                            Err(e) => format!("a task of the active side failed: {e}"),
                        });
                    }
                }
            }
            s.runtime().inboxes.clear();
            if tokio::time::timeout(Duration::from_secs(10), async {
                while set.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                tracing::warn!("the active side did not stop in time; aborting it");
                set.abort_all();
            }
            tracing::warn!("the active side has stopped");
        });
        ActiveSide {
            epoch,
            from: from.to_string(),
            token,
            handle,
        }
    }

    /// After the active side has stopped: `on_demote` (the token must be
    /// cancelled already).
    fn demote(self, shared: &Arc<Shared>, role: &RoleState) -> tokio::task::JoinHandle<()> {
        let (s, epoch, to) = (shared.clone(), role.epoch, role.active.clone());
        let handle = self.handle;
        tokio::spawn(async move {
            wait_previous(&s, Some(handle)).await;
            let me = s.me.name.clone();
            let _ = hooks::run(&s, warmspare_shared::config::Hook::OnDemote, epoch, &me, &to).await;
        })
    }
}

fn start_active(shared: &Arc<Shared>, tasks: &mut JoinSet<&'static str>, token: &CancellationToken) {
    // Roots are checked now, so that status and the log say at once when
    // one is not fit to ship from (the shippers check again before each batch).
    // Local changes flagged while passive are this node's own tree now.
    shared.local.clear_pending();
    for w in shared.local_watches().iter().filter(|w| w.verify_root) {
        let _ = shared.roots.verify(&w.name, &w.root);
    }
    let mut inboxes = Vec::new();
    for peer in shared.cluster().peers_of(&shared.me.name) {
        let inbox = Arc::new(Inbox::default());
        inboxes.push(inbox.clone());
        shared.runtime().inboxes.insert(peer.name.clone(), inbox.clone());
        let stop = inbox.clone();
        let t = token.clone();
        tasks.spawn(async move {
            t.cancelled().await;
            stop.interrupt();
            "an interrupt relay"
        });
        let (s, p, t) = (shared.clone(), peer.clone(), token.clone());
        tasks.spawn(async move {
            ship::run(s, p, inbox, t).await;
            "a shipper"
        });
    }
    let targets = shared
        .local_watches()
        .into_iter()
        .map(|w| watcher::Target {
            name: w.name,
            root: w.root,
            debounce: w.debounce,
        })
        .collect();
    let t = token.clone();
    let rewatch = shared.roots.recovered.clone();
    tasks.spawn(async move {
        // A hidden switch for the tests of this supervision: a watcher that
        // fails at once, as one whose inotify instance cannot be made.
        let result = if std::env::var_os("WARMSPARE_TEST_BREAK_WATCHER").is_some() {
            Err(anyhow::anyhow!("broken on purpose (WARMSPARE_TEST_BREAK_WATCHER)"))
        } else {
            watcher::run(targets, inboxes, rewatch, t).await
        };
        if let Err(e) = result {
            tracing::error!(error = format!("{e:#}"), "the watcher failed");
        }
        "the watcher"
    });
}
