//! A Puppet CA that fails over and back on real Puppet Server (Debian's
//! `puppetserver` 7 and `puppet-agent`), with the hooks, the serial guard and
//! the boot gate of docs/puppet-enterprise.md, installed from that page.
//!
//! Three hosts on one machine, each a private mount namespace (and host
//! name) over its own copies of Puppet's directories: `a` (the CA,
//! 127.84.0.2), `b` (the spare, 127.84.0.3) and `c` (the Puppet agents,
//! which reach `puppet.example.test` through their own `/etc/hosts`). The
//! warmspare agents of `a` and `b` run inside their host's namespace, so the
//! guide's scripts run with the guide's paths. `systemctl` is a stand-in (the
//! machine runs no systemd): it runs the guide's drop-in's `ExecStartPre=`
//! line, then `puppetserver foreground`, and waits until it is ready, as
//! systemd does for Debian's unit.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use warmspare_tests::{bin, converge, http_status, require, wait_until, write_file, ClusterOptions, TestCluster};

const A_IP: &str = "127.84.0.2";
const B_IP: &str = "127.84.0.3";
/// The most one Puppet Server start (or restart) may take: about a minute
/// on two cores, far more on a machine starved of disk reads.
const SERVER: Duration = Duration::from_secs(900);
const LIMIT: Duration = Duration::from_secs(120);
const CA: &str = "/etc/puppet/puppetserver/ca";
const GUIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/puppet-enterprise.md");

/// The processes in the mount namespace `ns` (a `/proc/PID/ns/mnt` link text).
fn members(ns: &str, except: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid != except && fs::read_link(e.path().join("ns/mnt")).is_ok_and(|l| l.to_string_lossy() == ns) {
            out.push(pid);
        }
    }
    out
}

/// One host: a holder process, the first of its own PID namespace, in a
/// private mount and UTS namespace that bind-mounts the host's copies over
/// the real paths. When the holder dies (dropped, or the test process
/// killed: `setpriv --pdeathsig`, `unshare --kill-child`), the kernel kills
/// every process of the namespace, Puppet Server too (even one a hook
/// started in its own session), and the mounts go with it.
struct Host {
    name: &'static str,
    dir: PathBuf,
    /// `unshare`, the holder's parent.
    holder: Child,
    /// The holder (PID 1 of the namespace), as seen from outside.
    init: u32,
    ns: String,
    path: String,
}

impl Host {
    /// Copies Puppet's directories under `dir` and starts the holder.
    fn new(name: &'static str, dir: &Path, hosts: &str, server: bool, path: &str) -> Host {
        let mut mounts = vec![
            ("etc/puppet", "/etc/puppet"),
            ("var/lib/puppet", "/var/lib/puppet"),
            ("var/cache/puppet", "/var/cache/puppet"),
            ("hosts", "/etc/hosts"),
        ];
        if server {
            mounts.extend([
                ("var/lib/puppetserver", "/var/lib/puppetserver"),
                ("var/log/puppetserver", "/var/log/puppetserver"),
                ("run/puppetserver", "/run/puppetserver"),
                ("default/puppetserver", "/etc/default/puppetserver"),
                ("sbin", "/usr/local/sbin"),
                ("etc/warmspare", "/etc/warmspare"),
            ]);
        }
        for (rel, real) in &mounts {
            let dst = dir.join(rel);
            fs::create_dir_all(dst.parent().unwrap()).unwrap();
            match *rel {
                "hosts" => fs::write(&dst, hosts).unwrap(),
                "default/puppetserver" => fs::write(
                    &dst,
                    "JAVA_ARGS=\"-Xms256m -Xmx512m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
                     -Djruby.logger.class=com.puppetlabs.jruby_utils.jruby.Slf4jLogger\"\n\
                     JAVA_ARGS_CLI=\"\"\nTK_ARGS=\"\"\nINSTALL_DIR=\"/usr/share/puppetserver\"\n\
                     CONFIG=\"/etc/puppet/puppetserver/conf.d\"\n\
                     BOOTSTRAP_CONFIG=\"/etc/puppet/puppetserver/services.d\"\n",
                )
                .unwrap(),
                "sbin" | "run/puppetserver" | "etc/warmspare" => {
                    fs::create_dir_all(&dst).unwrap();
                    // The mount point on the machine; empty, like the package's.
                    fs::create_dir_all(real).unwrap();
                }
                _ => {
                    warmspare_tests::sh(Command::new("cp").arg("-a").arg(real).arg(&dst));
                }
            }
        }
        let mut script = format!("hostname {name}\n");
        for (rel, real) in &mounts {
            script += &format!("mount --bind '{}' '{real}'\n", dir.join(rel).display());
        }
        script += "echo ready\nexec sleep infinity\n";
        let mut holder = Command::new(require("setpriv", "util-linux"))
            .args(["--pdeathsig", "KILL", "--"])
            .arg(require("unshare", "util-linux"))
            .args([
                "-m",
                "-u",
                "-p",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "/bin/sh",
                "-ec",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "host {name}'s namespace did not come up");
        let children = format!("/proc/{0}/task/{0}/children", holder.id());
        let init: u32 = fs::read_to_string(&children)
            .unwrap()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no holder under {children}"));
        let ns = fs::read_link(format!("/proc/{init}/ns/mnt"))
            .unwrap()
            .to_string_lossy()
            .to_string();
        Host {
            name,
            dir: dir.to_path_buf(),
            holder,
            init,
            ns,
            path: path.to_string(),
        }
    }

    /// A command run inside this host.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(require("nsenter", "util-linux"));
        c.args(["-t", &self.init.to_string(), "-m", "-u", "-p", "--"])
            .args(args)
            .env("PATH", &self.path)
            .stdin(Stdio::null());
        c
    }

