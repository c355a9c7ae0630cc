//! `warmsparectl demo`: a whole pair on loopback, narrated, with no setup.
//!
//! It makes a temporary directory, generates two node keys and a cluster
//! file for `mastera` and `masterb` on free loopback ports, starts two real
//! `warmspare-agent` processes, signs certificates with `openssl` into the
//! active's CA directory (or writes PEM-like files when `openssl` is
//! missing), shows them arriving on the passive, then kills the active, fails
//! over to the spare, brings the old active back (it steps down, and what it
//! wrote while cut off is preserved under `diverged/`), fails back, and
//! cleans up.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use warmspare_shared::keys::SecretKey;

use crate::cli::{DemoArgs, FailoverArgs, StatusArgs, SwitchoverArgs};
use crate::client::Operator;
use crate::{admin, roles, status};

/// Runs the demo.
pub fn run(opts: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let agent = agent_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("warmspare-demo")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let root = dir.path().to_path_buf();
    say(&format!("Setting up a two-node cluster in {}", root.display()));

    let nodes = ["mastera", "masterb"];
    let mut text = String::from(
        "[cluster]\nname = \"demo\"\npreferred_active = \"mastera\"\nstate_dir = \"/var/lib/warmspare\"\nkey_file = \"/etc/warmspare/node.key\"\n\n",
    );
    for n in nodes {
        let key = SecretKey::generate();
        key.save(&root.join(n).join("etc/warmspare/node.key"))
            .context("cannot write a node key")?;
        text += &format!(
            "[[node]]\nname = \"{n}\"\nssh = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{}\"\npublic_key = \"{}\"\nroot = \"{}\"\n\n",
            free_port()?,
            free_port()?,
            key.public().to_openssh(),
            root.join(n).display()
        );
    }
    let operator = SecretKey::generate();
    let operator_key = root.join("operator.key");
    operator.save(&operator_key).context("cannot write the operator key")?;
    text += &format!(
        "[[operator]]\nname = \"demo\"\npublic_key = \"{}\"\n\n",
        operator.public().to_openssh()
    );
    text += "[[watch]]\nname = \"ca\"\npath = \"/etc/puppetlabs/puppetserver/ca\"\nexclude = [\"*.bak\"]\n";
    let cluster = root.join("cluster.toml");
    // 0600 whatever the umask: agents refuse a cluster file others can write.
    std::io::Write::write_all(
        &mut warmspare_shared::perms::create_private_file(&cluster).context("cannot create the cluster file")?,
        text.as_bytes(),
    )
    .context("cannot write the cluster file")?;
    say(&format!(
        "Generated an ed25519 key per node and this cluster file, {} (the same file on every node):",
        cluster.display()
    ));
    for line in text.lines() {
        println!("    {line}");
    }
    say("`root` puts each node's paths under its own folder, so both fit on one machine; on real servers it is left out.");

    let ca = |n: &str| root.join(n).join("etc/puppetlabs/puppetserver/ca");
    fs::create_dir_all(ca("mastera").join("signed")).context("cannot create the CA directory")?;

    let mut agents = Agents::default();
    for n in nodes {
        agents.start(&agent, &cluster, n, &root.join(format!("{n}.log")))?;
    }
    say("Started warmspare-agent for mastera (active at epoch 1) and masterb (passive).");

    let openssl = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let signer = if openssl {
        "openssl"
    } else {
        "PEM-like files (openssl is not installed)"
    };
    say(&format!(
        "Signing {} certificates into mastera's CA directory with {signer}:",
        opts.certs
    ));
    let a_ca = ca("mastera");
    if openssl {
        run_quiet(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=Puppet CA: demo",
                    "-keyout",
                ])
                .arg(a_ca.join("ca_key.pem"))
                .arg("-out")
                .arg(a_ca.join("ca_crt.pem")),
        )?;
    } else {
        fs::write(a_ca.join("ca_crt.pem"), pem("CA")).context("cannot write the CA certificate")?;
    }
    let mut names = Vec::new();
    for i in 1..=opts.certs {
        let host = format!("agent{i}.example.com");
        let out = a_ca.join("signed").join(format!("{host}.pem"));
        if openssl {
            let key = root.join(format!("{host}.key"));
            let csr = root.join(format!("{host}.csr"));
            run_quiet(
                Command::new("openssl")
                    .args([
                        "req",
                        "-new",
                        "-newkey",
                        "rsa:2048",
                        "-nodes",
                        "-subj",
                        &format!("/CN={host}"),
                        "-keyout",
                    ])
                    .arg(&key)
                    .arg("-out")
                    .arg(&csr),
            )?;
            run_quiet(
                Command::new("openssl")
                    .args(["x509", "-req", "-days", "30", "-CAcreateserial", "-in"])
                    .arg(&csr)
                    .arg("-CA")
                    .arg(a_ca.join("ca_crt.pem"))
                    .arg("-CAkey")
                    .arg(a_ca.join("ca_key.pem"))
                    .arg("-out")
                    .arg(&out),
            )?;
        } else {
            fs::write(&out, pem(&host)).context("cannot write a certificate")?;
        }
        let t = Instant::now();
        let rel = format!("signed/{host}.pem");
        let b_path = ca("masterb").join(&rel);
        wait_for(Duration::from_secs(30), || {
            fs::read(&b_path).ok() == fs::read(&out).ok()
        })
        .with_context(|| format!("{rel} did not reach masterb"))?;
        println!(
            "    {rel}: signed on mastera, identical on masterb {:.0} ms later",
            t.elapsed().as_secs_f64() * 1000.0
        );
        names.push(host);
    }
    fs::write(a_ca.join("inventory.txt.bak"), b"an admin's backup copy\n").context("cannot write a backup file")?;
    if openssl {
        let b_ca = ca("masterb");
        for host in &names {
            let out = Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(b_ca.join("ca_crt.pem"))
                .arg(b_ca.join(format!("signed/{host}.pem")))
                .output()
                .context("cannot run openssl verify")?;
            if !out.status.success() {
                bail!(
                    "openssl verify failed on masterb for {host}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        say("On masterb, `openssl verify` accepts every certificate against the replicated CA certificate.");
    }
    // The excluded file must not arrive; give the watcher a moment's worth of work first.
    let marker = a_ca.join("serial.demo");
    fs::write(&marker, b"done\n").context("cannot write a marker file")?;
    wait_for(Duration::from_secs(30), || ca("masterb").join("serial.demo").exists())
        .context("the marker did not reach masterb")?;
    if ca("masterb").join("inventory.txt.bak").exists() {
        bail!("inventory.txt.bak is excluded but reached masterb");
    }
    say(
        "inventory.txt.bak matches `exclude = [\"*.bak\"]`: it stayed on mastera only. \
         (A real CA directory needs no excludes: see docs/puppet-enterprise.md.)",
    );

    // Status, a switchover and a failback, through the same code as the CLI.
    let op = Operator::load(&cluster, &operator_key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    show_status(&rt, &op)?;
    say("Killing mastera's agent with SIGKILL, as a crash would.");
    agents.kill("mastera");
    let cutoff = "signed/cutoff.example.com.pem";
    fs::write(a_ca.join(cutoff), pem("cutoff.example.com")).context("cannot write a certificate")?;
    say(&format!(
        "While its agent is down, something on mastera still writes {cutoff}: it cannot reach masterb."
    ));
    say("`warmsparectl failover --to masterb --force`: promote the spare without the active's agreement:");
    rt.block_on(roles::failover(
        &op,
        &FailoverArgs {
            to: "masterb".into(),
            force: true,
            timeout: Duration::from_secs(10),
        },
    ))?;
    say("masterb is active at epoch 2.");
    let b_ca = ca("masterb");
    fs::write(b_ca.join("signed/agent9.example.com.pem"), pem("agent9.example.com"))
        .context("cannot write a certificate")?;
    say("masterb signs signed/agent9.example.com.pem as the new CA.");
    say("Restarting mastera's agent: it still believes it is active at epoch 1, so it holds (health 503, no shipping) until a peer answers.");
    agents.start(&agent, &cluster, "mastera", &root.join("mastera.log"))?;
    let t = Instant::now();
    wait_for(Duration::from_secs(60), || {
        ca("mastera").join("signed/agent9.example.com.pem").exists() && !a_ca.join(cutoff).exists()
    })
    .context("mastera did not step down and follow masterb")?;
    let preserved = find_file(
        &root.join("mastera/var/lib/warmspare/diverged"),
        "cutoff.example.com.pem",
    )
    .context("mastera's cut-off certificate is not under diverged/")?;
    say(&format!(
        "mastera met masterb at epoch 2 and stepped down within {:.0} ms: it now holds masterb's agent9 certificate, \
         and its cut-off {cutoff} was moved aside, not lost:",
        t.elapsed().as_secs_f64() * 1000.0
    ));
    println!("    {}", preserved.display());
    say("(In a real CA, revoke a cut-off certificate's serial and sign that host again: see docs/operations.md.)");
    show_status(&rt, &op)?;
    say("`warmsparectl failback`: a switchover back to the preferred active mastera (flush, demote masterb, promote mastera at epoch 3):");
    let to_a = SwitchoverArgs {
        to: "mastera".into(),
        yes: true,
        dry_run: false,
        skip_jobs: false,
        timeout: Duration::from_secs(60),
    };
    rt.block_on(roles::switchover(&op, &to_a, "failback"))?;
    say("mastera is active at epoch 3.");
    say("`warmsparectl history`:");
    rt.block_on(admin::history(&op, false))?;

    agents.stop_all();
    say(&format!(
        "Stopped both agents. Demo finished in {:.1} s.",
        started.elapsed().as_secs_f64()
    ));
    if opts.keep {
        let kept = dir.keep();
        say(&format!(
            "Kept {}: the cluster file, both nodes' trees (mastera/, masterb/, with their state under var/lib/warmspare) and their logs (mastera.log, masterb.log).",
            kept.display()
        ));
    } else {
        say("Everything was removed; `warmsparectl demo --keep` keeps the directory to look around in.");
    }
    say("Next steps: docs/install.md sets up a real pair; docs/puppet-enterprise.md is the guide for a Puppet CA; docs/operations.md covers switchover, failover and what to do with diverged files.");
    Ok(())
}

/// `warmsparectl status`, through the CLI's own code.
fn show_status(rt: &tokio::runtime::Runtime, op: &Operator) -> Result<()> {
    say("`warmsparectl status`:");
    rt.block_on(status::run(
        op,
        &StatusArgs {
            json: false,
            watch: false,
        },
    ))
}

fn say(s: &str) {
    println!("==> {s}");
}

fn pem(name: &str) -> String {
    format!("-----BEGIN CERTIFICATE-----\n(demo certificate for {name})\n-----END CERTIFICATE-----\n")
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The first file named `name` below `dir`, depth first.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let kind = entry.file_type().ok()?;
        if kind.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr().context("no local address")?.port())
}

/// `warmspare-agent` beside this executable, else on `PATH`.
fn agent_binary() -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        let p = dir.join("warmspare-agent");
        if p.is_file() {
            return Ok(p);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("warmspare-agent"))
        .find(|p| p.is_file())
        .context("warmspare-agent is neither beside warmsparectl nor on PATH (build it with `cargo build --workspace`)")
}

/// The demo's agent processes; stopped (SIGKILL at worst) when dropped.
#[derive(Default)]
struct Agents {
    children: Vec<(String, Child)>,
}

impl Agents {
    fn start(&mut self, bin: &Path, cluster: &Path, node: &str, log: &Path) -> Result<()> {
        // Appended to: a restarted agent keeps its earlier lines.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .context("cannot open a log file")?;
        let child = Command::new(bin)
            .arg("--cluster")
            .arg(cluster)
            .args(["--node", node, "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        self.children.push((node.to_string(), child));
        Ok(())
    }

    /// Kills one agent with SIGKILL and forgets it.
    fn kill(&mut self, node: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == node) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop_all(&mut self) {
        for (_, c) in &mut self.children {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        for (_, mut c) in self.children.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop_all();
    }
}
