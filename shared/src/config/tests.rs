//! The cluster file's parser and validation, from text to errors.

use super::*;
use crate::compress::Compress;

fn sample() -> String {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    let (key_a, key_b) = KEYS.get_or_init(|| {
        (
            crate::keys::SecretKey::generate().public().to_openssh(),
            crate::keys::SecretKey::generate().public().to_openssh(),
        )
    });
    format!(
        r#"
[cluster]
name = "pe-prod"
preferred_active = "a"
state_dir = "/var/lib/warmspare"
key_file = "/etc/warmspare/node.key"

[[node]]
name = "a"
ssh = "127.0.0.1:7422"
http = "127.0.0.1:7480"
public_key = "{key_a}"

[[node]]
name = "b"
ssh = "localhost:7423"
public_key = "{key_b}"
root = "/srv/lab/b"

[[watch]]
name = "ca"
path = "/etc/puppetlabs/puppet/ssl/ca"
exclude = ["signed/b.pem"]

[[job]]
name = "rbac"
schedule = "0 10 * * * *"
dump = "pg_dump"
restore = "psql"
timeout = "10m"
"#
    )
}

fn parse(text: &str) -> Result<Cluster, ConfigError> {
    Cluster::parse(text, Path::new("cluster.toml"))
}

#[test]
fn max_delete_parses_shares_and_counts() {
    let with = |v: &str| parse(&sample().replace("exclude = [", &format!("max_delete = {v}\nexclude = [")));
    assert_eq!(parse(&sample()).unwrap().watch[0].max_delete, DeleteLimit::Share(50));
    assert_eq!(with("\"25%\"").unwrap().watch[0].max_delete, DeleteLimit::Share(25));
    assert_eq!(with("\"200\"").unwrap().watch[0].max_delete, DeleteLimit::Count(200));
    assert_eq!(with("7").unwrap().watch[0].max_delete, DeleteLimit::Count(7));
    assert!(with("\"101%\"").is_err());
    assert!(with("\"half\"").is_err());
    assert!(with("-3").is_err());
    // The default is not written in the canonical form (hashes stay as they were).
    assert!(!parse(&sample()).unwrap().canonical().contains("max_delete"));
    assert!(with("\"25%\"").unwrap().canonical().contains("max_delete = \"25%\""));
    let d = DeleteLimit::DEFAULT;
    assert!(!d.holds(9, 10), "fewer than ten files are never held by a share");
    assert!(d.holds(10, 10));
    assert!(!d.holds(50, 100));
    assert!(d.holds(51, 100));
    assert!(!DeleteLimit::Share(100).holds(1000, 1000));
    assert!(DeleteLimit::Count(3).holds(4, 1_000_000));
    assert!(!DeleteLimit::Count(3).holds(3, 3));
}

#[test]
fn parses_the_sample() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.node.len(), 2);
    assert_eq!(c.watch[0].debounce_ms, 0);
    assert_eq!(c.job[0].timeout(), Duration::from_secs(600));
    assert_eq!(c.job[0].keep, DEFAULT_KEEP);
    let b = c.node("b").unwrap();
    assert_eq!(c.state_dir(b), PathBuf::from("/srv/lab/b/var/lib/warmspare"));
}

#[test]
fn diverged_bounds_parse_with_defaults() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.cluster.diverged_max_size, 1 << 30);
    assert_eq!(c.cluster.diverged_max_age, Duration::from_secs(30 * 86_400));
    assert!(!c.canonical().contains("diverged"), "defaults change the hash");
    for (size, want) in [
        ("1GiB", Some(1u64 << 30)),
        ("500MB", Some(500_000_000)),
        ("64 KiB", Some(65_536)),
        ("10", Some(10)),
        ("1PB", None),
        ("x", None),
        ("-1", None),
    ] {
        assert_eq!(parse_size(size), want, "{size}");
    }
    let bad = sample().replacen("\n\n[[node]]", "\ndiverged_max_size = \"lots\"\n\n[[node]]", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.diverged_max_size"), "{e}");
    let good = sample().replacen(
        "\n\n[[node]]",
        "\ndiverged_max_size = \"300MB\"\ndiverged_max_age = \"12h\"\n\n[[node]]",
        1,
    );
    let c = parse(&good).unwrap();
    assert_eq!(c.cluster.diverged_max_size, 300_000_000);
    assert_eq!(c.cluster.diverged_max_age, Duration::from_secs(12 * 3600));
    assert!(c.canonical().contains("diverged_max_size"), "{}", c.canonical());
}

