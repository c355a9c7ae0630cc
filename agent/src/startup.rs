//! The supervisor's start-up: binding the SSH endpoint (and the loopback
//! check that comes with it), the state dir and its folders, the role
//! state loaded (and the hold of a node that comes back active), the role
//! history begun, the watch roots observed and cleaned of temp files left
//! by an earlier run, and the warm-up of the send-side hash caches on a
//! node that starts passive. `daemon` calls it before it starts any task.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;
use warmspare_shared::apply;
use warmspare_shared::state::{self, HistoryEntry, RoleState};

use crate::clock::unix;
use crate::live::Live;
use crate::role::Role;
use crate::roots::Roots;

/// Binds the SSH endpoint of this node: its `listen` address, by default
/// every IPv4 address on the port of its `ssh` address.
pub async fn bind(live: &Live) -> Result<TcpListener> {
    let addr = live.me.listen_addr();
    if let Some(warning) = loopback_warning_of(live).await {
        tracing::warn!("{warning}");
    }
    bind_listener(addr).await
}

/// How long a listen address that is in use is tried again before the
/// agent gives up: `warmspare-agent check` binds each listen address for a
/// moment to see whether it is free, and an agent started in that moment
/// must not fail for it.
const IN_USE_GRACE: Duration = Duration::from_secs(5);

/// Binds `addr`, trying again for up to [`IN_USE_GRACE`] while it is in use
/// (any other error fails at once).
pub async fn bind_listener(addr: std::net::SocketAddr) -> Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + IN_USE_GRACE;
    let mut warned = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                if !warned {
                    tracing::warn!(%addr, "listen address in use; trying again for a few seconds");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }
}

/// How long name lookups for [`loopback_warning`] may take before the
/// warning is given up (a resolver can hang; start-up must not).
const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

/// [`loopback_warning`] for this node, on a blocking thread and within
/// [`LOOKUP_DEADLINE`]: no warning when the lookups take longer.
pub async fn loopback_warning_of(live: &Live) -> Option<String> {
    let cluster = live.cluster().clone();
    let me = live.me.name.clone();
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

/// Makes the state dir and its folders, prunes what the node preserved of
/// the CA (the supervisor prunes the undo store once this is done), loads
/// and publishes the role state (holding a node that comes back active),
/// begins the role history, and observes and cleans the watch roots;
/// returns the role state it started with.
pub fn prepare(live: &Live, role_handle: &Role, roots: &Roots) -> Result<RoleState> {
    // Private whatever the umask: the state dir holds dumps, diverged files
    // and what the passive preserved of the CA. An existing state dir keeps
    // its mode (a unit's StateDirectoryMode= sets it); the folders the agent
    // keeps beneath it are made 0700.
    warmspare_shared::perms::create_private_dir_all(&live.state_dir)
        .with_context(|| format!("cannot create the state dir {}", live.state_dir.display()))?;
    for dir in [
        live.state_dir.join("diverged"),
        live.state_dir.join("undo"),
        crate::live::spool_dir(&live.state_dir),
        live.state_dir.join("jobs"),
    ] {
        warmspare_shared::perms::ensure_private_dir(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::preserved::prune(live, None);
    let persisted = live.state_dir.join(state::ROLE_FILE).exists();
    let role = RoleState::load_or_init(&live.state_dir, &live.cluster().cluster.preferred_active)?;
    role_handle.start(role.clone());
    if persisted && role.active == live.me.name && live.cluster().peers_of(&live.me.name).next().is_some() {
        // A node that comes back active may be a stale primary: its peers may
        // have moved on (a failover while it was down). It acts as the active
        // one only once a peer confirms its epoch, or an operator promotes it.
        let reason = format!(
            "no peer has confirmed epoch {} since this agent started (`warmsparectl failover --to {} --force` promotes it)",
            role.epoch, live.me.name
        );
        tracing::warn!(epoch = role.epoch, "{reason}");
        role_handle.hold(Some(reason));
    }
    let history = state::read_history(&live.state_dir);
    if history.is_empty() {
        let first = HistoryEntry {
            time: unix(SystemTime::now()),
            epoch: role.epoch,
            from: String::new(),
            to: role.active.clone(),
            reason: "cluster initialised".into(),
            by: live.me.name.clone(),
        };
        let _ = state::append_history(&live.state_dir, &first);
    }
    for w in live.local_watches() {
        if w.name == crate::live::SPOOL_WATCH {
            // The job spool is the agent's own, under the state dir.
            std::fs::create_dir_all(&w.root)
                .with_context(|| format!("cannot create the job spool {}", w.root.display()))?;
        } else if w.root.is_dir() {
            roots.observe(&w.name, &w.root);
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
    Ok(role)
}

/// Scans the local watches once to fill their send-side hash caches, so that
/// the first comparison after a switchover to this node reads only what
/// changed. Only a node that starts passive runs it, beside its other work:
/// an active node's first comparison fills the same caches as it goes, and
/// waiting for a separate pass first would only delay it.
pub async fn warm_send_caches(live: Arc<Live>) {
    let done = tokio::task::spawn_blocking(move || {
        for w in live.local_watches() {
            let path = live.cache_path(&w.name, "send");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An address held by another socket for a moment (as `check` holds
    /// it) is bound once it is let go; one held past the grace fails
    /// with the address named.
    #[tokio::test]
    async fn a_listen_address_in_use_for_a_moment_is_tried_again() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        let bound = bind_listener(addr).await.unwrap();
        assert_eq!(bound.local_addr().unwrap(), addr);
        release.await.unwrap();
        drop(bound);

        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = squatter.local_addr().unwrap();
        let err = bind_listener(busy).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("cannot listen on {busy}")),
            "{err:#}"
        );
    }
}
