//! The optional `[etcd]` table: where the role lives when failover is
//! automatic, and the timing of the active's lease.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// The default of `ttl`: the leader lease's time to live.
pub const DEFAULT_ETCD_TTL: Duration = Duration::from_secs(30);
/// The default of `loop_wait`: how often the active renews its lease.
pub const DEFAULT_ETCD_LOOP_WAIT: Duration = Duration::from_secs(10);
/// The default of `retry_timeout`: how long a due renewal may stay
/// unconfirmed before the active demotes itself.
pub const DEFAULT_ETCD_RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of `max_lag_on_failover`.
pub const DEFAULT_MAX_LAG_ON_FAILOVER: Duration = Duration::from_secs(60);

/// The `[etcd]` table: the etcd v3 cluster the agents coordinate through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Etcd {
    /// The members' client URLs, `http://host:port` or `https://host:port`.
    pub endpoints: Vec<Endpoint>,
    /// The key prefix of this cluster's keys (default `/warmspare/<name>`).
    pub prefix: String,
    /// The leader lease's time to live.
    #[serde(serialize_with = "super::serialize_duration")]
    pub ttl: Duration,
    /// How often the active renews its lease.
    #[serde(serialize_with = "super::serialize_duration")]
    pub loop_wait: Duration,
    /// How long a due renewal may stay unconfirmed before the active
    /// demotes itself.
    #[serde(serialize_with = "super::serialize_duration")]
    pub retry_timeout: Duration,
    /// The CA that signed the members' server certificates (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This node's client certificate for etcd (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A passive further behind than this is never promoted automatically.
    #[serde(serialize_with = "super::serialize_duration")]
    pub max_lag_on_failover: Duration,
    /// Whether an active that loses etcd but still reaches every passive
    /// may keep its role.
    pub failsafe: bool,
}

impl Etcd {
    /// How long after the send of its last renewal that succeeded an active
    /// still counts as confirmed: the next renewal is due `loop_wait` after
    /// it, and may then stay unconfirmed for `retry_timeout`. Validation
    /// keeps this below `ttl`, so the active demotes before its lease can
    /// lapse on the server.
    pub fn confirm_window(&self) -> Duration {
        self.loop_wait + self.retry_timeout
    }

    /// Whether the endpoints are dialed with TLS.
    pub fn tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.tls)
    }
}

/// One etcd client URL: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Whether the URL is `https`.
    pub tls: bool,
    /// The host: a name or an address (an IPv6 address without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port` (a trailing `/` is
    /// allowed, nothing else after the port).
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(format!("{text:?}: only a scheme, a host and a port are allowed"));
        }
        let (host, port) = super::split_host_port(rest)
            .ok_or_else(|| format!("{text:?} has no host:port (for example \"https://10.0.0.1:2379\")"))?;
        if port == 0 {
            return Err(format!("{text:?}: the port must not be 0"));
        }
        Ok(Endpoint {
            tls,
            host: host.to_string(),
            port,
        })
    }

    /// `host:port`, with an IPv6 address in brackets (the HTTP `Host`).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