    /// Runs `args` inside this host.
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs `args` inside this host and fails the test unless it succeeds.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "on {}: {args:?} failed: {}",
            self.name,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The wrapper that starts a warmspare agent inside this host (`nsenter`
    /// forks it into the host's PID namespace: signal it by [`Host::agent_pid`]).
    fn wrapper(&self) -> Vec<String> {
        ["nsenter", "-t", &self.init.to_string(), "-m", "-u", "-p", "--"]
            .map(str::to_string)
            .to_vec()
    }

    /// Every process of this host but its holder dies at once (SIGKILL), as
    /// in a power cut: Puppet Server's JVM among them.
    fn crash(&self) {
        wait_until("every process of the host gone", LIMIT, || {
            // Not the holder nor `unshare` above it (also in the mount
            // namespace): with them the whole host would be gone.
            let left: Vec<u32> = members(&self.ns, self.init)
                .into_iter()
                .filter(|p| *p != self.holder.id())
                .collect();
            for pid in &left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            left.is_empty()
        });
        // The stand-in's record of the server it started goes with the host.
        let _ = fs::remove_file(self.dir.join("run/puppetserver/test-pgid"));
    }

    /// The warmspare agent running in this host, as seen from outside.
    fn agent_pid(&self) -> u32 {
        let mut found = None;
        wait_until("the agent's process", LIMIT, || {
            found = members(&self.ns, 0)
                .into_iter()
                .find(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "warmspare-agent"));
            found.is_some()
        });
        found.unwrap()
    }

