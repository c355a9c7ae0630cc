//! The cluster file as the agent's commands see it.

use std::process::Command;

use warmspare_tests::{bin, TestCluster};

fn check(file: &std::path::Path) -> (i32, String) {
    let out = Command::new(bin("warmspare-agent"))
        .arg("--cluster")
        .arg(file)
        .args(["--node", "a", "check"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap()
}

#[test]
fn bad_cluster_files_fail_check_with_key_and_line() {
    let c = TestCluster::pair("");
    let good = std::fs::read_to_string(&c.file).unwrap();
    let cases: Vec<(String, &str, String)> = vec![
        {
            let t = good.replace("debounce_ms = 0", "debounce_ms = 0\ncolour = \"blue\"");
            let l = line_of(&t, "colour", 0);
            (t, "colour", format!(":{l}:"))
        },
        {
            let t = good.replace("name = \"b\"", "name = \"a\"");
            let l = line_of(&t, "name = \"a\"", 1);
            (t, "node[1].name", format!(":{l}:"))
        },
        {
            let t = format!("{good}\n[[job]]\nname = \"rbac\"\nschedule = \"every hour\"\ndump = \"true\"\n");
            let l = line_of(&t, "every hour", 0);
            (t, "job[0].schedule", format!(":{l}:"))
        },
        {
            // A crontab line: the message says how many fields, seconds first.
            let t = format!("{good}\n[[job]]\nname = \"rbac\"\nschedule = \"0 3 * * *\"\ndump = \"true\"\n");
            let l = line_of(&t, "0 3 * * *", 0);
            (t, "seconds first", format!(":{l}:"))
        },
        {
            // A wrong type names its key.
            let t = format!("{good}\n[[job]]\nname = \"rbac\"\ndump = \"true\"\nkeep = \"3\"\n");
            let l = line_of(&t, "keep", 0);
            (t, "key `keep`", format!(":{l}:"))
        },
        {
            let t = good.replacen("name = \"b\"", "name = \"b\"\ncompress = \"fast\"", 1);
            let l = line_of(&t, "compress", 0);
            (t, "node[1].compress", format!(":{l}:"))
        },
        {
            let t = good.replace("debounce_ms = 0", "debounce_ms = 0\nexclude = [\"signed/[b.pem\"]");
            let l = line_of(&t, "exclude", 0);
            (t, "watch[0].exclude[0]", format!(":{l}:"))
        },
    ];
    for (i, (text, key, line)) in cases.into_iter().enumerate() {
        let f = c.dir.path().join(format!("bad{i}.toml"));
        warmspare_tests::write_cluster_file(&f, &text);
        let (code, err) = check(&f);
        assert_eq!(code, 2, "case {i}: exit code {code}, stderr: {err}");
        assert!(err.contains(key), "case {i}: {err:?} does not name {key}");
        assert!(err.contains(&line), "case {i}: {err:?} does not name line {line}");
    }
}

#[test]
fn config_hash_is_the_same_for_the_same_cluster() {
    let c = TestCluster::pair("");
    let hash = |f: &std::path::Path| {
        let out = Command::new(bin("warmspare-agent"))
            .arg("--cluster")
            .arg(f)
            .args(["config", "hash"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let text = std::fs::read_to_string(&c.file).unwrap();
    let f2 = c.dir.path().join("reformatted.toml");
    warmspare_tests::write_cluster_file(
        &f2,
        &format!("# the same file, laid out differently\n{}", text.replace(" = ", "=")),
    );
    let (h1, h2) = (hash(&c.file), hash(&f2));
    assert_eq!(h1.len(), 64);
    assert_eq!(h1, h2);
    let f3 = c.dir.path().join("changed.toml");
    warmspare_tests::write_cluster_file(&f3, &text.replace("debounce_ms = 0", "debounce_ms = 1"));
    assert_ne!(h1, hash(&f3));
}

#[test]
fn keygen_writes_a_private_key_and_prints_the_public_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("k/node.key");
    let out = Command::new(bin("warmspare-agent"))
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    let again = Command::new(bin("warmspare-agent"))
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen overwrote an existing key");
}

#[test]
fn check_reports_each_peer() {
    let c = TestCluster::pair("");
    let run_check = |extra: &[&str]| c.check("a", extra);
    let (code, text) = run_check(&[]);
    // This node is ready, its peer is not: 3, and it says which.
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("this node is ready"), "{text}");
    assert!(text.contains("ssh listen address") && text.contains("free"), "{text}");
    assert!(text.contains("peer b") && text.contains("unreachable"), "{text}");
    assert!(
        !text.contains("unreachable: unreachable"),
        "a message repeats itself: {text}"
    );
    // The first node installed checks itself only.
    let (code, text) = run_check(&["--local"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("peer b"), "{text}");
    let _b = c.start("b");
    let _a = c.start("a");
    // Until a's agent holds its listen address, check finds it free (and
    // a's agent, seeing check's probe bind, tries again): wait for both.
    let mut text = String::new();
    warmspare_tests::wait_until(
        "check to reach b and see a's agent listening",
        std::time::Duration::from_secs(20),
        || {
            let (code, t) = run_check(&[]);
            text = t;
            code == Some(0) && text.contains("in use by this node's running agent")
        },
    );
    assert!(text.contains("peer b") && text.contains("ok"), "{text}");
    drop(_a);

    // A listen address another program holds: this node is not ready.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = squatter.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&c.file).unwrap();
    let a_ssh = format!("ssh = \"127.0.0.1:{}\"", c.node("a").port);
    assert!(text.contains(&a_ssh), "{text}");
    let busy = c.dir.path().join("busy.toml");
    warmspare_tests::write_cluster_file(
        &busy,
        &text.replacen(&a_ssh, &format!("{a_ssh}\nlisten = \"127.0.0.1:{port}\""), 1),
    );
    let (code, out_text) = warmspare_tests::check_with(&busy, "a", &["--local"]);
    assert_eq!(code, Some(1), "{out_text}");
    assert!(
        out_text.contains(&format!("FAILED: ssh listen address 127.0.0.1:{port}")),
        "{out_text}"
    );
    assert!(out_text.contains("this node is NOT ready"), "{out_text}");
    drop(squatter);

    // A cluster file on `a` that pins another key for `b`: key mismatch.
    let other = warmspare_shared::keys::SecretKey::generate().public().to_openssh();
    let text = std::fs::read_to_string(&c.file)
        .unwrap()
        .replace(&c.node("b").key.public().to_openssh(), &other);
    let wrong = c.dir.path().join("wrong-pin.toml");
    warmspare_tests::write_cluster_file(&wrong, &text);
    let (code, text) = warmspare_tests::check_with(&wrong, "a", &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("key mismatch"), "{text}");
}

/// The keys the parser accepts in a table, from its own refusal of an unknown one.
fn accepted_keys(file: &std::path::Path, text: &str) -> Vec<String> {
    warmspare_tests::write_cluster_file(file, text);
    let out = Command::new(bin("warmspare-agent"))
        .arg("--cluster")
        .arg(file)
        .args(["config", "hash"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    let expected = err
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of expected keys in {err:?}"));
    expected.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

#[test]
fn the_configuration_reference_documents_every_key_the_parser_accepts() {
    let c = TestCluster::pair("");
    let good = std::fs::read_to_string(&c.file).unwrap();
    let with_job = format!("{good}\n[[job]]\nname = \"j\"\nrun = \"true\"\n");
    let f = c.dir.path().join("probe.toml");
    let tables = [
        ("top level", format!("zzz_unknown = 1\n{with_job}")),
        (
            "[cluster]",
            with_job.replacen("[cluster]\n", "[cluster]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[node]]",
            with_job.replacen("[[node]]\n", "[[node]]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[operator]]",
            with_job.replacen("[[operator]]\n", "[[operator]]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[watch]]",
            with_job.replacen("[[watch]]\n", "[[watch]]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[job]]",
            with_job.replacen("[[job]]\n", "[[job]]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[etcd]",
            format!("{with_job}\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nzzz_unknown = 1\n"),
        ),
    ];
    let doc_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let mut checked = 0;
    for (table, text) in tables {
        let keys = accepted_keys(&f, &text);
        assert!(keys.len() >= 2, "{table}: {keys:?}");
        for k in keys {
            assert!(
                doc.contains(&format!("`{k}`")),
                "docs/configuration.md does not document `{k}` of {table}"
            );
            checked += 1;
        }
    }
    assert!(checked > 25, "only {checked} keys checked");
}

/// The TOML blocks of the README and `docs/` (and `docs/examples/*.toml`),
/// each with where it starts.
fn toml_blocks() -> Vec<(String, String)> {
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![ws.join("README.md")];
    let mut dirs = vec![ws.join("docs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut blocks = Vec::new();
    for f in files {
        let name = f.strip_prefix(&ws).unwrap().display().to_string();
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        match f.extension().and_then(|x| x.to_str()) {
            Some("toml") => blocks.push((name, text)),
            Some("md") => {
                let mut open: Option<(usize, String)> = None;
                for (i, line) in text.lines().enumerate() {
                    let fence = line.trim_start().strip_prefix("```");
                    match (&mut open, fence) {
                        (None, Some(info)) if info.trim() == "toml" => open = Some((i + 1, String::new())),
                        (Some(_), Some(_)) => {
                            let (at, body) = open.take().unwrap();
                            blocks.push((format!("{name}:{at}"), body));
                        }
                        (Some((_, body)), None) => {
                            body.push_str(line);
                            body.push('\n');
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    blocks
}

/// Gives every `public_key` a real key where the docs show a placeholder
/// (`"ssh-ed25519 AAAA... (mastera's keygen output)"`).
fn with_real_keys(text: &str) -> String {
    text.lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with("public_key") && t.contains("...") {
                format!(
                    "public_key = \"{}\"",
                    warmspare_shared::keys::SecretKey::generate().public().to_openssh()
                )
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_toml_block_in_the_docs_is_read_by_the_real_parser() {
    // A fragment (a block without `[cluster]`) is read as the tables it shows
    // added to a minimal cluster, a `[cluster]` table alone with the node it
    // prefers added; a whole file must validate as it stands, with real keys
    // in place of the placeholders.
    let minimal = "[cluster]\nname = \"docs\"\npreferred_active = \"a\"\n\n[[node]]\nname = \"a\"\nssh = \"127.0.0.1:7422\"\npublic_key = \"ssh-ed25519 AAAA...\"\n";
    let blocks = toml_blocks();
    assert!(
        blocks.len() >= 3,
        "only {} TOML blocks found: is the extractor broken?",
        blocks.len()
    );
    let mut bad = Vec::new();
    for (place, body) in &blocks {
        let whole = if body.contains("[cluster]") && body.contains("[[node]]") {
            body.clone()
        } else if body.contains("[cluster]") {
            // The cluster table alone: add the node it names as preferred.
            let preferred = body
                .lines()
                .find_map(|l| l.trim().strip_prefix("preferred_active"))
                .and_then(|v| v.split('"').nth(1))
                .unwrap_or("a");
            format!("{body}\n[[node]]\nname = \"{preferred}\"\nssh = \"127.0.0.1:7422\"\npublic_key = \"ssh-ed25519 AAAA...\"\n")
        } else {
            format!("{minimal}\n{body}")
        };
        if let Err(e) = warmspare_shared::config::Cluster::parse(&with_real_keys(&whole), std::path::Path::new(place)) {
            bad.push(format!("{place}: {e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "TOML blocks in the docs that the cluster-file parser rejects (a fragment must start with its table header):\n{}",
        bad.join("\n")
    );
}

/// A cluster file other users can write names commands that run as this
/// user (root, installed): `run`, `check` and `warmsparectl` refuse it, and a
/// node key others can read, naming the file and its mode.
#[test]
fn files_others_can_write_or_read_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let c = TestCluster::pair("");
    // A refused file must stop `run` at once: an agent that starts instead
    // is killed at a deadline and the test fails, rather than waiting on it.
    let agent = |cmd: &str| {
        let err_file = c.dir.path().join(format!("{cmd}.stderr"));
        let mut child = Command::new(bin("warmspare-agent"))
            .arg("--cluster")
            .arg(&c.file)
            .args(["--node", "a", cmd])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let err = std::fs::read_to_string(&err_file).unwrap_or_default();
        let status = status.unwrap_or_else(|| panic!("{cmd} was still running after 60 s: {err}"));
        (status.code(), err)
    };
    let chmod =
        |p: &std::path::Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    chmod(&c.file, 0o666);
    for cmd in ["run", "check"] {
        let (code, err) = agent(cmd);
        assert_ne!(code, Some(0), "{cmd} accepted a 0666 cluster file: {err}");
        assert!(
            err.contains("cluster.toml") && err.contains("0666") && err.contains("refused"),
            "{cmd}: {err}"
        );
    }
    let out = c.ctl(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "warmsparectl accepted a 0666 cluster file");
    assert!(err.contains("cluster.toml") && err.contains("0666"), "{err}");
    chmod(&c.file, 0o644);
    let key = c.node("a").root.join("etc/warmspare/node.key");
    chmod(&key, 0o644);
    let (code, err) = agent("run");
    assert_ne!(code, Some(0), "run accepted a 0644 private key: {err}");
    assert!(err.contains("node.key") && err.contains("0644"), "{err}");
    chmod(&key, 0o600);
    chmod(&c.operator_key, 0o640);
    let out = c.ctl(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "warmsparectl accepted a 0640 operator key");
    assert!(err.contains("operator.key") && err.contains("0640"), "{err}");
    chmod(&c.operator_key, 0o600);
    // With safe modes again, the files are accepted (check then fails, if
    // at all, only on the unreachable peer).
    let (_, err) = agent("check");
    assert!(!err.contains("refused"), "{err}");
}

/// Dumps, the spool and the role state are private whatever the umask the
/// agent runs under: a dump made under umask 022 is 0600 in 0700 folders, on
/// the active and where it arrives.
#[test]
fn dumps_and_state_are_private_under_a_permissive_umask() {
    use std::os::unix::fs::PermissionsExt;
    let c = TestCluster::new(warmspare_tests::ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 0\n\n\
             [[job]]\nname = \"db\"\ndump = \"echo secret rows > \\\"$WARMSPARE_OUTPUT\\\"\"\n\
             restore = \"cat \\\"$WARMSPARE_INPUT\\\" > /dev/null\"\n",
            warmspare_tests::CA_WATCH
        ),
        ..Default::default()
    });
    let umask = ["sh", "-c", "umask 022; exec \"$0\" \"$@\""];
    let _b = c.start_wrapped("b", &[], &umask);
    let _a = c.start_wrapped("a", &[], &umask);
    warmspare_tests::wait_until("agents up", std::time::Duration::from_secs(60), || {
        c.ctl(&["status"]).status.success()
    });
    let run = c.ctl(&["run-job", "db"]);
    assert!(run.status.success(), "{run:?}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let a_state = c.node("a").root.join("var/lib/warmspare");
    let b_state = c.node("b").root.join("var/lib/warmspare");
    warmspare_tests::wait_until("the dump on b", std::time::Duration::from_secs(60), || {
        b_state.join("spool/db/dump").exists()
    });
    for (p, want) in [
        (a_state.clone(), 0o700),
        (a_state.join("jobs/db"), 0o700),
        (a_state.join("jobs/db/gen"), 0o700),
        (a_state.join("jobs/db/gen/0000000001"), 0o600),
        (a_state.join("jobs/db/history.jsonl"), 0o600),
        (a_state.join("spool"), 0o700),
        (a_state.join("spool/db"), 0o700),
        (a_state.join("spool/db/dump"), 0o600),
        (a_state.join("spool/db/meta.json"), 0o600),
        (a_state.join("diverged"), 0o700),
        (a_state.join("role.json"), 0o600),
        (a_state.join("history.jsonl"), 0o600),
        (b_state.join("spool"), 0o700),
        (b_state.join("spool/db"), 0o700),
        (b_state.join("spool/db/dump"), 0o600),
    ] {
        assert_eq!(mode(&p), want, "{} is {:04o}", p.display(), mode(&p));
    }
}
