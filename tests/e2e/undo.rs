//! The undo store on passives: files replication removes or replaces are
//! kept, listed, bounded, and put back on the active.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use warmspare_tests::{
    converge, http_get, output_text, read, require, wait_until, write_cluster_file, write_file, TestCluster,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A pair with `keys` added to the `[cluster]` table.
fn pair_with(keys: &str) -> TestCluster {
    let c = TestCluster::pair("");
    let t = fs::read_to_string(&c.file).unwrap();
    let t = t.replacen(
        "key_file = \"/etc/warmspare/node.key\"\n",
        &format!("key_file = \"/etc/warmspare/node.key\"\n{keys}"),
        1,
    );
    write_cluster_file(&c.file, &t);
    c
}

fn undo_dir(c: &TestCluster, node: &str) -> PathBuf {
    c.node(node).root.join("var/lib/warmspare/undo")
}

/// `undo list --node NODE --json`, parsed.
fn list(c: &TestCluster, node: &str) -> Vec<serde_json::Value> {
    let out = c.ctl(&["undo", "list", "--node", node, "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)))
        .as_array()
        .unwrap()
        .clone()
}

/// `undo list` of `node` once every path of `paths` is in it: removals
/// apply at once, the index is written at the commit that follows.
fn list_with(c: &TestCluster, node: &str, paths: &[&str]) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    wait_until(&format!("{node} lists {paths:?} in its undo store"), LIMIT, || {
        entries = list(c, node);
        paths.iter().all(|p| entry(&entries, p).is_some())
    });
    entries
}

fn entry<'a>(entries: &'a [serde_json::Value], path: &str) -> Option<&'a serde_json::Value> {
    entries.iter().rev().find(|e| e["path"] == path)
}

fn id_of(entries: &[serde_json::Value], path: &str) -> String {
    entry(entries, path).unwrap_or_else(|| panic!("no entry for {path}: {entries:?}"))["id"]
        .as_u64()
        .unwrap()
        .to_string()
}

fn certs(c: &TestCluster, node: &str, n: usize, len: usize) {
    for i in 0..n {
        let mut body = format!("cert {i} ").into_bytes();
        body.resize(len, b'.');
        write_file(&c.ca(node).join(format!("signed/host{i:02}.pem")), &body, 0o640);
    }
}

