//! Dump and restore jobs, on real PostgreSQL servers and on plain files.

use std::fs;
use std::path::Path;
use std::time::Duration;

use warmspare_tests::{read, wait_until, ClusterOptions, Postgres, TestCluster};

const LIMIT: Duration = Duration::from_secs(90);

fn pair_with_jobs(jobs: &str, node_extra: Vec<(&'static str, String)>) -> TestCluster {
    TestCluster::new(ClusterOptions {
        nodes: vec!["a", "b"],
        extra: format!(
            "[[watch]]\nname = \"ca\"\npath = \"{}\"\ndebounce_ms = 5\n\n{jobs}",
            warmspare_tests::CA_WATCH
        ),
        node_extra,
        ..Default::default()
    })
}

fn job_history(c: &TestCluster, node: &str, job: &str) -> Vec<serde_json::Value> {
    let st = c.status_json();
    let n = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap()
        .clone();
    let jobs = n["status"]["jobs"].as_array().cloned().unwrap_or_default();
    jobs.into_iter().filter(|j| j["name"] == job).collect()
}

fn last_run(c: &TestCluster, node: &str, job: &str) -> Option<serde_json::Value> {
    job_history(c, node, job)
        .first()
        .and_then(|j| (!j["last"].is_null()).then(|| j["last"].clone()))
}

fn gens(c: &TestCluster, node: &str, job: &str) -> usize {
    fs::read_dir(c.node(node).root.join("var/lib/warmspare/jobs").join(job).join("gen"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A digest of table `t`, or `None` while it cannot be read (a restore may
/// be rewriting it).
fn rows(pg: &Postgres) -> Option<String> {
    pg.try_sql(
        "app",
        "select count(*), coalesce(sum(id), 0), coalesce(string_agg(v, ',' order by id), '') from t",
    )
}

#[test]
fn postgres_dumps_follow_the_active_database_as_small_deltas() {
    let (pa, pb) = (Postgres::start(), Postgres::start());
    for pg in [&pa, &pb] {
        pg.sql("postgres", "create database app");
    }
    pa.sql("app", "create table t (id int primary key, v text)");
    pa.sql(
        "app",
        "insert into t select g, md5(g::text) || repeat('x', 60) from generate_series(1, 60000) g",
    );
    let job = "[[job]]\nname = \"db\"\nschedule = \"*/2 * * * * *\"\ndump = \"pg_dump --clean --if-exists -d app\"\n\
               restore = \"psql -X -q -v ON_ERROR_STOP=1 --single-transaction -d app -f \\\"$WARMSPARE_INPUT\\\"\"\nkeep = 3\ntimeout = \"60s\"\n";
    let c = pair_with_jobs(job, vec![("a", pa.env_toml()), ("b", pb.env_toml())]);
    let _b = c.start("b");
    let a = c.start("a");
    wait_until("the passive database to hold the rows", LIMIT, || {
        let b = rows(&pb);
        b.is_some() && b == rows(&pa)
    });

    pa.sql("app", "update t set v = 'changed' where id = 30000");
    pa.sql("app", "delete from t where id = 7");
    wait_until("the passive to follow an update and a delete", LIMIT, || {
        rows(&pb) == rows(&pa)
    });
    assert_eq!(pb.sql("app", "select v from t where id = 30000"), "changed");
    assert_eq!(pb.sql("app", "select count(*) from t where id = 7"), "0");

    // The dump of several MiB changed by one row went as a delta.
    let log = a.log_text();
    let shipped: Vec<(u64, u64, bool)> = log
        .lines()
        .filter(|l| l.contains("large file shipped") && l.contains("path=\"db/dump\""))
        .filter_map(|l| {
            let num = |k: &str| l.split(k).nth(1)?.split_whitespace().next()?.parse::<u64>().ok();
            Some((num("size=")?, num("wire_bytes=")?, l.contains("delta=true")))
        })
        .collect();
    let (size, wire, _) = *shipped
        .iter()
        .rev()
        .find(|s| s.2)
        .unwrap_or_else(|| panic!("no delta shipment of the dump: {shipped:?}"));
    eprintln!(
        "MEASURE dump of {size} bytes after a one-row change: {wire} bytes on the wire ({:.2}%)",
        wire as f64 * 100.0 / size as f64
    );
    assert!(size > 4 << 20, "the dump is only {size} bytes");
    assert!(wire * 10 < size, "delta of {wire} bytes is not under 10% of {size}");

    let dump = last_run(&c, "a", "db").expect("a dump ran");
    let restore = last_run(&c, "b", "db").expect("a restore ran");
    assert_eq!(dump["kind"], "Dump");
    assert_eq!(restore["kind"], "Restore");
    assert_eq!(restore["ok"], true, "{restore}");
    let ms = |r: &serde_json::Value| r["end_ms"].as_i64().unwrap() - r["start_ms"].as_i64().unwrap();
    eprintln!(
        "MEASURE pg_dump {} ms, restore {} ms for {} bytes (generation {})",
        ms(&dump),
        ms(&restore),
        restore["bytes"],
        restore["generation"]
    );
    // keep = 3 on both sides.
    wait_until("generations to be pruned", LIMIT, || {
        gens(&c, "a", "db") == 3 && gens(&c, "b", "db") == 3
    });
}

#[test]
fn a_failing_or_empty_dump_ships_nothing() {
    let c = pair_with_jobs(
        "[[job]]\nname = \"bad\"\ndump = \"echo partial output; echo oops >&2; exit 3\"\nrestore = \"touch \\\"$WARMSPARE_INPUT.restored\\\"\"\n\n\
         [[job]]\nname = \"empty\"\ndump = \"true\"\nrestore = \"touch \\\"$WARMSPARE_INPUT.restored\\\"\"\n\n\
         [[job]]\nname = \"slow\"\ndump = \"echo started; sleep 30\"\ntimeout = \"1s\"\n",
        vec![],
    );
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    let out = c.ctl(&["run-job", "bad"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("exit status: 3") && text.contains("oops"), "{text}");
    let out = c.ctl(&["run-job", "empty"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("wrote nothing"), "{text}");
    let out = c.ctl(&["run-job", "slow"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("timed out"), "{text}");
    for job in ["bad", "empty", "slow"] {
        let last = last_run(&c, "a", job).unwrap();
        assert_eq!(last["ok"], false);
        assert!(
            !c.node("a").root.join("var/lib/warmspare/spool").join(job).exists(),
            "{job} was published"
        );
        assert_eq!(gens(&c, "a", job), 0);
    }
    // Nothing reached the passive; nothing was restored.
    let b_state = c.node("b").root.join("var/lib/warmspare");
    assert!(!b_state.join("spool/bad").exists() && !b_state.join("spool/empty").exists());
    assert!(last_run(&c, "b", "bad").is_none());
}

#[test]
fn a_failed_restore_keeps_its_dump_and_the_next_arrival_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out, flag) = (dir.path().join("src"), dir.path().join("out"), dir.path().join("fail"));
    fs::write(&src, b"generation one\n").unwrap();
    fs::write(&flag, b"").unwrap();
    let job = format!(
        "[[job]]\nname = \"files\"\ndump = \"cat {}\"\nrestore = \"test ! -e {} || exit 7; cp \\\"$WARMSPARE_INPUT\\\" {}\"\nkeep = 2\n",
        src.display(),
        flag.display(),
        out.display()
    );
    let c = pair_with_jobs(&job, vec![]);
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    assert!(c.ctl(&["run-job", "files"]).status.success());
    wait_until("the failed restore", LIMIT, || {
        last_run(&c, "b", "files").is_some_and(|r| r["ok"] == false)
    });
    let failed = last_run(&c, "b", "files").unwrap();
    assert!(
        failed["detail"].as_str().unwrap().contains("exit status: 7"),
        "{failed}"
    );
    assert_eq!(gens(&c, "b", "files"), 1, "the dump it failed on is kept");
    assert!(!out.exists());
    // A retry by hand on the passive fails the same way and keeps the dump.
    let retry = c.ctl(&["run-job", "files", "--on", "b"]);
    assert_eq!(retry.status.code(), Some(1));
    assert_eq!(gens(&c, "b", "files"), 1);

    fs::remove_file(&flag).unwrap();
    fs::write(&src, b"generation two\n").unwrap();
    assert!(c.ctl(&["run-job", "files"]).status.success());
    wait_until("the next arrival to restore", LIMIT, || {
        read(&out).is_some_and(|d| d == b"generation two\n")
    });
    let ok = last_run(&c, "b", "files").unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["generation"], 2);
    for _ in 0..2 {
        assert!(c.ctl(&["run-job", "files"]).status.success());
    }
    wait_until("keep = 2 on both sides", LIMIT, || {
        gens(&c, "a", "files") == 2
            && gens(&c, "b", "files") == 2
            && last_run(&c, "b", "files").is_some_and(|r| r["generation"] == 4)
    });
}

#[test]
fn a_run_job_on_all_runs_on_both_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let job = format!(
        "[[job]]\nname = \"deploy\"\nschedule = \"* * * * * *\"\nrun = \"touch {}/ran-$WARMSPARE_NODE\"\non = \"all\"\n\n\
         [[job]]\nname = \"only-active\"\nschedule = \"* * * * * *\"\nrun = \"touch {}/active-$WARMSPARE_NODE\"\n",
        dir.path().display(),
        dir.path().display()
    );
    let c = pair_with_jobs(&job, vec![]);
    let _b = c.start("b");
    let _a = c.start("a");
    let p = |n: &str| dir.path().join(n);
    wait_until("the run job on both nodes", LIMIT, || {
        p("ran-a").exists() && p("ran-b").exists() && p("active-a").exists()
    });
    assert!(
        !Path::new(&p("active-b")).exists(),
        "a job for the active ran on the passive"
    );
}

#[test]
fn switchover_runs_a_final_dump_and_restore_and_refuses_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    fs::write(&src, b"before the switchover\n").unwrap();
    let job = format!(
        "[[job]]\nname = \"files\"\ndump = \"cat {}\"\nrestore = \"cp \\\"$WARMSPARE_INPUT\\\" {}\"\n",
        src.display(),
        out.display()
    );
    let c = pair_with_jobs(&job, vec![]);
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    c.wait_linked("a", LIMIT);
    // A dump that cannot run refuses the switchover; nothing changes.
    fs::remove_file(&src).unwrap();
    let refused = c.ctl(&["switchover", "--to", "b", "--yes"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(refused.status.code(), Some(3), "{text}");
    assert!(text.contains("final dump"), "{text}");
    assert_eq!(
        warmspare_tests::http_status(c.node("a").http_port, "/_status/check"),
        Some(200)
    );
    // With the data back, the final dump is restored on b before b becomes active.
    fs::write(&src, b"the last word before the switchover\n").unwrap();
    let ok = c.ctl(&["switchover", "--to", "b", "--yes"]);
    let text = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(ok.status.success(), "{text}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        text.contains("final dump of files") && text.contains("restore the final dumps"),
        "{text}"
    );
    assert_eq!(read(&out).unwrap(), b"the last word before the switchover\n");
    assert_eq!(
        warmspare_tests::http_status(c.node("b").http_port, "/_status/check"),
        Some(200)
    );
}

#[test]
fn restore_schedule_restores_on_its_schedule_not_on_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // A restore schedule that will not come round during the test.
    let job = format!(
        "[[job]]\nname = \"later\"\ndump = \"echo payload\"\nrestore = \"cp \\\"$WARMSPARE_INPUT\\\" {}\"\nrestore_schedule = \"0 0 0 1 1 * 2099\"\n",
        out.display()
    );
    let c = pair_with_jobs(&job, vec![]);
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    assert!(c.ctl(&["run-job", "later"]).status.success());
    let meta = c.node("b").root.join("var/lib/warmspare/spool/later/meta.json");
    wait_until("the dump to arrive on b", LIMIT, || meta.exists());
    // Arrival alone restores nothing (an arrival-driven restore takes milliseconds).
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        assert!(!out.exists(), "restored on arrival despite restore_schedule");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(last_run(&c, "b", "later").is_none());
    // The operator can restore it now.
    let now = c.ctl(&["run-job", "later", "--on", "b"]);
    assert!(now.status.success(), "{}", String::from_utf8_lossy(&now.stderr));
    assert_eq!(read(&out).unwrap(), b"payload\n");
}

/// A failed dump's stderr can hold a secret (a connection string with a
/// password): the unauthenticated `/_status` must not serve it, while
/// `warmsparectl status` over SSH keeps the detail.
#[test]
fn job_detail_stays_off_the_unauthenticated_status_port() {
    let secret = "postgres://app:s3cretPassw0rd@db.example/app";
    let c = pair_with_jobs(
        &format!("[[job]]\nname = \"leaky\"\ndump = \"echo 'cannot connect to {secret}' >&2; exit 3\"\n"),
        vec![],
    );
    let _b = c.start("b");
    let a = c.start("a");
    wait_until("agents up", LIMIT, || c.ctl(&["status"]).status.success());
    assert_eq!(c.ctl(&["run-job", "leaky"]).status.code(), Some(1));
    let last = last_run(&c, "a", "leaky").expect("a recorded run");
    assert_eq!(last["ok"], false);
    assert!(
        last["detail"].as_str().unwrap_or_default().contains(secret),
        "status --json over SSH lost the detail: {last}"
    );
    let (code, body) = warmspare_tests::http_get(c.node("a").http_port, "/_status").expect("/_status answers");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("s3cretPassw0rd"), "/_status leaks job detail: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/_status is JSON");
    let job = v["jobs"]
        .as_array()
        .and_then(|js| js.iter().find(|j| j["name"] == "leaky"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(job["runs_failed"], 1, "{body}");
    assert_eq!(job["last"]["ok"], false, "{body}");
    assert_eq!(v["role"]["active"], "a", "{body}");
    drop(a);
}

#[test]
fn run_job_honours_on_and_on_node() {
    // Jobs without schedules: only `run-job` starts them. Each command
    // appends its node to a file named after the job.
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = String::new();
    for (name, on) in [("act", "active"), ("pas", "passive"), ("every", "all")] {
        jobs.push_str(&format!(
            "[[job]]\nname = \"{name}\"\nrun = \"echo $WARMSPARE_NODE >> {}/{name}\"\non = \"{on}\"\n\n",
            dir.path().display()
        ));
    }
    let c = pair_with_jobs(&jobs, vec![]);
    let _b = c.start("b");
    let _a = c.start("a");
    wait_until("a healthy pair", LIMIT, || c.ctl(&["status"]).status.success());
    let ran = |name: &str| {
        let mut nodes: Vec<String> = fs::read_to_string(dir.path().join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        nodes.sort();
        nodes
    };
    let run = |args: &[&str]| c.ctl(&[&["run-job"], args].concat());
    let code = |o: &std::process::Output| o.status.code().unwrap_or(-1);

    let out = run(&["act"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(ran("act"), ["a"]);
    let out = run(&["pas"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(ran("pas"), ["b"], "on = \"passive\" must run on the passive only");
    let out = run(&["every"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(ran("every"), ["a", "b"], "on = \"all\" must run on every node");

    // --on picks a node among those `on` allows; another node refuses
    // (exit 3) and runs nothing.
    let out = run(&["pas", "--on", "a"]);
    assert_eq!(code(&out), 3, "{out:?}");
    assert_eq!(ran("pas"), ["b"]);
    let out = run(&["act", "--on", "b"]);
    assert_eq!(code(&out), 3, "{out:?}");
    assert_eq!(ran("act"), ["a"]);
    let out = run(&["every", "--on", "b"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(ran("every"), ["a", "b", "b"]);
}

#[test]
fn the_last_run_of_a_job_survives_a_restart() {
    // One job that succeeds and one that fails, each run once by `run-job`;
    // after b restarts, status (table and JSON) and the metrics still show
    // each job's last run from the persisted history.
    let jobs = "[[job]]\nname = \"good\"\nrun = \"true\"\non = \"all\"\n\n\
                [[job]]\nname = \"bad\"\nrun = \"echo broken >&2; exit 7\"\non = \"all\"\n";
    let c = pair_with_jobs(jobs, vec![]);
    let mut b = c.start("b");
    let _a = c.start("a");
    wait_until("a healthy pair", LIMIT, || c.ctl(&["status"]).status.success());
    for job in ["good", "bad"] {
        let out = c.ctl(&["run-job", job, "--on", "b"]);
        assert!(out.status.code().is_some(), "{out:?}");
    }
    let before = (last_run(&c, "b", "good"), last_run(&c, "b", "bad"));
    let (Some(good), Some(bad)) = before.clone() else {
        panic!("run-job left no last run in status: {before:?}");
    };
    assert_eq!(good["ok"], true, "{good}");
    assert_eq!(bad["ok"], false, "{bad}");

    b.terminate();
    b.restart();
    wait_until("b answering status again", LIMIT, || {
        let st = c.status_json();
        st["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["node"] == "b" && n["status"].is_object()))
    });
    assert_eq!(
        last_run(&c, "b", "good"),
        Some(good.clone()),
        "the good run was forgotten"
    );
    assert_eq!(
        last_run(&c, "b", "bad"),
        Some(bad.clone()),
        "the failed run was forgotten"
    );

    let table = String::from_utf8_lossy(&c.ctl(&["status"]).stdout).into_owned();
    let row = |job: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([job, "b"]))
            .unwrap_or_else(|| panic!("no row for {job} on b in:\n{table}"))
            .to_string()
    };
    assert!(row("good").contains(" run ") && row("good").contains(" ok "), "{table}");
    assert!(row("bad").contains(" FAILED "), "{table}");

    let (code, metrics) = warmspare_tests::http_get(c.node("b").http_port, "/metrics").expect("b's metrics");
    assert_eq!(code, 200);
    for (job, result, run) in [("good", "ok", &good), ("bad", "failed", &bad)] {
        let line = format!(
            "warmspare_job_last_run_timestamp_seconds{{job=\"{job}\",result=\"{result}\"}} {}",
            run["end_ms"].as_i64().unwrap_or_default() / 1000
        );
        assert!(metrics.contains(&line), "no {line:?} in the metrics:\n{metrics}");
    }
}
