//! `warmsparectl`, as an operator runs it, against real agents.

use std::fs;
use std::process::Command;
use std::time::Duration;

use warmspare_tests::{
    bin, converge, exit_code, http_status, output_text, read, snapshot, wait_until, write_file, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

fn node_json<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap()
}

#[test]
fn demo_runs_a_pair_and_exits_zero() {
    let out = Command::new(bin("warmsparectl"))
        .args(["demo", "--certs", "2"])
        .output()
        .unwrap();
    let t = output_text(&out);
    assert!(out.status.success(), "demo failed: {t}");
    assert_eq!(t.matches("identical on masterb").count(), 2, "{t}");
    assert!(t.contains("stayed on mastera only"), "{t}");
    // The whole cluster file is printed, section headers included.
    assert!(t.contains("[cluster]") && t.matches("[[node]]").count() == 2, "{t}");
    // A failover after a crash, the old active stepping down with its
    // cut-off write preserved, and a failback.
    assert!(
        t.contains("promoting masterb to active at epoch 2 (mastera is unreachable)"),
        "{t}"
    );
    assert!(t.contains("stepped down"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.contains("/diverged/") && l.ends_with("signed/cutoff.example.com.pem")),
        "{t}"
    );
    assert!(
        t.contains("masterb is active at epoch 2") && t.contains("mastera is active at epoch 3"),
        "{t}"
    );
    assert!(t.contains("Next steps"), "{t}");
}

