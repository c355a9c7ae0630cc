//! A node started inside the test's own process with
//! [`warmspare_agent::serve`], on listeners bound to port 0: no agent
//! process is spawned.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use warmspare_shared::keys::SecretKey;

/// How long the node may take to answer, and to stop once told to.
const DEADLINE: Duration = Duration::from_secs(30);

/// `GET path` on `addr` over HTTP/1.0: the status code and the body, or
/// `None` while nothing answers.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// A cluster of `a` (preferred active, on `ssh`) and `b` (never started,
/// on a port nothing listens on), each with its key under its own root.
fn write_cluster(dir: &Path, ssh: u16, http: u16, b_port: u16) -> std::path::PathBuf {
    let mut text = String::from(
        "[cluster]\nname = \"test\"\npreferred_active = \"a\"\nstate_dir = \"/var/lib/warmspare\"\n\
         key_file = \"/etc/warmspare/node.key\"\n\n",
    );
    for (name, port) in [("a", ssh), ("b", b_port)] {
        let root = dir.join(name);
        std::fs::create_dir_all(root.join("ssl/ca")).unwrap();
        let key = SecretKey::generate();
        key.save(&root.join("etc/warmspare/node.key")).unwrap();
        text += &format!(
            "[[node]]\nname = \"{name}\"\nssh = \"127.0.0.1:{port}\"\nhttp = \"127.0.0.1:{http}\"\n\
             public_key = \"{}\"\nroot = \"{}\"\n\n",
            key.public().to_openssh(),
            root.display()
        );
    }
    text += "[[watch]]\nname = \"ca\"\npath = \"/ssl/ca\"\ndebounce_ms = 5\n";
    let file = dir.join("cluster.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_in_process_answers_its_health_check_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let ssh = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A port for `b` that nothing listens on: a's shipper towards it fails
    // and retries, which the node must survive.
    let b_port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ssh_addr = ssh.local_addr().unwrap();
    let http_addr = http.local_addr().unwrap();
    let file = write_cluster(dir.path(), ssh_addr.port(), http_addr.port(), b_port);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = warmspare_agent::serve(&file, Some("a"), ssh, Some(http), async {
        let _ = stopped.await;
    });
    let client = async move {
        let until = tokio::time::Instant::now() + DEADLINE;
        let mut last = None;
        while tokio::time::Instant::now() < until {
            last = http_get(http_addr, "/_status/check").await;
            if last.as_ref().is_some_and(|(code, _)| *code == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(());
        last
    };
    let (ended, answer) = tokio::join!(tokio::time::timeout(DEADLINE * 2, node), client);

    let (code, body) = answer.expect("the health endpoint never answered");
    assert_eq!(code, 200, "a, the preferred active, is not active: {body}");
    assert!(
        body.starts_with("active at epoch "),
        "unexpected check answer: {body:?}"
    );
    let ended = ended.expect("the node did not stop within the deadline after shutdown");
    if let Err(e) = ended {
        panic!("the node stopped with an error: {e:#}");
    }
    // Its listeners went with it.
    assert!(
        http_get(http_addr, "/_status/ping").await.is_none(),
        "the health listener still answers after the node stopped"
    );
    assert!(
        TcpStream::connect(ssh_addr).await.is_err(),
        "the SSH listener still accepts after the node stopped"
    );
    // It kept its state under its own root, as the cluster file says.
    assert!(
        dir.path().join("a/var/lib/warmspare/undo").is_dir(),
        "no state dir under a's root"
    );
}
