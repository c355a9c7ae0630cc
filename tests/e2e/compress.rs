//! Per-link compression (`compress`): what crosses the wire between two real
//! agents, and a peer whose compressed frame would expand without bound.

use std::path::Path;
use std::time::Duration;

use warmspare_shared::compress::{Compress, Packer};
use warmspare_shared::proto::{self, Hello, Purpose, Reply, Request};
use warmspare_tests::{
    converge, hello_session, http_get, noise, test_hello, wait_until, write_cluster_file, write_file, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Adds `key` to the `[cluster]` table and `node_b` to node b's table.
fn with_keys(c: &TestCluster, key: &str, node_b: &str) {
    let text = std::fs::read_to_string(&c.file).unwrap();
    let text = text.replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        &format!("key_file = \"/etc/warmspare/node.key\"\n{key}\n"),
        1,
    );
    let text = text.replacen("name = \"b\"\n", &format!("name = \"b\"\n{node_b}\n"), 1);
    write_cluster_file(&c.file, &text);
}

/// Certificates (base64 text between PEM markers), a plain SQL dump and a
/// file of random bytes under `root`; returns the sizes of the SQL dump and
/// of the random file.
fn fill(root: &Path) -> (u64, u64) {
    let b64 = |seed: u64, len: usize| -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        noise(len, seed)
            .iter()
            .map(|b| ALPHABET[(b & 63) as usize] as char)
            .collect()
    };
    for i in 0..100u64 {
        let body = b64(i + 1, 1600);
        let lines: Vec<&str> = (0..body.len())
            .step_by(64)
            .map(|s| &body[s..(s + 64).min(body.len())])
            .collect();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        write_file(
            &root.join(format!("signed/node{i:03}.example.com.pem")),
            pem.as_bytes(),
            0o644,
        );
    }
    let mut sql = String::from("COPY public.reports (id, certname, status, environment, created_at) FROM stdin;\n");
    for i in 0..20_000u64 {
        sql += &format!(
            "{i}\tnode{:04}.example.com\t{}\tproduction\t2026-11-{:02} {:02}:{:02}:{:02}+00\n",
            i % 700,
            ["changed", "unchanged", "failed"][(i % 3) as usize],
            1 + i % 28,
            i % 24,
            i % 60,
            (i * 7) % 60
        );
    }
    sql += "\\.\n";
    write_file(&root.join("dump.sql"), sql.as_bytes(), 0o600);
    let random = noise(512 * 1024, 99);
    write_file(&root.join("random.bin"), &random, 0o600);
    (sql.len() as u64, random.len() as u64)
}

/// The active's bytes sent, and what they stand for uncompressed.
fn counters(http_port: u16) -> (u64, u64) {
    let (code, body) = http_get(http_port, "/metrics").expect("metrics answer");
    assert_eq!(code, 200, "{body}");
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    (
        value("warmspare_bytes_sent_total "),
        value("warmspare_bytes_sent_uncompressed_total "),
    )
}

/// Whether node a's link to b says it compresses.
fn link_compressed(c: &TestCluster) -> bool {
    let st = c.node_status("a");
    let links = st["links"].as_array().cloned().unwrap_or_default();
    assert!(!links.is_empty(), "no links in {st}");
    links.iter().all(|l| l["compressed"] == true)
}

/// Starts the pair on the tree of [`fill`], waits until b has it, and
/// returns (bytes sent, bytes uncompressed, SQL size, random size, whether
/// the link says it compresses).
fn replicate(c: &TestCluster) -> (u64, u64, u64, u64, bool) {
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    let (sql, random) = fill(&ra);
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&ra, &rb, LIMIT);
    let http = c.node("a").http_port;
    // The counters move once the writer has flushed: at the latest just
    // after the peer applied what it sent.
    wait_until("the counters to account for the tree", LIMIT, || {
        counters(http).1 > sql + random
    });
    let (sent, raw) = counters(http);
    eprintln!("MEASURE {sent} bytes sent for {raw} bytes of frames (SQL {sql}, random {random})");
    (sent, raw, sql, random, link_compressed(c))
}