#[test]
fn switchover_swaps_roles_health_and_direction() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("signed/one.pem"), b"one", 0o644);
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&ra, &rb, LIMIT);
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("health endpoints", LIMIT, || {
        http_status(ha, "/_status/check") == Some(200) && http_status(hb, "/_status/check") == Some(503)
    });
    assert_eq!(http_status(ha, "/_status/ping"), Some(200));

    let dry = c.ctl(&["switchover", "--to", "b", "--dry-run"]);
    assert_eq!(exit_code(&dry), 0, "{}", output_text(&dry));
    assert_eq!(
        http_status(ha, "/_status/check"),
        Some(200),
        "a dry run changed the role"
    );
    let no_tty = c.ctl(&["switchover", "--to", "b"]);
    assert_eq!(
        exit_code(&no_tty),
        2,
        "without a terminal, --yes is required: {}",
        output_text(&no_tty)
    );

    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(http_status(ha, "/_status/check"), Some(503));
    assert_eq!(http_status(hb, "/_status/check"), Some(200));
    let st = c.status_json();
    assert_eq!(node_json(&st, "a")["status"]["role"]["epoch"], 2);
    assert_eq!(node_json(&st, "b")["status"]["role"]["active"], "b");

    // The new active ships to the old one.
    write_file(&rb.join("signed/two.pem"), b"two", 0o644);
    wait_until("b's file on a", LIMIT, || {
        read(&ra.join("signed/two.pem")).is_some_and(|d| d == b"two")
    });
    // The old active ships nothing: a file written there never reaches b, and
    // the next comparison from b preserves it under a's diverged/ folder.
    write_file(&ra.join("signed/stray.pem"), b"written on the passive", 0o644);
    let out = c.ctl(&["resync"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    wait_until("the stray file to be preserved on a", LIMIT, || {
        !ra.join("signed/stray.pem").exists()
    });
    assert!(!rb.join("signed/stray.pem").exists());
    let st = c.status_json();
    let diverged = node_json(&st, "a")["status"]["diverged"].as_array().unwrap();
    assert!(
        diverged
            .iter()
            .any(|d| d.as_str().unwrap().ends_with("ca/signed/stray.pem")),
        "{diverged:?}"
    );
    converge(&ra, &rb, LIMIT);
}

#[test]
fn failover_fences_the_old_primary_preserves_its_changes_and_failback_returns() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("signed/one.pem"), b"one", 0o644);
    write_file(&ra.join("serial"), b"1000\n", 0o644);
    let _b = c.start("b");
    let mut a = c.start("a");
    converge(&ra, &rb, LIMIT);
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);

    a.kill9();
    let refused = c.ctl(&["failover", "--to", "b"]);
    assert_eq!(exit_code(&refused), 3, "{}", output_text(&refused));
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(http_status(hb, "/_status/check"), Some(200));
    let st = c.status_json();
    assert_eq!(node_json(&st, "b")["status"]["role"]["epoch"], 2);
    assert_eq!(node_json(&st, "a")["reachable"], false);

    // While cut off, a's CA signed a certificate and bumped its serial; b moved on too.
    write_file(&ra.join("signed/cutoff.pem"), b"signed by the stale primary", 0o644);
    write_file(&ra.join("serial"), b"1001\n", 0o644);
    write_file(&rb.join("signed/new-on-b.pem"), b"signed by the new active", 0o644);
    write_file(&rb.join("serial"), b"2000\n", 0o644);

    a.restart();
    wait_until("a to step down", LIMIT, || {
        http_status(ha, "/_status/check") == Some(503)
    });
    converge(&rb, &ra, LIMIT);
    assert!(!ra.join("signed/cutoff.pem").exists());
    let st = c.status_json();
    let a_status = &node_json(&st, "a")["status"];
    assert_eq!(a_status["role"]["epoch"], 2);
    assert_eq!(a_status["role"]["active"], "b");
    let diverged: Vec<String> = a_status["diverged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert!(
        diverged
            .iter()
            .any(|d| d.starts_with("2-") && d.ends_with("ca/signed/cutoff.pem")),
        "{diverged:?}"
    );
    assert!(diverged.iter().any(|d| d.ends_with("ca/serial")), "{diverged:?}");
    let kept = c
        .node("a")
        .root
        .join("var/lib/warmspare/diverged")
        .join(diverged.iter().find(|d| d.ends_with("cutoff.pem")).unwrap());
    assert_eq!(read(&kept).unwrap(), b"signed by the stale primary");
    let human = output_text(&c.ctl(&["status"]));
    assert!(human.contains("diverged"), "{human}");
    // The shipping side never lost a step: nothing of a's stale state reached b.
    assert!(!rb.join("signed/cutoff.pem").exists());
    assert_eq!(read(&rb.join("serial")).unwrap(), b"2000\n");

    let out = c.ctl(&["failback", "--yes"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(http_status(ha, "/_status/check"), Some(200));
    assert_eq!(http_status(hb, "/_status/check"), Some(503));
    assert_eq!(snapshot(&ra), snapshot(&rb));
    write_file(&ra.join("signed/after.pem"), b"after failback", 0o644);
    wait_until("a's new file on b", LIMIT, || rb.join("signed/after.pem").exists());

    let hist = c.ctl(&["history", "--json"]);
    assert_eq!(exit_code(&hist), 0, "{}", output_text(&hist));
    let entries: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    let entries = entries.as_array().unwrap();
    let epochs: Vec<u64> = entries.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, [1, 2, 3], "{entries:?}");
    assert_eq!(
        entries[1]["reason"],
        "failover",
        "{entries:?}\n{}",
        fs::read_to_string(c.node("b").root.join("var/lib/warmspare/history.jsonl")).unwrap_or_default()
    );
    assert_eq!(entries[1]["to"], "b");
    assert_eq!(entries[2]["reason"], "failback");
    assert_eq!(entries[2]["to"], "a");
    assert!(entries[2]["by"].as_str().unwrap().contains("tester"));
}

