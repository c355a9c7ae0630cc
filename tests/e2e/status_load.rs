//! Status and metrics under load: pollers of a large watch must not hold up
//! replication (no lock held over a tree walk, no disk I/O on the async
//! runtime).

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warmspare_tests::{http_get, read, wait_until, TestCluster};

/// Files in the watch.
const FILES: usize = 100_000;
/// Concurrent pollers (half on each node).
const POLLERS: usize = 16;

/// How long a new file on a takes to appear on b.
fn latency(ra: &std::path::Path, rb: &std::path::Path, name: &str) -> Duration {
    fs::write(ra.join(name), name.as_bytes()).unwrap();
    let t = Instant::now();
    wait_until(&format!("{name} on b"), Duration::from_secs(300), || {
        read(&rb.join(name)).as_deref() == Some(name.as_bytes())
    });
    t.elapsed()
}

fn files_on(c: &TestCluster, node: &str) -> Option<u64> {
    let (_, m) = http_get(c.node(node).http_port, "/metrics")?;
    m.lines()
        .find_map(|l| l.strip_prefix("warmspare_watch_files{watch=\"ca\"} "))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn status_pollers_of_a_large_watch_do_not_delay_replication() {
    let c = TestCluster::pair("");
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    for d in 0..FILES / 1000 {
        let dir = ra.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            fs::write(dir.join(format!("f{f:04}")), format!("{d}/{f}")).unwrap();
        }
    }
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("the initial sync of 100,000 files", Duration::from_secs(1200), || {
        files_on(&c, "b") == Some(FILES as u64)
    });
    // The first file after the initial sync also waits for its tail
    // (cache and ledger saves): not a fair baseline.
    latency(&ra, &rb, "warm-up.pem");
    // Unloaded: the time a new file takes (several, the slowest counts).
    let baseline = (0..3)
        .map(|i| latency(&ra, &rb, &format!("quiet-{i}.pem")))
        .max()
        .unwrap();

    // Loaded: pollers ask both nodes for /metrics and /_status without a pause.
    let stop = Arc::new(AtomicBool::new(false));
    let times: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let pollers: Vec<_> = (0..POLLERS)
        .map(|i| {
            let port = c.node(if i % 2 == 0 { "a" } else { "b" }).http_port;
            let path = if i % 4 < 2 { "/metrics" } else { "/_status" };
            let (stop, times) = (stop.clone(), times.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    let got = http_get(port, path);
                    let took = t.elapsed();
                    if got.is_some_and(|(code, _)| code == 200) {
                        times.lock().unwrap().push(took);
                    }
                }
            })
        })
        .collect();
    wait_until("every poller answered at least once", Duration::from_secs(600), || {
        times.lock().unwrap().len() >= POLLERS
    });
    let loaded = (0..3)
        .map(|i| latency(&ra, &rb, &format!("busy-{i}.pem")))
        .max()
        .unwrap();
    let polled_meanwhile = times.lock().unwrap().len();
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        p.join().unwrap();
    }
    let times = times.lock().unwrap();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    let max = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "MEASURE {} requests to /metrics and /_status of a {FILES}-file watch by {POLLERS} pollers: mean {:.1} ms, max {:.1} ms; \
         new-file latency unloaded {:.0} ms, loaded {:.0} ms",
        times.len(),
        mean.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        baseline.as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0
    );
    assert!(polled_meanwhile >= POLLERS, "the pollers were running");
    // Generous (the disk's fsync latency alone varies a lot on a busy
    // machine): eleven times the slowest unloaded latency. Before, each
    // request walked the tree holding the lock every receiver and shipper
    // takes per batch, and a new file waited behind the queue of walks.
    assert!(
        loaded <= baseline * 11,
        "pollers delayed replication: a new file took {loaded:?} under load, {baseline:?} without"
    );
}