#[test]
fn undo_bounds_parse_with_defaults_and_spanned_errors() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.cluster.undo_max_size, 1 << 30);
    assert_eq!(c.cluster.undo_max_age, Duration::from_secs(7 * 86_400));
    assert!(!c.canonical().contains("undo"), "defaults change the hash");
    let bad = sample().replacen("\n\n[[node]]", "\nundo_max_size = \"lots\"\n\n[[node]]", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.undo_max_size"), "{e}");
    assert!(e.line.is_some_and(|l| l > 0), "{e}");
    let bad = sample().replacen("\n\n[[node]]", "\nundo_max_age = \"soon\"\n\n[[node]]", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.undo_max_age"), "{e}");
    let good = sample().replacen(
        "\n\n[[node]]",
        "\nundo_max_size = \"64MiB\"\nundo_max_age = \"2d\"\n\n[[node]]",
        1,
    );
    let c = parse(&good).unwrap();
    assert_eq!(c.cluster.undo_max_size, 64 << 20);
    assert_eq!(c.cluster.undo_max_age, Duration::from_secs(2 * 86_400));
    assert!(c.canonical().contains("undo_max_size"), "{}", c.canonical());
}

#[test]
fn undo_when_full_refuses_by_default_and_is_checked() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.cluster.undo_when_full, UndoWhenFull::Refuse);
    let good = sample().replacen("\n\n[[node]]", "\nundo_when_full = \"replace\"\n\n[[node]]", 1);
    let c = parse(&good).unwrap();
    assert_eq!(c.cluster.undo_when_full, UndoWhenFull::Replace);
    assert!(c.canonical().contains("undo_when_full"), "{}", c.canonical());
    let bad = sample().replacen("\n\n[[node]]", "\nundo_when_full = \"overwrite\"\n\n[[node]]", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.undo_when_full"), "{e}");
    assert!(e.line.is_some_and(|l| l > 0), "{e}");
    assert!(
        e.to_string().contains("\"overwrite\" is not \"refuse\" or \"replace\""),
        "{e}"
    );
}

#[test]
fn compress_is_auto_by_default_with_a_per_node_override() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.cluster.compress, Compress::Auto);
    assert_eq!(c.compress_of(&c.node[0]), Compress::Auto);
    assert!(!c.canonical().contains("compress"), "{}", c.canonical());
    let good = sample()
        .replacen("\n\n[[node]]", "\ncompress = \"never\"\n\n[[node]]", 1)
        .replacen(
            "root = \"/srv/lab/b\"",
            "root = \"/srv/lab/b\"\ncompress = \"always\"",
            1,
        );
    let c = parse(&good).unwrap();
    assert_eq!(c.cluster.compress, Compress::Never);
    assert_eq!(c.compress_of(&c.node[0]), Compress::Never);
    assert_eq!(c.compress_of(&c.node[1]), Compress::Always);
    assert!(c.canonical().contains("compress = \"always\""), "{}", c.canonical());
}

#[test]
fn a_bad_compress_value_names_its_key_and_line() {
    let bad = sample().replacen("\n\n[[node]]", "\ncompress = \"fast\"\n\n[[node]]", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.compress"), "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(
        e.to_string()
            .contains("\"fast\" is not \"auto\", \"always\" or \"never\""),
        "{e}"
    );
    let bad = sample().replacen("root = \"/srv/lab/b\"", "root = \"/srv/lab/b\"\ncompress = true", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("compress"), "{e}");
    assert!(e.line.is_some_and(|l| l > 0), "{e}");
    let bad = sample().replacen("root = \"/srv/lab/b\"", "root = \"/srv/lab/b\"\ncompress = \"on\"", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("node[1].compress"), "{e}");
}

#[test]
fn load_refuses_a_file_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cluster.toml");
    std::fs::write(&p, sample()).unwrap();
    for mode in [0o666, 0o664, 0o646, 0o620] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = Cluster::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("cluster.toml") && e.contains(&format!("{mode:04o}")) && e.contains("refused"),
            "{e}"
        );
    }
    for mode in [0o644, 0o640, 0o600] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(Cluster::load(&p).is_ok(), "{mode:o}");
    }
}

