//! The etcd operations warmspare needs, over the JSON gateway: leases, the
//! role's two keys and the transactions that change them, a watch on the
//! leader key, and each member's status.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use data_encoding::BASE64;
use serde_json::{json, Value};
use tokio::time::Instant;

use tokio_rustls::TlsConnector;

use super::confirm::Renewal;
use super::http::{self, Exchange};
use super::{tls, EtcdError};
use crate::config::{Endpoint, Etcd};

/// A client of one etcd cluster, for one warmspare cluster's keys.
pub struct Client {
    endpoints: Vec<Endpoint>,
    prefix: String,
    deadline: Duration,
    /// The TLS set-up for `https` endpoints (from `ca`, `cert`, `key`).
    tls: Option<TlsConnector>,
    /// The member that answered last: asked first next time.
    preferred: AtomicUsize,
}

/// The node named by the leader key, and the lease the key is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The active node's name.
    pub name: String,
    /// The lease the key is attached to.
    pub lease: i64,
}

/// The role as etcd holds it, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The leader, when the key exists.
    pub leader: Option<Leader>,
    /// The epoch; 0 while the key does not exist yet.
    pub epoch: u64,
    /// Why automatic failover is paused (`<prefix>/paused`, written by
    /// `warmsparectl pause`), while it is.
    pub paused: Option<String>,
    /// During a switchover: the old active, named by `<prefix>/handover`
    /// on that node's lease, which may still act until the key vanishes
    /// (see [`Client::switch`]).
    pub handover: Option<String>,
    /// The store's revision the keys were read at.
    pub revision: i64,
}

/// The result of a role transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The change was made: the epoch is now this.
    Done(u64),
    /// The comparison failed: this is the role that was there instead.
    Refused(Role),
}

/// A change of the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderEvent {
    /// The revision of the change.
    pub revision: i64,
    /// The new leader, or `None` when the key was deleted (or its lease
    /// expired).
    pub leader: Option<Leader>,
}

/// What a bounded wait on a [`LeaderWatch`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// The leader key changed.
    Change(LeaderEvent),
    /// Nothing arrived within the limit given.
    Silent(Duration),
}

/// One member's answer to a status request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The member's client URL.
    pub endpoint: String,
    /// The etcd version it runs, when it answered.
    pub version: Option<String>,
    /// Whether it knows a raft leader (that is, its cluster has quorum).
    pub has_leader: bool,
    /// Why it did not answer, if it did not.
    pub error: Option<String>,
}

/// A watch on the leader key: its changes in order, from one member.
pub struct LeaderWatch {
    exchange: Exchange,
    key: String,
    queued: VecDeque<LeaderEvent>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("deadline", &self.deadline)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the cluster `[etcd]` names; each call (across members)
    /// gives up after `deadline`. The TLS files (`ca`, `cert`, `key`) are
    /// read here: an error names the key whose file cannot be read or used.
    pub fn new(etcd: &Etcd, deadline: Duration) -> Result<Client, EtcdError> {
        let mut client = Client::with_endpoints(etcd.endpoints.clone(), etcd.prefix.clone(), deadline);
        client.tls = tls::connector(etcd)?;
        Ok(client)
    }

    /// A client of `endpoints`, for the keys under `prefix`.
    pub fn with_endpoints(endpoints: Vec<Endpoint>, prefix: String, deadline: Duration) -> Client {
        Client {
            endpoints,
            prefix,
            deadline,
            tls: None,
            preferred: AtomicUsize::new(0),
        }
    }

    /// The leader key: `<prefix>/leader`.
    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The key prefix of this cluster's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The epoch key: `<prefix>/epoch`.
    pub fn epoch_key(&self) -> String {
        format!("{}/epoch", self.prefix)
    }

    /// The pause key: `<prefix>/paused` (no automatic failover while it
    /// exists).
    pub fn paused_key(&self) -> String {
        format!("{}/paused", self.prefix)
    }

    /// The handover key: `<prefix>/handover`, naming the old active of a
    /// switchover on that node's lease.
    pub fn handover_key(&self) -> String {
        format!("{}/handover", self.prefix)
    }

