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
//! What it does not emulate: TCP's own behaviour over a long path. Each hop
//! is a loopback connection, so the kernel's acknowledgements, slow start
//! and Nagle's wait for an acknowledgement all happen at loopback speed;
//! only what the applications exchange (SSH channel windows, the tools'
//! own requests and replies) pays the delay. benchmarks.md says so.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// Chunks in flight in one direction before the reader waits: with reads of
/// up to 64 KiB, 64 MiB, far more than any window the tools open.
const IN_FLIGHT: usize = 1024;

/// A running relay; it stops accepting when dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Relay {
    /// Listens on `127.0.0.1:port` here and forwards each connection to
    /// `127.0.0.1:port` inside the network namespace `ns`, `delay` each way.
    pub fn start(port: u16, ns: &str, delay: Duration) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay");
        let stop = Arc::new(AtomicBool::new(false));
        let ns_path = format!("/run/netns/{ns}");
        let stopped = stop.clone();
        thread::spawn(move || {
            for near in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(near) = near else { continue };
                let ns_path = ns_path.clone();
                thread::spawn(move || {
                    if let Err(e) = connect(near, &ns_path, port, delay) {
                        eprintln!("relay: {e}");
                    }
                });
            }
        });
        Relay { stop, port }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Joins the namespace on this thread, dials the far side, and relays both
/// ways until each side has closed.
fn connect(near: TcpStream, ns_path: &str, port: u16, delay: Duration) -> Result<(), String> {
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
    let back = thread::spawn(move || pump(far2, near2, delay));
    pump(near, far, delay);
    let _ = back.join();
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read, then passes
/// the end of the stream on.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let from_ctl = from.try_clone().ok();
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
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