#[test]
fn hash_ignores_layout_and_comments() {
    let a = parse(&sample()).unwrap();
    let text = sample()
        .replace("[[watch]]", "# a comment\n[[watch]]")
        .replace(" = ", "=");
    let b = parse(&text).unwrap();
    assert_eq!(a.hash(), b.hash());
    let changed = parse(&sample().replace("signed/b.pem", "signed/c.pem")).unwrap();
    assert_ne!(a.hash(), changed.hash());
}

#[test]
fn canonical_form_parses_back_to_the_same_cluster() {
    let a = parse(&sample()).unwrap();
    let b = parse(&a.canonical()).unwrap();
    assert_eq!(a, b);
    assert!(a.canonical().contains("timeout = \"10m\""), "{}", a.canonical());
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = sample()
        .replace("debounce", "x")
        .replace("exclude = [", "colour = 3\nexclude = [");
    let err = parse(&text).unwrap_err();
    let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
    assert_eq!(err.line, Some(line), "{err}");
    assert!(err.to_string().contains("colour"), "{err}");
}

#[test]
fn duplicate_node_is_refused_with_line() {
    let text = sample().replace("name = \"b\"", "name = \"a\"");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("node[1].name"));
    let line = text
        .match_indices("name = \"a\"")
        .nth(1)
        .map(|(p, _)| line_col(&text, p).0);
    assert_eq!(err.line, line, "{err}");
}

#[test]
fn bad_cron_and_glob_are_refused() {
    let err = parse(&sample().replace("0 10 * * * *", "every hour")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("job[0].schedule"), "{err}");
    assert!(err.line.is_some());
    let err = parse(&sample().replace("signed/b.pem", "signed/[b.pem")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("watch[0].exclude[0]"), "{err}");
}

#[test]
fn hooks_parse_with_node_overrides_and_bad_values_name_key_and_line() {
    let text = sample().replace(
        "key_file = \"/etc/warmspare/node.key\"\n",
        "key_file = \"/etc/warmspare/node.key\"\non_promote = \"enable-ca\"\non_demote = \"disable-ca\"\nhook_timeout = \"90s\"\n",
    );
    let text = text.replace(
        "root = \"/srv/lab/b\"",
        "root = \"/srv/lab/b\"\non_promote = \"b-promote\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.cluster.hook_timeout, Duration::from_secs(90));
    let (a, b) = (c.node("a").unwrap(), c.node("b").unwrap());
    assert_eq!(c.hook(a, Hook::OnPromote), Some("enable-ca"));
    assert_eq!(c.hook(b, Hook::OnPromote), Some("b-promote"));
    assert_eq!(c.hook(b, Hook::OnDemote), Some("disable-ca"));
    assert_eq!(parse(&c.canonical()).unwrap(), c);
    let plain = parse(&sample()).unwrap();
    assert_eq!(plain.cluster.hook_timeout, DEFAULT_HOOK_TIMEOUT);
    assert_eq!(plain.hook(a, Hook::OnPromote), None);
    assert!(!plain.canonical().contains("hook_timeout"), "{}", plain.canonical());

    let bad = text.replace("\"90s\"", "\"soon\"");
    let err = parse(&bad).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("cluster.hook_timeout"), "{err}");
    let line = bad.lines().position(|l| l.starts_with("hook_timeout")).unwrap() + 1;
    assert_eq!(err.line, Some(line), "{err}");
    let err = parse(&text.replace("\"b-promote\"", "\"  \"")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("node[1].on_promote"), "{err}");
    let err = parse(&text.replace("\"90s\"", "\"0s\"")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("cluster.hook_timeout"), "{err}");
}