#[test]
fn two_concurrent_switchovers_cannot_both_win() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let _a = c.start("a");
    write_file(&c.ca("a").join("x"), b"x", 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    let run = |c: &TestCluster| {
        Command::new(bin("warmsparectl"))
            .arg("--cluster")
            .arg(&c.file)
            .arg("--key")
            .arg(&c.operator_key)
            .args(["switchover", "--to", "b", "--yes"])
            .output()
            .unwrap()
    };
    let (one, two) = std::thread::scope(|s| {
        let h1 = s.spawn(|| run(&c));
        let h2 = s.spawn(|| run(&c));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    let mut codes = [exit_code(&one), exit_code(&two)];
    codes.sort();
    assert_eq!(
        codes,
        [0, 3],
        "one:\n{}\ntwo:\n{}",
        output_text(&one),
        output_text(&two)
    );
    let st = c.status_json();
    assert_eq!(
        node_json(&st, "b")["status"]["role"]["epoch"],
        2,
        "exactly one epoch change"
    );
}

#[test]
fn an_operator_key_not_in_the_cluster_file_is_refused() {
    let c = TestCluster::pair("");
    let _a = c.start("a");
    wait_until("a up", LIMIT, || exit_code(&c.ctl(&["status"])) == 0);
    // A controller whose own copy of the file lists a stranger's key.
    let stranger = warmspare_shared::keys::SecretKey::generate();
    let key = c.dir.path().join("stranger.key");
    stranger.save(&key).unwrap();
    let ours = warmspare_shared::keys::SecretKey::load(&c.operator_key)
        .unwrap()
        .public()
        .to_openssh();
    let forged = fs::read_to_string(&c.file)
        .unwrap()
        .replace(&ours, &stranger.public().to_openssh());
    let forged_file = c.dir.path().join("forged.toml");
    fs::write(&forged_file, forged).unwrap();
    let out = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&forged_file)
        .arg("--key")
        .arg(&key)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = node_json(&st, "a");
    assert_eq!(a["reachable"], false, "{st}");
    assert!(a["error"].as_str().unwrap().contains("refused"), "{st}");
    let out = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&forged_file)
        .arg("--key")
        .arg(&key)
        .args(["switchover", "--to", "b", "--yes"])
        .output()
        .unwrap();
    assert_ne!(exit_code(&out), 0);
}

