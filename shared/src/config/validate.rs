//! Validation of the raw, spanned cluster file into a [`Cluster`]: one
//! function per section, each error located at the value it is about.
//!
//! The sections are checked in the file's order of importance (`[cluster]`,
//! the nodes, the operators, the watches, the jobs), and the first problem
//! found is the one reported.

use std::net::SocketAddr;
use std::path::{Component, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;

use super::error::{ConfigError, Locator};
use super::raw::{RawCluster, RawEtcd, RawFile, RawJob, RawLimit, RawNode, RawOperator, RawWatch};
use super::{
    parse_size, split_host_port, Cluster, ClusterSection, DeleteLimit, Endpoint, Etcd, Job, Node, Operator,
    UndoWhenFull, Watch, DEFAULT_AFTER_APPLY_TIMEOUT, DEFAULT_DIVERGED_MAX_AGE, DEFAULT_DIVERGED_MAX_SIZE,
    DEFAULT_ETCD_LOOP_WAIT, DEFAULT_ETCD_RETRY_TIMEOUT, DEFAULT_ETCD_TTL, DEFAULT_HOOK_TIMEOUT, DEFAULT_JOB_TIMEOUT,
    DEFAULT_KEEP, DEFAULT_MAX_LAG_ON_FAILOVER, DEFAULT_UNDO_MAX_AGE, DEFAULT_UNDO_MAX_SIZE,
};
use crate::compress::Compress;
use crate::keys::PublicKey;

/// Checks every section of `raw` and builds the cluster.
pub(super) fn validate(raw: RawFile, loc: &Locator<'_>) -> Result<Cluster, ConfigError> {
    let cluster_span = raw.cluster.span();
    let c = raw.cluster.into_inner();
    let cluster = cluster_section(&c, loc)?;
    let node = nodes(&raw.node, loc)?;
    if node.is_empty() {
        return Err(loc.err(
            cluster_span,
            "node".into(),
            "the cluster needs at least one [[node]]".into(),
        ));
    }
    if !node.iter().any(|n| n.name == cluster.preferred_active) {
        return Err(loc.at(
            &c.preferred_active,
            "cluster.preferred_active".into(),
            format!("{:?} is not the name of a [[node]]", cluster.preferred_active),
        ));
    }
    let etcd = match &raw.etcd {
        Some(e) => Some(etcd(e, &cluster.name, loc)?),
        None => None,
    };
    Ok(Cluster {
        cluster,
        etcd,
        node,
        operator: operators(&raw.operator, loc)?,
        watch: watches(&raw.watch, loc)?,
        job: jobs(&raw.job, loc)?,
    })
}

/// The `[cluster]` table.
fn cluster_section(c: &RawCluster, loc: &Locator<'_>) -> Result<ClusterSection, ConfigError> {
    let t = Table::new(loc, "cluster");
    Ok(ClusterSection {
        name: check_name(loc, &c.name, "cluster.name".into())?,
        preferred_active: c.preferred_active.get_ref().clone(),
        state_dir: check_absolute(loc, &c.state_dir, "cluster.state_dir".into())?,
        key_file: check_absolute(loc, &c.key_file, "cluster.key_file".into())?,
        on_promote: check_command(loc, c.on_promote.as_ref(), "cluster.on_promote".into())?,
        on_demote: check_command(loc, c.on_demote.as_ref(), "cluster.on_demote".into())?,
        hook_timeout: t.whole_seconds(&c.hook_timeout, "hook_timeout", "5m", DEFAULT_HOOK_TIMEOUT)?,
        diverged_max_size: t.size(&c.diverged_max_size, "diverged_max_size", DEFAULT_DIVERGED_MAX_SIZE)?,
        diverged_max_age: t.duration(&c.diverged_max_age, "diverged_max_age", "30d", DEFAULT_DIVERGED_MAX_AGE)?,
        undo_max_size: t.size(&c.undo_max_size, "undo_max_size", DEFAULT_UNDO_MAX_SIZE)?,
        undo_max_age: t.duration(&c.undo_max_age, "undo_max_age", "7d", DEFAULT_UNDO_MAX_AGE)?,
        undo_when_full: match &c.undo_when_full {
            Some(v) => check_undo_when_full(loc, v, "cluster.undo_when_full".into())?,
            None => UndoWhenFull::default(),
        },
        compress: match &c.compress {
            Some(v) => check_compress(loc, v, "cluster.compress".into())?,
            None => Compress::default(),
        },
    })
}

/// The `[[node]]` tables: names and keys unique, addresses that parse.
fn nodes(raw: &[Spanned<RawNode>], loc: &Locator<'_>) -> Result<Vec<Node>, ConfigError> {
    let mut nodes: Vec<Node> = Vec::new();
    for (i, n) in raw.iter().enumerate() {
        let n = n.get_ref();
        let name = check_name(loc, &n.name, format!("node[{i}].name"))?;
        if nodes.iter().any(|o| o.name == name) {
            return Err(loc.at(
                &n.name,
                format!("node[{i}].name"),
                format!("duplicate node name {name:?}"),
            ));
        }
        if split_host_port(n.ssh.get_ref()).is_none() {
            return Err(loc.at(
                &n.ssh,
                format!("node[{i}].ssh"),
                format!("{:?} is not a host:port address", n.ssh.get_ref()),
            ));
        }
        let t = Table::new(loc, format!("node[{i}]"));
        let listen = t.socket_addr(&n.listen, "listen")?;
        let http = t.socket_addr(&n.http, "http")?;
        let public_key = check_key(loc, &n.public_key, format!("node[{i}].public_key"))?;
        if nodes.iter().any(|o| o.public_key == public_key) {
            return Err(loc.at(
                &n.public_key,
                format!("node[{i}].public_key"),
                "the same key is pinned for two nodes".into(),
            ));
        }
        let root = t.absolute(&n.root, "root")?;
        nodes.push(Node {
            name,
            ssh: n.ssh.get_ref().clone(),
            listen,
            http,
            public_key,
            root,
            env: n.env.clone(),
            on_promote: check_command(loc, n.on_promote.as_ref(), format!("node[{i}].on_promote"))?,
            on_demote: check_command(loc, n.on_demote.as_ref(), format!("node[{i}].on_demote"))?,
            failover: n.failover.unwrap_or(true),
            compress: match &n.compress {
                Some(v) => Some(check_compress(loc, v, format!("node[{i}].compress"))?),
                None => None,
            },
        });
    }
    Ok(nodes)
}

/// The `[etcd]` table: endpoints that parse (all `http` or all `https`),
/// a prefix that is a clean absolute key path, TLS files that go together,
/// and lease timing in which the active demotes before its lease can lapse
/// (`loop_wait + retry_timeout < ttl`).
fn etcd(raw: &Spanned<RawEtcd>, cluster_name: &str, loc: &Locator<'_>) -> Result<Etcd, ConfigError> {
    let span = raw.span();
    let e = raw.get_ref();
    if e.endpoints.get_ref().is_empty() {
        return Err(loc.at(
            &e.endpoints,
            "etcd.endpoints".into(),
            "needs at least one endpoint".into(),
        ));
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (i, text) in e.endpoints.get_ref().iter().enumerate() {
        let key = format!("etcd.endpoints[{i}]");
        let ep = Endpoint::parse(text.get_ref()).map_err(|m| loc.at(text, key.clone(), m))?;
        if endpoints.iter().any(|o| o.tls != ep.tls) {
            return Err(loc.at(text, key, "mixes http:// and https:// endpoints".into()));
        }
        if endpoints.contains(&ep) {
            return Err(loc.at(text, key, format!("duplicate endpoint {ep}")));
        }
        endpoints.push(ep);
    }
    let tls = endpoints.iter().any(|ep| ep.tls);
    let prefix = match &e.prefix {
        Some(p) => {
            let t = p.get_ref();
            let ok = t.starts_with('/')
                && t.len() > 1
                && !t.ends_with('/')
                && !t.contains("//")
                && t.len() <= 256
                && t.chars().all(|c| c.is_ascii_graphic());
            if !ok {
                return Err(loc.at(
                    p,
                    "etcd.prefix".into(),
                    format!("{t:?} is not a key prefix like \"/warmspare/pe-prod\" (starts with '/', no trailing '/', printable ASCII, at most 256)"),
                ));
            }
            t.clone()
        }
        None => format!("/warmspare/{cluster_name}"),
    };
    let t = Table::new(loc, "etcd");
    let ttl = t.whole_seconds(&e.ttl, "ttl", "10s", DEFAULT_ETCD_TTL)?;
    let loop_wait = t.whole_seconds(&e.loop_wait, "loop_wait", "10s", DEFAULT_ETCD_LOOP_WAIT)?;
    let retry_timeout = t.whole_seconds(&e.retry_timeout, "retry_timeout", "10s", DEFAULT_ETCD_RETRY_TIMEOUT)?;
    if ttl.as_secs() < 2 {
        let place = e.ttl.as_ref().map_or(span.clone(), |t| t.span());
        return Err(loc.err(place, "etcd.ttl".into(), "must be at least 2 seconds".into()));
    }
    if loop_wait + retry_timeout >= ttl {
        let place = e.ttl.as_ref().map_or(span.clone(), |t| t.span());
        return Err(loc.err(
            place,
            "etcd.ttl".into(),
            format!(
                "must be more than loop_wait + retry_timeout ({}s + {}s): the active must demote before its lease can lapse",
                loop_wait.as_secs(),
                retry_timeout.as_secs()
            ),
        ));
    }
    let ca = t.absolute(&e.ca, "ca")?;
    let cert = t.absolute(&e.cert, "cert")?;
    let key = t.absolute(&e.key, "key")?;
    match (&e.cert, &e.key) {
        (Some(c), None) => return Err(loc.at(c, "etcd.cert".into(), "needs `key` as well".into())),
        (None, Some(k)) => return Err(loc.at(k, "etcd.key".into(), "needs `cert` as well".into())),
        _ => {}
    }
    if !tls {
        if let Some(p) = e.ca.as_ref().or(e.cert.as_ref()) {
            let which = if e.ca.is_some() { "etcd.ca" } else { "etcd.cert" };
            return Err(loc.at(p, which.into(), "TLS files need https:// endpoints".into()));
        }
    } else if ca.is_none() {
        return Err(loc.err(
            span,
            "etcd.ca".into(),
            "https:// endpoints need `ca`, the CA that signed the members' certificates".into(),
        ));
    }
    let max_lag_on_failover = t.duration(
        &e.max_lag_on_failover,
        "max_lag_on_failover",
        "1m",
        DEFAULT_MAX_LAG_ON_FAILOVER,
    )?;
    Ok(Etcd {
        endpoints,
        prefix,
        ttl,
        loop_wait,
        retry_timeout,
        ca,
        cert,
        key,
        max_lag_on_failover,
        failsafe: e.failsafe,
    })
}

/// The `[[operator]]` tables: unique names, keys that parse.
fn operators(raw: &[Spanned<RawOperator>], loc: &Locator<'_>) -> Result<Vec<Operator>, ConfigError> {
    let mut operators: Vec<Operator> = Vec::new();
    for (i, o) in raw.iter().enumerate() {
        let o = o.get_ref();
        let name = check_name(loc, &o.name, format!("operator[{i}].name"))?;
        if operators.iter().any(|p| p.name == name) {
            return Err(loc.at(
                &o.name,
                format!("operator[{i}].name"),
                format!("duplicate operator name {name:?}"),
            ));
        }
        let public_key = check_key(loc, &o.public_key, format!("operator[{i}].public_key"))?;
        operators.push(Operator { name, public_key });
    }
    Ok(operators)
}

/// The `[[watch]]` tables: unique names outside the reserved `_` space,
/// paths that do not overlap, globs that compile, limits that parse.
fn watches(raw: &[Spanned<RawWatch>], loc: &Locator<'_>) -> Result<Vec<Watch>, ConfigError> {
    let mut watches: Vec<Watch> = Vec::new();
    for (i, w) in raw.iter().enumerate() {
        let w = w.get_ref();
        let name = check_name(loc, &w.name, format!("watch[{i}].name"))?;
        if name.starts_with('_') {
            return Err(loc.at(
                &w.name,
                format!("watch[{i}].name"),
                "names starting with '_' are reserved for warmspare's own watches".into(),
            ));
        }
        if watches.iter().any(|o| o.name == name) {
            return Err(loc.at(
                &w.name,
                format!("watch[{i}].name"),
                format!("duplicate watch name {name:?}"),
            ));
        }
        let path = check_absolute(loc, &w.path, format!("watch[{i}].path"))?;
        if let Some(other) = watches
            .iter()
            .find(|o| o.path.starts_with(&path) || path.starts_with(&o.path))
        {
            return Err(loc.at(
                &w.path,
                format!("watch[{i}].path"),
                format!("overlaps the path of watch {:?}", other.name),
            ));
        }
        let mut exclude = Vec::new();
        for (j, g) in w.exclude.iter().enumerate() {
            crate::manifest::Excludes::check_glob(g.get_ref())
                .map_err(|e| loc.at(g, format!("watch[{i}].exclude[{j}]"), e.to_string()))?;
            exclude.push(g.get_ref().clone());
        }
        let max_delete = match &w.max_delete {
            None => DeleteLimit::DEFAULT,
            Some(v) => match v.get_ref() {
                RawLimit::Count(n) => DeleteLimit::Count(*n),
                RawLimit::Text(t) => {
                    DeleteLimit::parse(t).map_err(|e| loc.at(v, format!("watch[{i}].max_delete"), e))?
                }
            },
        };
        let after_apply_timeout = Table::new(loc, format!("watch[{i}]")).whole_seconds(
            &w.after_apply_timeout,
            "after_apply_timeout",
            "5m",
            DEFAULT_AFTER_APPLY_TIMEOUT,
        )?;
        watches.push(Watch {
            name,
            path,
            exclude,
            debounce_ms: w.debounce_ms,
            after_apply: w.after_apply.clone(),
            after_apply_timeout,
            max_delete,
        });
    }
    Ok(watches)
}

/// The `[[job]]` tables: unique names, cron expressions that parse, and a
/// consistent choice of `dump`/`restore` or `run`.
fn jobs(raw: &[Spanned<RawJob>], loc: &Locator<'_>) -> Result<Vec<Job>, ConfigError> {
    let mut jobs: Vec<Job> = Vec::new();
    for (i, j) in raw.iter().enumerate() {
        let span = j.span();
        let j = j.get_ref();
        let name = check_name(loc, &j.name, format!("job[{i}].name"))?;
        if jobs.iter().any(|o| o.name == name) {
            return Err(loc.at(
                &j.name,
                format!("job[{i}].name"),
                format!("duplicate job name {name:?}"),
            ));
        }
        let t = Table::new(loc, format!("job[{i}]"));
        let schedule = t.cron(&j.schedule, "schedule")?;
        let restore_schedule = t.cron(&j.restore_schedule, "restore_schedule")?;
        let refuse = |key: String, message: &str| Err(loc.err(span.clone(), key, message.into()));
        if j.dump.is_none() && j.run.is_none() {
            return refuse(format!("job[{i}]"), "a job needs a `dump` or a `run` command");
        }
        if j.dump.is_some() && j.run.is_some() {
            return refuse(
                format!("job[{i}]"),
                "a job has either `dump` (with `restore`) or `run`, not both",
            );
        }
        if j.run.is_some() && j.restore.is_some() {
            return refuse(format!("job[{i}].restore"), "a `run` job has no `restore`");
        }
        if j.restore_schedule.is_some() && j.restore.is_none() {
            return refuse(
                format!("job[{i}].restore_schedule"),
                "`restore_schedule` needs a `restore` command",
            );
        }
        if j.on.is_some() && j.run.is_none() {
            return refuse(format!("job[{i}].on"), "`on` only applies to `run` jobs");
        }
        let keep = match &j.keep {
            Some(k) if *k.get_ref() < 1 || *k.get_ref() > 10_000 => {
                return Err(loc.at(k, format!("job[{i}].keep"), "must be between 1 and 10000".into()));
            }
            Some(k) => *k.get_ref() as u32,
            None => DEFAULT_KEEP,
        };
        let timeout = t.duration(&j.timeout, "timeout", "15m", DEFAULT_JOB_TIMEOUT)?;
        if timeout.is_zero() {
            if let Some(t) = &j.timeout {
                return Err(loc.at(t, format!("job[{i}].timeout"), "must be more than zero".into()));
            }
        }
        jobs.push(Job {
            name,
            schedule,
            dump: j.dump.clone(),
            restore: j.restore.clone(),
            run: j.run.clone(),
            on: j.on,
            restore_schedule,
            keep,
            timeout: Duration::from_secs(timeout.as_secs().max(1)),
        });
    }
    Ok(jobs)
}

/// A name: letters, digits, `-`, `_` and `.`, 1 to 64 of them.
fn check_name(loc: &Locator<'_>, name: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(loc.at(
            name,
            key,
            format!("{n:?} is not a valid name (letters, digits, '-', '_', '.'; at most 64)"),
        ));
    }
    Ok(n.clone())
}

