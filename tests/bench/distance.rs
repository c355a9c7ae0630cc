//! Scenario 6, distance: the passive (and a second sshd) in a network
//! namespace of its own, reached over an emulated long path: initial sync
//! and event latency against rsync (`run`), and what crosses the wire with
//! compression against `rsync -z` on a 25 ms path and on a 25 ms path of
//! 10 Mbit/s (`compression`).

use std::path::Path;
use std::time::{Duration, Instant};

use warmspare_tests::faults::NetLink;
use warmspare_tests::{converge, TestCluster};

use super::{
    arrived, event_latencies, in_turn, keep_logs, pair_at, percentile, relay, round_trees, settle, start_agent, wait,
    Row, Sizes, Sshd,
};

/// How scenario 6 puts distance between the two sides.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Emulation {
    /// `tc netem` on both ends of the veth pair.
    Netem,
    /// The far side listens on loopback in its namespace, reached through a
    /// [`relay::Relay`] on the same port in the host's.
    Relay,
    /// The veth pair without a delay (to check the plumbing).
    Plain,
}

impl Emulation {
    /// Milliseconds each way.
    fn one_way_ms(self) -> u64 {
        if self == Emulation::Plain {
            0
        } else {
            25
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Emulation::Netem => "25 ms each way from tc netem on a veth pair between network namespaces",
            Emulation::Relay => {
                "25 ms each way from a delay relay between network namespaces (this kernel has no tc netem): \
                 every chunk either side sends is passed on 25 ms after it was read, so each exchange \
                 between the tools' ends costs a 50 ms round trip, but TCP's own acknowledgements, slow start \
                 and Nagle's waits stay at loopback speed on each of the relay's two hops"
            }
            Emulation::Plain => "no delay (BENCH_DISTANCE_NO_DELAY), the veth plumbing only",
        }
    }
}

/// Scenario 6: the passive (and a second sshd) in a network namespace, with
/// `how` putting distance between it and the active; initial sync against
/// rsync in `rounds` rounds that alternate which tool goes first (as in
/// scenario 1: the second to create 20,000 files in the same block groups
/// pays more for ext4's recently deleted inodes), then event latency on
/// the last round's pair against the round trip. Returns the clusters, to
/// be kept until the run ends.
pub(super) fn run(
    link: &NetLink,
    how: Emulation,
    sizes: &Sizes,
    rounds: usize,
    work: &Path,
    rows: &mut Vec<Row>,
) -> Vec<TestCluster> {
    let one_way = Duration::from_millis(how.one_way_ms());
    let rtt_ms = 2.0 * how.one_way_ms() as f64;
    let (near, far) = match how {
        Emulation::Relay => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
        Emulation::Netem | Emulation::Plain => (link.outer.clone(), link.inner.clone()),
    };
    let relay_delay = (how == Emulation::Relay).then_some(one_way);
    let shape = relay_delay.map(|delay| relay::Shape { delay, rate: None });
    let sshd = Sshd::start_at(&work.join("sshd-far"), &far, Some(&link.ns), shape);
    let (mut rsync_times, mut ws_times) = (Vec::new(), Vec::new());
    let mut kept = Vec::new();
    let mut last = None;
    for round in 0..rounds.max(1) {
        let c = pair_at(vec![("a", near.clone()), ("b", far.clone())]);
        let (src, dst) = round_trees(&c, work, &format!("rsync-far-{round}"), sizes.files);
        let rsync = || {
            settle();
            sshd.rsync(&src, &dst, &[]).0
        };
        let warmspare = || {
            settle();
            // `BENCH_WRAP_FAR` wraps the passive inside its namespace (a profiler, strace).
            let wrap_far = std::env::var("BENCH_WRAP_FAR").unwrap_or_default();
            let b = start_agent(&c, "b", &format!("ip netns exec {} {wrap_far}", link.ns));
            let relay = relay_delay.map(|d| relay::Relay::start(c.node("b").port, &link.ns, d));
            // The active's first dial must find the passive listening (a
            // refused dial would time its backoff, not the sync).
            wait(Duration::from_secs(30), || b.log_text().contains("agent started"));
            let start = Instant::now();
            let a = start_agent(&c, "a", "");
            arrived(&src, &c.ca("b"), sizes.files);
            let secs = start.elapsed().as_secs_f64();
            converge(&src, &c.ca("b"), Duration::from_secs(120));
            (secs, (a, b, relay))
        };
        let (r, (w, agents)) = in_turn(round, rsync, warmspare);
        println!(
            "distance ({rtt_ms:.0} ms RTT), round {}: initial sync rsync {r:.2} s, warmspare {w:.2} s",
            round + 1
        );
        rsync_times.push(r);
        ws_times.push(w);
        // The agents of earlier rounds stop here; the last pair stays for
        // the events. Every tree stays until the run ends.
        last = Some(agents);
        kept.push(c);
    }
    rows.push(Row {
        scenario: format!("6. distance ({rtt_ms:.0} ms RTT): initial sync, {} files", sizes.files),
        measure: "time".into(),
        warmspare: percentile(&mut ws_times, 0.5),
        best_other: percentile(&mut rsync_times, 0.5),
        other_name: "rsync".into(),
        unit: "s",
        target: "<= 1.2x".into(),
    });
    let (Some(c), Some((a, b, _relay))) = (kept.last(), last.as_ref()) else {
        return kept;
    };
    let mut lat = event_latencies(&c.ca("a"), &c.ca("b"), "far", sizes.events.min(50));
    keep_logs("distance", a, b);
    rows.push(Row {
        scenario: format!("6. distance ({rtt_ms:.0} ms RTT): event latency"),
        measure: "p50".into(),
        warmspare: percentile(&mut lat, 0.5),
        best_other: rtt_ms,
        other_name: "one round trip".into(),
        unit: "ms",
        target: "< 3 round trips".into(),
    });
    kept
}

