//! The member records under `<prefix>/members/<name>`: each node publishes
//! its own on a lease (see [`super::elect`] for what they decide).

use std::collections::BTreeMap;

use serde_json::json;

use super::client::{b64, int, text};
use super::elect::MemberRecord;
use super::{Client, EtcdError};

impl Client {
    /// The key of `name`'s record: `<prefix>/members/<name>`.
    pub fn member_key(&self, name: &str) -> String {
        format!("{}/members/{name}", self.prefix())
    }

    /// Publishes this node's record as `name` on `lease` (it vanishes when
    /// the lease lapses).
    pub async fn publish_member(&self, name: &str, record: &MemberRecord, lease: i64) -> Result<(), EtcdError> {
        let value = serde_json::to_string(record).map_err(|e| self.bad(format!("encoding a member record: {e}")))?;
        let body = json!({ "key": b64(&self.member_key(name)), "value": b64(&value), "lease": lease.to_string() });
        self.call("/v3/kv/put", &body).await.map(|_| ())
    }

    /// Every member record, by name, with the revision they were read at. A
    /// record that does not parse counts as absent (its node is then not
    /// eligible): what is in etcd is not trusted further than that.
    pub async fn members(&self) -> Result<(BTreeMap<String, MemberRecord>, i64), EtcdError> {
        let from = format!("{}/members/", self.prefix());
        // The end of the range: the prefix with its last byte ('/') plus one.
        let to = format!("{}/members0", self.prefix());
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(&from), "range_end": b64(&to) }))
            .await?;
        let mut records = BTreeMap::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Ok(key), Ok(value)) = (text(&kv["key"]), text(&kv["value"])) else {
                continue;
            };
            let Some(name) = key.strip_prefix(&from) else {
                continue;
            };
            if let Ok(record) = serde_json::from_str::<MemberRecord>(&value) {
                records.insert(name.to_string(), record);
            }
        }
        Ok((records, int(&v["header"]["revision"])))
    }
}
