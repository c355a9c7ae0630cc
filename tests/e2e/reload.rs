//! SIGHUP applies what it says it applies: SSH trust and the node's env.

use std::fs;
use std::time::Duration;

use warmspare_shared::keys::SecretKey;
use warmspare_shared::proto::{Purpose, Reply, Request};
use warmspare_shared::ssh::DialError;
use warmspare_tests::{
    hello_session, test_hello, wait_until, write_cluster_file, ClusterOptions, Session, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

/// An operator session to node `to` with `key`, past its hello.
async fn control(c: &TestCluster, to: &str, key: &SecretKey) -> Result<Session, DialError> {
    let hello = test_hello("second", Purpose::Control, 0);
    let (session, reply) = hello_session(c, to, key, "second", hello).await?;
    assert!(matches!(reply, Reply::Hello(_)), "{reply:?}");
    Ok(session)
}

fn reloads(log: &str) -> usize {
    log.matches("cluster file reloaded").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_operator_key_is_refused_and_its_open_session_ends() {
    let second = SecretKey::generate();
    let block = format!(
        "[[operator]]\nname = \"second\"\npublic_key = \"{}\"\n\n",
        second.public().to_openssh()
    );
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "{block}[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n",
            warmspare_tests::CA_WATCH
        ),
        ..Default::default()
    });
    let b = c.start("b");
    let mut open = loop {
        match control(&c, "b", &second).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    open.1.send(&Request::Status).await.unwrap();
    let reply = open.0.recv::<Reply>().await.unwrap();
    assert!(matches!(reply, Some(Reply::Status(_))), "{reply:?}");

    let text = fs::read_to_string(&c.file).unwrap();
    assert!(text.contains(&block));
    write_cluster_file(&c.file, &text.replace(&block, ""));
    let before = reloads(&b.log_text());
    b.signal("-HUP");
    wait_until("b to reload", LIMIT, || reloads(&b.log_text()) > before);

    // The session opened with the removed key ends without being asked.
    let ended = tokio::time::timeout(Duration::from_secs(20), open.0.recv::<Reply>()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "the open session of a removed key is still served: {ended:?}\n{}",
        b.log_text()
    );
    // And the key no longer gets in.
    match control(&c, "b", &second).await {
        Err(DialError::AuthRefused) => {}
        Err(e) => panic!("refused, but not at authentication: {e}"),
        Ok(_) => panic!("a removed operator key was accepted after the reload"),
    }
    assert!(b.log_text().contains("no longer trusts this key"), "{}", b.log_text());
    // The operator still listed keeps working.
    let out = c.ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reachable = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node"] == "b" && n["reachable"] == true);
    assert!(reachable, "{v:#}");
}

#[test]
fn a_changed_node_env_reaches_the_next_job_after_a_reload() {
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n\n[[job]]\nname = \"greet\"\nrun = \"echo $GREETING > $OUT\"\n",
            warmspare_tests::CA_WATCH
        ),
        node_extra: vec![(
            "a",
            "env = { GREETING = \"one\", OUT = \"OUTPATH\" }".to_string(),
        )],
        ..Default::default()
    });
    let file = c.dir.path().join("greeting");
    let text = fs::read_to_string(&c.file)
        .unwrap()
        .replace("OUTPATH", &file.display().to_string());
    write_cluster_file(&c.file, &text);
    let _b = c.start("b");
    let a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    let out = c.ctl(&["run-job", "greet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(&file).unwrap().trim(), "one");

    write_cluster_file(&c.file, &text.replace("GREETING = \"one\"", "GREETING = \"two\""));
    let before = reloads(&a.log_text());
    a.signal("-HUP");
    wait_until("a to reload", LIMIT, || reloads(&a.log_text()) > before);
    let out = c.ctl(&["run-job", "greet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        fs::read_to_string(&file).unwrap().trim(),
        "two",
        "the job ran with the env from before the reload"
    );
}
