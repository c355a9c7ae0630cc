//! The replication core: two (or three) agents keep a watched tree identical.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmspare_tests::{
    converge, noise, read, sh, snapshot, temp_files, wait_until, write_file, ClusterOptions, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn initial_sync_of_a_5000_file_tree() {
    let c = TestCluster::pair("");
    let src = c.ca("a");
    for d in 0..50 {
        for f in 0..100 {
            let mode = [0o600, 0o640, 0o755][(d + f) % 3];
            let path = src.join(format!("d{d:02}/sub{}/f{f:03}.pem", f % 4));
            write_file(
                &path,
                format!("-----BEGIN CERTIFICATE-----\n{d} {f}\n{}\n", "x".repeat(f * 7)).as_bytes(),
                mode,
            );
        }
    }
    fs::create_dir_all(src.join("empty/deeper")).unwrap();
    fs::create_dir_all(src.join("private")).unwrap();
    fs::set_permissions(src.join("private"), std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("d00/sub0/f000.pem", src.join("latest.pem")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
    let files = snapshot(&src).values().filter(|v| v.starts_with("file")).count();
    assert_eq!(files, 5000);

    let _b = c.start("b");
    let start = Instant::now();
    let _a = c.start("a");
    let took = converge(&src, &c.ca("b"), LIMIT);
    eprintln!(
        "MEASURE initial sync of 5000 files: {:.0} ms (from agent start)",
        start.elapsed().as_secs_f64() * 1000.0
    );
    let _ = took;
    let b = c.ca("b");
    assert_eq!(
        fs::read_link(b.join("latest.pem")).unwrap(),
        Path::new("d00/sub0/f000.pem")
    );
    assert!(b.join("empty/deeper").is_dir());
    assert!(temp_files(&b).is_empty());
}

#[test]
fn every_kind_of_change_converges_and_excludes_hold() {
    let c = TestCluster::pair("exclude = [\"signed/b.pem\", \"*.swp\", \"scratch/\"]");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("serial"), b"01\n", 0o644);
    write_file(&a_root.join("signed/a.pem"), b"cert a", 0o644);
    write_file(&a_root.join("signed/b.pem"), b"the passive's own cert", 0o644);
    write_file(&a_root.join("scratch/x"), b"never shipped", 0o644);
    // The passive's own copy of an excluded file is left alone.
    write_file(&b_root.join("signed/b.pem"), b"b's own", 0o644);
    let _b = c.start("b");
    let _a = c.start("a");
    let same = || {
        let mut sa = snapshot(&a_root);
        let mut sb = snapshot(&b_root);
        for s in [&mut sa, &mut sb] {
            s.retain(|k, _| k != "signed/b.pem" && !k.starts_with("scratch") && !k.ends_with(".swp"));
        }
        sa == sb
    };
    wait_until("initial sync", LIMIT, same);

    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        (
            "create",
            Box::new(|| write_file(&a_root.join("signed/c.pem"), b"cert c", 0o640)),
        ),
        (
            "modify in place",
            Box::new(|| {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = fs::OpenOptions::new().write(true).open(a_root.join("serial")).unwrap();
                f.seek(SeekFrom::Start(1)).unwrap();
                f.write_all(b"2").unwrap();
            }),
        ),
        (
            "truncate",
            Box::new(|| {
                fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(a_root.join("signed/a.pem"))
                    .map(drop)
                    .unwrap()
            }),
        ),
        (
            "rename file",
            Box::new(|| fs::rename(a_root.join("signed/c.pem"), a_root.join("signed/d.pem")).unwrap()),
        ),
        (
            "mkdir -p with files",
            Box::new(|| {
                write_file(&a_root.join("requests/x/y/z.csr"), b"csr", 0o600);
                write_file(&a_root.join("requests/x/w.csr"), b"csr2", 0o600);
            }),
        ),
        (
            "rename directory",
            Box::new(|| fs::rename(a_root.join("requests/x"), a_root.join("requests/moved")).unwrap()),
        ),
        (
            "chmod",
            Box::new(|| {
                fs::set_permissions(
                    a_root.join("serial"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap()
            }),
        ),
        (
            "delete file",
            Box::new(|| fs::remove_file(a_root.join("signed/d.pem")).unwrap()),
        ),
        (
            "delete directory",
            Box::new(|| fs::remove_dir_all(a_root.join("requests")).unwrap()),
        ),
        (
            "excluded writes",
            Box::new(|| {
                write_file(&a_root.join("signed/b.pem"), b"changed on a", 0o644);
                write_file(&a_root.join("edit.swp"), b"swap", 0o644);
                write_file(&a_root.join("scratch/y"), b"never", 0o644);
            }),
        ),
    ];
    for (what, step) in steps {
        step();
        wait_until(what, LIMIT, same);
    }
    assert_eq!(read(&b_root.join("signed/b.pem")).unwrap(), b"b's own");
    assert!(!b_root.join("edit.swp").exists());
    assert!(!b_root.join("scratch").exists());
    assert!(temp_files(&b_root).is_empty());
}

#[test]
fn close_to_appear_latency() {
    let c = TestCluster::pair("");
    let _b = c.start("b");
    let _a = c.start("a");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("warmup"), b"w", 0o644);
    wait_until("warm-up file", LIMIT, || b_root.join("warmup").exists());
    let mut lat = Vec::new();
    for i in 0..40 {
        let data = format!("-----BEGIN CERTIFICATE-----\n{i}\n{}\n", "A".repeat(2000));
        let p = format!("signed/host{i}.pem");
        write_file(&a_root.join(&p), data.as_bytes(), 0o644);
        let closed = Instant::now();
        wait_until("certificate to appear", LIMIT, || {
            read(&b_root.join(&p)).is_some_and(|d| d == data.as_bytes())
        });
        lat.push(closed.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    eprintln!(
        "MEASURE close-to-appear latency over {} files: median {:.1} ms, max {:.1} ms",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
}

/// Finds the wire bytes of the last "large file shipped" line for `path`.
fn shipped(log: &str, path: &str) -> Option<(u64, bool)> {
    log.lines()
        .rev()
        .filter(|l| l.contains("large file shipped") && l.contains(&format!("path=\"{path}\"")))
        .find_map(|l| {
            let wire = l.split("wire_bytes=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((wire, l.contains("delta=true")))
        })
}

#[test]
fn a_changed_64_mib_file_ships_as_a_small_delta() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let size = 64 << 20;
    let mut data = noise(size, 7);
    write_file(&a_root.join("big.bin"), &data, 0o644);
    let _b = c.start("b");
    let a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    // 1% of the bytes, in 64 scattered places, written in place.
    let per = size / 100 / 64;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(a_root.join("big.bin")).unwrap();
        for i in 0..64 {
            let at = i * (size / 64) + 12_345;
            let patch = noise(per, 1000 + i as u64);
            data[at..at + per].copy_from_slice(&patch);
            f.seek(SeekFrom::Start(at as u64)).unwrap();
            f.write_all(&patch).unwrap();
        }
    }
    converge(&a_root, &b_root, LIMIT);
    wait_until("the shipping log line", LIMIT, || {
        shipped(&a.log_text(), "big.bin").is_some_and(|(_, d)| d)
    });
    let (wire, delta) = shipped(&a.log_text(), "big.bin").unwrap();
    eprintln!(
        "MEASURE 64 MiB file with 1% changed: {wire} bytes on the wire ({:.2}% of the file)",
        wire as f64 * 100.0 / size as f64
    );
    assert!(delta, "the change was not shipped as a delta");
    assert!(
        (wire as usize) < size / 10,
        "delta of {wire} bytes is not under 10% of {size}"
    );
}

/// Several large files changed while the active was down go in its first
/// batch, each as a delta (the signature of each asked for before its hash
/// is learned, each applied on the passive as its frames arrive), and all
/// arrive right, with no temporary file left behind.
#[test]
fn several_large_changed_files_in_one_batch_arrive_as_deltas() {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let size = 12 << 20;
    let names = ["one.bin", "two.bin", "three.bin"];
    let mut files: Vec<Vec<u8>> = (0..names.len()).map(|i| noise(size, 40 + i as u64)).collect();
    for (name, data) in names.iter().zip(&files) {
        write_file(&a_root.join(name), data, 0o644);
    }
    let _b = c.start("b");
    let mut a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    a.terminate();
    // Each changed in a few places, and one grown by an insertion (a new
    // size: its hash is not known from the scan).
    for (i, data) in files.iter_mut().enumerate() {
        for k in 0..4 {
            let at = k * (size / 4) + 999 * (i + 1);
            data[at..at + 100].copy_from_slice(&noise(100, 70 + (i * 4 + k) as u64));
        }
        if i == 1 {
            let tail = data.split_off(size / 2);
            data.extend_from_slice(&noise(4096, 99));
            data.extend_from_slice(&tail);
        }
    }
    for (name, data) in names.iter().zip(&files) {
        write_file(&a_root.join(name), data, 0o644);
    }
    let a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    wait_until("every file's shipping log line", LIMIT, || {
        names.iter().all(|n| shipped(&a.log_text(), n).is_some_and(|(_, d)| d))
    });
    for name in names {
        let (wire, delta) = shipped(&a.log_text(), name).unwrap();
        assert!(delta, "{name} was not shipped as a delta");
        assert!((wire as usize) < size / 10, "{name}: a delta of {wire} bytes");
    }
    for (name, data) in names.iter().zip(&files) {
        assert!(read(&b_root.join(name)).is_some_and(|d| &d == data), "{name} differs");
    }
    assert!(temp_files(&b_root).is_empty(), "{:?}", temp_files(&b_root));
}

/// Watches `path` until stopped: whenever it exists, it must be `old` or `new` in full.
fn never_torn(
    path: std::path::PathBuf,
    old: Vec<u8>,
    new: Vec<u8>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (ho, hn) = (blake3::hash(&old), blake3::hash(&new));
    let h = std::thread::spawn(move || {
        let mut looks = 0;
        while !s.load(Ordering::Relaxed) {
            if let Some(d) = read(&path) {
                let h = blake3::hash(&d);
                assert!(
                    h == ho || h == hn,
                    "a torn file of {} bytes was visible at {}",
                    d.len(),
                    path.display()
                );
                looks += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        looks
    });
    (stop, h)
}

fn restart_during_transfer(kill_active: bool) {
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    let old = noise(8 << 20, 1);
    write_file(&a_root.join("big.bin"), &old, 0o644);
    let mut b = c.start("b");
    let mut a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    let (stop, checker) = never_torn(b_root.join("big.bin"), old.clone(), noise(160 << 20, 2));
    // A larger, different file, put in place atomically on the active (so
    // old and new are the only versions there are): shipped whole, it takes a while.
    let staging = c.dir.path().join("staging.bin");
    write_file(&staging, &noise(160 << 20, 2), 0o644);
    fs::rename(&staging, a_root.join("big.bin")).unwrap();
    wait_until("the transfer to start", LIMIT, || !temp_files(&b_root).is_empty());
    if kill_active {
        a.kill9();
    } else {
        b.kill9();
    }
    // Nothing was renamed into place half-way.
    assert_eq!(
        read(&b_root.join("big.bin")).map(|d| d.len()),
        Some(old.len()),
        "the old version must still be in place"
    );
    if kill_active {
        a.restart();
    } else {
        b.restart();
    }
    converge(&a_root, &b_root, LIMIT * 2);
    stop.store(true, Ordering::Relaxed);
    let looks = checker.join().expect("no torn file was seen");
    assert!(looks > 0);
    wait_until("temp files to go", LIMIT, || temp_files(&b_root).is_empty());
}

#[test]
fn restarting_the_passive_mid_transfer_converges_cleanly() {
    restart_during_transfer(false);
}

#[test]
fn restarting_the_active_mid_transfer_converges_cleanly() {
    restart_during_transfer(true);
}

#[test]
fn three_nodes_two_passives_and_a_stopped_one_catches_up() {
    let c = TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b", "c"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n",
            warmspare_tests::CA_WATCH
        ),
        ..Default::default()
    });
    let (ra, rb, rc) = (c.ca("a"), c.ca("b"), c.ca("c"));
    for i in 0..100 {
        write_file(
            &ra.join(format!("signed/n{i}.pem")),
            format!("cert {i}").as_bytes(),
            0o644,
        );
    }
    let _b = c.start("b");
    let mut cc = c.start("c");
    let _a = c.start("a");
    converge(&ra, &rb, LIMIT);
    converge(&ra, &rc, LIMIT);
    cc.kill9();
    for i in 100..300 {
        write_file(
            &ra.join(format!("signed/n{i}.pem")),
            format!("cert {i}").as_bytes(),
            0o644,
        );
    }
    fs::remove_file(ra.join("signed/n5.pem")).unwrap();
    let t = converge(&ra, &rb, LIMIT);
    eprintln!(
        "MEASURE b converged in {:.0} ms while c was down",
        t.as_secs_f64() * 1000.0
    );
    assert!(rc.join("signed/n5.pem").exists(), "c was down and cannot have changed");
    cc.restart();
    converge(&ra, &rc, LIMIT);
}

#[test]
fn a_real_ca_directory_verifies_on_the_passive() {
    let c = TestCluster::pair("after_apply = \"touch \\\"$WARMSPARE_PATH/../applied-$WARMSPARE_WATCH\\\"\"");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    fs::create_dir_all(a_root.join("signed")).unwrap();
    fs::create_dir_all(a_root.join("private")).unwrap();
    fs::write(a_root.join("inventory.txt"), b"").unwrap();
    fs::write(a_root.join("serial"), b"1000\n").unwrap();
    fs::write(a_root.join("crlnumber"), b"1000\n").unwrap();
    let cnf = c.dir.path().join("openssl.cnf");
    fs::write(
        &cnf,
        format!(
            "[ ca ]\ndefault_ca = pe\n[ pe ]\ndir = {}\ndatabase = $dir/inventory.txt\nserial = $dir/serial\ncrlnumber = $dir/crlnumber\n\
             new_certs_dir = $dir/signed\ncertificate = $dir/ca_crt.pem\nprivate_key = $dir/private/ca_key.pem\n\
             default_md = sha256\ndefault_days = 365\ndefault_crl_days = 30\npolicy = any\nunique_subject = no\ncopy_extensions = copy\n\
             [ any ]\ncommonName = supplied\n[ req ]\ndistinguished_name = dn\nprompt = no\n[ dn ]\nCN = Puppet CA\n",
            a_root.display()
        ),
    )
    .unwrap();
    let openssl = || {
        let mut c = Command::new(warmspare_tests::require("openssl", "openssl"));
        c.env("OPENSSL_CONF", &cnf);
        c
    };
    sh(openssl()
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "365",
            "-subj",
            "/CN=Puppet CA",
            "-keyout",
        ])
        .arg(a_root.join("private/ca_key.pem"))
        .arg("-out")
        .arg(a_root.join("ca_crt.pem")));
    let _b = c.start("b");
    let _a = c.start("a");
    let work = c.dir.path().join("work");
    fs::create_dir_all(&work).unwrap();
    for host in ["agent1.example.com", "agent2.example.com", "agent3.example.com"] {
        let (key, csr) = (work.join(format!("{host}.key")), work.join(format!("{host}.csr")));
        sh(openssl()
            .args([
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={host}"),
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        sh(openssl()
            .args(["ca", "-batch", "-config"])
            .arg(&cnf)
            .arg("-in")
            .arg(&csr)
            .arg("-out")
            .arg(a_root.join(format!("signed/{host}.pem"))));
    }
    converge(&a_root, &b_root, LIMIT);
    for host in ["agent1.example.com", "agent2.example.com", "agent3.example.com"] {
        let out = sh(Command::new(warmspare_tests::require("openssl", "openssl"))
            .arg("verify")
            .arg("-CAfile")
            .arg(b_root.join("ca_crt.pem"))
            .arg(b_root.join(format!("signed/{host}.pem"))));
        assert!(out.contains(": OK"), "{out}");
    }
    // Revoke one and publish the CRL: serial, inventory and CRL follow.
    sh(openssl()
        .args(["ca", "-batch", "-config"])
        .arg(&cnf)
        .arg("-revoke")
        .arg(a_root.join("signed/agent2.example.com.pem")));
    sh(openssl()
        .args(["ca", "-batch", "-config"])
        .arg(&cnf)
        .arg("-gencrl")
        .arg("-out")
        .arg(a_root.join("ca_crl.pem")));
    converge(&a_root, &b_root, LIMIT);
    let inv = String::from_utf8(read(&b_root.join("inventory.txt")).unwrap()).unwrap();
    assert!(
        inv.lines()
            .any(|l| l.starts_with('R') && l.contains("agent2.example.com")),
        "{inv}"
    );
    let verify_crl = |host: &str| {
        Command::new(warmspare_tests::require("openssl", "openssl"))
            .args(["verify", "-crl_check", "-CAfile"])
            .arg(b_root.join("ca_crt.pem"))
            .arg("-CRLfile")
            .arg(b_root.join("ca_crl.pem"))
            .arg(b_root.join(format!("signed/{host}.pem")))
            .output()
            .unwrap()
    };
    assert!(verify_crl("agent1.example.com").status.success());
    let revoked = verify_crl("agent2.example.com");
    assert!(
        !revoked.status.success(),
        "a revoked certificate verified on the passive"
    );
    assert!(
        String::from_utf8_lossy(&revoked.stdout).contains("revoked")
            || String::from_utf8_lossy(&revoked.stderr).contains("revoked")
    );
    // after_apply ran on the receiver with the watch's variables (beside
    // replication, so perhaps a moment after the files arrived).
    let applied = c.node("b").root.join("ssl/applied-ca");
    wait_until("after_apply ran on b", LIMIT, || applied.exists());
}

#[test]
fn a_directory_moved_away_and_back_ships_again() {
    // Names that sort between a directory and its children ("certs-2" and
    // "certs.old" come before "certs/") must not hide the children.
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("certs/a.pem"), b"cert a", 0o644);
    write_file(&a_root.join("certs/sub/b.pem"), b"cert b", 0o600);
    write_file(&a_root.join("certs-2/c.pem"), b"cert c", 0o644);
    write_file(&a_root.join("certs.old"), b"old list", 0o644);
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&a_root, &b_root, LIMIT);

    // Out of the tree and back, as a restore from a copy would bring it:
    // the same content, modes and modification times.
    let aside = a_root.with_file_name("aside");
    fs::rename(a_root.join("certs"), &aside).unwrap();
    converge(&a_root, &b_root, LIMIT);
    assert!(!b_root.join("certs").exists());
    fs::rename(&aside, a_root.join("certs")).unwrap();
    converge(&a_root, &b_root, LIMIT);
    assert_eq!(read(&b_root.join("certs/sub/b.pem")).as_deref(), Some(&b"cert b"[..]));
}

#[test]
fn a_storm_while_a_batch_is_in_flight_ships_as_few_batches() {
    // The leading edge ships a lone change at once; what arrives while a
    // batch is in flight (the passive takes 1.5 s over every commit here)
    // must coalesce into the next batch, not make one batch per event.
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("seed.pem"), b"seed", 0o644);
    let _b = c.start_with_env("b", &[("WARMSPARE_TEST_SLOW_COMMIT_MS", "1500")]);
    let a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    let before = batch_sizes(&a.log_text()).len();
    write_file(&a_root.join("first.pem"), b"first", 0o644);
    wait_until("the first change to be pending", LIMIT, || {
        c.node_status("a")["links"][0]["pending_changes"]
            .as_u64()
            .is_some_and(|p| p >= 1)
    });
    let mut events = 0;
    for round in 0..50 {
        for f in 0..20 {
            write_file(
                &a_root.join(format!("storm/f{f:02}.pem")),
                format!("round {round} of file {f}\n").as_bytes(),
                0o644,
            );
            events += 1;
        }
    }
    converge(&a_root, &b_root, LIMIT);
    // The first batch, the storm gathered while it was in flight, and what
    // of the storm came after that batch (if the writer was slower than one
    // commit) while the second was in flight.
    let batches = batch_sizes(&a.log_text()).len() - before;
    assert!(
        (1..=4).contains(&batches),
        "{events} events in 20 files shipped as {batches} batches"
    );
}