    /// A path of this host (`/etc/puppet/...`) seen from outside.
    fn path(&self, real: &str) -> PathBuf {
        let rel = real.trim_start_matches('/');
        for (prefix, copy) in [("etc/puppet", "etc/puppet"), ("var/lib/warmspare", "var/lib/warmspare")] {
            if let Some(rest) = rel.strip_prefix(prefix) {
                return self.dir.join(copy).join(rest.trim_start_matches('/'));
            }
        }
        panic!("no copy of {real} on {}", self.name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.dir.join("var/log/puppetserver/foreground.log");
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "---- Puppet Server on {} (last lines) ----\n{}",
                self.name,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // The kernel ends the namespace's processes once its first one is
        // gone; wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !members(&self.ns, 0).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The file a fenced block of the guide installs: the block whose first
/// lines name `path` in a comment.
fn from_guide(path: &str) -> String {
    let guide = fs::read_to_string(GUIDE).unwrap();
    let mut blocks = guide.split("```").skip(1).step_by(2);
    let block = blocks
        .find(|b| {
            b.lines()
                .take(3)
                .any(|l| l.trim_start().starts_with(&format!("# {path}")))
        })
        .unwrap_or_else(|| panic!("docs/puppet-enterprise.md has no block for {path}"));
    // Drop the info string (`sh`, `ini`) and the indentation of a block
    // inside a list item.
    let body = block.split_once('\n').unwrap().1;
    let indent = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.lines()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
        + "\n"
}

/// The `systemctl` stand-in for Puppet Server in a host: the drop-in's
/// `ExecStartPre=` lines (the `+` prefix dropped: everything runs as root
/// here), `puppetserver foreground` in its own session, and the wait for
/// "successfully started" (Debian's unit waits for its restart file).
fn systemctl_shim(dropin: &Path) -> String {
    format!(
        r#"#!/bin/bash
set -eu
verb=$1; unit=${{@: -1}}; unit=${{unit%.service}}
[ "$unit" = puppetserver ] || {{ echo "systemctl (test): unknown unit $unit" >&2; exit 5; }}
pgfile=/run/puppetserver/test-pgid
log=/var/log/puppetserver/foreground.log
running() {{ [ -s $pgfile ] && pgrep -g "$(cat $pgfile)" >/dev/null; }}
stop() {{
  running || {{ rm -f $pgfile; return 0; }}
  pg=$(cat $pgfile)
  kill -TERM -- -$pg 2>/dev/null || true
  for i in $(seq 1 600); do running || {{ rm -f $pgfile; return 0; }}; sleep 0.1; done
  kill -KILL -- -$pg 2>/dev/null || true; rm -f $pgfile
}}
start() {{
  sed -n 's/^ExecStartPre=+\{{0,1\}}//p' '{dropin}' | while IFS= read -r line; do eval "$line"; done
  : > $log
  setsid puppetserver foreground >> $log 2>&1 < /dev/null &
  echo $! > $pgfile
  for i in $(seq 1 3000); do
    grep -q "Puppet Server has successfully started" $log && return 0
    running || {{ echo "systemctl (test): puppetserver exited" >&2; tail -20 $log >&2; exit 1; }}
    sleep 0.1
  done
  echo "systemctl (test): puppetserver did not start in 300 s" >&2; exit 1
}}
case "$verb" in
  start) running || start ;;
  stop) stop ;;
  restart) stop; start ;;
  is-active) running ;;
  *) echo "systemctl (test): $verb unsupported" >&2; exit 1 ;;
esac
"#,
        dropin = dropin.display()
    )
}

/// The serial of a PEM certificate, as `openssl x509 -serial` prints it (hex).
fn serial_of(pem: &Path) -> u128 {
    let out = warmspare_tests::sh(
        Command::new(require("openssl", "openssl"))
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(pem),
    );
    let hex = out.trim().strip_prefix("serial=").unwrap_or_else(|| panic!("{out}"));
    u128::from_str_radix(hex, 16).unwrap()
}

/// Every certificate under `dir` (recursively): path -> serial.
fn cert_serials(dir: &Path, out: &mut BTreeMap<PathBuf, u128>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            cert_serials(&p, out);
        } else if p.extension().is_some_and(|x| x == "pem") && p.parent().is_some_and(|d| d.ends_with("signed")) {
            out.insert(p.clone(), serial_of(&p));
        }
    }
}

/// `inventory.txt` lines: serial -> subject.
fn inventory(path: &Path) -> Vec<(u128, String)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let serial = u128::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            Some((serial, f.nth(2)?.to_string()))
        })
        .collect()
}

/// One `puppet agent -t` on host `c` as `certname` (its own ssldir and
/// vardir, so agents can run side by side).
fn agent_run(c: &Host, certname: &str) -> Output {
    c.run(&[
        "puppet",
        "agent",
        "-t",
        "--certname",
        certname,
        "--ssldir",
        &format!("/var/lib/puppet/ssl-{certname}"),
        "--vardir",
        &format!("/var/cache/puppet/{certname}"),
    ])
}

/// `puppet agent -t` succeeded (`--detailed-exitcodes`: 0 or 2).
fn applied(o: &Output) -> bool {
    matches!(o.status.code(), Some(0 | 2))
}

