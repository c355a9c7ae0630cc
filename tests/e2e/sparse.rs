//! Sparse files: a 4 GiB file of holes crosses as its data, not as 4 GiB of
//! zeros, and stays sparse on the passive (new, with data, and modified).

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use warmspare_tests::{http_get, noise, wait_until, write_cluster_file, TestCluster};

const LIMIT: Duration = Duration::from_secs(120);

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The active's `warmspare_bytes_sent_total`.
fn bytes_sent(http_port: u16) -> u64 {
    let (code, body) = http_get(http_port, "/metrics").expect("metrics answer");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("warmspare_bytes_sent_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no bytes sent counter in {body}"))
}

/// Bytes allocated to the file at `p` (its blocks, not its length).
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Whether the two files have the same content (compared by `cmp`, which
/// reads both whole).
fn same_content(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .expect("run cmp")
        .success()
}

/// Whether the passive's file at `p` is `len` bytes long and holds `data`
/// at `at` (the last write the active made, seen without reading 4 GiB).
fn arrived(p: &Path, len: u64, at: u64, data: &[u8]) -> bool {
    let Ok(f) = fs::File::open(p) else { return false };
    if !f.metadata().is_ok_and(|m| m.len() == len) {
        return false;
    }
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, at).is_ok() && buf == data
}

#[test]
fn sparse_files_cross_as_their_data_and_stay_sparse() {
    let c = TestCluster::pair("");
    // The passive keeps what it replaces in its undo store, and refuses to
    // replace a file larger than undo_max_size (1 GiB by default; sizes are
    // apparent ones): room for the 4 GiB file, which is linked there (the
    // store is on the watch's file system), not copied.
    let text = std::fs::read_to_string(&c.file).unwrap().replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        "key_file = \"/etc/warmspare/node.key\"\nundo_max_size = \"8GiB\"\n",
        1,
    );
    write_cluster_file(&c.file, &text);
    let (ra, rb) = (c.ca("a"), c.ca("b"));
    // Present at start-up (the first full comparison sends it): 4 GiB, no data.
    let empty = fs::File::create(ra.join("empty.img")).unwrap();
    empty.set_len(4 * GIB).unwrap();
    drop(empty);
    assert!(
        allocated(&ra.join("empty.img")) < MIB,
        "the test's own file is not sparse"
    );
    let _b = c.start("b");
    let _a = c.start("a");
    let http = c.node("a").http_port;
    let started = Instant::now();
    wait_until("the empty sparse file on b", LIMIT, || {
        fs::metadata(rb.join("empty.img")).is_ok_and(|m| m.len() == 4 * GIB)
    });
    eprintln!(
        "MEASURE 4 GiB sparse file without data: {:.1} s, {} bytes sent, {} bytes allocated on the passive",
        started.elapsed().as_secs_f64(),
        bytes_sent(http),
        allocated(&rb.join("empty.img"))
    );
    assert!(
        allocated(&rb.join("empty.img")) < MIB,
        "{} bytes allocated on the passive",
        allocated(&rb.join("empty.img"))
    );

    // Written while the agents run: data at the start, in the middle and
    // near the end, then a 1 MiB hole to the end.
    let sent_before = bytes_sent(http);
    let started = Instant::now();
    let path = ra.join("data.img");
    let f = fs::File::create(&path).unwrap();
    f.set_len(4 * GIB).unwrap();
    let (head, middle, tail) = (noise(64 * 1024, 1), noise(64 * 1024, 2), noise(64 * 1024, 3));
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&middle, 2 * GIB + 12_345).unwrap();
    f.write_all_at(&tail, 4 * GIB - MIB - tail.len() as u64).unwrap();
    drop(f);
    wait_until("the sparse file with data on b", LIMIT, || {
        arrived(&rb.join("data.img"), 4 * GIB, 4 * GIB - MIB - tail.len() as u64, &tail)
    });
    let sent = bytes_sent(http) - sent_before;
    eprintln!(
        "MEASURE 4 GiB sparse file with 192 KiB of data: {:.1} s, {sent} bytes sent, {} bytes allocated on the passive",
        started.elapsed().as_secs_f64(),
        allocated(&rb.join("data.img"))
    );
    assert!(sent < 4 * MIB, "{sent} bytes sent for 192 KiB of data");
    assert!(
        allocated(&rb.join("data.img")) < 4 * MIB,
        "{} bytes allocated on the passive",
        allocated(&rb.join("data.img"))
    );

    // Modified in place: 4 KiB written in a hole at 1 GiB.
    let sent_before = bytes_sent(http);
    let patch = noise(4096, 4);
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&patch, GIB).unwrap();
    drop(f);
    wait_until("the modified sparse file on b", LIMIT, || {
        arrived(&rb.join("data.img"), 4 * GIB, GIB, &patch)
    });
    let sent = bytes_sent(http) - sent_before;
    eprintln!(
        "MEASURE 4 GiB sparse file modified in place: {sent} bytes sent, {} bytes allocated on the passive",
        allocated(&rb.join("data.img"))
    );
    assert!(same_content(&path, &rb.join("data.img")));
    assert!(sent < 4 * MIB, "{sent} bytes sent for a 4 KiB change");
    assert!(
        allocated(&rb.join("data.img")) < 4 * MIB,
        "{} bytes allocated on the passive",
        allocated(&rb.join("data.img"))
    );
    // Nothing else grew meanwhile, and the content is the same (compared
    // in full once, at the end: each comparison reads 8 GiB).
    assert!(allocated(&rb.join("empty.img")) < MIB);
    assert!(same_content(&ra.join("empty.img"), &rb.join("empty.img")));
}
