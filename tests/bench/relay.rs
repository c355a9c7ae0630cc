//! A delay relay: distance for scenario 6 on a kernel without `tc netem`.
//!
//! The far side (the passive agent, or a second sshd) runs in a network
//! namespace of its own and listens on `127.0.0.1:PORT` there. The relay
//! listens on the same address in the host's namespace, where the near side
//! dials it, and for each connection dials the far side from inside the
//! namespace (a thread that has joined it with `setns`). Every chunk read
//! from either end is written to the other `delay` after it was read, so an
//! exchange costs one round trip of `2 × delay` on top of loopback's.
//!
//! With a rate ([`Shape::rate`]), each direction is also a link of that
//! many bytes a second: a chunk leaves once the link has sent the chunks
//! before it, and arrives `delay` later; the relay reads no further while
//! more than [`QUEUE`] of sending is queued (a bottleneck's queue), so the
//! sender's TCP backs off as it would behind a slow link. Every byte it
//! passes on, both ways, is counted ([`Relay::bytes`]): the same counter
//! for every tool measured through it.
//!
//! What it does not emulate: TCP's own behaviour over a long path. Each hop
//! is a loopback connection, so the kernel's acknowledgements, slow start
//! and Nagle's wait for an acknowledgement all happen at loopback speed;
//! only what the applications exchange (SSH channel windows, the tools'
//! own requests and replies) pays the delay. benchmarks.md says so.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// Chunks in flight in one direction before the reader waits: with reads of
/// up to 64 KiB, 64 MiB, far more than any window the tools open.
const IN_FLIGHT: usize = 1024;

/// The most sending a rate-limited direction queues before the relay reads
/// on: about a bottleneck router's queue.
pub const QUEUE: Duration = Duration::from_millis(100);

/// What a relay makes of the path: a delay each way and, optionally, a
/// rate each way.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Added to every chunk, each way.
    pub delay: Duration,
    /// Bytes a second each way; `None`: loopback's.
    pub rate: Option<u64>,
}

/// A running relay; it stops accepting when dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    host: String,
    port: u16,
    bytes: Arc<AtomicU64>,
}

impl Relay {
    /// Listens on `127.0.0.1:port` here and forwards each connection to
    /// `127.0.0.1:port` inside the network namespace `ns`, `delay` each way.
    pub fn start(port: u16, ns: &str, delay: Duration) -> Relay {
        Relay::start_shaped("127.0.0.1", port, ns, Shape { delay, rate: None })
    }

    /// Listens on `host:port` here and forwards each connection to
    /// `127.0.0.1:port` inside the network namespace `ns`, shaped by `shape`.
    pub fn start_shaped(host: &str, port: u16, ns: &str, shape: Shape) -> Relay {
        let listener = TcpListener::bind((host, port)).expect("bind the relay");
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let ns_path = format!("/run/netns/{ns}");
        let (stopped, counted) = (stop.clone(), bytes.clone());
        thread::spawn(move || {
            for near in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(near) = near else { continue };
                let (ns_path, counted) = (ns_path.clone(), counted.clone());
                thread::spawn(move || {
                    if let Err(e) = connect(near, &ns_path, port, shape, counted) {
                        eprintln!("relay: {e}");
                    }
                });
            }
        });
        Relay {
            stop,
            host: host.to_string(),
            port,
            bytes,
        }
    }

    /// The bytes passed on so far, both ways, every connection.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accepting thread so that it sees the flag.
        let _ = TcpStream::connect((self.host.as_str(), self.port));
    }
}

/// Joins the namespace on this thread, dials the far side, and relays both
/// ways until each side has closed.
fn connect(near: TcpStream, ns_path: &str, port: u16, shape: Shape, bytes: Arc<AtomicU64>) -> Result<(), String> {
    let ns = File::open(ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns_path}: {e}"))?;
    // A refused dial is normal while the far side starts (the harness polls
    // sshd with `ssh true` until it answers): the near side sees it closed.
    let Ok(far) = TcpStream::connect(("127.0.0.1", port)) else {
        return Ok(());
    };
    for s in [&near, &far] {
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    }
    let (near2, far2) = (
        near.try_clone().map_err(|e| e.to_string())?,
        far.try_clone().map_err(|e| e.to_string())?,
    );
    let back_bytes = bytes.clone();
    let back = thread::spawn(move || pump(far2, near2, shape, &back_bytes));
    pump(near, far, shape, &bytes);
    let _ = back.join();
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read (after the
/// link has sent it, with a rate), counting it in `bytes`, then passes the
/// end of the stream on.
fn pump(mut from: TcpStream, mut to: TcpStream, shape: Shape, bytes: &Arc<AtomicU64>) {
    let from_ctl = from.try_clone().ok();
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let bytes = bytes.clone();
    let reader = thread::spawn(move || {
        // Smaller reads on a slow link: a chunk arrives whole, when its last
        // byte would have.
        let mut buf = vec![0u8; if shape.rate.is_some() { 16 << 10 } else { 64 << 10 }];
        // When the link is done with what it was given.
        let mut free_at = Instant::now();
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let now = Instant::now();
                    let sent = match shape.rate {
                        None => now,
                        Some(rate) => {
                            free_at = free_at.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
                            if free_at > now + QUEUE {
                                thread::sleep(free_at - now - QUEUE);
                            }
                            free_at
                        }
                    };
                    if tx.send((sent + shape.delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            // The far end is gone: stop reading for it too.
            if let Some(f) = &from_ctl {
                let _ = f.shutdown(Shutdown::Read);
            }
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = reader.join();
}