/// `(ops, files)` of every `batch replicated` line of an active's log.
fn batch_sizes(log: &str) -> Vec<(u64, u64)> {
    let field = |l: &str, key: &str| -> Option<u64> { l.split(key).nth(1)?.split_whitespace().next()?.parse().ok() };
    log.lines()
        .filter(|l| l.contains("batch replicated"))
        .filter_map(|l| Some((field(l, " ops=")?, field(l, " files=")?)))
        .collect()
}

#[test]
fn a_batch_of_new_files_in_one_directory_sends_the_directory_once() {
    // A burst of new files in one directory coalesces into one batch of
    // one prefix per file; the directory's metadata (its mtime changed with
    // every file) must go once per batch, after the files, not once per file.
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    write_file(&a_root.join("signed/seed.pem"), b"seed", 0o644);
    let _b = c.start_with_env("b", &[("WARMSPARE_TEST_SLOW_COMMIT_MS", "1500")]);
    let a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    let before = batch_sizes(&a.log_text()).len();
    // A batch in flight, so that the files gather into the next one. On a
    // loaded machine the first batch can end before the files come: then
    // the round is tried again with new names (at most five rounds).
    let mut batches: Vec<(u64, u64)> = Vec::new();
    for round in 0..5 {
        write_file(&a_root.join(format!("first{round}.pem")), b"first", 0o644);
        wait_until("the first change to be pending", LIMIT, || {
            c.node_status("a")["links"][0]["pending_changes"]
                .as_u64()
                .is_some_and(|p| p >= 1)
        });
        for i in 0..40 {
            write_file(
                &a_root.join(format!("signed/host{round}-{i:02}.pem")),
                format!("certificate {i}\n").as_bytes(),
                0o644,
            );
        }
        converge(&a_root, &b_root, LIMIT);
        batches = batch_sizes(&a.log_text()).split_off(before);
        if batches.iter().any(|&(_, files)| files >= 3) {
            break;
        }
    }
    let mtime = |root: &Path| fs::metadata(root.join("signed")).and_then(|m| m.modified()).ok();
    wait_until("the directory's mtime on b", LIMIT, || mtime(&b_root) == mtime(&a_root));
    assert!(
        batches.iter().any(|&(_, files)| files >= 3),
        "the files did not gather into a batch in five rounds: {batches:?}"
    );
    // Each new file is one operation, and each directory above the batch's
    // files one more: `signed`, and the root when the round's first file
    // (at the root) was still waiting and joined the burst's batch (on a
    // loaded machine the shipper can take it after the burst began). Sent
    // once per file, as before, a batch of three files or more would take
    // more.
    for &(ops, files) in &batches {
        assert!(
            ops <= files + 2,
            "a batch of {files} files took {ops} operations: {batches:?}"
        );
    }
}