/// An absolute path without `..`.
fn check_absolute(loc: &Locator<'_>, path: &Spanned<PathBuf>, key: String) -> Result<PathBuf, ConfigError> {
    let p = path.get_ref();
    if !p.is_absolute() {
        return Err(loc.at(path, key, format!("{} must be an absolute path", p.display())));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(loc.at(path, key, format!("{} must not contain '..'", p.display())));
    }
    Ok(p.clone())
}

/// An OpenSSH public key line, in its canonical form.
fn check_key(loc: &Locator<'_>, key_text: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    PublicKey::parse(key_text.get_ref())
        .map(|k| k.to_openssh())
        .map_err(|e| loc.at(key_text, key, e.to_string()))
}

/// A cron expression of 6 or 7 fields, seconds first.
fn check_cron(loc: &Locator<'_>, expr: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    let text = expr.get_ref();
    let fields = text.split_whitespace().count();
    if fields == 5 {
        return Err(loc.at(
            expr,
            key,
            format!(
                "cron expression {text:?} has 5 fields; warmspare's have 6 or 7, seconds first \
                 (for example \"0 {}\")",
                text.trim()
            ),
        ));
    }
    cron::Schedule::from_str(text).map(|_| text.clone()).map_err(|e| {
        loc.at(
            expr,
            key,
            format!("invalid cron expression {text:?} (6 or 7 fields, seconds first): {e}"),
        )
    })
}