#[test]
fn a_pair_that_always_compresses_replicates_identically_and_sends_less() {
    let c = TestCluster::pair("");
    with_keys(&c, "compress = \"always\"", "");
    let (sent, raw, sql, random, compressed) = replicate(&c);
    // The dump alone compresses far more than by half; the random file
    // does not compress at all.
    assert!(sent + sql / 2 < raw, "{sent} bytes sent for {raw} bytes uncompressed");
    assert!(sent > random, "{sent} bytes sent, less than the random file");
    assert!(compressed, "status does not show the link compressed");
}

#[test]
fn auto_on_loopback_and_never_on_either_side_send_uncompressed() {
    for (key, node_b) in [("", ""), ("compress = \"always\"", "compress = \"never\"")] {
        let c = TestCluster::pair("");
        with_keys(&c, key, node_b);
        let (sent, raw, _, _, compressed) = replicate(&c);
        assert_eq!(sent, raw, "[cluster] {key:?}, node b {node_b:?}");
        assert!(!compressed, "[cluster] {key:?}, node b {node_b:?}");
    }
}

/// Dials b as a, the active of epoch 1, saying `compress = "always"`.
async fn push(c: &TestCluster) -> (warmspare_tests::Session, Reply) {
    let hello = Hello {
        compress: Compress::Always,
        ..test_hello("a", Purpose::Replicate, 1)
    };
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        match hello_session(c, "b", &c.node("a").key, "a", hello.clone()).await {
            Ok(x) => return x,
            Err(e) if std::time::Instant::now() > deadline => panic!("cannot dial b: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_frame_that_expands_too_far_ends_its_session_not_the_agent() {
    let c = TestCluster::pair("");
    let mut b = c.start("b");

    // A million pings, 5 MB of frames, in one packed frame of a few
    // kilobytes: each ping is valid, so only the bound on what one packed
    // frame may expand to ends the session (without it, the pings would
    // all be answered and the session would go on).
    let (mut conn, hello) = push(&c).await;
    assert!(matches!(hello, Reply::Hello(_)), "{hello:?}");
    let ping = proto::encode(&Request::Ping).unwrap();
    let bomb = vec![ping; 1_000_000];
    let packed = proto::pack(&mut Packer::new().unwrap(), &bomb).unwrap();
    assert!(packed.len() < 64 * 1024, "{} bytes", packed.len());
    conn.1.feed(packed).await.unwrap();
    conn.1.flush().await.unwrap();
    let end = tokio::time::timeout(LIMIT, conn.0.recv::<Reply>()).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "the session should have ended, got {end:?}"
    );

    // The agent carries on: a new session's compressed file is applied.
    let (mut conn, _) = push(&c).await;
    let data = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec();
    let reqs = [
        Request::Op(proto::Op::FileBegin {
            watch: "ca".into(),
            path: "after-the-bomb.pem".into(),
            meta: warmspare_shared::manifest::Meta {
                mode: 0o644,
                mtime: 1_700_000_000,
                ..Default::default()
            },
            size: data.len() as u64,
            hash: warmspare_shared::manifest::ContentHash::of(&data),
            delta_base: None,
        }),
        Request::Op(proto::Op::FileData(serde_bytes::ByteBuf::from(data.clone()))),
        Request::Op(proto::Op::FileEnd),
        Request::Commit { batch: 1 },
    ];
    let frames: Vec<bytes::Bytes> = reqs.iter().map(|r| proto::encode(r).unwrap()).collect();
    conn.1
        .feed(proto::pack(&mut Packer::new().unwrap(), &frames).unwrap())
        .await
        .unwrap();
    conn.1.flush().await.unwrap();
    let reply = tokio::time::timeout(LIMIT, conn.0.recv::<Reply>()).await;
    assert!(
        matches!(&reply, Ok(Ok(Some(Reply::Committed { batch: 1, failed, .. }))) if failed.is_empty()),
        "{reply:?}"
    );
    assert_eq!(std::fs::read(c.ca("b").join("after-the-bomb.pem")).unwrap(), data);
    assert!(b.is_running(), "the agent stopped");
}