/// Runs `agent_run` for every name side by side; panics unless all applied.
fn agents_apply(c: &Host, names: &[&str]) {
    std::thread::scope(|s| {
        let runs: Vec<_> = names.iter().map(|n| (n, s.spawn(|| agent_run(c, n)))).collect();
        for (n, r) in runs {
            let out = r.join().unwrap();
            assert!(applied(&out), "puppet agent -t as {n}: {}", text(&out));
        }
    });
}

/// The CA service's answer for its own certificate on `ip` (404: no CA).
fn ca_answer(curl: &Path, ip: &str) -> String {
    let out = Command::new(curl)
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20"])
        .arg(format!("https://{ip}:8140/puppet-ca/v1/certificate/ca"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_puppet_ca_fails_over_and_back_on_real_puppet_server_with_no_serial_twice() {
    let started = Instant::now();
    for (tool, package) in [
        ("puppetserver", "puppetserver"),
        ("puppet", "puppet-agent"),
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("pgrep", "procps"),
        ("setsid", "util-linux"),
    ] {
        require(tool, package);
    }
    let curl = require("curl", "curl");
    assert!(
        warmspare_shared::apply::can_chown(),
        "this test runs Puppet Server in mount namespaces: it needs root"
    );

    // The cluster: the guide's hooks, its watch, and the server's address
    // for warmspare-ca-off.
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!("[[watch]]\nname = \"ca\"\npath = \"{CA}\"\ndebounce_ms = 10\n"),
        node_extra: vec![
            (
                "a",
                "env = { PUPPETSERVER_URL = \"https://a.example.test:8140\" }".into(),
            ),
            (
                "b",
                "env = { PUPPETSERVER_URL = \"https://b.example.test:8140\" }".into(),
            ),
        ],
        ..Default::default()
    });
    let toml = fs::read_to_string(&c.file).unwrap().replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        "key_file = \"/etc/warmspare/node.key\"\n\
         on_promote = \"/usr/local/sbin/warmspare-ca-on\"\n\
         on_demote = \"/usr/local/sbin/warmspare-ca-off\"\n\
         hook_timeout = \"5m\"\n",
        1,
    );
    fs::write(&c.file, &toml).unwrap();

    let bindir = bin("warmspare-agent").parent().unwrap().to_path_buf();
    let hosts = |shared_ip: &str| {
        format!("127.0.0.1 localhost\n{A_IP} a.example.test\n{B_IP} b.example.test\n{shared_ip} puppet.example.test\n")
    };
    let mut servers = Vec::new();
    for (name, ip) in [("a", A_IP), ("b", B_IP)] {
        let dir = c.node(name).root.clone();
        let testbin = dir.join("testbin");
        let path = format!(
            "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            testbin.display(),
            bindir.display()
        );
        let host = Host::new(name, &dir, &hosts(A_IP), true, &path);
        // The guide's scripts and drop-in, as written there.
        for script in ["warmspare-ca-on", "warmspare-ca-off"] {
            write_file(
                &dir.join("sbin").join(script),
                from_guide(&format!("/usr/local/sbin/{script}")).as_bytes(),
                0o755,
            );
        }
        let dropin = dir.join("warmspare-ca-gate.conf");
        fs::write(
            &dropin,
            from_guide("/etc/systemd/system/puppetserver.service.d/warmspare-ca-gate.conf"),
        )
        .unwrap();
        write_file(&testbin.join("systemctl"), systemctl_shim(&dropin).as_bytes(), 0o755);
        fs::write(dir.join("etc/warmspare/cluster.toml"), &toml).unwrap();
        fs::set_permissions(
            dir.join("etc/warmspare/cluster.toml"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // Puppet: one name per server, the shared name as an alternative
        // name, the CA CLI asking the local server, agents autosigned.
        let conf = host.path("/etc/puppet");
        let main = if name == "a" {
            "certname = a.example.test\nserver = a.example.test\n\
             dns_alt_names = a.example.test,puppet.example.test\n"
        } else {
            "certname = b.example.test\nserver = a.example.test\n\
             dns_alt_names = b.example.test,puppet.example.test\n"
        };
        fs::write(
            conf.join("puppet.conf"),
            format!(
                "[main]\n{main}keylength = 2048\n\n[server]\nca_server = {name}.example.test\n\
                 autosign = /etc/puppet/autosign.conf\n"
            ),
        )
        .unwrap();
        fs::write(conf.join("autosign.conf"), "*.agents.test\n").unwrap();
        // The code both servers compile (catalogs come from either).
        write_file(
            &conf.join("code/environments/production/manifests/site.pp"),
            b"node default { }\n",
            0o644,
        );
        // The spare's CA CLI, allowed in auth.conf (the guide's step 2).
        let auth =
            from_guide("/etc/puppet/puppetserver/conf.d/auth.conf").replace("puppet-b.example.com", "b.example.test");
        host.ok(&["/bin/sh", "-ec", &auth]);
        let rules = fs::read_to_string(conf.join("puppetserver/conf.d/auth.conf")).unwrap();
        assert_eq!(rules.matches("\"b.example.test\"]").count(), 4, "{rules}");
        let d = conf.join("puppetserver/conf.d");
        let edit = |file: &str, from: &str, to: &str| {
            let p = d.join(file);
            let t = fs::read_to_string(&p).unwrap();
            assert!(t.contains(from), "{file} has no {from:?}");
            fs::write(&p, t.replacen(from, to, 1)).unwrap();
        };
        edit("webserver.conf", "ssl-host: 0.0.0.0", &format!("ssl-host: {ip}"));
        edit(
            "ca.conf",
            "# allow-subject-alt-names: false",
            "allow-subject-alt-names: true",
        );
        edit(
            "ca.conf",
            "# allow-authorization-extensions: false",
            "allow-authorization-extensions: true",
        );
        edit(
            "puppetserver.conf",
            "jruby-puppet: {",
            "jruby-puppet: {\n    max-active-instances: 1",
        );
        servers.push(host);
    }
    let b = servers.pop().unwrap();
    let a = servers.pop().unwrap();
    let cdir = c.dir.path().join("c");
    let clients = Host::new("c", &cdir, &hosts(A_IP), false, "/usr/sbin:/usr/bin:/sbin:/bin");
    fs::write(
        clients.path("/etc/puppet").join("puppet.conf"),
        "[main]\nserver = puppet.example.test\nkeylength = 2048\n",
    )
    .unwrap();

    // a's CA exists before warmspare (an existing Puppet server); the spare
    // runs without a CA (the guide's set-up, step 4).
    a.ok(&[
        "puppetserver",
        "ca",
        "setup",
        "--subject-alt-names",
        "a.example.test,puppet.example.test",
    ]);
    let (ca_a, ca_b) = (a.path(CA), b.path(CA));
    fs::create_dir_all(&ca_b).unwrap();
    warmspare_tests::sh(Command::new("chown").arg("puppet:puppet").arg(&ca_b));
    b.ok(&["/usr/local/sbin/warmspare-ca-off", "--config-only"]);
    let cfg = |h: &Host| fs::read_to_string(h.path("/etc/puppet/puppetserver/services.d/ca.cfg")).unwrap();
    let ca_on = |h: &Host| {
        cfg(h)
            .lines()
            .any(|l| l.starts_with("puppetlabs.services.ca.certificate-authority-service/"))
    };
    assert!(ca_on(&a) && !ca_on(&b));

    // The agents: a's on_promote pads a's serial and starts its Puppet Server
    // with the CA (through the gate, which lets a promoting node pass).
    let env = |h: &Host| vec![("PATH".to_string(), h.path.clone())];
    let start = |h: &Host| {
        let e = env(h);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c.start_wrapped(h.name, &e, &h.wrapper().iter().map(String::as_str).collect::<Vec<_>>())
    };
    let _agent_b = start(&b);
    let mut agent_a = start(&a);
    let (ha, hb) = (c.node("a").http_port, c.node("b").http_port);
    wait_until("a active, its Puppet Server up with the CA", SERVER, || {
        http_status(ha, "/_status/check") == Some(200)
    });
    assert_eq!(ca_answer(&curl, A_IP), "200");
    eprintln!("puppet e2e: a active with its CA after {:?}", started.elapsed());

    // The spare's certificate, by the guide (step 2): the shared name,
    // signed on the primary.
    b.ok(&["puppet", "ssl", "submit_request"]);
    a.ok(&["puppetserver", "ca", "sign", "--certname", "b.example.test"]);
    b.ok(&["puppet", "ssl", "download_cert"]);
    // Agents: three signed (autosign), one of them revoked.
    agents_apply(&clients, &["ag1.agents.test", "ag2.agents.test", "ag3.agents.test"]);
    a.ok(&["puppetserver", "ca", "revoke", "--certname", "ag3.agents.test"]);

    // Replication: content, modes, owners, times of the whole CA directory.
    converge(&ca_a, &ca_b, LIMIT);
    for f in [
        "serial",
        "inventory.txt",
        "ca_crl.pem",
        "ca_crt.pem",
        "ca_key.pem",
        "signed/b.example.test.pem",
    ] {
        assert_eq!(fs::read(ca_a.join(f)).unwrap(), fs::read(ca_b.join(f)).unwrap(), "{f}");
    }
    let puppet_uid = warmspare_tests::sh(Command::new("id").args(["-u", "puppet"]));
    let key_md = fs::metadata(ca_b.join("ca_key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&key_md).to_string(),
        puppet_uid.trim()
    );
    assert_eq!(key_md.permissions().mode() & 0o777, 0o640);
    let names_b: Vec<String> = inventory(&ca_b.join("inventory.txt"))
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    for n in ["a.example.test", "b.example.test", "ag1.agents.test", "ag3.agents.test"] {
        assert!(
            names_b.iter().any(|s| s.ends_with(&format!("CN={n}"))),
            "{n} not in b's inventory: {names_b:?}"
        );
    }
    c.wait_linked("a", LIMIT);

    // The race: a signs a certificate (serial file, inventory, signed/) and
    // its agent dies before it ships any of it.
    let pid_a = a.agent_pid().to_string();
    warmspare_tests::sh(Command::new("kill").args(["-STOP", &pid_a]));
    agents_apply(&clients, &["ag4.agents.test"]);
    let cutoff = ca_a.join("signed/ag4.agents.test.pem");
    let cutoff_serial = serial_of(&cutoff);
    let cutoff_pem = fs::read(&cutoff).unwrap();
    assert!(!ca_b.join("signed/ag4.agents.test.pem").exists());
    // Host a dies: its agent and its Puppet Server.
    let killed = Instant::now();
    warmspare_tests::sh(Command::new("kill").args(["-KILL", &pid_a]));
    agent_a.kill9();
    a.crash();

    // Failover: b's on_promote pads the serial and restarts b's Puppet
    // Server with the CA; then the agents' name points at b.
    let out = c.ctl(&["failover", "--to", "b", "--force", "--timeout", "30s"]);
    assert!(out.status.success(), "failover: {}", text(&out));
    assert_eq!(http_status(hb, "/_status/check"), Some(200));
    fs::write(clients.dir.join("hosts"), hosts(B_IP)).unwrap();
    let mut first = None;
    wait_until("a catalog from b", SERVER, || {
        let out = agent_run(&clients, "ag1.agents.test");
        if applied(&out) {
            first = Some(killed.elapsed());
        }
        applied(&out)
    });
    let failover = first.unwrap();
    eprintln!("puppet e2e: failover (agent kill on a to the first catalog from b) took {failover:?}");
    assert_eq!(ca_answer(&curl, B_IP), "200");

    // Meanwhile host a boots while it is not the active (its agent is still
    // down): the gate turns the CA off before Puppet Server starts.
    std::thread::scope(|s| {
        let boot_a = s.spawn(|| a.run(&["systemctl", "start", "puppetserver"]));
        // Existing agents run against b, a new one gets a fresh serial there,
        // the revoked one is refused.
        agents_apply(&clients, &["ag2.agents.test", "ag5.agents.test"]);
        let refused = agent_run(&clients, "ag3.agents.test");
        assert!(
            !applied(&refused),
            "the revoked agent got a catalog: {}",
            text(&refused)
        );
        let out = boot_a.join().unwrap();
        assert!(out.status.success(), "a's Puppet Server: {}", text(&out));
    });
    assert!(!ca_on(&a), "the gate left the CA on in a's ca.cfg");
    assert_eq!(
        ca_answer(&curl, A_IP),
        "404",
        "a's Puppet Server serves a CA while a is not the active"
    );
    let new_serial = serial_of(&ca_b.join("signed/ag5.agents.test.pem"));
    assert!(
        new_serial > cutoff_serial,
        "b issued {new_serial:#x}, not past a's unseen {cutoff_serial:#x}"
    );
    let list = b.ok(&["puppetserver", "ca", "list", "--all"]);
    for n in [
        "a.example.test",
        "b.example.test",
        "ag1.agents.test",
        "ag2.agents.test",
        "ag3.agents.test",
        "ag5.agents.test",
    ] {
        assert!(
            list.contains(n),
            "`puppetserver ca list --all` on b misses {n}:\n{list}"
        );
    }

    // a rejoins: it steps down (on_demote leaves its CA-less server alone),
    // and the certificate it signed while cut off is kept under diverged/.
    agent_a.restart();
    let diverged = a.path("/var/lib/warmspare").join("diverged");
    let mut kept = BTreeMap::new();
    wait_until("a's cut-off certificate under diverged/", LIMIT, || {
        kept.clear();
        cert_serials(&diverged, &mut kept);
        kept.keys().any(|p| p.ends_with("ca/signed/ag4.agents.test.pem"))
    });
    let (kept_path, _) = kept
        .iter()
        .find(|(p, _)| p.ends_with("ca/signed/ag4.agents.test.pem"))
        .unwrap();
    assert_eq!(fs::read(kept_path).unwrap(), cutoff_pem);
    converge(&ca_b, &ca_a, LIMIT);
    assert_eq!(ca_answer(&curl, A_IP), "404");

    // Failback: b's on_demote restarts it without the CA, a's on_promote
    // with it.
    let out = c.ctl(&["failback", "--yes", "--timeout", "600s"]);
    assert!(out.status.success(), "failback: {}", text(&out));
    assert_eq!(http_status(ha, "/_status/check"), Some(200));
    wait_until("b's Puppet Server back without the CA", SERVER, || {
        ca_answer(&curl, B_IP) == "404"
    });
    assert!(ca_on(&a) && !ca_on(&b));
    assert_eq!(ca_answer(&curl, A_IP), "200");
    fs::write(clients.dir.join("hosts"), hosts(A_IP)).unwrap();
    agents_apply(&clients, &["ag1.agents.test", "ag6.agents.test"]);
    converge(&ca_a, &ca_b, LIMIT);
    let last = serial_of(&ca_a.join("signed/ag6.agents.test.pem"));
    assert!(last > new_serial, "a issued {last:#x} after b's {new_serial:#x}");

    // No serial twice anywhere: every certificate on both nodes (the CA
    // directories and diverged/), and every inventory line.
    let mut certs = BTreeMap::new();
    for h in [&a, &b] {
        cert_serials(&h.path(CA), &mut certs);
        cert_serials(&h.path("/var/lib/warmspare"), &mut certs);
    }
    let mut by_serial: BTreeMap<u128, Vec<u8>> = BTreeMap::new();
    for (p, serial) in &certs {
        let pem = fs::read(p).unwrap();
        if let Some(other) = by_serial.insert(*serial, pem.clone()) {
            assert_eq!(other, pem, "serial {serial:#x} on two certificates ({})", p.display());
        }
    }
    let mut inv = inventory(&ca_a.join("inventory.txt"));
    inv.extend(inventory(&ca_b.join("inventory.txt")));
    inv.extend(inventory(
        &kept_path.parent().unwrap().parent().unwrap().join("inventory.txt"),
    ));
    let mut subjects: BTreeMap<u128, String> = BTreeMap::new();
    for (serial, subject) in inv {
        if let Some(other) = subjects.insert(serial, subject.clone()) {
            assert_eq!(other, subject, "serial {serial:#x} in inventory.txt for two subjects");
        }
    }
    assert!(subjects.values().any(|s| s.ends_with("CN=ag4.agents.test")));
    assert!(
        by_serial.contains_key(&cutoff_serial) && by_serial.len() >= 8,
        "{by_serial:?}"
    );
    eprintln!(
        "puppet e2e: {} certificates, no serial twice; failover {failover:?}; whole test {:?}",
        by_serial.len(),
        started.elapsed()
    );
}