    /// Asks the members in turn (the one that answered last first), each
    /// with its share of what is left of the deadline, until one answers.
    /// An error that another member would give as well (an unknown lease, a
    /// bad request) ends the call at once.
    pub(super) async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let (exchange, value) = self
            .first_answer(path, body, |mut ex| async move {
                let v = ex.whole().await?;
                Ok((ex, v))
            })
            .await?;
        drop(exchange);
        Ok(value)
    }

    async fn first_answer<T, F, Fut>(&self, path: &str, body: &Value, read: F) -> Result<T, EtcdError>
    where
        F: Fn(Exchange) -> Fut,
        Fut: std::future::Future<Output = Result<T, EtcdError>>,
    {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(EtcdError::Connect {
                endpoint: "-".into(),
                message: "no endpoints".into(),
            });
        }
        let end = Instant::now() + self.deadline;
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let at = (first + i) % n;
            let ep = &self.endpoints[at];
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Each member left gets an equal share of the time left.
            let share = left / u32::try_from(n - i).unwrap_or(1);
            let attempt = http::within(ep, share, async {
                let ex = http::post(ep, self.tls.as_ref(), path, body).await?;
                read(ex).await
            })
            .await;
            match attempt {
                Ok(v) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.try_another() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Timeout {
            endpoint: self.endpoints[first].to_string(),
            after: self.deadline,
        }))
    }

    /// Grants a lease of `ttl` (whole seconds); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl.as_secs().to_string() }))
            .await?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(self.bad(format!("a lease grant without an ID: {v}")));
        }
        Ok(id)
    }

    /// Renews `lease`; returns its TTL, or `None` when the lease is gone.
    pub async fn keepalive(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        let ttl = int(&v["result"]["TTL"]);
        Ok((ttl > 0).then_some(ttl))
    }

    /// The seconds `lease` has left, or `None` when it is gone.
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let v = self
            .call("/v3/lease/timetolive", &json!({ "ID": lease.to_string() }))
            .await?;
        let ttl = int(&v["TTL"]);
        Ok((ttl > 0).then_some(ttl))
    }

    /// Revokes `lease` (its keys are deleted at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).await {
            Ok(_) => Ok(()),
            // Already gone is what was asked for.
            Err(EtcdError::Server { code: 5, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The role: the leader, epoch, pause and handover keys, read at one
    /// revision.
    pub async fn role(&self) -> Result<Role, EtcdError> {
        let body = json!({ "success": self.role_ranges() });
        let v = self.call("/v3/kv/txn", &body).await?;
        self.role_from(&v)
    }

    /// Pauses automatic failover with `note` (what `status` shows), or
    /// resumes it (`None`). A plain put or delete, not a transaction: the
    /// pause compares nothing and changes no role, writing it twice is
    /// harmless, and the takes it stops compare the key's absence in their
    /// own transactions.
    pub async fn set_paused(&self, note: Option<&str>) -> Result<(), EtcdError> {
        let key = b64(&self.paused_key());
        match note {
            Some(note) => self
                .call("/v3/kv/put", &json!({ "key": key, "value": b64(note) }))
                .await
                .map(|_| ()),
            None => self
                .call("/v3/kv/deleterange", &json!({ "key": key }))
                .await
                .map(|_| ()),
        }
    }

    /// Renews `lease` and confirms that the leader key names `me` on it:
    /// `Confirmed`, or `Lost` when etcd says otherwise. The caller times the
    /// renewal from before this call (see [`super::confirm`]).
    pub async fn renew(&self, me: &str, lease: i64) -> Result<Renewal, EtcdError> {
        if self.keepalive(lease).await?.is_none() {
            return Ok(Renewal::Lost);
        }
        let role = self.role().await?;
        let mine = role.leader.is_some_and(|l| l.name == me && l.lease == lease);
        Ok(if mine { Renewal::Confirmed } else { Renewal::Lost })
    }

    /// Watches the leader key from `revision` on (the revision after a
    /// [`Role`] was read, so no change in between is missed).
    pub async fn watch_leader(&self, revision: i64) -> Result<LeaderWatch, EtcdError> {
        let key = self.leader_key();
        let body = json!({ "create_request": { "key": b64(&key), "start_revision": revision.to_string() } });
        self.first_answer("/v3/watch", &body, |mut ex| {
            let key = key.clone();
            async move {
                let first = ex.next_message().await?;
                if let Some(e) = ex.server_error(&first["error"]) {
                    return Err(e);
                }
                if first["result"]["created"] != Value::Bool(true) {
                    return Err(EtcdError::WatchBroken {
                        endpoint: ex.endpoint().to_string(),
                        message: format!("the watch was not created: {first}"),
                    });
                }
                let mut watch = LeaderWatch {
                    exchange: ex,
                    key: key.clone(),
                    queued: VecDeque::new(),
                };
                watch.queue(&first)?;
                Ok(watch)
            }
        })
        .await
    }

    /// Every member's status, asked concurrently, each within the deadline.
    pub async fn health(&self) -> Vec<Health> {
        let asks = self.endpoints.iter().map(|ep| async move {
            let endpoint = ep.to_string();
            let answer = http::within(ep, self.deadline, async {
                let mut ex = http::post(ep, self.tls.as_ref(), "/v3/maintenance/status", &json!({})).await?;
                ex.whole().await
            })
            .await;
            match answer {
                Ok(v) => Health {
                    endpoint,
                    version: v["version"].as_str().map(str::to_string),
                    has_leader: nonzero(&v["leader"]),
                    error: None,
                },
                Err(e) => Health {
                    endpoint,
                    version: None,
                    has_leader: false,
                    error: Some(e.to_string()),
                },
            }
        });
        futures_util::future::join_all(asks).await
    }

    pub(super) fn range(&self, key: &str) -> Value {
        json!({ "request_range": { "key": b64(key) } })
    }

    /// The ranges [`Client::role_from`] reads, in its order.
    pub(super) fn role_ranges(&self) -> Value {
        json!([
            self.range(&self.leader_key()),
            self.range(&self.epoch_key()),
            self.range(&self.paused_key()),
            self.range(&self.handover_key()),
        ])
    }

    /// The role from a transaction's answer whose responses are the ranges
    /// of the leader, epoch, pause and handover keys, in that order (the
    /// last two may be left out: absent).
    pub(super) fn role_from(&self, v: &Value) -> Result<Role, EtcdError> {
        let kv = |i: usize| v["responses"][i]["response_range"]["kvs"].get(0).cloned();
        let note = |i: usize| -> Result<Option<String>, EtcdError> {
            match kv(i) {
                Some(kv) => Ok(Some(text(&kv["value"]).map_err(|m| self.bad(m))?)),
                None => Ok(None),
            }
        };
        let leader = match kv(0) {
            Some(kv) => Some(Leader {
                name: text(&kv["value"]).map_err(|m| self.bad(m))?,
                lease: int(&kv["lease"]),
            }),
            None => None,
        };
        let epoch = match kv(1) {
            Some(kv) => {
                let t = text(&kv["value"]).map_err(|m| self.bad(m))?;
                t.parse()
                    .map_err(|_| self.bad(format!("the epoch key holds {t:?}, not a number")))?
            }
            None => 0,
        };
        Ok(Role {
            leader,
            epoch,
            paused: note(2)?,
            handover: note(3)?,
            revision: int(&v["header"]["revision"]),
        })
    }

    pub(super) fn bad(&self, message: String) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoints.first().map_or_else(|| "-".into(), ToString::to_string),
            message,
        }
    }
}