/// An optional shell command: not empty, no NUL byte.
fn check_command(loc: &Locator<'_>, cmd: Option<&Spanned<String>>, key: String) -> Result<Option<String>, ConfigError> {
    match cmd {
        Some(c) if c.get_ref().trim().is_empty() => Err(loc.at(c, key, "the command is empty".into())),
        Some(c) if c.get_ref().contains('\0') => Err(loc.at(c, key, "the command contains a NUL byte".into())),
        Some(c) => Ok(Some(c.get_ref().clone())),
        None => Ok(None),
    }
}

/// An `ip:port` socket address.
fn check_socket_addr(loc: &Locator<'_>, addr: &Spanned<String>, key: String) -> Result<SocketAddr, ConfigError> {
    addr.get_ref().parse::<SocketAddr>().map_err(|e| {
        loc.at(
            addr,
            key,
            format!("{:?} is not an ip:port address: {e}", addr.get_ref()),
        )
    })
}

/// The optional keys of one table (`cluster`, `node[0]`, `etcd`...), each
/// checked under its full name (`cluster.undo_max_size`), or its default
/// when absent.
struct Table<'a, 'b> {
    loc: &'a Locator<'b>,
    name: String,
}

impl<'a, 'b> Table<'a, 'b> {
    fn new(loc: &'a Locator<'b>, name: impl Into<String>) -> Self {
        Table { loc, name: name.into() }
    }