#[test]
fn after_apply_timeout_defaults_to_five_minutes_and_bad_values_name_the_key() {
    let plain = parse(&sample()).unwrap();
    assert_eq!(plain.watch[0].after_apply_timeout, DEFAULT_AFTER_APPLY_TIMEOUT);
    assert!(
        !plain.canonical().contains("after_apply_timeout"),
        "{}",
        plain.canonical()
    );
    let text = sample().replace(
        "exclude = [\"signed/b.pem\"]",
        "exclude = [\"signed/b.pem\"]\nafter_apply_timeout = \"90s\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.watch[0].after_apply_timeout, Duration::from_secs(90));
    assert_eq!(parse(&c.canonical()).unwrap(), c);
    for bad in ["\"soon\"", "\"0s\""] {
        let err = parse(&text.replace("\"90s\"", bad)).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("watch[0].after_apply_timeout"), "{err}");
        assert!(err.line.is_some(), "{err}");
    }
}

#[test]
fn preferred_active_must_be_a_node() {
    let err = parse(&sample().replace("preferred_active = \"a\"", "preferred_active = \"zz\"")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("cluster.preferred_active"), "{err}");
}

#[test]
fn relative_paths_and_bad_addresses_are_refused() {
    let err = parse(&sample().replace("\"/etc/puppetlabs/puppet/ssl/ca\"", "\"ssl/ca\"")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("watch[0].path"));
    let err = parse(&sample().replace("localhost:7423", "localhost")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("node[1].ssh"));
}

/// The sample with an `[etcd]` table holding `body` inserted before the nodes.
fn with_etcd(body: &str) -> String {
    sample().replacen("\n[[node]]", &format!("\n[etcd]\n{body}\n\n[[node]]"), 1)
}

#[test]
fn without_etcd_nothing_changes() {
    let c = parse(&sample()).unwrap();
    assert_eq!(c.etcd, None);
    assert!(c.node.iter().all(|n| n.failover));
    let canonical = c.canonical();
    assert!(
        !canonical.contains("etcd") && !canonical.contains("failover"),
        "{canonical}"
    );
}

#[test]
fn etcd_defaults_follow_the_cluster_name() {
    let c = parse(&with_etcd(
        "endpoints = [\"http://127.0.0.1:2379\", \"http://[::1]:2380/\"]",
    ))
    .unwrap();
    let e = c.etcd.clone().unwrap();
    assert_eq!(e.prefix, "/warmspare/pe-prod");
    assert_eq!(e.ttl, DEFAULT_ETCD_TTL);
    assert_eq!(e.loop_wait, DEFAULT_ETCD_LOOP_WAIT);
    assert_eq!(e.retry_timeout, DEFAULT_ETCD_RETRY_TIMEOUT);
    assert_eq!(e.max_lag_on_failover, DEFAULT_MAX_LAG_ON_FAILOVER);
    assert!(!e.failsafe && !e.tls());
    assert_eq!(e.confirm_window(), Duration::from_secs(20));
    assert_eq!(e.endpoints[1].host, "::1");
    assert_eq!(e.endpoints[1].to_string(), "http://[::1]:2380");
    // The canonical form reads back to the same cluster.
    assert_eq!(parse(&c.canonical()).unwrap(), c);
}

#[test]
fn etcd_with_tls_and_a_node_that_never_fails_over() {
    let text = with_etcd(
        "endpoints = [\"https://e1:2379\", \"https://e2:2379\", \"https://e3:2379\"]\n\
         prefix = \"/ws/prod\"\nttl = \"20s\"\nloop_wait = \"5s\"\nretry_timeout = \"5s\"\n\
         ca = \"/etc/warmspare/etcd-ca.pem\"\ncert = \"/etc/warmspare/etcd.pem\"\nkey = \"/etc/warmspare/etcd.key\"\n\
         max_lag_on_failover = \"30s\"\nfailsafe = true",
    )
    .replace("root = \"/srv/lab/b\"", "root = \"/srv/lab/b\"\nfailover = false");
    let c = parse(&text).unwrap();
    let e = c.etcd.clone().unwrap();
    assert!(e.tls() && e.failsafe);
    assert_eq!(e.prefix, "/ws/prod");
    assert_eq!(
        (e.ttl, e.loop_wait, e.retry_timeout),
        (Duration::from_secs(20), Duration::from_secs(5), Duration::from_secs(5))
    );
    assert_eq!(e.max_lag_on_failover, Duration::from_secs(30));
    assert_eq!(e.key.as_deref(), Some(Path::new("/etc/warmspare/etcd.key")));
    assert!(c.node[0].failover);
    assert!(!c.node[1].failover);
    assert!(c.canonical().contains("failover = false"), "{}", c.canonical());
    assert_eq!(parse(&c.canonical()).unwrap(), c);
}