/// The paths [`compression`] measures on: 25 ms each way, then also
/// 10 Mbit/s each way.
const PATHS: [(&str, relay::Shape); 2] = [
    (
        "50 ms RTT",
        relay::Shape {
            delay: Duration::from_millis(25),
            rate: None,
        },
    ),
    (
        "50 ms RTT, 10 Mbit/s",
        relay::Shape {
            delay: Duration::from_millis(25),
            rate: Some(10_000_000 / 8),
        },
    ),
];

/// Rows of the SQL dump of [`sql_dump`].
const DUMP_ROWS: usize = 60_000;

/// Certificates as they are: base64 of DER, 64 characters a line, every
/// one with the same issuer and extensions (a third of its bytes) and its
/// own key and signature; `n` of them under `root/signed/`, and a serial.
fn pem_tree(root: &Path, n: usize) {
    let shared = warmspare_tests::noise(400, 1);
    for i in 0..n {
        let mut der = shared.clone();
        der.extend(warmspare_tests::noise(800, i as u64 + 2));
        let b64 = base64(&der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        let body = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        warmspare_tests::write_file(
            &root.join(format!("signed/{:02}/host{i:06}.example.com.pem", i % 64)),
            body.as_bytes(),
            0o644,
        );
    }
    warmspare_tests::write_file(&root.join("serial"), format!("{n:08X}\n").as_bytes(), 0o644);
}

/// A plain SQL dump (pg_dump's INSERT form) of `rows` rows of a reports
/// table: ids, UUIDs, host names, timestamps, statuses, durations and a
/// message.
fn sql_dump(rows: usize) -> Vec<u8> {
    let mut out = String::from(
        "--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n\n\
         CREATE TABLE public.reports (\n    id bigint NOT NULL,\n    uuid uuid NOT NULL,\n    certname text NOT NULL,\n    \
         environment text NOT NULL,\n    status text NOT NULL,\n    start_time timestamp with time zone NOT NULL,\n    \
         duration_ms integer NOT NULL,\n    resources_changed integer NOT NULL,\n    message text\n);\n\n",
    );
    let noise = warmspare_tests::noise(rows * 16, 7);
    let statuses = ["unchanged", "changed", "failed"];
    let envs = ["production", "staging", "development"];
    for i in 0..rows {
        let u = &noise[i * 16..i * 16 + 16];
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex(&u[0..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..16])
        );
        let status = statuses[(u[0] % 3) as usize];
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "INSERT INTO public.reports VALUES ({}, '{uuid}', 'node{:04}.example.com', '{}', '{status}', \
                 '2026-11-{:02} {:02}:{:02}:{:02}.{:03}+00', {}, {}, {});\n",
                1_000_000 + i,
                u[1] as usize * 4 % 1000,
                envs[(u[2] % 3) as usize],
                1 + i * 28 / rows,
                (i / 150) % 24,
                (i / 3) % 60,
                u[3] % 60,
                u16::from_le_bytes([u[4], u[5]]) % 1000,
                u16::from_le_bytes([u[6], u[7]]) % 30_000,
                if status == "changed" { u[8] % 20 } else { 0 },
                if status == "failed" {
                    format!(
                        "'Could not retrieve catalog from remote server: Error 500 on SERVER: node{:04}'",
                        u[9]
                    )
                } else {
                    "NULL".to_string()
                },
            ),
        );
    }
    out.push_str("\n--\n-- PostgreSQL database dump complete\n--\n");
    out.into_bytes()
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (j, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if j <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The active's bytes sent and what they stand for uncompressed.
fn counters(http_port: u16) -> (u64, u64) {
    let Some((_, body)) = warmspare_tests::http_get(http_port, "/metrics") else {
        return (0, 0);
    };
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    (
        value("warmspare_bytes_sent_total "),
        value("warmspare_bytes_sent_uncompressed_total "),
    )
}

/// One path's measurements: (seconds, bytes through the relay) per tool.
struct Measured {
    rsync_z: (f64, u64),
    rsync: (f64, u64),
    warmspare: (f64, u64),
}

/// Scenario 6, compression: on each of [`PATHS`], through relays that count
/// every byte both ways, the certificate tree's initial sync and then a
/// 60,000-row plain SQL dump, by warmspare (`compress` left at `auto`: on,
/// as the passive's address is not a loopback one) against `rsync -z` and
/// plain rsync. Returns the notes for the table.
pub(super) fn compression(link: &NetLink, sizes: &Sizes, work: &Path, rows: &mut Vec<Row>) -> String {
    let mut notes = String::new();
    let files = sizes.files;
    let dump_rows = if files < 1000 { 2_000 } else { DUMP_ROWS };
    let dump = sql_dump(dump_rows);
    for (k, (name, shape)) in PATHS.iter().enumerate() {
        let sshd = Sshd::start_at(
            &work.join(format!("sshd-z{k}")),
            "127.0.0.1",
            Some(&link.ns),
            Some(*shape),
        );
        let relayed = || sshd.relay.as_ref().map_or(0, |r| r.bytes());
        // The pair: b in the namespace, dialed at the host side's address
        // of the veth pair, where a relay of this shape listens.
        let c = pair_at(vec![("a", "127.0.0.1".to_string()), ("b", link.outer.clone())]);
        let b_http = c.node("b").http_port;
        let text = std::fs::read_to_string(&c.file).unwrap().replace(
            &format!("http = \"{}:{b_http}\"", link.outer),
            &format!("http = \"127.0.0.1:{b_http}\""),
        );
        warmspare_tests::write_cluster_file(&c.file, &text);
        let src = c.ca("a");
        pem_tree(&src, files);
        let dump_src = work.join(format!("dump-z{k}"));
        warmspare_tests::write_file(&dump_src.join("reports.sql"), &dump, 0o600);
        let mut tree = Measured {
            rsync_z: (0.0, 0),
            rsync: (0.0, 0),
            warmspare: (0.0, 0),
        };
        let mut sql = Measured {
            rsync_z: (0.0, 0),
            rsync: (0.0, 0),
            warmspare: (0.0, 0),
        };
        for (flags, tool) in [(&["-z"][..], 0), (&[][..], 1)] {
            for (from, m) in [(&src, &mut tree), (&dump_src, &mut sql)] {
                let dst = work.join(format!(
                    "rsync-z{k}-{tool}-{}",
                    from.file_name().unwrap().to_string_lossy()
                ));
                std::fs::create_dir_all(&dst).unwrap();
                settle();
                let before = relayed();
                let (secs, _) = sshd.rsync(from, &dst, flags);
                let got = (secs, relayed() - before);
                if tool == 0 {
                    m.rsync_z = got;
                } else {
                    m.rsync = got;
                }
            }
        }
        settle();
        let b = start_agent(&c, "b", &format!("ip netns exec {}", link.ns));
        let relay = relay::Relay::start_shaped(&link.outer, c.node("b").port, &link.ns, *shape);
        wait(Duration::from_secs(30), || b.log_text().contains("agent started"));
        let start = Instant::now();
        let a = start_agent(&c, "a", "");
        arrived(&src, &c.ca("b"), files);
        tree.warmspare = (start.elapsed().as_secs_f64(), relay.bytes());
        converge(&src, &c.ca("b"), Duration::from_secs(300));
        let a_http = c.node("a").http_port;
        let (sent0, raw0) = counters(a_http);
        // The dump lands whole (renamed into place), as pg_dump's wrapper
        // would leave it.
        settle();
        let before = relay.bytes();
        let tmp = c.node("a").root.join("reports.sql.tmp");
        std::fs::write(&tmp, &dump).unwrap();
        let start = Instant::now();
        std::fs::rename(&tmp, src.join("reports.sql")).unwrap();
        let target = c.ca("b").join("reports.sql");
        wait(Duration::from_secs(300), || {
            std::fs::metadata(&target).is_ok_and(|m| m.len() == dump.len() as u64)
        });
        sql.warmspare = (start.elapsed().as_secs_f64(), relay.bytes() - before);
        let (sent1, raw1) = counters(a_http);
        keep_logs(&format!("compress-{k}"), &a, &b);
        drop((a, b, relay));
        let _ = std::fmt::Write::write_fmt(
            &mut notes,
            format_args!(
                "6. compression, {name}: the active's counters: the tree {:.1} MB sent for {:.1} MB of frames \
                 ({:.2}x), the dump {:.2} MB for {:.2} MB ({:.2}x); plain rsync sent {:.1} MB (tree) and {:.2} MB (dump).\n",
                sent0 as f64 / 1e6,
                raw0 as f64 / 1e6,
                raw0 as f64 / sent0.max(1) as f64,
                (sent1 - sent0) as f64 / 1e6,
                (raw1 - raw0) as f64 / 1e6,
                (raw1 - raw0) as f64 / (sent1 - sent0).max(1) as f64,
                tree.rsync.1 as f64 / 1e6,
                sql.rsync.1 as f64 / 1e6,
            ),
        );
        for (what, m) in [
            (format!("certificates, {files} files, initial sync"), &tree),
            (
                format!("SQL dump, {dump_rows} rows, {:.1} MB", dump.len() as f64 / 1e6),
                &sql,
            ),
        ] {
            println!(
                "compression, {name}, {what}: rsync -z {:.2} s {} B, rsync {:.2} s {} B, warmspare {:.2} s {} B",
                m.rsync_z.0, m.rsync_z.1, m.rsync.0, m.rsync.1, m.warmspare.0, m.warmspare.1
            );
            rows.push(Row {
                scenario: format!("6. distance ({name}): {what}"),
                measure: "bytes on the wire".into(),
                warmspare: m.warmspare.1 as f64 / 1e6,
                best_other: m.rsync_z.1 as f64 / 1e6,
                other_name: format!("rsync -z (rsync {:.2} MB)", m.rsync.1 as f64 / 1e6),
                unit: "MB",
                target: "<= 1.0x".into(),
            });
            rows.push(Row {
                scenario: format!("6. distance ({name}): {what}"),
                measure: "time".into(),
                warmspare: m.warmspare.0,
                best_other: m.rsync_z.0,
                other_name: format!("rsync -z (rsync {:.2} s)", m.rsync.0),
                unit: "s",
                target: "<= 1.0x".into(),
            });
        }
        drop(c);
    }
    notes
}