/// A refused transaction whose refusal shows exactly the change it asked
/// for was made by an earlier attempt (its answer lost, the call retried on
/// another member) counts as done.
pub(super) fn settle(outcome: TxnOutcome, leader: &str, lease: i64, next: u64) -> TxnOutcome {
    match outcome {
        TxnOutcome::Refused(role)
            if role.epoch == next
                && role
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.name == leader && l.lease == lease) =>
        {
            TxnOutcome::Done(next)
        }
        other => other,
    }
}

impl LeaderWatch {
    /// The next change of the leader key, waiting at most `limit`: a watch
    /// that stays silent that long (nothing changed, or the member stopped
    /// answering without closing the stream) is [`Watched::Silent`], for
    /// the caller to tell apart. A stream that ends, breaks or is cancelled
    /// by etcd is an error. Nothing here waits without a deadline.
    pub async fn next_within(&mut self, limit: Duration) -> Result<Watched, EtcdError> {
        let end = Instant::now() + limit;
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Ok(Watched::Change(e));
            }
            let Ok(message) = tokio::time::timeout_at(end, self.exchange.next_message()).await else {
                return Ok(Watched::Silent(limit));
            };
            self.queue(&message?)?;
        }
    }

    fn queue(&mut self, message: &Value) -> Result<(), EtcdError> {
        let broken = |m: String| EtcdError::WatchBroken {
            endpoint: self.exchange.endpoint().to_string(),
            message: m,
        };
        if !message["error"].is_null() {
            return Err(broken(format!("etcd ended the watch: {}", message["error"])));
        }
        let result = &message["result"];
        if result["canceled"] == Value::Bool(true) {
            return Err(broken(format!("etcd cancelled the watch: {result}")));
        }
        let Some(events) = result["events"].as_array() else {
            return Ok(());
        };
        for e in events {
            let kv = &e["kv"];
            if text(&kv["key"]).ok().as_deref() != Some(self.key.as_str()) {
                continue;
            }
            // The gateway leaves out default values: no type is a put.
            let leader = match e["type"].as_str() {
                Some("DELETE") => None,
                _ => Some(Leader {
                    name: text(&kv["value"]).map_err(broken)?,
                    lease: int(&kv["lease"]),
                }),
            };
            self.queued.push_back(LeaderEvent {
                revision: int(&kv["mod_revision"]),
                leader,
            });
        }
        Ok(())
    }
}

/// A key or value for the gateway: base64 of its bytes.
pub(super) fn b64(s: &str) -> String {
    BASE64.encode(s.as_bytes())
}

/// Whether an unsigned 64-bit id from the gateway (a member id, which may
/// not fit an `i64`) is present and not 0.
fn nonzero(v: &Value) -> bool {
    match v {
        Value::String(s) => s.parse::<u64>().is_ok_and(|n| n != 0),
        Value::Number(n) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    }
}

/// A base64 key or value from the gateway, as UTF-8 text (absent is empty).
pub(super) fn text(v: &Value) -> Result<String, String> {
    let s = v.as_str().unwrap_or("");
    let bytes = BASE64
        .decode(s.as_bytes())
        .map_err(|e| format!("a value is not base64: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "a value is not UTF-8".to_string())
}

/// A 64-bit integer from the gateway: a string (as protobuf's JSON writes
/// them) or a number; absent (a default left out) is 0.
pub(super) fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
