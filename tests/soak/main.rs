//! The long fault soak: every case of `warmspare_tests::faults` at soak
//! scale, one table of faults injected, checks made, times to converge and
//! files lost. Run it with
//!
//! ```text
//! cargo run --release -p warmspare-tests --bin soak -- [--seed N] [--scale ci|soak] [--rounds N]
//!     [--kills N] [--only CASE-SUBSTRING]
//! ```
//!
//! It needs root for the namespace, tmpfs and sysctl cases (they are
//! reported as skipped otherwise) and writes the table to
//! `target/soak/results.md` as well.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use warmspare_tests::faults::{self, Report, Scale, Victim};

/// One fault case, run on a scale; `Err` says why it was skipped.
type Case = Box<dyn FnOnce(Scale) -> Result<Report, String> + Send>;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let seed: u64 = arg("--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let rounds: u64 = arg("--rounds").and_then(|s| s.parse().ok()).unwrap_or(1);
    let scale_name = arg("--scale").unwrap_or_else(|| "soak".into());
    let started = Instant::now();
    let mut reports: Vec<Report> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let limit = Duration::from_secs(1800);
    for round in 0..rounds {
        let mut scale = match scale_name.as_str() {
            "ci" => Scale {
                seed: seed + round,
                ..Scale::ci()
            },
            _ => Scale::soak(seed + round),
        };
        if let Some(k) = arg("--kills").and_then(|s| s.parse().ok()) {
            scale.kills = k;
        }
        let only = arg("--only");
        eprintln!("round {round}: {scale:?}");
        let cases: Vec<(&str, Case)> = vec![
            (
                "kill receiver, large file",
                Box::new(|s| Ok(faults::kill_during_large_file(&s, Victim::Receiver))),
            ),
            (
                "kill sender, large file",
                Box::new(|s| Ok(faults::kill_during_large_file(&s, Victim::Sender))),
            ),
            (
                "kill receiver, many files",
                Box::new(|s| Ok(faults::kill_during_many_files(&s, Victim::Receiver))),
            ),
            (
                "kill sender, many files",
                Box::new(|s| Ok(faults::kill_during_many_files(&s, Victim::Sender))),
            ),
            ("link cut", Box::new(|s| faults::cut_link(&s))),
            ("disk full", Box::new(|s| faults::disk_full(&s))),
            ("queue overflow", Box::new(|s| faults::queue_overflow(&s))),
            ("burst", Box::new(|s| Ok(faults::burst(&s)))),
            ("clock skew", Box::new(|s| Ok(faults::clock_skew(&s)))),
        ];
        for (name, case) in cases {
            if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                continue;
            }
            let s = scale.clone();
            let t = Instant::now();
            eprintln!("{name} ...");
            match faults::with_watchdog(name, limit, move || case(s)) {
                Ok(r) => {
                    eprintln!(
                        "{name}: {} faults in {:.0} s; {}",
                        r.faults,
                        t.elapsed().as_secs_f64(),
                        r.notes.join("; ")
                    );
                    reports.push(r);
                }
                Err(why) => {
                    eprintln!("{name}: skipped: {why}");
                    skipped.push(format!("{name}: {why}"));
                }
            }
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "| case | faults | checks | converge median | converge worst | lost |\n|---|---:|---:|---:|---:|---:|"
    );
    for r in &reports {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} s | {:.2} s | {} |",
            r.case,
            r.faults,
            r.checked,
            r.median().as_secs_f64(),
            r.worst().as_secs_f64(),
            r.lost
        );
    }
    let faults: usize = reports.iter().map(|r| r.faults).sum();
    let checks: u64 = reports.iter().map(|r| r.checked).sum();
    let lost: u64 = reports.iter().map(|r| r.lost).sum();
    let _ = writeln!(
        md,
        "| **all** | **{faults}** | **{checks}** | | | **{lost}** |\n\nscale `{scale_name}`, seed {seed}, {rounds} round(s), {:.0} s in all.",
        started.elapsed().as_secs_f64()
    );
    for r in &reports {
        for n in &r.notes {
            let _ = writeln!(md, "- {}: {n}", r.case);
        }
    }
    for s in &skipped {
        let _ = writeln!(md, "- skipped: {s}");
    }
    println!("{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("results.md"), &md);
}
