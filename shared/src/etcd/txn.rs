//! The transactions that change the role: each compares the leader key
//! and the epoch (and the handover key, for every take) and writes both
//! in one step ([`Client::take`], [`Client::seize`],
//! [`Client::take_unless_paused`], [`Client::claim`], [`Client::switch`],
//! [`Client::hand_over`]).

use serde_json::{json, Value};

use super::client::{b64, settle, Leader, TxnOutcome};
use super::{Client, EtcdError};

impl Client {
    /// Takes the role when nobody holds it: if the leader key is absent and
    /// the epoch is `epoch`, the leader becomes `me` on `lease` and the
    /// epoch `epoch + 1`, in one transaction.
    pub async fn take(&self, me: &str, lease: i64, epoch: u64) -> Result<TxnOutcome, EtcdError> {
        let next = self.next_epoch(epoch)?;
        self.seize(me, lease, epoch, next).await
    }

    /// An automatic take: [`Client::seize`] that is also refused while
    /// automatic failover is paused (`<prefix>/paused` exists).
    pub async fn take_unless_paused(
        &self,
        me: &str,
        lease: i64,
        epoch: u64,
        next: u64,
    ) -> Result<TxnOutcome, EtcdError> {
        self.seize_if(me, lease, epoch, next, Some(self.absent(&self.paused_key())))
            .await
    }

    /// Takes the role when nobody holds it, at an epoch the caller names:
    /// if the leader key is absent and the epoch is `epoch`, the leader
    /// becomes `me` on `lease` and the epoch `next` (above `epoch`), in one
    /// transaction. [`Client::take`] is this with `next = epoch + 1`; an
    /// active whose local epoch is ahead of etcd's (the first start with
    /// `[etcd]`, or an operator's role change) records its own epoch so.
    ///
    /// Every take (this, [`Client::take`], [`Client::claim`]) is also
    /// refused while a switchover's old active may still act (the handover
    /// key exists).
    pub async fn seize(&self, me: &str, lease: i64, epoch: u64, next: u64) -> Result<TxnOutcome, EtcdError> {
        self.seize_if(me, lease, epoch, next, None).await
    }

    async fn seize_if(
        &self,
        me: &str,
        lease: i64,
        epoch: u64,
        next: u64,
        also: Option<Value>,
    ) -> Result<TxnOutcome, EtcdError> {
        if next <= epoch || next > crate::state::MAX_EPOCH {
            return Err(self.bad(format!("cannot move the epoch from {epoch} to {next}")));
        }
        let mut compare = vec![
            self.absent(&self.leader_key()),
            self.epoch_is(epoch),
            self.absent(&self.handover_key()),
        ];
        compare.extend(also);
        let outcome = self.role_txn(Value::Array(compare), me, lease, next, vec![]).await?;
        Ok(settle(outcome, me, lease, next))
    }

    /// Keeps the role for `me` on a new lease: if the leader key names `me`
    /// and the epoch is `epoch`, the key is put again on `lease` and the
    /// epoch becomes `next` (at or above `epoch`), in one transaction. An
    /// active that restarted (its old lease still alive) re-claims its key
    /// so, at the same epoch; one an operator named again at a higher epoch
    /// records that epoch.
    pub async fn claim(&self, me: &str, lease: i64, epoch: u64, next: u64) -> Result<TxnOutcome, EtcdError> {
        if next < epoch || next > crate::state::MAX_EPOCH {
            return Err(self.bad(format!("cannot move the epoch from {epoch} to {next}")));
        }
        let compare = json!([
            { "key": b64(&self.leader_key()), "target": "VALUE", "result": "EQUAL", "value": b64(me) },
            self.epoch_is(epoch),
            self.absent(&self.handover_key()),
        ]);
        let outcome = self.role_txn(compare, me, lease, next, vec![]).await?;
        Ok(settle(outcome, me, lease, next))
    }