#[test]
fn status_json_carries_every_field() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let _a = c.start("a");
    write_file(&c.ca("a").join("f"), b"f", 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("a link with a success", LIMIT, || {
        let st = c.status_json();
        node_json(&st, "a")["status"]["links"][0]["last_success"].is_i64()
    });
    let st = c.status_json();
    assert_eq!(st["cluster"], "test");
    assert_eq!(st["config_hash"].as_str().unwrap().len(), 64);
    for n in ["a", "b"] {
        let node = node_json(&st, n);
        assert_eq!(node["reachable"], true);
        assert_eq!(node["config_hash_matches"], true);
        let s = &node["status"];
        for key in [
            "node",
            "version",
            "protocol",
            "config_hash",
            "role",
            "paused",
            "watches",
            "links",
            "diverged",
            "started",
        ] {
            assert!(!s[key].is_null(), "{n}: missing {key}: {s}");
        }
        assert!(s["watches"][0]["files"].as_u64().unwrap() >= 1);
    }
    let link = &node_json(&st, "a")["status"]["links"][0];
    for key in [
        "peer",
        "watch",
        "connected",
        "pending_changes",
        "lag_bytes",
        "lag_seconds",
        "last_success",
    ] {
        assert!(!link[key].is_null(), "missing {key}: {link}");
    }
    assert_eq!(link["connected"], true);
    // Pause shows in status and holds replication; resume releases it.
    assert_eq!(exit_code(&c.ctl(&["pause"])), 0);
    let st = c.status_json();
    assert_eq!(node_json(&st, "a")["status"]["paused"], true);
    write_file(&c.ca("a").join("held"), b"held", 0o644);
    wait_until("the held change to show as pending", LIMIT, || {
        let st = c.status_json();
        node_json(&st, "a")["status"]["links"][0]["pending_changes"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    assert!(!c.ca("b").join("held").exists());
    assert_eq!(exit_code(&c.ctl(&["resume"])), 0);
    wait_until("the held change to arrive", LIMIT, || c.ca("b").join("held").exists());
}

/// A tiny HTTP responder standing for a node's master service.
fn responder(name: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = format!("I am {name}");
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// HAProxy in the foreground; killed when dropped.
struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn haproxy_routes_clients_to_the_active_node_only() {
    let haproxy = warmspare_tests::require("haproxy", "haproxy");
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let _a = c.start("a");
    let (ra, rb) = (responder("a"), responder("b"));
    let front = warmspare_tests::free_port();
    let cfg = c.dir.path().join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
             frontend masters\n  bind 127.0.0.1:{front}\n  default_backend masters\n\
             backend masters\n  option httpchk HEAD /_status/check\n  http-check expect status 200\n\
             \x20 server a 127.0.0.1:{ra} check port {} inter 100ms fall 1 rise 1\n\
             \x20 server b 127.0.0.1:{rb} check port {} inter 100ms fall 1 rise 1\n",
            c.node("a").http_port,
            c.node("b").http_port
        ),
    )
    .unwrap();
    let check = Command::new(&haproxy).arg("-c").arg("-f").arg(&cfg).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}", output_text(&check));
    let _proxy = Haproxy(
        Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let only = |who: &str| {
        (0..20).all(|_| {
            warmspare_tests::http_get(front, "/")
                .is_some_and(|(code, body)| code == 200 && body == format!("I am {who}"))
        })
    };
    wait_until("HAProxy to route to a only", LIMIT, || only("a"));
    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    wait_until("HAProxy to route to b only", LIMIT, || only("b"));
    let out = c.ctl(&["failback", "--yes"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    wait_until("HAProxy to route to a again", LIMIT, || only("a"));
}

/// A local user on a passive can fill `diverged/` by leaving files for the
/// receiver to preserve, and name them with terminal escapes: the store is
/// pruned to `diverged_max_age` and `diverged_max_size` (oldest folders
/// first, with a log line and a metric), and `status` prints names escaped.
#[test]
fn diverged_is_bounded_and_its_names_are_escaped() {
    let c = TestCluster::pair("");
    let text = fs::read_to_string(&c.file).unwrap().replace(
        "key_file = ",
        "diverged_max_size = \"10KiB\"\ndiverged_max_age = \"7d\"\nkey_file = ",
    );
    warmspare_tests::write_cluster_file(&c.file, &text);
    let div = c.node("b").root.join("var/lib/warmspare/diverged");
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let evil = "evil\x1b]0;owned\x07.pem";
    let folder = |name: &str, file: &str, len: usize, age: Duration| {
        let f = div.join(name);
        write_file(&f.join("ca").join(file), &vec![b'x'; len], 0o600);
        for d in [f.join("ca"), f.clone()] {
            fs::File::open(&d).unwrap().set_modified(now - age).unwrap();
        }
        f
    };
    // 20 days old: over the age limit. Then 8 KiB + 4 KiB is over 10 KiB:
    // the older of the two goes.
    let ancient = folder("1-20250101T000000Z", "old.pem", 100, 20 * day);
    let big = folder("2-20250201T000000Z", "big.bin", 8 << 10, 2 * day);
    let recent = folder("3-20250301T000000Z", evil, 4 << 10, day);
    let _a = c.start("a");
    let b = c.start("b");
    wait_until("b to prune its diverged folder", LIMIT, || {
        b.log_text().matches("pruned preserved files from diverged/").count() >= 2
    });
    assert!(!ancient.exists(), "a folder over the age limit stayed");
    assert!(!big.exists(), "the oldest folder over the size limit stayed");
    assert!(recent.join("ca").join(evil).exists(), "the newest folder was pruned");
    let log = b.log_text();
    assert!(log.contains("reason=\"age\"") || log.contains("reason=age"), "{log}");
    assert!(log.contains("reason=\"size\"") || log.contains("reason=size"), "{log}");
    let (_, metrics) = warmspare_tests::http_get(c.node("b").http_port, "/metrics").unwrap();
    assert!(metrics.contains("warmspare_diverged_pruned_total 2"), "{metrics}");
    wait_until("both nodes in status", LIMIT, || c.ctl(&["status"]).status.success());
    let out = c.ctl(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "status printed a raw escape: {shown:?}"
    );
    assert!(shown.contains("evil\\x1b]0;owned\\x07.pem"), "{shown}");
}

#[test]
fn status_exit_codes_and_output_suit_scripts() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    // Only the passive answers: no node acts as the active one.
    wait_until("b in status", LIMIT, || {
        output_text(&c.ctl(&["status"])).contains("no reachable node acts as the active node")
    });
    let out = c.ctl(&["status", "--json"]);
    assert_eq!(exit_code(&out), 1, "{}", output_text(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON even when exiting 1");
    assert_eq!(node_json(&st, "b")["reachable"], true);

    let _a = c.start("a");
    wait_until("a healthy pair", LIMIT, || exit_code(&c.ctl(&["status"])) == 0);

    // A reader that goes away (`status --watch | head -1`) ends the command
    // quietly, without a panic.
    let mut child = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&c.file)
        .arg("--key")
        .arg(&c.operator_key)
        .args(["status", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead as _;
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
    }
    let deadline = std::time::Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status --watch kept running after its reader left"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");

    // Without HOME there is no default key: a usage error, not a lookup
    // relative to the current directory.
    let out = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&c.file)
        .arg("status")
        .env_remove("HOME")
        .current_dir(c.dir.path())
        .output()
        .unwrap();
    assert_eq!(exit_code(&out), 2, "{}", output_text(&out));
    assert!(output_text(&out).contains("--key"), "{}", output_text(&out));

    // A missing operator key is a configuration error too (exit 2).
    let out = Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&c.file)
        .arg("--key")
        .arg(c.dir.path().join("no-such.key"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(exit_code(&out), 2, "{}", output_text(&out));
}

#[test]
fn exit_codes_agree_for_unknown_names_and_moves_already_made() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("a healthy pair", LIMIT, || exit_code(&c.ctl(&["status"])) == 0);
    // Names the cluster file does not have: usage errors (2), alike.
    for args in [
        &["switchover", "--to", "zz", "--yes"][..],
        &["failover", "--to", "zz", "--force"][..],
        &["resync", "--watch", "nope"][..],
        &["run-job", "nope"][..],
    ] {
        let out = c.ctl(args);
        assert_eq!(exit_code(&out), 2, "{args:?}: {}", output_text(&out));
    }
    // Moving the role where it already is: nothing to do (0), alike.
    for args in [
        &["switchover", "--to", "a", "--yes"][..],
        &["failback", "--yes"][..],
        &["failover", "--to", "a", "--force"][..],
    ] {
        let out = c.ctl(args);
        assert_eq!(exit_code(&out), 0, "{args:?}: {}", output_text(&out));
    }
    let st = c.status_json();
    assert_eq!(
        node_json(&st, "a")["status"]["role"]["epoch"],
        1,
        "a no-op changed the epoch"
    );
}

#[test]
fn warmsparectl_keygen_writes_an_operator_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keygen = |args: &[&str], home: &std::path::Path| {
        Command::new(bin("warmsparectl"))
            .arg("keygen")
            .args(args)
            .env("HOME", home)
            .output()
            .unwrap()
    };
    // The default place is the one every other command reads.
    let out = keygen(&[], dir.path());
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    let path = dir.path().join(".config/warmspare/operator.key");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(line.starts_with("ssh-ed25519 "), "{line}");
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let key = warmspare_shared::keys::SecretKey::load(&path).unwrap();
    assert_eq!(key.public().to_openssh(), line);
    // An existing key is never overwritten.
    let before = fs::read(&path).unwrap();
    let out = keygen(&[], dir.path());
    assert_ne!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(fs::read(&path).unwrap(), before);
    // --out writes elsewhere.
    let other = dir.path().join("ops/second.key");
    let out = keygen(&["--out", other.to_str().unwrap()], dir.path());
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert!(other.is_file());
}
