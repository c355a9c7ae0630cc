//! Scenarios 3 and 4: a large file changed in place (a delta against the
//! passive's copy) and a large new file, each against rsync over the
//! bench's sshd in the same run, and the new file also against the raw
//! `cat | ssh` stream.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use warmspare_tests::{converge, noise, read, TestCluster};

use super::{in_turn, keep_logs, pair, percentile, settle, start_agent, Row, Sizes, Sshd};

/// `base` with 1% of its bytes changed in 100 places and 4 KiB inserted
/// in the middle.
fn large_delta(base: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    let per = data.len() / 100 / 100;
    for i in 0..100 {
        let at = i * (data.len() / 100) + 777;
        data[at..at + per].copy_from_slice(&noise(per, 50 + i as u64));
    }
    let mid = data.len() / 2 + 123;
    let mut changed = data[..mid].to_vec();
    changed.extend_from_slice(&noise(4096, 9));
    changed.extend_from_slice(&data[mid..]);
    changed
}

/// Seconds from `start` until `dst` holds exactly `want`. Files appear whole
/// (the receiver renames them into place), so the moment is that of the stat
/// that first saw the new size, provided the content read right after it is
/// `want`; the read and hash of the check itself are not counted.
fn appears_whole(dst: &Path, want: &[u8], start: Instant) -> f64 {
    let hash = blake3::hash(want);
    let deadline = start + Duration::from_secs(600);
    loop {
        if fs::metadata(dst).is_ok_and(|m| m.len() == want.len() as u64) {
            let seen = start.elapsed().as_secs_f64();
            if read(dst).is_some_and(|d| blake3::hash(&d) == hash) {
                return seen;
            }
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Seconds to write `data` into a new file at `path` and make it durable
/// (`fdatasync`), as the passive must before it renames a result into
/// place: the floor of the disk beneath both agents, measured in the same
/// run (rsync and `cat` into ssh write nothing durably). The file is
/// removed after.
fn durable_write(path: &Path, data: &[u8]) -> f64 {
    use std::io::Write;
    settle();
    let t = Instant::now();
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_data().unwrap();
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(path).unwrap();
    secs
}

/// Runs scenarios 3 and 4 on one pair, `rounds` rounds of each, and
/// adds their rows; returns the pair, to be kept until the run ends.
pub fn run(sshd: &Sshd, work: &Path, sizes: &Sizes, rounds: usize, rows: &mut Vec<Row>) -> TestCluster {
    let c = pair();
    let src = c.ca("a");
    // rsync has a source tree of its own, a copy of warmspare's, so that
    // either tool's run changes only its own tree and either may go first.
    let rsync_src = work.join("rsync-src");
    let mirror = work.join("rsync-big");
    for dir in [&src, &rsync_src, &mirror] {
        fs::create_dir_all(dir).unwrap();
    }
    let staged = work.join("big.new");
    // Files are put in place whole (renamed), as a dump job does.
    let put = |path: &Path, data: &[u8]| {
        fs::write(&staged, data).unwrap();
        fs::rename(&staged, path).unwrap();
    };
    let base = noise(sizes.big, 3);
    let changed = large_delta(&base);
    put(&src.join("big.bin"), &base);
    let b = start_agent(&c, "b", "");
    let a = start_agent(&c, "a", "");
    let (mut ws_times, mut rsync_times, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wire, mut rbytes) = (f64::NAN, 0);
    let floor_file = work.join("durable-floor.bin");
    for round in 0..rounds {
        // Both sides back to the base version, untimed.
        put(&src.join("big.bin"), &base);
        put(&rsync_src.join("big.bin"), &base);
        converge(&src, &c.ca("b"), Duration::from_secs(600));
        sshd.rsync(&rsync_src, &mirror, &[]);
        let warmspare = || {
            fs::write(&staged, &changed).unwrap();
            settle();
            let t = Instant::now();
            fs::rename(&staged, src.join("big.bin")).unwrap();
            appears_whole(&c.ca("b").join("big.bin"), &changed, t)
        };
        let rsync = || {
            put(&rsync_src.join("big.bin"), &changed);
            settle();
            sshd.rsync(&rsync_src, &mirror, &[])
        };
        // Odd rounds first here: scenario 3's first round went to warmspare.
        let ((rs, rb), ws) = in_turn(round + 1, rsync, warmspare);
        let floor = durable_write(&floor_file, &changed);
        println!(
            "large delta, round {}: rsync {rs:.2} s, warmspare {ws:.2} s, writing it durably {floor:.2} s",
            round + 1
        );
        ws_times.push(ws);
        rsync_times.push(rs);
        floors.push(floor);
        rbytes = rb;
        wire = a
            .log_text()
            .lines()
            .rev()
            .find(|l| l.contains("large file shipped") && l.contains("delta=true"))
            .and_then(|l| {
                l.split("wire_bytes=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN);
    }
    rows.push(Row {
        scenario: format!("3. large delta, {} MiB", sizes.big >> 20),
        measure: "bytes on the wire".into(),
        warmspare: wire,
        best_other: rbytes as f64,
        other_name: "rsync".into(),
        unit: "B",
        target: "<= 1.1x".into(),
    });
    rows.push(Row {
        scenario: format!("3. large delta, {} MiB", sizes.big >> 20),
        measure: "time".into(),
        warmspare: percentile(&mut ws_times, 0.5),
        best_other: percentile(&mut rsync_times, 0.5),
        other_name: "rsync".into(),
        unit: "s",
        target: "<= 1.0x".into(),
    });
    rows.push(Row {
        scenario: format!("3. large delta, {} MiB", sizes.big >> 20),
        measure: "time against the disk's floor".into(),
        warmspare: percentile(&mut ws_times, 0.5),
        best_other: percentile(&mut floors, 0.5),
        other_name: "write + fdatasync".into(),
        unit: "s",
        target: "report".into(),
    });

    // 4. A new file per round, `rounds` rounds alternating which side goes
    // first: warmspare, or rsync and then the raw stream. Every file stays
    // until the run ends.
    let mb = (sizes.big as f64) / 1e6;
    let (mut ws_times, mut rsync_times, mut cat_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut floors = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let name = format!("new-{round}.bin");
        let fresh = noise(sizes.big, 11 + round as u64);
        let warmspare = || {
            fs::write(&staged, &fresh).unwrap();
            settle();
            let t = Instant::now();
            fs::rename(&staged, src.join(&name)).unwrap();
            appears_whole(&c.ca("b").join(&name), &fresh, t)
        };
        let others = || {
            put(&rsync_src.join(&name), &fresh);
            settle();
            let (rs, _) = sshd.rsync(&rsync_src, &mirror, &[]);
            let t = Instant::now();
            let cat = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat {} | {} 127.0.0.1 'cat > /dev/null'",
                    rsync_src.join(&name).display(),
                    sshd.ssh_args()
                ))
                .status()
                .unwrap();
            assert!(cat.success());
            (rs, t.elapsed().as_secs_f64())
        };
        let ((rs, cat), ws) = in_turn(round, others, warmspare);
        let floor = durable_write(&floor_file, &fresh);
        println!(
            "large new file, round {}: warmspare {ws:.2} s, rsync {rs:.2} s, cat into ssh {cat:.2} s ({:.2}x the raw stream), writing it durably {floor:.2} s",
            round + 1,
            cat / ws
        );
        floors.push(floor);
        ws_times.push(ws);
        rsync_times.push(rs);
        cat_times.push(cat);
        ratios.push(cat / ws);
    }
    keep_logs("large", &a, &b);
    let (ws, rs, cat) = (
        percentile(&mut ws_times, 0.5),
        percentile(&mut rsync_times, 0.5),
        percentile(&mut cat_times, 0.5),
    );
    rows.push(Row {
        scenario: format!("4. large new file, {} MiB", sizes.big >> 20),
        measure: "throughput".into(),
        warmspare: mb / ws,
        best_other: mb / rs,
        other_name: "rsync".into(),
        unit: "MB/s",
        target: ">= 1.5x".into(),
    });
    rows.push(Row {
        scenario: format!("4. large new file, {} MiB", sizes.big >> 20),
        measure: "vs raw ssh".into(),
        warmspare: mb / ws,
        best_other: mb / cat,
        other_name: "cat into ssh".into(),
        unit: "MB/s",
        target: ">= 0.8x".into(),
    });
    rows.push(Row {
        scenario: format!("4. large new file, {} MiB", sizes.big >> 20),
        measure: "rounds at >= 0.8x the raw stream".into(),
        warmspare: ratios.iter().filter(|r| **r >= 0.8).count() as f64,
        best_other: rounds as f64,
        other_name: "rounds".into(),
        unit: "",
        target: "all".into(),
    });
    rows.push(Row {
        scenario: format!("4. large new file, {} MiB", sizes.big >> 20),
        measure: "vs the disk's floor".into(),
        warmspare: mb / ws,
        best_other: mb / percentile(&mut floors, 0.5),
        other_name: "write + fdatasync".into(),
        unit: "MB/s",
        target: "report".into(),
    });
    c
}
