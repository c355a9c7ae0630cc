//! A fault-injecting HTTP proxy in front of one etcd member's client port,
//! switched at run time between passing everything and one kind of etcd
//! failure (see [`Fault`]). The agents' `[etcd] endpoints` name the
//! proxies instead of the members, so a test decides what the agents'
//! etcd access looks like while etcd itself keeps running.
//!
//! std threads only: a listener thread per proxy, two threads per piped
//! connection. Every wait is bounded (a read timeout, a condition variable
//! with a timeout), so a switch of the fault reaches every open connection
//! within a few tens of milliseconds.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{free_port, EtcdCluster};

/// What a proxy does with the agents' etcd requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through to the member.
    Pass,
    /// Accept connections and never answer (what a stopped member or a
    /// black-holed link looks like: the client's deadline runs out).
    /// Connections already open stop forwarding.
    Hang,
    /// Close the listening socket, so connections are refused, and cut
    /// every connection already open.
    Refuse,
    /// Answer every request as etcd's gateway answers `etcdserver: no
    /// leader` (gRPC Unavailable, 14): HTTP 503 with the JSON
    /// `{"error", "message", "code": 14}`. The real gateway (etcd 3.4)
    /// answered a read without quorum so: `503 Service Unavailable`,
    /// `{"error":"etcdserver: request timed out","message":"etcdserver:
    /// request timed out","code":14}`; `no leader` is the same status
    /// (`rpctypes.ErrGRPCNoLeader` is `codes.Unavailable`).
    NoLeader,
    /// Answer every request with an error code etcd does not use
    /// (HTTP 500, code 99), as a newer etcd might.
    UnknownCode,
    /// Pass every request but a watch; let a watch be created, then cut
    /// it (and cut the watches open when this fault is set).
    BreakWatches,
}