    /// The full name of `key` of this table.
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    /// A size, or `default`.
    fn size(&self, v: &Option<Spanned<String>>, key: &str, default: u64) -> Result<u64, ConfigError> {
        v.as_ref()
            .map_or(Ok(default), |s| check_size(self.loc, s, self.key(key)))
    }

    /// A duration (`example` shown when it does not parse), or `default`.
    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        example: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        v.as_ref()
            .map_or(Ok(default), |t| check_duration(self.loc, t, self.key(key), example))
    }

    /// A time limit in whole seconds, at least one, or `default`.
    fn whole_seconds(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        example: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        v.as_ref()
            .map_or(Ok(default), |t| whole_seconds(self.loc, t, self.key(key), example))
    }

    /// An `ip:port` address, when set.
    fn socket_addr(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        v.as_ref()
            .map(|a| check_socket_addr(self.loc, a, self.key(key)))
            .transpose()
    }

    /// An absolute path, when set.
    fn absolute(&self, v: &Option<Spanned<PathBuf>>, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        v.as_ref()
            .map(|p| check_absolute(self.loc, p, self.key(key)))
            .transpose()
    }

    /// A cron expression, when set.
    fn cron(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<String>, ConfigError> {
        v.as_ref().map(|s| check_cron(self.loc, s, self.key(key))).transpose()
    }
}

