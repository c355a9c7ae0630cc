//! The daemon: one supervisor owning every long-lived task.
//!
//! The SSH server (and with it the receiver) runs on every node. The watcher
//! and one shipper per peer run only while this node is the active one: the
//! role is a `watch` channel, and a change of role starts or cancels the
//! active-side tasks without a restart. SIGTERM or SIGINT cancels the root
//! token; every task stops on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warmspare_shared::apply;
use warmspare_shared::state::{self, HistoryEntry, RoleState};

use crate::clock::unix;
use crate::events::Inbox;
use crate::node::Shared;
use crate::{health, hooks, jobs, sd, server, ship, watch as watcher};

/// Binds the SSH endpoint of this node: its `listen` address, by default
/// every IPv4 address on the port of its `ssh` address.
pub async fn bind(shared: &Shared) -> Result<TcpListener> {
    let addr = shared.live.me.listen_addr();
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
    let cluster = shared.live.cluster().clone();
    let me = shared.live.me.name.clone();
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
    let http = match shared.live.me.http {
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
    warmspare_shared::perms::create_private_dir_all(&shared.live.state_dir)
        .with_context(|| format!("cannot create the state dir {}", shared.live.state_dir.display()))?;
    for dir in [
        shared.live.state_dir.join("diverged"),
        shared.live.state_dir.join("undo"),
        crate::live::spool_dir(&shared.live.state_dir),
        shared.live.state_dir.join("jobs"),
    ] {
        warmspare_shared::perms::ensure_private_dir(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::preserved::prune(&shared.live, None);
    crate::undo::prune(&shared);
    let persisted = shared.live.state_dir.join(state::ROLE_FILE).exists();
    let role = RoleState::load_or_init(&shared.live.state_dir, &shared.live.cluster().cluster.preferred_active)?;
    shared.role.start(role.clone());
    if persisted
        && role.active == shared.live.me.name
        && shared.live.cluster().peers_of(&shared.live.me.name).next().is_some()
    {
        // A node that comes back active may be a stale primary: its peers may
        // have moved on (a failover while it was down). It acts as the active
        // one only once a peer confirms its epoch, or an operator promotes it.
        let reason = format!(
            "no peer has confirmed epoch {} since this agent started (`warmsparectl failover --to {} --force` promotes it)",
            role.epoch, shared.live.me.name
        );
        tracing::warn!(epoch = role.epoch, "{reason}");
        shared.role.hold(Some(reason));
    }
    let history = state::read_history(&shared.live.state_dir);
    if history.is_empty() {
        let first = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: role.epoch,
            from: String::new(),
            to: role.active.clone(),
            reason: "cluster initialised".into(),
            by: shared.live.me.name.clone(),
        };
        let _ = state::append_history(&shared.live.state_dir, &first);
    }
    for w in shared.live.local_watches() {
        if w.name == crate::live::SPOOL_WATCH {
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
        node = shared.live.me.name,
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
    if role.active != shared.live.me.name {
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
    if role.active != shared.live.me.name {
        let (s, epoch, now) = (shared.clone(), role.epoch, role.active.clone());
        last = Some(tokio::spawn(async move {
            hooks::recover_passive(&s.live, &s.role, epoch, &now).await
        }));
    }
    // The active node before this one (WARMSPARE_FROM): from the history
    // entry that named this node when it starts active.
    let mut previous = if role.active == shared.live.me.name {
        state::read_history(&shared.live.state_dir)
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
        let mine = role.active == shared.live.me.name;
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
                if shared.role.hooks.promoted(side.epoch) {
                    // Still this node, at a higher epoch: nothing to redo.
                    shared
                        .role
                        .hooks
                        .promotion
                        .send_replace(crate::promotion::Promotion::Done(role.epoch));
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
                    shared.telemetry.runtime().inboxes.clear();
                    last = Some(side.demote(&shared, &role));
                }
            }
            _ => {}
        }
        previous = role.active.clone();
        shared.beat();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.failed() => break,
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
                match shared.live.reload() {
                    Ok(true) => {
                        tracing::warn!(path = %shared.live.cluster_path.display(), hash = shared.live.config_hash(), "cluster file reloaded; restarting jobs and the active side");
                        config_token.cancel();
                        shared.telemetry.runtime().inboxes.clear();
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
                    Err(e) => tracing::error!(path = %shared.live.cluster_path.display(), error = format!("{e:#}"), "reload refused; running on the previous cluster file"),
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
    let failed = shared.failure();
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
        for w in shared.live.local_watches() {
            let path = shared.live.cache_path(&w.name, "send");
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
    shared.live.cluster().cluster.hook_timeout * 2 + Duration::from_secs(30)
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
            if t.is_cancelled() || !hooks::promote(&s.live, &s.role, epoch, &prev).await || t.is_cancelled() {
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
            s.telemetry.runtime().inboxes.clear();
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
            let me = s.live.me.name.clone();
            let _ = hooks::run(
                &s.live,
                &s.role,
                warmspare_shared::config::Hook::OnDemote,
                epoch,
                &me,
                &to,
            )
            .await;
        })
    }
}

fn start_active(shared: &Arc<Shared>, tasks: &mut JoinSet<&'static str>, token: &CancellationToken) {
    // Roots are checked now, so that status and the log say at once when
    // one is not fit to ship from (the shippers check again before each batch).
    // Local changes flagged while passive are this node's own tree now.
    shared.local.clear_pending();
    for w in shared.live.local_watches().iter().filter(|w| w.verify_root) {
        let _ = shared.roots.verify(&w.name, &w.root);
    }
    let mut inboxes = Vec::new();
    for peer in shared.live.cluster().peers_of(&shared.live.me.name) {
        let inbox = Arc::new(Inbox::default());
        inboxes.push(inbox.clone());
        shared
            .telemetry
            .runtime()
            .inboxes
            .insert(peer.name.clone(), inbox.clone());
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
        .live
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