    /// A switchover: if the leader key names `old.name` on `old.lease` and
    /// the epoch is `epoch`, the leader becomes `to` on `lease` and the
    /// epoch `epoch + 1`, and the handover key names the old active on the
    /// old active's lease, all in one transaction.
    ///
    /// The handover key keeps every take (the target's [`Client::claim`]
    /// included) refused until the old active's lease is gone: the old
    /// agent revokes it as it steps down, or it lapses after `ttl`, by
    /// which time an old active that heard nothing has demoted itself (its
    /// renewal sees the key name another node). So the target acts only
    /// after the old active stopped. `lease` is meant to be one nobody
    /// renews (the controller's): the target claims the key onto a lease
    /// of its own, and if it never does (it died), the key lapses with
    /// `lease` and an automatic failover follows.
    pub async fn switch(&self, old: &Leader, to: &str, lease: i64, epoch: u64) -> Result<TxnOutcome, EtcdError> {
        let next = self.next_epoch(epoch)?;
        let compare = json!([
            { "key": b64(&self.leader_key()), "target": "VALUE", "result": "EQUAL", "value": b64(&old.name) },
            { "key": b64(&self.leader_key()), "target": "LEASE", "result": "EQUAL", "lease": old.lease.to_string() },
            self.epoch_is(epoch),
        ]);
        let marker = json!({ "request_put": {
            "key": b64(&self.handover_key()), "value": b64(&old.name), "lease": old.lease.to_string()
        } });
        let outcome = self.role_txn(compare, to, lease, next, vec![marker]).await?;
        Ok(settle(outcome, to, lease, next))
    }

    /// Hands the role from `me` to `other`: if the leader key names `me` and
    /// the epoch is `epoch`, the leader becomes `other` on `other_lease` (a
    /// lease the new leader then keeps alive) and the epoch `epoch + 1`.
    pub async fn hand_over(
        &self,
        me: &str,
        other: &str,
        other_lease: i64,
        epoch: u64,
    ) -> Result<TxnOutcome, EtcdError> {
        let next = self.next_epoch(epoch)?;
        let compare = json!([
            { "key": b64(&self.leader_key()), "target": "VALUE", "result": "EQUAL", "value": b64(me) },
            self.epoch_is(epoch),
        ]);
        let outcome = self.role_txn(compare, other, other_lease, next, vec![]).await?;
        Ok(settle(outcome, other, other_lease, next))
    }

    pub(super) async fn role_txn(
        &self,
        compare: Value,
        leader: &str,
        lease: i64,
        next: u64,
        also: Vec<Value>,
    ) -> Result<TxnOutcome, EtcdError> {
        let mut success = vec![
            json!({ "request_put": { "key": b64(&self.leader_key()), "value": b64(leader), "lease": lease.to_string() } }),
            json!({ "request_put": { "key": b64(&self.epoch_key()), "value": b64(&next.to_string()) } }),
        ];
        success.extend(also);
        let body = json!({
            "compare": compare,
            "success": success,
            "failure": self.role_ranges(),
        });
        let v = self.call("/v3/kv/txn", &body).await?;
        if v["succeeded"] == Value::Bool(true) {
            Ok(TxnOutcome::Done(next))
        } else {
            Ok(TxnOutcome::Refused(self.role_from(&v)?))
        }
    }

    fn next_epoch(&self, epoch: u64) -> Result<u64, EtcdError> {
        crate::state::next_epoch(epoch).map_err(|e| self.bad(e.to_string()))
    }

    /// The comparison "the epoch is `epoch`" (0: the key does not exist).
    fn epoch_is(&self, epoch: u64) -> Value {
        if epoch == 0 {
            self.absent(&self.epoch_key())
        } else {
            json!({ "key": b64(&self.epoch_key()), "target": "VALUE", "result": "EQUAL", "value": b64(&epoch.to_string()) })
        }
    }

    /// The comparison "`key` does not exist".
    pub(super) fn absent(&self, key: &str) -> Value {
        json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
    }
}