/// `"refuse"` or `"replace"`.
fn check_undo_when_full(loc: &Locator<'_>, v: &Spanned<String>, key: String) -> Result<UndoWhenFull, ConfigError> {
    [UndoWhenFull::Refuse, UndoWhenFull::Replace]
        .into_iter()
        .find(|w| w.as_str() == v.get_ref())
        .ok_or_else(|| loc.at(v, key, format!("{:?} is not \"refuse\" or \"replace\"", v.get_ref())))
}

fn check_compress(loc: &Locator<'_>, v: &Spanned<String>, key: String) -> Result<Compress, ConfigError> {
    Compress::parse(v.get_ref()).ok_or_else(|| {
        loc.at(
            v,
            key,
            format!("{:?} is not \"auto\", \"always\" or \"never\"", v.get_ref()),
        )
    })
}

/// A size such as `"1GiB"` (see [`parse_size`]).
fn check_size(loc: &Locator<'_>, size: &Spanned<String>, key: String) -> Result<u64, ConfigError> {
    parse_size(size.get_ref()).ok_or_else(|| {
        loc.at(
            size,
            key,
            format!("{:?} is not a size like \"1GiB\" or \"500MB\"", size.get_ref()),
        )
    })
}

/// A duration such as `"30d"`; `example` is shown when it does not parse.
fn check_duration(loc: &Locator<'_>, t: &Spanned<String>, key: String, example: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(t.get_ref()).map_err(|e| {
        loc.at(
            t,
            key,
            format!("{:?} is not a duration like \"{example}\": {e}", t.get_ref()),
        )
    })
}

/// A time limit of at least one second, in whole seconds.
fn whole_seconds(loc: &Locator<'_>, t: &Spanned<String>, key: String, example: &str) -> Result<Duration, ConfigError> {
    let d = check_duration(loc, t, key.clone(), example)?;
    if d.as_secs() == 0 {
        return Err(loc.at(t, key, "must be at least one second".into()));
    }
    Ok(Duration::from_secs(d.as_secs()))
}
