//! Role hooks (`on_promote`, `on_demote`) with real agents and `warmsparectl`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use warmspare_tests::{
    bin, converge, exit_code, http_get, http_status, output_text, wait_until, write_file, ClusterOptions, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A pair `a` (active), `b` with the `ca` watch, `cluster_keys` added to the
/// `[cluster]` table and `b_keys` to b's `[[node]]`.
fn pair_with_hooks(cluster_keys: &str, b_keys: &str) -> TestCluster {
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n",
            warmspare_tests::CA_WATCH
        ),
        node_extra: if b_keys.is_empty() {
            vec![]
        } else {
            vec![("b", b_keys.to_string())]
        },
        ..Default::default()
    });
    let toml = fs::read_to_string(&c.file).unwrap();
    let anchor = "key_file = \"/etc/warmspare/node.key\"\n";
    assert!(toml.contains(anchor));
    let toml = toml.replacen(anchor, &format!("{anchor}{cluster_keys}\n"), 1);
    fs::write(&c.file, toml).unwrap();
    c
}

fn spawn_ctl(c: &TestCluster, args: &[&str]) -> std::process::Child {
    Command::new(bin("warmsparectl"))
        .arg("--cluster")
        .arg(&c.file)
        .arg("--key")
        .arg(&c.operator_key)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `warmspare-agent role --is-active` for `node`: its exit code and output.
fn role_gate(c: &TestCluster, node: &str) -> (i32, String) {
    role_gate_with(c, node, &[])
}

/// `role --is-active` for `node` with `extra` arguments (`--or-promoting`).
fn role_gate_with(c: &TestCluster, node: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("warmspare-agent"))
        .arg("--cluster")
        .arg(&c.file)
        .args(["--node", node, "role", "--is-active", "--timeout", "5s"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (exit_code(&out), output_text(&out))
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn on_promote_runs_with_its_environment_before_the_node_reports_active_and_on_demote_after() {
    let c = pair_with_hooks("", "");
    let d = c.dir.path().display().to_string();
    let toml = fs::read_to_string(&c.file).unwrap().replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        &format!(
            "key_file = \"/etc/warmspare/node.key\"\n\
             on_promote = 'echo \"$WARMSPARE_NODE $WARMSPARE_EPOCH from=$WARMSPARE_FROM to=$WARMSPARE_TO $EXTRA\" >> {d}/promote.log; \
             if [ \"$WARMSPARE_NODE\" = b ]; then while [ ! -e {d}/go ]; do sleep 0.05; done; fi'\n\
             on_demote = 'echo \"$WARMSPARE_NODE $WARMSPARE_EPOCH from=$WARMSPARE_FROM to=$WARMSPARE_TO $EXTRA\" >> {d}/demote.log'\n"
        ),
        1,
    );
    let toml = toml.replace(
        &format!("root = \"{}\"\n", c.node("b").root.display()),
        &format!(
            "root = \"{}\"\nenv = {{ EXTRA = \"x-b\" }}\n",
            c.node("b").root.display()
        ),
    );
    fs::write(&c.file, toml).unwrap();
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("serial"), b"10\n", 0o644);
    let _b = c.start("b");
    let _a = c.start("a");
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    // The preferred active runs on_promote at the first start (no previous active).
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    assert_eq!(lines(&c.dir.path().join("promote.log")), ["a 1 from= to=a "]);
    converge(&ra, &rb, LIMIT);
    c.wait_linked("a", LIMIT);

    let mut sw = spawn_ctl(&c, &["switchover", "--to", "b", "--yes"]);
    wait_until("b's on_promote to start", LIMIT, || {
        lines(&c.dir.path().join("promote.log")).len() == 2
    });
    // b holds epoch 2 but its hook has not finished: it is not active yet.
    let (code_b, body) = http_get(hb, "/_status/check").unwrap();
    assert_eq!(code_b, 503, "{body}");
    assert!(body.contains("on_promote is running"), "{body}");
    assert_eq!(c.node_status("b")["role"]["epoch"], 2);
    assert_eq!(c.node_status("b")["held"], "on_promote is running");
    // The role gate: not active yet, but a service its hook restarts may
    // start (`--or-promoting`); the demoted a may not, with or without it.
    assert_eq!(role_gate(&c, "b").0, 1);
    let (gate_b, out_b) = role_gate_with(&c, "b", &["--or-promoting"]);
    assert_eq!(gate_b, 0, "{out_b}");
    wait_until("a passive", LIMIT, || http_status(ha, "/_status/check") == Some(503));
    assert_eq!(role_gate_with(&c, "a", &["--or-promoting"]).0, 1);
    // a's active side stopped before b was promoted, and a ran on_demote.
    wait_until("a's on_demote", LIMIT, || {
        !lines(&c.dir.path().join("demote.log")).is_empty()
    });
    assert_eq!(lines(&c.dir.path().join("demote.log")), ["a 2 from=a to=b "]);
    assert_eq!(http_status(ha, "/_status/check"), Some(503));
    assert!(
        sw.try_wait().unwrap().is_none(),
        "the switchover returned before b's hook ended"
    );
    write_file(&rb.join("serial"), b"11\n", 0o644);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fs::read(ra.join("serial")).unwrap(),
        b"10\n",
        "b shipped before its hook ended"
    );

    fs::write(c.dir.path().join("go"), b"").unwrap();
    let out = sw.wait_with_output().unwrap();
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(http_status(hb, "/_status/check"), Some(200));
    assert_eq!(lines(&c.dir.path().join("promote.log"))[1], "b 2 from=a to=b x-b");
    wait_until("b's serial shipped to a", LIMIT, || {
        fs::read(ra.join("serial")).unwrap() == b"11\n"
    });
    let st = c.node_status("b");
    let hooks = st["hooks"].as_array().unwrap();
    let promote = hooks.iter().find(|h| h["hook"] == "on_promote").unwrap();
    assert_eq!(promote["ok"], true, "{st}");
    assert_eq!(promote["epoch"], 2, "{st}");
    assert!(promote["end_ms"].as_i64().unwrap() >= promote["start_ms"].as_i64().unwrap());
    let human = output_text(&c.ctl(&["status"]));
    assert!(human.contains("on_promote") && human.contains("on_demote"), "{human}");
}

