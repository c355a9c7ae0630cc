//! Peers that hold a valid key but send what they must not, and peers without one.

use std::time::Duration;

use serde_bytes::ByteBuf;
use warmspare_shared::keys::SecretKey;
use warmspare_shared::manifest::{ContentHash, Meta};
use warmspare_shared::proto::{FrameReader, Hello, Op, Purpose, Reply, Request, PROTOCOL_VERSION};
use warmspare_shared::ssh::{self, DialError};
use warmspare_tests::{converge, hello_session, read, temp_files, test_hello, wait_until, write_file, TestCluster};

type Conn = warmspare_tests::Session;

/// Dials node `to` as node `me` and says hello as the active of `epoch`.
async fn push_session(c: &TestCluster, me: &str, to: &str, epoch: u64) -> Result<(Conn, Reply), DialError> {
    let hello = test_hello(me, Purpose::Replicate, epoch);
    hello_session(c, to, &c.node(me).key, me, hello).await
}

/// Waits until node `name`'s agent accepts connections (its watch roots
/// exist before it starts, so they say nothing about it).
fn wait_listening(c: &TestCluster, name: &str) {
    let port = c.node(name).port;
    wait_until(&format!("{name} listening"), Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
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
    wait_listening(&c, "b");
    std::os::unix::fs::symlink(&outside, b_root.join("evil")).unwrap();

    for bad in [
        "../outside/pwned",
        "/tmp/warmspare-pwned",
        "evil/pwned",
        "a/../../pwned",
        "./x",
    ] {
        // A link planted on the receiver is a local matter, not the peer's
        // fault: the change fails and is reported, the session goes on.
        let through_link = bad == "evil/pwned";
        let (mut conn, hello) = loop {
            match push_session(&c, "a", "b", 1).await {
                Ok(x) => break x,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
        let (reply, closed) = send_all(&mut conn, file_op(bad, b"owned")).await;
        if through_link {
            assert!(
                matches!(reply, Some(Reply::Committed { ref failed, .. }) if failed.len() == 1),
                "{bad}: {reply:?}\n{}",
                b.log_text()
            );
            continue;
        }
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
    let hello = Hello {
        protocol: PROTOCOL_VERSION + 1,
        version: "future".into(),
        ..test_hello("a", Purpose::Replicate, 1)
    };
    let (_session, reply) = hello_session(&c, "b", &c.node("a").key, "a", hello).await.unwrap();
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("protocol")),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_no_controller_could_have_made_is_refused() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let role_file = c.node("b").root.join("var/lib/warmspare/role.json");
    wait_until("b's role file", Duration::from_secs(30), || role_file.exists());
    let before = std::fs::read(&role_file).unwrap();
    // A node key claims the highest epoch there is: adopting it would leave
    // no epoch for the next failover.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (_, reply) = loop {
        match push_session(&c, "a", "b", u64::MAX).await {
            Ok(x) => break x,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "b never answered: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("epoch")),
        "{reply:?}"
    );
    // A jump far beyond what any controller made is refused too.
    let ((_, _, _), reply) = push_session(&c, "a", "b", 1 + 1_000_000).await.unwrap();
    assert!(matches!(&reply, Reply::Refused { .. }), "{reply:?}");
    assert_eq!(std::fs::read(&role_file).unwrap(), before, "b's role state changed");
    // b still knows a as the active of epoch 1, and a failover still works.
    let out = c.ctl(&["failover", "--to", "b", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = c.status_json();
    let b = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "b")
        .unwrap();
    assert_eq!(b["status"]["role"]["epoch"], 2, "{v}");
    assert_eq!(b["status"]["role"]["active"], "b", "{v}");
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

/// A session whose writing half is the raw byte stream, for frames no
/// well-behaved writer would produce. The hello has been answered.
struct RawSession {
    reader: FrameReader<tokio::io::ReadHalf<russh::ChannelStream<russh::client::Msg>>>,
    writer: tokio::io::WriteHalf<russh::ChannelStream<russh::client::Msg>>,
    _handle: russh::client::Handle<ssh::PinnedHost>,
}

fn framed(req: &Request) -> Vec<u8> {
    let body = warmspare_shared::proto::encode(req).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

impl RawSession {
    async fn open(c: &TestCluster, me: &str, to: &str) -> RawSession {
        use tokio::io::AsyncWriteExt;
        let target = c.node(to);
        let addr = format!("127.0.0.1:{}", target.port);
        let d = loop {
            match ssh::dial(
                &addr,
                &target.key.public(),
                &c.node(me).key,
                me,
                Duration::from_secs(10),
            )
            .await
            {
                Ok(d) => break d,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (rd, mut writer) = tokio::io::split(d.stream);
        let mut reader = FrameReader::new(rd);
        let hello = test_hello(me, Purpose::Replicate, 1);
        writer.write_all(&framed(&Request::Hello(hello))).await.unwrap();
        let reply = reader.recv::<Reply>().await.unwrap().unwrap();
        assert!(matches!(reply, Reply::Hello(_)), "{reply:?}");
        RawSession {
            reader,
            writer,
            _handle: d.handle,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Whether the agent ends the session (end of stream or an error) within 10 s.
    async fn dropped(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.reader.recv::<Reply>()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
            }
        }
    }
}

/// The agent still takes a well-behaved push after a hostile one.
async fn still_serves(c: &TestCluster, name: &str) {
    let (mut conn, _) = push_session(c, "a", "b", 1).await.unwrap();
    let (reply, _) = send_all(&mut conn, file_op(name, name.as_bytes())).await;
    assert!(
        matches!(reply, Some(Reply::Committed { ref failed, .. }) if failed.is_empty()),
        "{reply:?}"
    );
    assert_eq!(read(&c.ca("b").join(name)).unwrap(), name.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_truncated_frames_drop_only_their_session() {
    let c = TestCluster::pair("");
    let b = c.start("b");
    let b_root = c.ca("b");
    wait_listening(&c, "b");
    let rss_before = b.rss_kib().unwrap();

    // A length prefix of 4 GiB, then a megabyte of junk: refused on the prefix.
    let mut s = RawSession::open(&c, "a", "b").await;
    let mut junk = u32::MAX.to_be_bytes().to_vec();
    junk.extend(std::iter::repeat_n(0xA5u8, 1 << 20));
    let _ = s.write(&junk).await;
    assert!(s.dropped().await, "an oversized frame did not end the session");
    // One byte over the cap.
    let mut s = RawSession::open(&c, "a", "b").await;
    let _ = s
        .write(&((warmspare_shared::proto::MAX_FRAME as u32) + 1).to_be_bytes())
        .await;
    assert!(
        s.dropped().await,
        "a frame one byte over the cap did not end the session"
    );

    // A file begun, part of its data, then a frame cut short and the end of the stream.
    let mut s = RawSession::open(&c, "a", "b").await;
    let data = warmspare_tests::noise(300_000, 7);
    let begin = Request::Op(Op::FileBegin {
        watch: "ca".into(),
        path: "cut.bin".into(),
        meta: Meta {
            mode: 0o644,
            mtime: 1_700_000_000,
            ..Meta::default()
        },
        size: data.len() as u64,
        hash: ContentHash::of(&data),
        delta_base: None,
    });
    let mut bytes = framed(&begin);
    bytes.extend(framed(&Request::Op(Op::FileData(ByteBuf::from(
        data[..100_000].to_vec(),
    )))));
    let rest = framed(&Request::Op(Op::FileData(ByteBuf::from(data[100_000..].to_vec()))));
    bytes.extend(&rest[..rest.len() / 2]);
    s.write(&bytes).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        s.writer.shutdown().await.unwrap();
    }
    assert!(s.dropped().await, "a truncated frame did not end the session");
    // A body that is not a message.
    let mut s = RawSession::open(&c, "a", "b").await;
    let _ = s.write(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert!(s.dropped().await, "an undecodable frame did not end the session");

    wait_until("temp files cleaned", Duration::from_secs(10), || {
        temp_files(&b_root).is_empty()
    });
    assert!(!b_root.join("cut.bin").exists(), "a half-received file appeared");
    still_serves(&c, "after-frames.pem").await;
    let mut b = b;
    assert!(b.is_running());
    let rss_after = b.rss_kib().unwrap();
    eprintln!("resident memory of the agent: {rss_before} KiB before the hostile sessions, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let log = b.log_text();
    assert!(
        log.contains("session ended"),
        "no log line for the dropped sessions:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_past_their_size_or_on_the_wrong_base_are_refused() {
    let c = TestCluster::pair("");
    let mut b = c.start("b");
    let b_root = c.ca("b");
    wait_listening(&c, "b");
    let base = warmspare_tests::noise(200_000, 11);
    let (mut conn, _) = push_session(&c, "a", "b", 1).await.unwrap();
    let (reply, _) = send_all(&mut conn, file_op("base.bin", &base)).await;
    assert!(
        matches!(reply, Some(Reply::Committed { ref failed, .. }) if failed.is_empty()),
        "{reply:?}"
    );

    let sig = warmspare_shared::delta::signature(&base, warmspare_shared::delta::block_len(base.len() as u64));
    let doubled = [base.clone(), base.clone()].concat();
    let mut patch = Vec::new();
    warmspare_shared::delta::diff(&sig, &doubled, &mut patch).unwrap();
    let delta_op = |size: u64, hash: ContentHash, base_hash: ContentHash, patch: &[u8]| {
        vec![
            Request::Op(Op::FileBegin {
                watch: "ca".into(),
                path: "base.bin".into(),
                meta: Meta {
                    mode: 0o644,
                    mtime: 1_700_000_001,
                    ..Meta::default()
                },
                size,
                hash,
                delta_base: Some(base_hash),
            }),
            Request::Op(Op::FileData(ByteBuf::from(patch.to_vec()))),
            Request::Op(Op::FileEnd),
            Request::Commit { batch: 2 },
        ]
    };
    // The delta writes 400,000 bytes where 200,000 were announced.
    let (reply, _) = send_all(
        &mut conn,
        delta_op(
            base.len() as u64,
            ContentHash::of(&doubled),
            ContentHash::of(&base),
            &patch,
        ),
    )
    .await;
    assert!(
        matches!(&reply, Some(Reply::Committed { failed, .. }) if failed.iter().any(|(p, why)| p == "base.bin" && why.contains("delta"))),
        "{reply:?}"
    );
    // A delta against a base the receiver does not hold.
    let (reply, _) = send_all(
        &mut conn,
        delta_op(
            doubled.len() as u64,
            ContentHash::of(&doubled),
            ContentHash::of(b"another base"),
            &patch,
        ),
    )
    .await;
    assert!(
        matches!(&reply, Some(Reply::Committed { failed, .. }) if failed.iter().any(|(p, why)| p == "base.bin" && why.contains("base"))),
        "{reply:?}"
    );
    // Data far past what the announced size allows ends the session.
    let (reply, closed) = send_all(
        &mut conn,
        delta_op(10, ContentHash::of(b"0123456789"), ContentHash::of(&base), &doubled),
    )
    .await;
    assert!(matches!(reply, Some(Reply::Refused { .. })), "{reply:?}");
    assert!(closed, "the session was not dropped");

    assert_eq!(
        read(&b_root.join("base.bin")).unwrap(),
        base,
        "the old version was not kept"
    );
    wait_until("temp files cleaned", Duration::from_secs(10), || {
        temp_files(&b_root).is_empty()
    });
    still_serves(&c, "after-deltas.pem").await;
    assert!(b.is_running());
    let log = b.log_text();
    assert!(
        log.contains("cannot apply a received file"),
        "no log line for the refused deltas:\n{log}"
    );
}

/// Reads replies until the session ends; `None` when it is still open after
/// `limit`.
async fn read_to_end(conn: &mut Conn, limit: Duration) -> Option<usize> {
    tokio::time::timeout(limit, async {
        let mut n = 0;
        while let Ok(Some(_)) = conn.0.recv::<Reply>().await {
            n += 1;
        }
        n
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_of_a_node_ends_its_older_one() {
    // A sender whose link was cut dials again while the receiver still
    // serves its old session: the old one must end (its half-sent file
    // cleaned up, nothing of it applied), and the new one must work.
    let c = TestCluster::pair("");
    let b = c.start("b");
    let b_root = c.ca("b");
    wait_listening(&c, "b");
    let (mut old, hello) = push_session(&c, "a", "b", 1).await.unwrap();
    assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
    let data = warmspare_tests::noise(1 << 20, 7);
    let half = file_op("half", &data);
    old.1.send(&half[0]).await.unwrap();
    old.1
        .send(&Request::Op(Op::FileData(ByteBuf::from(data[..64 * 1024].to_vec()))))
        .await
        .unwrap();
    // Its answer to a ping says the partial data has been taken in.
    old.1.send(&Request::Ping).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(60), old.0.recv::<Reply>()).await;
    assert!(matches!(pong, Ok(Ok(Some(Reply::Pong)))), "{pong:?}");

    let (mut new, hello) = push_session(&c, "a", "b", 1).await.unwrap();
    assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
    assert!(
        read_to_end(&mut old, Duration::from_secs(60)).await.is_some(),
        "the older session of node a is still open"
    );
    assert!(
        b.log_text().contains("ending its older session"),
        "no log line for the replaced session"
    );
    let (reply, _) = send_all(&mut new, file_op("whole", b"whole")).await;
    assert!(matches!(reply, Some(Reply::Committed { .. })), "{reply:?}");
    assert_eq!(read(&b_root.join("whole")).as_deref(), Some(&b"whole"[..]));
    assert_eq!(
        temp_files(&b_root),
        Vec::<String>::new(),
        "the older session left temp files"
    );
    assert!(!b_root.join("half").exists(), "the half-sent file was applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_no_acknowledgements_loses_its_session_not_the_daemon() {
    // A node-key peer floods requests whose replies are large (signatures
    // of a 1 MiB file) and never reads one. The receiver's queues are
    // bounded, so it stops reading and its memory stays put (the replies
    // asked for add up to gigabytes); after the reply deadline (2 s here)
    // it drops the session, and the daemon serves on.
    let c = TestCluster::pair("");
    write_file(&c.ca("b").join("big"), &warmspare_tests::noise(1 << 20, 3), 0o644);
    let mut b = c.start_with_env("b", &[("WARMSPARE_PEER_DEADLINE_MS", "2000")]);
    wait_listening(&c, "b");
    still_serves(&c, "b").await;
    let rss_before = b.rss_kib().expect("b's resident size");
    let (conn, hello) = push_session(&c, "a", "b", 1).await.unwrap();
    assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
    let (mut r, mut w, _handle) = conn;
    // Far more than any queue holds: the writes block long before.
    const FLOOD: u64 = 10_000_000;
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < FLOOD {
            let req = Request::GetSignature {
                id: sent,
                watch: "ca".into(),
                path: "big".into(),
                block_len: 256,
            };
            if w.send(&req).await.is_err() {
                return;
            }
            sent += 1;
        }
    });
    let mut rss_max = 0;
    wait_until(
        "b dropping the session that reads nothing",
        Duration::from_secs(120),
        || {
            rss_max = rss_max.max(b.rss_kib().unwrap_or(0));
            b.log_text().contains("read no reply within")
        },
    );
    assert!(b.is_running(), "the daemon died");
    assert!(
        rss_max < rss_before + 128 * 1024,
        "b grew from {rss_before} KiB to {rss_max} KiB under the flood"
    );
    // Reading now drains what was in flight, then meets the session's end.
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut n = 0u64;
        while let Ok(Some(_)) = r.recv::<Reply>().await {
            n += 1;
        }
        n
    })
    .await;
    assert!(read.is_ok(), "the session that read nothing is still open");
    // The test's own writer may stay blocked in its SSH client: it is no
    // part of what is tested.
    flood.abort();
    still_serves(&c, "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_protocol_6_is_refused_with_its_version() {
    // Protocol 7 added a field to the hello: an agent of protocol 6 sends
    // one that does not decode as this version's, and is told why.
    #[derive(serde::Serialize)]
    struct HelloV6 {
        protocol: u32,
        version: String,
        node: String,
        epoch: u64,
        active: String,
        config_hash: String,
        purpose: Purpose,
        owners: bool,
    }
    #[derive(serde::Serialize)]
    enum RequestV6 {
        Hello(HelloV6),
    }
    let c = TestCluster::pair("");
    let _b = c.start("b");
    wait_listening(&c, "b");
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
    let (mut r, mut w) = (FrameReader::new(rd), warmspare_shared::proto::FrameWriter::new(wr));
    let old = RequestV6::Hello(HelloV6 {
        protocol: 6,
        version: "old".into(),
        node: "a".into(),
        epoch: 1,
        active: "a".into(),
        config_hash: String::new(),
        purpose: Purpose::Replicate,
        owners: false,
    });
    let body = bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap();
    w.feed(body.into()).await.unwrap();
    w.flush().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), r.recv::<Reply>()).await;
    assert!(
        matches!(&reply, Ok(Ok(Some(Reply::Refused { reason }))) if reason.contains("protocol 6 is not supported")),
        "{reply:?}"
    );
}