#[test]
fn a_file_shipped_half_written_ships_again_when_whole() {
    // A writer that keeps its file open: the write without a close ships
    // after the partial quiet, and the rest, with the close, ships again.
    let c = TestCluster::pair("");
    let (a_root, b_root) = (c.ca("a"), c.ca("b"));
    fs::create_dir_all(&a_root).unwrap();
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&a_root, &b_root, LIMIT);
    let path = a_root.join("growing.pem");
    let mut f = fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut f, b"-----BEGIN CERTIFICATE-----\n").unwrap();
    wait_until("the half-written file on b", LIMIT, || {
        read(&b_root.join("growing.pem")).as_deref() == Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
    });
    std::io::Write::write_all(&mut f, b"MIIB\n-----END CERTIFICATE-----\n").unwrap();
    drop(f);
    wait_until("the whole file on b", LIMIT, || {
        read(&b_root.join("growing.pem")).as_deref()
            == Some(&b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"[..])
    });
    converge(&a_root, &b_root, LIMIT);
}

/// The shippers' first comparison can list the tree before the watcher's
/// watch is in place (notify walks a large tree first): a file written in
/// between ships once the watch is in place, not at the periodic comparison
/// ten minutes later. `WARMSPARE_TEST_HOLD_WATCH` holds the watch back.
#[test]
fn a_file_written_before_the_watch_is_in_place_still_ships() {
    let c = TestCluster::pair("");
    let hold = c.dir.path().join("hold-watch");
    fs::write(&hold, b"").unwrap();
    let _b = c.start("b");
    let a = c.start_with_env("a", &[("WARMSPARE_TEST_HOLD_WATCH", hold.to_str().unwrap())]);
    wait_until("a's first comparison", LIMIT, || {
        a.log_text().contains("compared in full")
    });
    assert!(
        !a.log_text().contains("INFO watching watch="),
        "the watch was in place before the test could write: {}",
        a.log_text()
    );
    write_file(
        &c.ca("a").join("late.pem"),
        b"signed before the watch was in place",
        0o644,
    );
    fs::remove_file(&hold).unwrap();
    wait_until("late.pem on b", Duration::from_secs(20), || {
        fs::read(c.ca("b").join("late.pem")).is_ok_and(|d| d == b"signed before the watch was in place")
    });
}