#[test]
fn a_failing_on_promote_keeps_the_node_fenced_and_the_controller_fails_until_a_retry() {
    let c = pair_with_hooks("", "");
    let d = c.dir.path().display().to_string();
    let toml = fs::read_to_string(&c.file).unwrap().replace(
        &format!("root = \"{}\"\n", c.node("b").root.display()),
        &format!(
            "root = \"{}\"\non_promote = 'echo enabling the CA; test -e {d}/allow || {{ echo CA refused to start >&2; exit 3; }}'\n",
            c.node("b").root.display()
        ),
    );
    fs::write(&c.file, toml).unwrap();
    let _b = c.start("b");
    let _a = c.start("a");
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    c.wait_linked("a", LIMIT);

    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert_eq!(exit_code(&out), 1, "{}", output_text(&out));
    assert!(output_text(&out).contains("on_promote failed"), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("CA refused to start"),
        "{}",
        output_text(&out)
    );
    assert_eq!(http_status(hb, "/_status/check"), Some(503));
    assert_eq!(http_status(ha, "/_status/check"), Some(503));
    let st = c.node_status("b");
    assert_eq!(st["role"]["active"], "b");
    assert!(st["held"].as_str().unwrap().starts_with("on_promote failed"), "{st}");
    let promote = st["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "on_promote")
        .unwrap()
        .clone();
    assert_eq!(promote["ok"], false, "{st}");
    assert!(promote["detail"].as_str().unwrap().contains("exit status: 3"), "{st}");
    let (_, metrics) = http_get(hb, "/metrics").unwrap();
    assert!(
        metrics.contains("warmspare_hook_failed{hook=\"on_promote\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warmspare_hook_runs_total{hook=\"on_promote\",result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("warmspare_is_active 0"), "{metrics}");
    // The role gate refuses on the held node and on the demoted one.
    let (gate, out) = role_gate(&c, "b");
    assert_eq!(gate, 1, "{out}");
    assert!(out.contains("held"), "{out}");
    assert_eq!(role_gate(&c, "a").0, 1);
    // A failed promotion is no promotion in progress.
    assert_eq!(role_gate_with(&c, "b", &["--or-promoting"]).0, 1);
    let human = output_text(&c.ctl(&["status"]));
    assert!(human.contains("held") && human.contains("FAILED"), "{human}");
    let hist = output_text(&c.ctl(&["history"]));
    assert!(hist.contains("on_promote failed on b"), "{hist}");
    // Nothing is shipped from a fenced node.
    write_file(&c.ca("b").join("signed/x.pem"), b"x", 0o644);
    // A switchover away from a held node is refused; a retry of the promotion is the way.
    let out = c.ctl(&["switchover", "--to", "a", "--yes"]);
    assert_eq!(exit_code(&out), 3, "{}", output_text(&out));

    // Retry still failing: still fenced, still non-zero.
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert_eq!(exit_code(&out), 1, "{}", output_text(&out));
    assert_eq!(http_status(hb, "/_status/check"), Some(503));
    assert!(!c.ca("a").join("signed/x.pem").exists());

    fs::write(c.dir.path().join("allow"), b"").unwrap();
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert_eq!(http_status(hb, "/_status/check"), Some(200));
    assert_eq!(c.node_status("b")["role"]["epoch"], 4);
    assert!(c.node_status("b")["held"].is_null());
    wait_until("b ships again", LIMIT, || c.ca("a").join("signed/x.pem").exists());
    let (gate, out) = role_gate(&c, "b");
    assert_eq!(gate, 0, "{out}");
    let (_, metrics) = http_get(hb, "/metrics").unwrap();
    assert!(
        metrics.contains("warmspare_hook_failed{hook=\"on_promote\"} 0"),
        "{metrics}"
    );
}

#[test]
fn on_demote_runs_when_a_higher_epoch_fences_the_old_active() {
    let c = pair_with_hooks("", "");
    let d = c.dir.path().display().to_string();
    let toml = fs::read_to_string(&c.file).unwrap().replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        &format!(
            "key_file = \"/etc/warmspare/node.key\"\non_demote = 'echo \"$WARMSPARE_NODE $WARMSPARE_EPOCH to=$WARMSPARE_TO\" >> {d}/demote.log'\n"
        ),
        1,
    );
    fs::write(&c.file, toml).unwrap();
    let _b = c.start("b");
    let mut a = c.start("a");
    let ha = c.node("a").http_port;
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    c.wait_linked("a", LIMIT);
    assert_eq!(role_gate(&c, "a").0, 0);
    assert_eq!(role_gate(&c, "b").0, 1);
    a.kill9();
    // No agent to ask: neither yes nor no.
    let (gate, out) = role_gate(&c, "a");
    assert_eq!(gate, 2, "{out}");
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    assert!(lines(&c.dir.path().join("demote.log")).is_empty());
    a.restart();
    // a starts as the active of epoch 1, pushes to b, learns epoch 2 and steps down.
    wait_until("a's on_demote after fencing", LIMIT, || {
        lines(&c.dir.path().join("demote.log")) == ["a 2 to=b"]
    });
    assert_eq!(http_status(ha, "/_status/check"), Some(503));
    assert_eq!(role_gate(&c, "a").0, 1);
    assert_eq!(role_gate(&c, "b").0, 0);
    let st = c.node_status("a");
    let demote = st["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "on_demote")
        .unwrap()
        .clone();
    assert_eq!(demote["ok"], true, "{st}");
}

#[test]
fn a_hook_that_hangs_is_killed_with_its_children_at_hook_timeout() {
    let c = pair_with_hooks("hook_timeout = \"2s\"", "");
    let d = c.dir.path().display().to_string();
    let toml = fs::read_to_string(&c.file).unwrap().replace(
        &format!("root = \"{}\"\n", c.node("b").root.display()),
        &format!(
            "root = \"{}\"\non_promote = 'sleep 600 & echo $! > {d}/child.pid; wait'\n",
            c.node("b").root.display()
        ),
    );
    fs::write(&c.file, toml).unwrap();
    let _b = c.start("b");
    let _a = c.start("a");
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    c.wait_linked("a", LIMIT);
    let out = c.ctl(&["switchover", "--to", "b", "--yes"]);
    assert_eq!(exit_code(&out), 1, "{}", output_text(&out));
    assert!(
        output_text(&out).contains("timed out after 2s"),
        "{}",
        output_text(&out)
    );
    assert_eq!(http_status(hb, "/_status/check"), Some(503));
    let pid = fs::read_to_string(c.dir.path().join("child.pid")).unwrap();
    let pid = pid.trim();
    wait_until("the hook's background child to be killed", LIMIT, || {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // A zombie waiting for its reaper is dead too.
            Ok(stat) => stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
        }
    });
}

#[test]
fn a_hook_cut_off_by_an_agent_kill_runs_again_after_restart() {
    let c = pair_with_hooks("", "");
    let d = c.dir.path().display().to_string();
    let toml = fs::read_to_string(&c.file).unwrap().replace(
        &format!("root = \"{}\"\n", c.node("b").root.display()),
        &format!(
            "root = \"{}\"\non_promote = 'echo run >> {d}/runs; while [ ! -e {d}/go ]; do sleep 0.05; done'\n",
            c.node("b").root.display()
        ),
    );
    fs::write(&c.file, toml).unwrap();
    let mut b = c.start("b");
    let _a = c.start("a");
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("a active", LIMIT, || http_status(ha, "/_status/check") == Some(200));
    c.wait_linked("a", LIMIT);
    let mut sw = spawn_ctl(&c, &["switchover", "--to", "b", "--yes"]);
    wait_until("b's on_promote to start", LIMIT, || {
        lines(&c.dir.path().join("runs")).len() == 1
    });
    let record = c.node("b").root.join("var/lib/warmspare/hooks/on_promote.json");
    let rec: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert!(rec["end_ms"].is_null(), "{rec}");
    b.kill9();
    let _ = sw.kill();
    let _ = sw.wait();
    fs::write(c.dir.path().join("go"), b"").unwrap();
    b.restart();
    wait_until("b active after its hook ran again", LIMIT, || {
        http_status(hb, "/_status/check") == Some(200)
    });
    assert_eq!(lines(&c.dir.path().join("runs")), ["run", "run"]);
    let rec: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["ok"], true, "{rec}");
    assert_eq!(rec["epoch"], 2, "{rec}");
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", output_text(&out));
}

/// Signs a certificate for `name` with `serial` (hex) under `ca/signed/`.
fn sign(ca: &Path, name: &str, serial: &str) {
    let work = ca.parent().unwrap().join(format!("req-{name}"));
    fs::create_dir_all(&work).unwrap();
    let w = work.display().to_string();
    let ca_s = ca.display().to_string();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{w}/key.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &format!("{w}/csr.pem"),
        ],
        ca,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{w}/csr.pem"),
            "-CA",
            &format!("{ca_s}/ca_crt.pem"),
            "-CAkey",
            &format!("{ca_s}/ca_key.pem"),
            "-set_serial",
            &format!("0x{serial}"),
            "-days",
            "2",
            "-out",
            &format!("{ca_s}/signed/{name}.pem"),
        ],
        ca,
    );
}

