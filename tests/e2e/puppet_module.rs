//! The Puppet module (`packaging/puppet/warmspare`), validated and applied
//! with Debian's real `puppet`, its output read by the real agent.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use warmspare_tests::{bin, output_text, require, workspace};

fn module_dir() -> PathBuf {
    workspace().join("packaging/puppet/warmspare")
}

/// Every file below `dir` whose name ends in `.ext`.
fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_with(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_module_validates() {
    let puppet = require("puppet", "puppet-agent");
    let manifests = files_with(&module_dir(), "pp");
    assert!(manifests.len() >= 2, "{manifests:?}");
    let out = Command::new(&puppet)
        .args(["parser", "validate"])
        .args(&manifests)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let templates = files_with(&module_dir(), "epp");
    assert!(templates.len() >= 2, "{templates:?}");
    let out = Command::new(&puppet)
        .args(["epp", "validate"])
        .args(&templates)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
}

/// `puppet apply` of the class, with its paths under a temporary directory
/// and the package and service left alone: the cluster file it writes is one
/// the agent reads as a ready node, the key and modes are right, the role
/// gate is the one `systemd/` ships, and a second run changes nothing.
#[test]
fn puppet_apply_writes_a_cluster_file_the_agent_accepts() {
    let puppet = require("puppet", "puppet-agent");
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    let keygen = |name: &str| {
        let out = Command::new(bin("warmspare-agent"))
            .args(["keygen", "--out"])
            .arg(t.join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (a_pub, b_pub) = (keygen("a.key"), keygen("b.key"));
    let op_pub = keygen("op.key");
    std::fs::create_dir_all(t.join("ca/signed")).unwrap();
    std::fs::create_dir_all(t.join("systemd")).unwrap();
    let (a_port, b_port, http) = (
        warmspare_tests::free_port(),
        warmspare_tests::free_port(),
        warmspare_tests::free_port(),
    );
    let t_s = t.display();
    let manifest = format!(
        r#"class {{ 'warmspare':
  config_dir     => '{t_s}/etc',
  systemd_dir    => '{t_s}/systemd',
  manage_package => false,
  manage_service => false,
  gated_services => ['puppetserver'],
  node_key       => Sensitive(file('{t_s}/a.key')),
  cluster        => {{ 'name' => 'pe', 'preferred_active' => 'a', 'state_dir' => '{t_s}/state', 'key_file' => '{t_s}/etc/node.key' }},
  nodes          => [
    {{ 'name' => 'a', 'ssh' => '127.0.0.1:{a_port}', 'http' => '127.0.0.1:{http}', 'public_key' => '{a_pub}',
      'env' => {{ 'PGHOST' => '/run/postgresql', 'NOTE' => 'a "quoted" \\ value' }} }},
    {{ 'name' => 'b', 'ssh' => '127.0.0.1:{b_port}', 'public_key' => '{b_pub}' }},
  ],
  operators      => [{{ 'name' => 'admin', 'public_key' => '{op_pub}' }}],
  watches        => [{{ 'name' => 'ca', 'path' => '{t_s}/ca', 'exclude' => ['*.bak'], 'debounce_ms' => 10 }}],
  jobs           => [{{ 'name' => 'rbac', 'schedule' => '0 0 3 * * *', 'dump' => 'true', 'keep' => 3 }}],
}}
"#
    );
    std::fs::write(t.join("site.pp"), manifest).unwrap();
    let apply = || {
        Command::new(&puppet)
            .arg("apply")
            .args(["--detailed-exitcodes", "--modulepath"])
            .arg(workspace().join("packaging/puppet"))
            .arg("--confdir")
            .arg(t.join("puppet/conf"))
            .arg("--vardir")
            .arg(t.join("puppet/var"))
            .arg("--logdir")
            .arg(t.join("puppet/log"))
            .arg("--rundir")
            .arg(t.join("puppet/run"))
            .arg("--codedir")
            .arg(t.join("puppet/code"))
            .arg(t.join("site.pp"))
            .output()
            .unwrap()
    };
    // --detailed-exitcodes: 2 means changes were made and nothing failed.
    let first = apply();
    assert_eq!(first.status.code(), Some(2), "{}", output_text(&first));

    let cluster = t.join("etc/cluster.toml");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cluster), 0o640);
    assert_eq!(mode(&t.join("etc/node.key")), 0o600);
    assert_eq!(
        std::fs::read(t.join("etc/node.key")).unwrap(),
        std::fs::read(t.join("a.key")).unwrap()
    );

    // The real agent reads the file as a ready node a, escapes included.
    let out = Command::new(bin("warmspare-agent"))
        .arg("--cluster")
        .arg(&cluster)
        .args(["--node", "a", "check", "--local"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let out = Command::new(bin("warmspare-agent"))
        .arg("--cluster")
        .arg(&cluster)
        .args(["config", "show"])
        .output()
        .unwrap();
    let shown = output_text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(r#"NOTE = 'a "quoted" \ value'"#) || shown.contains(r#"NOTE = "a \"quoted\" \\ value""#),
        "{shown}"
    );
    assert!(
        shown.contains("name = \"rbac\"") && shown.contains("keep = 3"),
        "{shown}"
    );

    // The role gate is the drop-in systemd/ ships, pointed at this cluster file.
    let gate = std::fs::read_to_string(t.join("systemd/puppetserver.service.d/warmspare-role-gate.conf")).unwrap();
    let shipped = std::fs::read_to_string(workspace().join("systemd/role-gate.conf")).unwrap();
    assert_eq!(
        gate.replace(&cluster.display().to_string(), "/etc/warmspare/cluster.toml"),
        shipped
    );

    // Idempotent: a second run changes nothing.
    let second = apply();
    assert_eq!(second.status.code(), Some(0), "{}", output_text(&second));
}
