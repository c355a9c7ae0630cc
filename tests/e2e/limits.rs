//! Bounded resources: what an agent holds for connections that never
//! authenticate, requests never finished, sessions piled on one connection
//! and hook output, stays bounded, and the agent keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use warmspare_shared::proto::{Purpose, Reply, Request, SUBSYSTEM};
use warmspare_shared::ssh;
use warmspare_tests::{converge, http_status, require, test_hello, wait_until, write_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(60);

/// Whether the agent has closed `s` (end of stream or a reset), reading
/// away whatever it sent first (the SSH banner).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn half_open_connections_do_not_stop_status_or_health() {
    let prlimit = require("prlimit", "util-linux");
    let c = TestCluster::pair("");
    // Few descriptors, as a crowded host would leave it: without caps the
    // half-open connections below take them all.
    let mut b = c.start_wrapped("b", &[], &[prlimit.to_str().unwrap(), "--nofile=256:256", "--"]);
    let b_node = c.node("b");
    wait_until("b's health port", LIMIT, || {
        http_status(b_node.http_port, "/_status/ping") == Some(200)
    });

    // Connections that never say anything on the SSH port, and requests
    // whose headers never end on the health port.
    let mut ssh_conns: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", b_node.port)).ok())
        .collect();
    let mut http_conns: Vec<TcpStream> = (0..600)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", b_node.http_port)).ok()?;
            s.write_all(b"GET /_status HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert!(
        ssh_conns.len() > 250 && http_conns.len() > 500,
        "could not open the connections"
    );

    // While they are all still open on this side, operators and load
    // balancers get through.
    wait_until("status to reach b", LIMIT, || {
        let v = c.status_json();
        v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["node"] == "b" && n["reachable"] == true))
    });
    wait_until("b's health port to answer", LIMIT, || {
        http_status(b_node.http_port, "/_status/ping") == Some(200)
    });
    // The agent let go of them: unauthenticated SSH connections and
    // unfinished requests are closed after a deadline.
    wait_until("the half-open connections to be closed", LIMIT, || {
        let ssh_open = ssh_conns.iter_mut().map(closed_by_peer).filter(|c| !c).count();
        let http_open = http_conns.iter_mut().map(closed_by_peer).filter(|c| !c).count();
        ssh_open == 0 && http_open == 0
    });
    assert!(b.is_running(), "b died");
    let log = b.log_text();
    assert!(
        log.matches("cannot accept a connection").count() < 10,
        "the agent ran out of descriptors:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_pile_up_sessions() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let target = c.node("b");
    let addr = format!("127.0.0.1:{}", target.port);
    let dialed = loop {
        match ssh::dial(
            &addr,
            &target.key.public(),
            &c.node("a").key,
            "a",
            Duration::from_secs(10),
        )
        .await
        {
            Ok(d) => break d,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // The dial's own session is the first; ask for many more on the same
    // connection and keep them all open.
    let mut held = vec![dialed.stream];
    let mut refused = 0;
    for _ in 0..30 {
        let Ok(mut ch) = dialed.handle.channel_open_session().await else {
            refused += 1;
            continue;
        };
        ch.request_subsystem(true, SUBSYSTEM).await.unwrap();
        let ok = loop {
            match tokio::time::timeout(Duration::from_secs(10), ch.wait()).await {
                Ok(Some(russh::ChannelMsg::Success)) => break true,
                Ok(Some(russh::ChannelMsg::Failure)) | Ok(None) | Err(_) => break false,
                Ok(Some(_)) => continue,
            }
        };
        if ok {
            held.push(ch.into_stream());
        } else {
            refused += 1;
        }
    }
    assert!(
        held.len() <= ssh::MAX_SESSIONS,
        "{} sessions on one connection (cap {})",
        held.len(),
        ssh::MAX_SESSIONS
    );
    assert!(refused >= 30 + 1 - ssh::MAX_SESSIONS, "{refused} refused");

    // Sessions that end give their place back.
    drop(held);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(mut ch) = dialed.handle.channel_open_session().await {
            ch.request_subsystem(true, SUBSYSTEM).await.unwrap();
            if let Ok(Some(russh::ChannelMsg::Success)) = tokio::time::timeout(Duration::from_secs(10), ch.wait()).await
            {
                again = Some(ch.into_stream());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stream = again.expect("no session once the others ended");
    let (rd, wr) = tokio::io::split(stream);
    let (mut r, mut w) = (
        warmspare_shared::proto::FrameReader::new(rd),
        warmspare_shared::proto::FrameWriter::new(wr),
    );
    let hello = test_hello("a", Purpose::Probe, 1);
    w.send(&Request::Hello(hello)).await.unwrap();
    assert!(matches!(r.recv::<Reply>().await.unwrap(), Some(Reply::Hello(_))));
}

#[test]
fn a_hook_that_writes_without_end_keeps_the_agent_small() {
    // 100 MB of output from after_apply on the passive.
    let c = TestCluster::pair("after_apply = \"head -c 100000000 /dev/zero | tr '\\\\0' x\"");
    let b = c.start("b");
    let _a = c.start("a");
    let (ca, cb) = (c.ca("a"), c.ca("b"));
    write_file(&ca.join("one.pem"), b"one", 0o644);
    converge(&ca, &cb, LIMIT);
    let log = c.node("b").root.join("var/lib/warmspare/hooks/after_apply.ca.log");
    let mut peak = 0;
    wait_until("the hook's run to end", Duration::from_secs(120), || {
        peak = peak.max(b.rss_kib().unwrap_or(0));
        let v = c.status_json();
        let runs = v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node"] == "b"))
            .and_then(|n| n["status"]["watches"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .find(|w| w["name"] == "ca")
            .map(|w| {
                w["after_apply"]["runs_ok"].as_u64().unwrap_or(0)
                    + w["after_apply"]["runs_failed"].as_u64().unwrap_or(0)
            })
            .unwrap_or(0);
        runs >= 1
    });
    peak = peak.max(b.rss_kib().unwrap_or(0));
    assert!(peak < 100 * 1024, "the agent grew to {peak} KiB");
    let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    assert!(size < 256 * 1024, "the hook's log holds {size} bytes");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("bytes of output left out"), "no marker in the log");
    assert!(
        text.ends_with('x') || text.ends_with("x\n"),
        "the log does not end with the output's tail"
    );
}