impl Fault {
    /// What an open connection does under this fault: whether it carries a
    /// watch and, for the member's side of a watch, whether the watch was
    /// created already.
    fn verdict(self, watch: bool, created: bool) -> Flow {
        match self {
            Fault::Pass => Flow::Forward,
            Fault::Hang => Flow::Hold,
            Fault::Refuse | Fault::NoLeader | Fault::UnknownCode => Flow::Cut,
            Fault::BreakWatches if watch && created => Flow::Cut,
            Fault::BreakWatches => Flow::Forward,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Forward,
    Hold,
    Cut,
}

/// What a proxy did, for tests to check that a fault was really met.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Connections piped to the member.
    pub piped: u64,
    /// Requests held without an answer.
    pub held: u64,
    /// Requests answered with an error (no leader, unknown code).
    pub answered: u64,
    /// Watches cut.
    pub watches_cut: u64,
}

struct Shared {
    fault: Mutex<Fault>,
    changed: Condvar,
    stop: AtomicBool,
    upstream: u16,
    port: u16,
    piped: AtomicU64,
    held: AtomicU64,
    answered: AtomicU64,
    watches_cut: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the fault is no longer `now` (or the proxy stops), at
    /// most `limit`.
    fn wait_change(&self, now: Fault, limit: Duration) {
        let guard = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(guard, limit, |f| *f == now && !self.stop.load(Ordering::SeqCst));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// One proxy in front of one etcd member; stopped when dropped.
pub struct EtcdProxy {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EtcdProxy {
    /// A proxy on a free port of 127.0.0.1 in front of the member whose
    /// client port is `upstream`, passing everything.
    pub fn start(upstream: u16) -> EtcdProxy {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the etcd proxy");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            upstream,
            port,
            piped: AtomicU64::new(0),
            held: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            watches_cut: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || listen(&s, Some(listener)));
        EtcdProxy {
            shared,
            thread: Some(thread),
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// Switches to `fault`; open connections follow within a few tens of
    /// milliseconds, and a refusing proxy has closed its socket when this
    /// returns.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
        self.shared.changed.notify_all();
        if fault == Fault::Refuse {
            wait_until("the etcd proxy to refuse", Duration::from_secs(5), || {
                TcpStream::connect(("127.0.0.1", self.port())).is_err()
            });
        }
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> ProxyCounts {
        let s = &self.shared;
        ProxyCounts {
            piped: s.piped.load(Ordering::SeqCst),
            held: s.held.load(Ordering::SeqCst),
            answered: s.answered.load(Ordering::SeqCst),
            watches_cut: s.watches_cut.load(Ordering::SeqCst),
        }
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A proxy in front of each member of an [`EtcdCluster`].
pub struct EtcdProxies {
    /// The proxies, in the order of the members.
    pub proxies: Vec<EtcdProxy>,
}

impl EtcdProxies {
    /// One passing proxy per member of `etcd`.
    pub fn start(etcd: &EtcdCluster) -> EtcdProxies {
        EtcdProxies {
            proxies: etcd.members.iter().map(|m| EtcdProxy::start(m.client_port)).collect(),
        }
    }

    /// Switches every proxy to `fault`.
    pub fn set(&self, fault: Fault) {
        for p in &self.proxies {
            p.set(fault);
        }
    }

    /// The proxies' URLs, as `[etcd] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.proxies
            .iter()
            .map(|p| format!("http://127.0.0.1:{}", p.port()))
            .collect()
    }

    /// An `[etcd]` table naming the proxies, with `extra` lines added.
    pub fn toml(&self, extra: &str) -> String {
        let list = self
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("[etcd]\nendpoints = [{list}]\n{extra}\n")
    }

    /// The sum of every proxy's counts.
    pub fn counts(&self) -> ProxyCounts {
        self.proxies
            .iter()
            .map(EtcdProxy::counts)
            .fold(ProxyCounts::default(), |a, c| ProxyCounts {
                piped: a.piped + c.piped,
                held: a.held + c.held,
                answered: a.answered + c.answered,
                watches_cut: a.watches_cut + c.watches_cut,
            })
    }
}

fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    crate::wait_until(what, limit, cond);
}

/// The listener thread: accepts while the fault is not `Refuse`, closes the
/// socket while it is, and binds it again after.
fn listen(s: &Arc<Shared>, mut listener: Option<TcpListener>) {
    while !s.stopped() {
        let fault = s.fault();
        if fault == Fault::Refuse {
            listener = None;
            s.wait_change(Fault::Refuse, Duration::from_millis(50));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(("127.0.0.1", s.port)) {
                Ok(l) if l.set_nonblocking(true).is_ok() => listener.insert(l),
                _ => {
                    s.wait_change(fault, Duration::from_millis(20));
                    continue;
                }
            },
        };
        match l.accept() {
            Ok((conn, _)) => {
                let s = s.clone();
                std::thread::spawn(move || serve(&s, conn));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => s.wait_change(fault, Duration::from_millis(5)),
            Err(_) => s.wait_change(fault, Duration::from_millis(5)),
        }
    }
}

/// One accepted connection.
fn serve(s: &Arc<Shared>, conn: TcpStream) {
    if conn.set_nonblocking(false).is_err() {
        return;
    }
    match s.fault() {
        Fault::Refuse => {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        Fault::Hang => return hold(s, conn),
        _ => {}
    }
    let Some(request) = read_request(s, &conn) else {
        return;
    };
    let head = String::from_utf8_lossy(&request);
    let watch = head
        .split_whitespace()
        .nth(1)
        .is_some_and(|path| path.starts_with("/v3/watch"));
    match s.fault() {
        Fault::Hang => hold(s, conn),
        Fault::Refuse => {
            let _ = conn.shutdown(Shutdown::Both);
        }
        Fault::NoLeader => answer(
            s,
            conn,
            "503 Service Unavailable",
            r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#,
        ),
        Fault::UnknownCode => answer(
            s,
            conn,
            "500 Internal Server Error",
            r#"{"error":"warmspare test: a code etcd does not use","message":"warmspare test: a code etcd does not use","code":99}"#,
        ),
        Fault::Pass | Fault::BreakWatches => pipe(s, conn, &request, watch),
    }
}

/// Holds `conn` unanswered until the fault is no longer `Hang`, then
/// closes it.
fn hold(s: &Shared, conn: TcpStream) {
    s.held.fetch_add(1, Ordering::SeqCst);
    while !s.stopped() && s.fault() == Fault::Hang {
        s.wait_change(Fault::Hang, Duration::from_millis(50));
    }
    drop(conn);
}

/// The request's head and its body (by `Content-Length`), read within a
/// few seconds; `None` when the client closed or was too slow.
fn read_request(s: &Shared, mut conn: &TcpStream) -> Option<Vec<u8>> {
    conn.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..at]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= at + 4 + len {
                return Some(got);
            }
        }
        if Instant::now() > end || s.stopped() {
            return None;
        }
        match conn.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

/// Answers the request on `conn` as etcd's gateway answers an error.
fn answer(s: &Shared, mut conn: TcpStream, status: &str, body: &str) {
    s.answered.fetch_add(1, Ordering::SeqCst);
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

/// Pipes `conn` to the member, `request` first, until either side closes
/// or the fault says to cut.
fn pipe(s: &Arc<Shared>, conn: TcpStream, request: &[u8], watch: bool) {
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", s.upstream)) else {
        return;
    };
    if up.write_all(request).is_err() {
        return;
    }
    s.piped.fetch_add(1, Ordering::SeqCst);
    let (Ok(conn2), Ok(up2)) = (conn.try_clone(), up.try_clone()) else {
        return;
    };
    let s2 = s.clone();
    let back = std::thread::spawn(move || copy(&s2, up2, conn2, watch, true));
    copy(s, conn, up, watch, false);
    let _ = back.join();
}

/// Copies `from` to `to` while the fault lets this connection flow;
/// `answers` is the member's side. Shuts both down at the end.
fn copy(s: &Shared, mut from: TcpStream, mut to: TcpStream, watch: bool, answers: bool) {
    let mut created = false;
    let mut seen = Vec::new();
    let mut buf = [0u8; 16384];
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    'outer: while !s.stopped() {
        // Only the member's side of a watch says whether it was created.
        let cut_watch = |f: Fault, created: bool| f.verdict(watch, answers && created);
        match cut_watch(s.fault(), created) {
            Flow::Cut => break,
            Flow::Hold => {
                s.wait_change(Fault::Hang, Duration::from_millis(50));
                continue;
            }
            Flow::Forward => {}
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        // A chunk read while forwarding is held, or dropped with the
        // connection, as the fault says by now.
        loop {
            match cut_watch(s.fault(), created) {
                Flow::Cut => break 'outer,
                Flow::Hold => s.wait_change(Fault::Hang, Duration::from_millis(50)),
                Flow::Forward => break,
            }
            if s.stopped() {
                break 'outer;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if watch && answers && !created {
            seen.extend_from_slice(&buf[..n]);
            created = seen.windows(9).any(|w| w == b"\"created\"");
        }
    }
    if watch && answers && s.fault() == Fault::BreakWatches {
        s.watches_cut.fetch_add(1, Ordering::SeqCst);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