#[test]
fn removed_and_replaced_files_are_kept_on_the_passive_and_put_back_on_the_active() {
    let c = TestCluster::pair("");
    certs(&c, "a", 5, 100);
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    let old1 = read(&c.ca("a").join("signed/host01.pem")).unwrap();
    let old2 = read(&c.ca("a").join("signed/host02.pem")).unwrap();
    let mtime2 = fs::metadata(c.ca("a").join("signed/host02.pem")).unwrap().mtime();

    // Mistakes on the active: one certificate overwritten, one deleted, a
    // whole folder deleted.
    write_file(&c.ca("a").join("signed/host01.pem"), b"clobbered", 0o600);
    fs::remove_file(c.ca("a").join("signed/host02.pem")).unwrap();
    write_file(&c.ca("a").join("requests/r1.pem"), b"request 1", 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    fs::remove_dir_all(c.ca("a").join("requests")).unwrap();
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    assert!(!c.ca("b").join("signed/host02.pem").exists());

    // The passive kept the previous versions, with their metadata.
    let entries = list_with(&c, "b", &["signed/host01.pem", "signed/host02.pem", "requests/r1.pem"]);
    let e1 = entry(&entries, "signed/host01.pem").expect("the overwritten file is kept");
    assert_eq!(e1["why"], "replaced");
    assert_eq!(e1["watch"], "ca");
    assert_eq!(e1["size"], 100);
    assert_eq!(e1["mode"], 0o640);
    assert_eq!(e1["kind"], "file");
    assert!(e1["epoch"].as_u64().unwrap() >= 1);
    assert_eq!(e1["hash"], blake3::hash(&old1).to_hex().as_str());
    let e2 = entry(&entries, "signed/host02.pem").expect("the deleted file is kept");
    assert_eq!(e2["why"], "removed");
    assert_eq!(e2["mtime"], mtime2);
    assert_eq!(
        entry(&entries, "requests/r1.pem").expect("a removed tree is kept")["why"],
        "removed"
    );
    let stored = undo_dir(&c, "b")
        .join("files")
        .join(id_of(&entries, "signed/host02.pem"));
    assert_eq!(read(&stored).unwrap(), old2);
    // The active replaced nothing of its own: its store is empty.
    assert!(list(&c, "a").is_empty());

    // The table, status and metrics show the store.
    let table = output_text(&c.ctl(&["undo", "list"]));
    assert!(
        table.contains("signed/host02.pem") && table.contains("removed"),
        "{table}"
    );
    let status = c.status_json();
    let b = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "b")
        .unwrap();
    assert!(b["status"]["undo"]["files"].as_u64().unwrap() >= 3, "{b}");
    assert_eq!(b["status"]["undo"]["max_size"], 1u64 << 30);
    assert_eq!(b["status"]["undo"]["max_age_s"], 7 * 86_400);
    let (_, metrics) = http_get(c.node("b").http_port, "/metrics").unwrap();
    assert!(metrics.contains("warmspare_undo_files "), "{metrics}");
    assert!(metrics.contains("warmspare_undo_bytes "), "{metrics}");

    // Fetched to the operator's machine.
    let out_file = c.dir.path().join("host02.copy");
    let id2 = id_of(&entries, "signed/host02.pem");
    let out = c.ctl(&[
        "undo",
        "restore",
        "--node",
        "b",
        &id2,
        "--output",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(read(&out_file).unwrap(), old2);

    // Put back on the active, from where it replicates.
    let out = c.ctl(&["undo", "restore", "--node", "b", &id2]);
    assert!(out.status.success(), "{}", output_text(&out));
    let back = c.ca("a").join("signed/host02.pem");
    assert_eq!(read(&back).unwrap(), old2);
    let md = fs::metadata(&back).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o640, mtime2));
    wait_until("the restored file reaches the passive", LIMIT, || {
        read(&c.ca("b").join("signed/host02.pem")).as_deref() == Some(&old2[..])
    });

    // A file that exists on the active is not replaced without --force ...
    let id1 = id_of(&entries, "signed/host01.pem");
    let out = c.ctl(&["undo", "restore", "--node", "b", &id1]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(output_text(&out).contains("--force"), "{}", output_text(&out));
    assert_eq!(read(&c.ca("a").join("signed/host01.pem")).unwrap(), b"clobbered");
    // ... and with it, what was there is kept in the active's own store.
    let out = c.ctl(&["undo", "restore", "--node", "b", &id1, "--force"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(read(&c.ca("a").join("signed/host01.pem")).unwrap(), old1);
    let on_a = list_with(&c, "a", &["signed/host01.pem"]);
    let kept = entry(&on_a, "signed/host01.pem").expect("the active kept what it replaced");
    let kept_id = kept["id"].as_u64().unwrap().to_string();
    assert_eq!(
        read(&undo_dir(&c, "a").join("files").join(kept_id)).unwrap(),
        b"clobbered"
    );
    wait_until("the forced restore reaches the passive", LIMIT, || {
        read(&c.ca("b").join("signed/host01.pem")).as_deref() == Some(&old1[..])
    });
    // An id the store does not hold is refused.
    let out = c.ctl(&["undo", "restore", "--node", "b", "999999"]);
    assert!(!out.status.success(), "{}", output_text(&out));
}

#[test]
fn the_undo_store_is_pruned_by_size_and_by_age_and_lets_a_large_file_go_when_told() {
    let c = pair_with("undo_max_size = \"350\"\nundo_max_age = \"3s\"\nundo_when_full = \"replace\"\n");
    certs(&c, "a", 6, 100);
    write_file(&c.ca("a").join("big.bin"), &[7u8; 1000], 0o644);
    let _b = c.start("b");
    let _a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);

    // Six 100-byte files removed one batch after another: the store keeps
    // the newest within 350 bytes.
    for i in 0..6 {
        fs::remove_file(c.ca("a").join(format!("signed/host{i:02}.pem"))).unwrap();
        converge(&c.ca("a"), &c.ca("b"), LIMIT);
    }
    let entries = list_with(&c, "b", &["signed/host05.pem"]);
    let paths: Vec<&str> = entries.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(
        paths.len() <= 3 && paths.contains(&"signed/host05.pem") && !paths.contains(&"signed/host00.pem"),
        "{paths:?}"
    );
    let bytes: u64 = entries.iter().map(|e| e["size"].as_u64().unwrap()).sum();
    assert!(bytes <= 350, "{bytes}");
    let files = fs::read_dir(undo_dir(&c, "b").join("files")).unwrap().count();
    assert_eq!(files, entries.len(), "pruned entries leave no file behind");

    // With undo_when_full = "replace", a file larger than the whole store
    // is replaced all the same, without a copy, and counted.
    write_file(&c.ca("a").join("big.bin"), &[8u8; 1000], 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    assert!(entry(&list(&c, "b"), "big.bin").is_none());
    let (_, metrics) = http_get(c.node("b").http_port, "/metrics").unwrap();
    assert!(!metrics.contains("warmspare_undo_skipped_total 0\n"), "{metrics}");
    assert!(!metrics.contains("warmspare_undo_pruned_total 0\n"), "{metrics}");

    // Later than undo_max_age, the next batch that keeps a file prunes the
    // old ones: only the newest is left.
    let first: Vec<u64> = list(&c, "b").iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(!first.is_empty());
    std::thread::sleep(Duration::from_secs(4));
    write_file(&c.ca("a").join("new.pem"), b"new", 0o644);
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    fs::remove_file(c.ca("a").join("new.pem")).unwrap();
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    wait_until("old entries pruned by age", LIMIT, || {
        let now = list(&c, "b");
        now.iter().all(|e| !first.contains(&e["id"].as_u64().unwrap())) && entry(&now, "new.pem").is_some()
    });
}

/// A tmpfs mounted at a path for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new(require("mount", "mount"))
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the test runs as root, as CI does): {}",
            output_text(&out)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The `last_error` of node `node`'s links, as `status --json` shows them.
fn link_errors(c: &TestCluster, node: &str) -> String {
    c.node_status(node)["links"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["last_error"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn a_file_the_store_cannot_keep_is_neither_replaced_nor_removed_unless_the_operator_says_so() {
    let c = pair_with("undo_max_size = \"500\"\n");
    // The passive's undo store on another file system than its watch: kept
    // files are copies, not links.
    let _tmpfs = Tmpfs::mount(&undo_dir(&c, "b"));
    write_file(&c.ca("a").join("big.pem"), &[1u8; 1000], 0o640);
    write_file(&c.ca("a").join("gone.pem"), &[2u8; 1000], 0o640);
    write_file(&c.ca("a").join("small.pem"), b"small 1", 0o640);
    let mut b = c.start("b");
    let mut a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);

    // On the active: the large files replaced and removed, the small one
    // replaced.
    write_file(&c.ca("a").join("big.pem"), &[3u8; 1000], 0o640);
    fs::remove_file(c.ca("a").join("gone.pem")).unwrap();
    write_file(&c.ca("a").join("small.pem"), b"small 2", 0o640);

    // The small file goes through, copied into the store across file systems.
    wait_until("the small file reaches the passive", LIMIT, || {
        read(&c.ca("b").join("small.pem")).as_deref() == Some(&b"small 2"[..])
    });
    let entries = list_with(&c, "b", &["small.pem"]);
    let stored = undo_dir(&c, "b").join("files").join(id_of(&entries, "small.pem"));
    assert_eq!(read(&stored).unwrap(), b"small 1");
    // The large ones are refused: the sender says which and why.
    let mut errors = String::new();
    wait_until("the active reports the refusal", LIMIT, || {
        errors = link_errors(&c, "a");
        errors.contains("no copy can be kept in the undo store")
    });
    assert!(errors.contains("undo_max_size is 500"), "{errors}");
    assert!(
        errors.contains("ca/big.pem") || errors.contains("ca/gone.pem"),
        "{errors}"
    );
    wait_until("the passive logs both refusals", LIMIT, || {
        let log = b.log_text();
        ["big.pem", "gone.pem"].iter().all(|p| {
            log.lines()
                .any(|l| l.contains("a file the undo store cannot keep is not removed or replaced") && l.contains(p))
        })
    });
    // The passive keeps its old files: nothing was let go without a copy.
    assert_eq!(read(&c.ca("b").join("big.pem")).unwrap(), vec![1u8; 1000]);
    assert_eq!(read(&c.ca("b").join("gone.pem")).unwrap(), vec![2u8; 1000]);
    assert!(entry(&list(&c, "b"), "big.pem").is_none());

    // The operator lets such files go: the retried changes apply, without
    // a copy.
    a.terminate();
    b.terminate();
    let t = fs::read_to_string(&c.file).unwrap();
    write_cluster_file(
        &c.file,
        &t.replacen(
            "undo_max_size = \"500\"\n",
            "undo_max_size = \"500\"\nundo_when_full = \"replace\"\n",
            1,
        ),
    );
    b.restart();
    a.restart();
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    assert!(!c.ca("b").join("gone.pem").exists());
    let (_, metrics) = http_get(c.node("b").http_port, "/metrics").unwrap();
    assert!(metrics.contains("warmspare_undo_skipped_total 2\n"), "{metrics}");
    assert!(entry(&list(&c, "b"), "big.pem").is_none());
}

#[test]
fn a_hostile_entry_in_the_store_cannot_make_a_restore_write_outside_the_root() {
    let c = TestCluster::pair("");
    certs(&c, "a", 2, 50);
    let mut b = c.start("b");
    let _a = c.start("a");
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    fs::remove_file(c.ca("a").join("signed/host00.pem")).unwrap();
    fs::remove_file(c.ca("a").join("signed/host01.pem")).unwrap();
    converge(&c.ca("a"), &c.ca("b"), LIMIT);
    let entries = list_with(&c, "b", &["signed/host00.pem", "signed/host01.pem"]);
    let id0 = id_of(&entries, "signed/host00.pem");
    let id1 = id_of(&entries, "signed/host01.pem");

    // A local user with the agent's privileges... or a damaged disk: the
    // index names paths out of the root, and a kept file is a link to a
    // secret.
    b.terminate();
    let outside = c.dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"not for the CA").unwrap();
    let index = undo_dir(&c, "b").join("index.jsonl");
    let t = fs::read_to_string(&index).unwrap();
    let escaped = format!("../../../../{}", outside.join("written").display());
    let t = t.replace("\"signed/host00.pem\"", &serde_json::to_string(&escaped).unwrap());
    let t = t.replace("\"signed/host01.pem\"", "\"signed/esc\\u001b[2Jape.pem\"");
    fs::write(&index, t).unwrap();
    let kept1 = undo_dir(&c, "b").join("files").join(&id1);
    fs::remove_file(&kept1).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), &kept1).unwrap();
    b.restart();
    c.wait_linked("a", LIMIT);

    // The listing escapes the terminal escape.
    let table = output_text(&c.ctl(&["undo", "list", "--node", "b"]));
    assert!(!table.contains('\x1b'), "{table:?}");
    assert!(table.contains("\\x1b[2J"), "{table}");

    // A path that leaves the root is refused by the active.
    let out = c.ctl(&["undo", "restore", "--node", "b", &id0, "--force"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("a refused") && output_text(&out).contains("leaves its root"),
        "{}",
        output_text(&out)
    );
    assert!(!outside.join("written").exists());
    // A kept file that is a link is not followed.
    let out = c.ctl(&["undo", "restore", "--node", "b", &id1, "--force"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("cannot read undo entry"),
        "{}",
        output_text(&out)
    );
    assert!(!c.ca("a").join("signed/esc\x1b[2Jape.pem").exists());
    let out_file = c.dir.path().join("leak");
    let out = c.ctl(&[
        "undo",
        "restore",
        "--node",
        "b",
        &id1,
        "--output",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert_ne!(read(&out_file).as_deref(), Some(&b"not for the CA"[..]));

    // A directory of the active's watch swapped for a link to the outside:
    // the restore does not go through it.
    let (good_id, _) = {
        write_file(&c.ca("a").join("sub/f.pem"), b"f", 0o644);
        converge(&c.ca("a"), &c.ca("b"), LIMIT);
        fs::remove_file(c.ca("a").join("sub/f.pem")).unwrap();
        converge(&c.ca("a"), &c.ca("b"), LIMIT);
        let e = list_with(&c, "b", &["sub/f.pem"]);
        (id_of(&e, "sub/f.pem"), ())
    };
    fs::remove_dir(c.ca("a").join("sub")).unwrap();
    std::os::unix::fs::symlink(&outside, c.ca("a").join("sub")).unwrap();
    let out = c.ctl(&["undo", "restore", "--node", "b", &good_id, "--force"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(output_text(&out).contains("beneath the root"), "{}", output_text(&out));
    assert!(!outside.join("f.pem").exists());
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"not for the CA");
}