/// The serial of a PEM certificate, as openssl prints it (uppercase hex).
fn cert_serial(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_string()
}

#[test]
fn ca_serial_guard_in_on_promote_pads_past_certificates_the_old_active_signed_unseen() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let c = pair_with_hooks("", "");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let guard = format!(
        "{} ca-serial-guard --ca-dir {}",
        bin("warmspare-agent").display(),
        rb.display()
    );
    let toml = fs::read_to_string(&c.file).unwrap().replace(
        &format!("root = \"{}\"\n", c.node("b").root.display()),
        &format!("root = \"{}\"\non_promote = '{guard}'\n", c.node("b").root.display()),
    );
    fs::write(&c.file, toml).unwrap();
    // A CA on a: serial 1 is the CA, 2 is in the inventory, 0x2FFF was signed
    // but never made it to the inventory; the serial file lags behind both.
    fs::create_dir_all(ra.join("signed")).unwrap();
    let ra_s = ra.display().to_string();
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ra_s}/ca_key.pem"),
            "-out",
            &format!("{ra_s}/ca_crt.pem"),
            "-subj",
            "/CN=Puppet CA",
            "-days",
            "2",
            "-set_serial",
            "1",
        ],
        &ra,
    );
    sign(&ra, "agent1", "2");
    sign(&ra, "agent2", "2FFF");
    fs::write(
        ra.join("inventory.txt"),
        "0x0001 2026-01-01T00:00:00UTC 2031-01-01T00:00:00UTC /CN=Puppet CA\n\
         0x0002 2026-01-01T00:00:00UTC 2031-01-01T00:00:00UTC /CN=agent1\n",
    )
    .unwrap();
    fs::write(ra.join("serial"), "0003").unwrap();
    std::os::unix::fs::chown(ra.join("serial"), Some(65534), Some(65534)).unwrap();
    fs::set_permissions(ra.join("serial"), fs::Permissions::from_mode(0o644)).unwrap();

    let _b = c.start("b");
    let mut a = c.start("a");
    converge(&ra, &rb, LIMIT);
    c.wait_linked("a", LIMIT);
    let certs_before: Vec<(String, Vec<u8>)> = ["agent1", "agent2"]
        .iter()
        .map(|n| (n.to_string(), fs::read(rb.join(format!("signed/{n}.pem"))).unwrap()))
        .collect();

    // a dies right after signing once more; b never sees serial 3.
    a.kill9();
    sign(&ra, "cutoff", "3");
    fs::write(ra.join("serial"), "0004").unwrap();

    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert_eq!(exit_code(&out), 0, "{}", output_text(&out));
    // max(serial 3, inventory 2 + 1, certificate 0x2FFF + 1) + 0x1000, rounded up to 0x1000.
    assert_eq!(fs::read_to_string(rb.join("serial")).unwrap(), "4000");
    let md = fs::metadata(rb.join("serial")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o777), (65534, 65534, 0o644));
    for (n, bytes) in &certs_before {
        assert_eq!(
            &fs::read(rb.join(format!("signed/{n}.pem"))).unwrap(),
            bytes,
            "{n} was edited"
        );
    }
    let st = c.node_status("b");
    let promote = st["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "on_promote")
        .unwrap()
        .clone();
    assert_eq!(promote["ok"], true, "{st}");

    // b signs the next certificate with the padded serial, as Puppet Server would.
    let next = fs::read_to_string(rb.join("serial")).unwrap();
    sign(&rb, "agent3", next.trim());
    fs::write(rb.join("serial"), "4001").unwrap();

    // a comes back, steps down, and its cut-off certificate is kept aside.
    a.restart();
    converge(&rb, &ra, LIMIT);
    assert!(!ra.join("signed/cutoff.pem").exists());
    let diverged = c.node_status("a")["diverged"].clone();
    assert!(diverged.to_string().contains("signed/cutoff.pem"), "{diverged}");
    let kept = c.node("a").root.join("var/lib/warmspare/diverged");
    let mut serials: Vec<String> = fs::read_dir(rb.join("signed"))
        .unwrap()
        .map(|e| cert_serial(&e.unwrap().path()))
        .collect();
    let cutoff = walk_find(&kept, "cutoff.pem").expect("the cut-off certificate under diverged/");
    serials.push(cert_serial(&cutoff));
    serials.push(cert_serial(&rb.join("ca_crt.pem")));
    let mut unique = serials.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), serials.len(), "duplicate serials: {serials:?}");
    assert!(serials.contains(&"4000".to_string()), "{serials:?}");
}

fn walk_find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = walk_find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
