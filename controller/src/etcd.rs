//! The etcd part of `warmsparectl status`: with `[etcd]` in the cluster
//! file, the role as etcd holds it (leader, its lease's time left, epoch)
//! and each node's published record and eligibility, read directly from
//! etcd within a deadline. etcd out of reach is shown, never fatal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use warmspare_shared::config::Cluster;
use warmspare_shared::etcd::elect::{self, Eligibility, MemberRecord};
use warmspare_shared::etcd::Client;

/// Each etcd call (across members) gives up after this.
const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// The whole etcd part of a status gives up after this.
const TOTAL_DEADLINE: Duration = Duration::from_secs(5);

/// What status shows of etcd.
#[derive(Debug, Serialize)]
pub struct EtcdView {
    /// The key prefix read.
    pub prefix: String,
    /// The role and members, or why etcd could not be read.
    #[serde(flatten)]
    pub read: Read,
}

/// The role and the members as read, or the reason they were not.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Read {
    /// etcd answered.
    Ok {
        /// The leader key's node, when the key exists.
        leader: Option<String>,
        /// The seconds the leader's lease has left, when known.
        lease_left_s: Option<i64>,
        /// The epoch key (0: not yet written).
        epoch: u64,
        /// Who paused automatic failover and when, while it is paused.
        paused: Option<String>,
        /// The old active of a switchover under way, until it lets go.
        handover: Option<String>,
        /// Every node in priority order (the leader shown as active).
        members: Vec<MemberView>,
        /// The node that would take the role were the leader key gone.
        next: Option<String>,
    },
    /// etcd could not be read.
    Unreachable {
        /// Why not.
        error: String,
    },
}

/// One node as etcd knows it.
#[derive(Debug, Serialize)]
pub struct MemberView {
    /// The node's name.
    pub node: String,
    /// The lag it published, in milliseconds.
    pub lag_ms: Option<u64>,
    /// Whether it published a record at all.
    pub published: bool,
    /// Whether it may be promoted automatically, and if not why.
    pub eligibility: String,
}

/// Reads etcd for `cluster`; `None` without `[etcd]`.
pub async fn gather(cluster: &Cluster) -> Option<EtcdView> {
    let etcd = cluster.etcd.as_ref()?;
    let read = match tokio::time::timeout(TOTAL_DEADLINE, read(cluster, etcd)).await {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => Read::Unreachable { error },
        Err(_) => Read::Unreachable {
            error: format!("no answer within {TOTAL_DEADLINE:?}"),
        },
    };
    Some(EtcdView {
        prefix: etcd.prefix.clone(),
        read,
    })
}

async fn read(cluster: &Cluster, etcd: &warmspare_shared::config::Etcd) -> Result<Read, String> {
    let client = Client::new(etcd, CALL_DEADLINE).map_err(|e| e.to_string())?;
    let role = client.role().await.map_err(|e| e.to_string())?;
    let lease_left_s = match &role.leader {
        Some(l) => client.time_to_live(l.lease).await.map_err(|e| e.to_string())?,
        None => None,
    };
    let (records, _) = client.members().await.map_err(|e| e.to_string())?;
    let leader = role.leader.as_ref().map(|l| l.name.as_str());
    // The leader is not a candidate: the passives leave it out (its own
    // record carries no lag anyway).
    let order: Vec<(&str, bool)> = elect::priority(cluster)
        .into_iter()
        .filter(|(name, _)| Some(*name) != leader)
        .collect();
    let mut members: Vec<MemberView> = elect::standings(&order, &records, etcd.max_lag_on_failover)
        .into_iter()
        .map(|(name, e)| member(name, &records, describe(e)))
        .collect();
    if let Some(l) = leader {
        let first = elect::priority(cluster).iter().position(|(n, _)| *n == l);
        let view = member(l, &records, "active: holds the leader key".into());
        members.insert(first.unwrap_or(0).min(members.len()), view);
    }
    let next = elect::choose(&order, &records, etcd.max_lag_on_failover).map(str::to_string);
    Ok(Read::Ok {
        leader: role.leader.map(|l| l.name),
        lease_left_s,
        epoch: role.epoch,
        paused: role.paused,
        handover: role.handover,
        members,
        next,
    })
}

fn member(name: &str, records: &BTreeMap<String, MemberRecord>, eligibility: String) -> MemberView {
    let record = records.get(name);
    MemberView {
        node: name.to_string(),
        lag_ms: record.and_then(|r| r.lag_ms),
        published: record.is_some(),
        eligibility,
    }
}

/// A few words for an eligibility.
fn describe(e: Eligibility) -> String {
    match e {
        Eligibility::Eligible { .. } => "eligible".into(),
        Eligibility::FailoverOff => "not eligible: failover = false".into(),
        Eligibility::Unpublished => "not eligible: no record in etcd".into(),
        Eligibility::LagUnknown => "not eligible: no lag measured (not caught up since it started)".into(),
        Eligibility::TooFarBehind { lag, max } => {
            format!(
                "not eligible: {} behind, more than max_lag_on_failover {}",
                secs(lag),
                secs(max)
            )
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The lines status prints for `view`.
pub fn render(view: &EtcdView) -> String {
    let mut out = format!("etcd (prefix {}):\n", view.prefix);
    match &view.read {
        Read::Unreachable { error } => {
            let _ = writeln!(out, "  UNREACHABLE: {error}");
        }
        Read::Ok {
            leader,
            lease_left_s,
            epoch,
            paused,
            handover,
            members,
            next,
        } => {
            let lease = lease_left_s.map_or_else(|| "unknown".into(), |s| format!("{s}s"));
            match leader {
                Some(l) => {
                    let _ = writeln!(out, "  leader {l}, lease {lease} left, epoch {epoch}");
                }
                None => {
                    let _ = writeln!(out, "  NO leader, epoch {epoch}");
                }
            }
            if let Some(note) = paused {
                let _ = writeln!(
                    out,
                    "  automatic failover PAUSED ({note}): `warmsparectl resume` ends it"
                );
            }
            if let Some(old) = handover {
                let _ = writeln!(out, "  switchover under way: {old} lets go of its lease");
            }
            for m in members {
                let lag = match (m.published, m.lag_ms) {
                    (false, _) => "-".to_string(),
                    (true, None) => "none".to_string(),
                    (true, Some(ms)) => secs(Duration::from_millis(ms)),
                };
                let _ = writeln!(out, "  {:<16} lag {lag:<8} {}", m.node, m.eligibility);
            }
            let _ = writeln!(
                out,
                "  next without a leader: {}",
                next.as_deref().unwrap_or("nobody eligible")
            );
        }
    }
    out
}