#[test]
fn bad_etcd_values_name_key_and_line() {
    let ok = "endpoints = [\"http://127.0.0.1:2379\"]";
    let cases: &[(&str, &str, &str)] = &[
        ("endpoints = []", "etcd.endpoints", "endpoints"),
        ("endpoints = [\"127.0.0.1:2379\"]", "etcd.endpoints[0]", "endpoints"),
        ("endpoints = [\"http://127.0.0.1\"]", "etcd.endpoints[0]", "endpoints"),
        ("endpoints = [\"http://h:1/v3\"]", "etcd.endpoints[0]", "endpoints"),
        (
            "endpoints = [\"http://a:1\",\n\"https://b:1\"]",
            "etcd.endpoints[1]",
            "\"https://b:1\"]",
        ),
        (
            "endpoints = [\"http://a:1\",\n\"http://a:1\"]",
            "etcd.endpoints[1]",
            "\"http://a:1\"]",
        ),
        (&format!("{ok}\nprefix = \"warmspare\""), "etcd.prefix", "prefix"),
        (&format!("{ok}\nprefix = \"/warmspare/\""), "etcd.prefix", "prefix"),
        (&format!("{ok}\nttl = \"soon\""), "etcd.ttl", "ttl"),
        (&format!("{ok}\nttl = \"1s\"\nloop_wait = \"1s\""), "etcd.ttl", "ttl"),
        (&format!("{ok}\nttl = \"20s\""), "etcd.ttl", "ttl"),
        (&format!("{ok}\nloop_wait = \"0s\""), "etcd.loop_wait", "loop_wait"),
        (&format!("{ok}\nretry_timeout = \"25s\""), "etcd.ttl", "["),
        (&format!("{ok}\nca = \"/ca.pem\""), "etcd.ca", "ca"),
        ("endpoints = [\"https://a:1\"]\nca = \"ca.pem\"", "etcd.ca", "ca"),
        (
            "endpoints = [\"https://a:1\"]\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
            "etcd.ca",
            "[",
        ),
        (
            "endpoints = [\"https://a:1\"]\nca = \"/ca.pem\"\nkey = \"/k.pem\"",
            "etcd.key",
            "key",
        ),
        (
            "endpoints = [\"https://a:1\"]\nca = \"/ca.pem\"\ncert = \"/c.pem\"",
            "etcd.cert",
            "cert",
        ),
        (
            &format!("{ok}\nmax_lag_on_failover = \"far\""),
            "etcd.max_lag_on_failover",
            "max_lag",
        ),
        (&format!("{ok}\nfailsafe = \"yes\""), "failsafe", "failsafe"),
        (&format!("{ok}\ncolour = 1"), "colour", "colour"),
    ];
    for (body, key, line_start) in cases {
        let text = with_etcd(body);
        let err = parse(&text).expect_err(body);
        assert!(
            err.key.as_deref().is_some_and(|k| k.contains(key)) || err.message.contains(key),
            "{body}: {err}"
        );
        let etcd_at = text.lines().position(|l| l == "[etcd]").unwrap();
        let line = text
            .lines()
            .enumerate()
            .skip(etcd_at)
            .find(|(_, l)| l.starts_with(line_start))
            .map(|(i, _)| i + 1);
        assert_eq!(err.line, line, "{body}: {err}");
    }
}

#[test]
fn node_failover_must_be_a_boolean() {
    let err =
        parse(&sample().replace("root = \"/srv/lab/b\"", "root = \"/srv/lab/b\"\nfailover = \"no\"")).unwrap_err();
    assert!(
        err.key.as_deref() == Some("failover") || err.message.contains("failover"),
        "{err}"
    );
    assert!(err.line.is_some(), "{err}");
}
