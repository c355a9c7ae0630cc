//! The systemd watchdog: fed while every loop that must go round does (the
//! shippers, the SSH and HTTP accept loops, the watcher), and not fed while
//! one of them hangs. A loop is made to hang with the test-only variable
//! `WARMSPARE_TEST_HANG_LOOP`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, write_file, Agent, TestCluster};

const LIMIT: Duration = Duration::from_secs(90);

/// What the service manager would receive from one agent.
struct Notifications {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(c: &TestCluster, node: &str) -> Notifications {
        let path = c.dir.path().join(format!("notify-{node}.sock"));
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Notifications {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Starts `node` under this socket, with a watchdog of one second, and
    /// waits for it to say it is ready.
    fn start(&mut self, c: &TestCluster, node: &str, env: &[(&str, &str)]) -> Agent {
        let path = self.path.to_str().unwrap().to_string();
        let mut all = vec![("NOTIFY_SOCKET", path.as_str()), ("WATCHDOG_USEC", "1000000")];
        all.extend_from_slice(env);
        let agent = c.start_with_env(node, &all);
        self.until("READY=1", LIMIT, |m| has_line(m, "READY=1"));
        agent
    }

    /// The next notification, if one comes within `limit`.
    fn next(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push(m.clone());
                return Some(m);
            }
        }
        None
    }

    /// Reads notifications until one matches `what`.
    fn until(&mut self, what: &str, limit: Duration, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {limit:?}; got {:#?}", self.seen);
            if let Some(m) = self.next(left) {
                if matches(&m) {
                    return m;
                }
            }
        }
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn fed(message: &str) -> bool {
    has_line(message, "WATCHDOG=1")
}

/// Starts a pair whose active (a) runs with `hang` set, checks that it
/// replicates and feeds the watchdog first, then that the watchdog stops
/// being fed and the status line and the log name `stalled`.
fn the_watchdog_starves_while(hang: &str, stalled: &str) {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("one"), b"1", 0o644);
    let _b = c.start("b");
    let mut n = Notifications::bind(&c, "a");
    let a = n.start(&c, "a", &[("WARMSPARE_TEST_HANG_LOOP", hang)]);
    converge(&ra, &rb, LIMIT);
    n.until("a first WATCHDOG=1", LIMIT, fed);
    let starving = format!("STATUS=not making progress: {stalled}");
    n.until(&starving, LIMIT, |m| m.lines().any(|l| l.starts_with(&starving)));
    // While the loop hangs, nothing feeds the watchdog any more: the next
    // status lines (one per half interval) carry no WATCHDOG=1.
    for _ in 0..4 {
        let m = n.next(LIMIT).expect("the status line goes on");
        assert!(!fed(&m), "fed while {stalled} hangs: {:#?}", n.seen);
    }
    let log = a.log_text();
    assert!(
        log.contains("the watchdog is not fed") && log.contains(&format!("{stalled} (no progress for")),
        "{log}"
    );
}

#[test]
fn the_watchdog_starves_while_a_shipper_hangs() {
    the_watchdog_starves_while("shipper", "the shipper to b");
}

#[test]
fn the_watchdog_starves_while_the_http_accept_loop_hangs() {
    the_watchdog_starves_while("http-accept", "the HTTP accept loop");
}

#[test]
fn an_idle_healthy_pair_keeps_feeding_the_watchdog() {
    // Longer than the longest limit of a loop (a shipper's, 30 s): a loop
    // that stamped only when busy would have gone stale by the end.
    const IDLE: Duration = Duration::from_secs(40);
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    write_file(&ra.join("one"), b"1", 0o644);
    let mut nb = Notifications::bind(&c, "b");
    let _b = nb.start(&c, "b", &[]);
    let mut na = Notifications::bind(&c, "a");
    let _a = na.start(&c, "a", &[]);
    converge(&ra, &rb, LIMIT);
    for n in [&mut na, &mut nb] {
        n.until("a WATCHDOG=1", LIMIT, fed);
        n.seen.clear();
    }
    let started = Instant::now();
    while started.elapsed() < IDLE {
        na.next(Duration::from_millis(100));
        nb.next(Duration::from_millis(100));
    }
    for (node, n) in [("a", &mut na), ("b", &mut nb)] {
        assert!(
            !n.seen.iter().any(|m| m.contains("not making progress")),
            "{node} starved its watchdog while idle: {:#?}",
            n.seen
        );
        // One ping per half second: most of them arrived, and the last
        // status lines still carry one.
        let pings = n.seen.iter().filter(|m| fed(m)).count();
        assert!(pings >= 20, "{node} sent {pings} pings in {IDLE:?}: {:#?}", n.seen);
        let m = n.until("a WATCHDOG=1 after the idle time", LIMIT, |_| true);
        assert!(fed(&m), "{node}: {m:?}");
    }
}
