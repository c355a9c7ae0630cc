//! Peers that hold a valid key but send what they must not, and peers without one.

use std::time::Duration;

use serde_bytes::ByteBuf;
use warmspare_shared::keys::SecretKey;
use warmspare_shared::manifest::{ContentHash, Meta};
use warmspare_shared::proto::{FrameReader, FrameWriter, Hello, Op, Purpose, Reply, Request, PROTOCOL_VERSION};
use warmspare_shared::ssh::{self, DialError};
use warmspare_tests::{converge, read, wait_until, write_file, TestCluster};

type Conn = (
    FrameReader<tokio::io::ReadHalf<russh::ChannelStream<russh::client::Msg>>>,
    FrameWriter<tokio::io::WriteHalf<russh::ChannelStream<russh::client::Msg>>>,
    russh::client::Handle<ssh::PinnedHost>,
);

/// Dials node `to` as node `me` and says hello as the active of `epoch`.
async fn push_session(c: &TestCluster, me: &str, to: &str, epoch: u64) -> Result<(Conn, Reply), DialError> {
    let target = c.node(to);
    let addr = format!("127.0.0.1:{}", target.port);
    let d = ssh::dial(
        &addr,
        &target.key.public(),
        &c.node(me).key,
        me,
        Duration::from_secs(10),
    )
    .await?;
    let (rd, wr) = tokio::io::split(d.stream);
    let (mut r, mut w) = (FrameReader::new(rd), FrameWriter::new(wr));
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
        node: me.into(),
        epoch,
        active: me.into(),
        config_hash: "test".into(),
        purpose: Purpose::Replicate,
        owners: false,
    };
    w.send(&Request::Hello(hello)).await.unwrap();
    let reply = r.recv::<Reply>().await.unwrap().unwrap();
    Ok(((r, w, d.handle), reply))
}

fn file_op(path: &str, data: &[u8]) -> Vec<Request> {
    vec![
        Request::Op(Op::FileBegin {
            watch: "ca".into(),
            path: path.into(),
            meta: Meta {
                mode: 0o644,
                mtime: 1_700_000_000,
                ..Meta::default()
            },
            size: data.len() as u64,
            hash: ContentHash::of(data),
            delta_base: None,
        }),
        Request::Op(Op::FileData(ByteBuf::from(data.to_vec()))),
        Request::Op(Op::FileEnd),
        Request::Commit { batch: 1 },
    ]
}

/// Sends `reqs`; returns the first reply and whether the session then closed.
async fn send_all(conn: &mut Conn, reqs: Vec<Request>) -> (Option<Reply>, bool) {
    for r in reqs {
        if conn.1.send(&r).await.is_err() {
            break;
        }
    }
    let first = tokio::time::timeout(Duration::from_secs(10), conn.0.recv::<Reply>())
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    if !matches!(first, Some(Reply::Refused { .. })) {
        return (first, false);
    }
    let closed = matches!(
        tokio::time::timeout(Duration::from_secs(10), conn.0.recv::<Reply>()).await,
        Ok(Ok(None)) | Ok(Err(_))
    );
    (first, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_are_refused_and_the_agent_keeps_serving() {
    let c = TestCluster::pair("");
    let mut b = c.start("b");
    let b_root = c.ca("b");
    let outside = c.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    wait_until("b's ca root", Duration::from_secs(30), || b_root.is_dir());
    std::os::unix::fs::symlink(&outside, b_root.join("evil")).unwrap();

    for bad in [
        "../outside/pwned",
        "/tmp/warmspare-pwned",
        "evil/pwned",
        "a/../../pwned",
        "./x",
    ] {
        let (mut conn, hello) = loop {
            match push_session(&c, "a", "b", 1).await {
                Ok(x) => break x,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
        let (reply, closed) = send_all(&mut conn, file_op(bad, b"owned")).await;
        assert!(
            matches!(reply, Some(Reply::Refused { .. })),
            "{bad}: {reply:?}\n{}",
            b.log_text()
        );
        assert!(closed, "{bad}: the session was not dropped");
    }
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside the root"
    );
    assert!(!std::path::Path::new("/tmp/warmspare-pwned").exists());
    assert!(!c.dir.path().join("ssl/pwned").exists() && !c.node("b").root.join("ssl/pwned").exists());
    assert!(b.is_running(), "the agent died");

    // The same agent still serves a well-behaved session.
    let (mut conn, _) = push_session(&c, "a", "b", 1).await.unwrap();
    let (reply, _) = send_all(&mut conn, file_op("fine.pem", b"fine")).await;
    assert!(
        matches!(reply, Some(Reply::Committed { ref failed, .. }) if failed.is_empty()),
        "{reply:?}"
    );
    assert_eq!(read(&b_root.join("fine.pem")).unwrap(), b"fine");
    let log = b.log_text();
    assert!(log.contains("refused a request"), "no log line for the refusals");
    drop(conn);

    // And a real active still converges with it (the planted link is its own business).
    std::fs::remove_file(b_root.join("evil")).unwrap();
    write_file(&c.ca("a").join("signed/x.pem"), b"x", 0o644);
    let _a = c.start("a");
    converge(&c.ca("a"), &b_root, Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_and_a_future_protocol_are_refused() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    // Epoch 0 is lower than b's epoch 1.
    let (_, reply) = loop {
        match push_session(&c, "a", "b", 0).await {
            Ok(x) => break x,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // The refusal says who is active now, so a stale sender can step down.
    assert!(
        matches!(&reply, Reply::Stale(r) if r.epoch == 1 && r.active == "a"),
        "{reply:?}"
    );
    // A hello from a future protocol version.
    let target = c.node("b");
    let d = ssh::dial(
        &format!("127.0.0.1:{}", target.port),
        &target.key.public(),
        &c.node("a").key,
        "a",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (rd, wr) = tokio::io::split(d.stream);
    let (mut r, mut w) = (FrameReader::new(rd), FrameWriter::new(wr));
    let hello = Hello {
        protocol: PROTOCOL_VERSION + 1,
        version: "future".into(),
        node: "a".into(),
        epoch: 1,
        active: "a".into(),
        config_hash: String::new(),
        purpose: Purpose::Replicate,
        owners: false,
    };
    w.send(&Request::Hello(hello)).await.unwrap();
    let reply = r.recv::<Reply>().await.unwrap().unwrap();
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("protocol")),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_not_in_the_cluster_file_is_refused_at_the_ssh_layer() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let target = c.node("b");
    let stranger = SecretKey::generate();
    let addr = format!("127.0.0.1:{}", target.port);
    let mut last = None;
    for _ in 0..200 {
        match ssh::dial(&addr, &target.key.public(), &stranger, "a", Duration::from_secs(10)).await {
            Err(DialError::Unreachable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => {
                last = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(last, Some(Err(DialError::AuthRefused))),
        "{:?}",
        last.map(|r| r.map(|_| ()))
    );
    // A server presenting another key than the pinned one is refused by the client.
    let wrong_pin = SecretKey::generate().public();
    let r = ssh::dial(&addr, &wrong_pin, &c.node("a").key, "a", Duration::from_secs(10)).await;
    assert!(matches!(r, Err(DialError::KeyMismatch)), "{:?}", r.map(|_| ()));
}
