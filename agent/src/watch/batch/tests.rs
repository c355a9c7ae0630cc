use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode};
use notify::EventKind;
use tokio::time::Instant;

use super::{Batcher, Edge, MAX_HOLD};
use crate::events::Inbox;

/// One step of a scenario: an event on a path, time passing, or the
/// shipper finishing the batch it has in flight.
#[derive(Clone, Copy)]
enum Step {
    /// A complete change (a close after writing, a rename into place).
    Whole(&'static str),
    /// A partial change (a create, a write before its close).
    Part(&'static str),
    /// Milliseconds pass.
    Wait(u64),
    /// The shipper's batch in flight is acknowledged.
    Done,
}
use Step::{Done, Part, Wait, Whole};

/// Plays `steps` through the watcher's batching and a real inbox into one
/// shipper that takes work whenever it has nothing in flight. Returns each
/// batch the shipper took: the millisecond it took it and its paths.
fn play(debounce_ms: u64, steps: &[Step]) -> Vec<Taken> {
    let start = Instant::now();
    let debounce = Duration::from_millis(debounce_ms);
    let mut batcher = Batcher::default();
    let inbox = Inbox::default();
    let mut in_flight = false;
    let mut ms = 0;
    let mut batches = Vec::new();
    let mut settle = |batcher: &mut Batcher, in_flight: &mut bool, ms: u64| {
        for (_, paths) in batcher.due(start + Duration::from_millis(ms)) {
            inbox.add_paths("ca", paths);
        }
        if !*in_flight {
            if let Some(work) = inbox.take(Duration::ZERO) {
                let paths = work
                    .paths
                    .get("ca")
                    .map(|p| p.iter().cloned().collect())
                    .unwrap_or_default();
                batches.push((ms, paths));
                *in_flight = true;
            }
        }
    };
    for step in steps {
        match *step {
            Whole(p) | Part(p) => {
                let edge = if matches!(step, Whole(_)) {
                    Edge::Complete
                } else {
                    Edge::Partial
                };
                batcher.add(
                    0,
                    p.to_string(),
                    edge,
                    debounce,
                    start + Duration::from_millis(ms),
                    50_000,
                );
            }
            Wait(n) => {
                for _ in 0..n {
                    ms += 1;
                    settle(&mut batcher, &mut in_flight, ms);
                }
            }
            Done => in_flight = false,
        }
        settle(&mut batcher, &mut in_flight, ms);
    }
    // Whatever is left ships once the shipper is free and time has passed.
    for _ in 0..=MAX_HOLD.as_millis() as u64 {
        in_flight = false;
        ms += 1;
        settle(&mut batcher, &mut in_flight, ms);
    }
    batches
}

/// A batch the shipper took: when (milliseconds) and its paths.
type Taken = (u64, Vec<String>);

/// One row of the table: what it shows, `debounce_ms`, the steps, the batches.
type Row = (&'static str, u64, Vec<Step>, Vec<Taken>);

fn b(ms: u64, paths: &[&str]) -> Taken {
    (ms, paths.iter().map(|p| p.to_string()).collect())
}

#[test]
fn leading_edge_ships_at_once_and_coalesces_what_arrives_in_flight() {
    let storm: Vec<Step> = (0..=1000)
        .map(|i| {
            if i % 2 == 0 {
                Whole(["a", "b", "c"][i % 3])
            } else {
                Part(["a", "b", "c"][i % 3])
            }
        })
        .collect();
    let mut in_flight_storm = vec![Whole("x")];
    in_flight_storm.extend(storm.iter().copied());
    in_flight_storm.push(Done);
    let table: Vec<Row> = vec![
        (
            "one close on an idle pair ships at once",
            0,
            vec![Whole("a")],
            vec![b(0, &["a"])],
        ),
        (
            "create, write and close of one file: one batch at the close",
            0,
            vec![Part("a"), Part("a"), Whole("a")],
            vec![b(0, &["a"])],
        ),
        (
            "a create that is never closed (a link) waits for the quiet",
            0,
            vec![Part("l"), Wait(20)],
            vec![b(10, &["l"])],
        ),
        (
            "writes that never close still ship within the hold",
            0,
            (0..200).flat_map(|_| [Part("log"), Wait(5), Done]).collect(),
            vec![b(500, &["log"]), b(1000, &["log"])],
        ),
        (
            "what arrives in flight is one next batch",
            0,
            vec![Whole("a"), Whole("b"), Whole("a"), Whole("c"), Wait(3), Done],
            vec![b(0, &["a"]), b(3, &["a", "b", "c"])],
        ),
        (
            "a storm in flight: two batches for a thousand events",
            0,
            in_flight_storm,
            vec![b(0, &["x"]), b(0, &["a", "b", "c"])],
        ),
        (
            "a write after the ship ships again",
            0,
            vec![Whole("a"), Part("a"), Wait(1), Whole("a"), Done],
            vec![b(0, &["a"]), b(1, &["a"])],
        ),
        (
            "a write that never closes after a ship still ships again",
            0,
            vec![Whole("a"), Done, Part("a"), Wait(20)],
            vec![b(0, &["a"]), b(10, &["a"])],
        ),
        (
            "the opt-in debounce waits for quiet even after a close",
            10,
            vec![Whole("a"), Wait(5), Whole("b"), Wait(20)],
            vec![b(15, &["a", "b"])],
        ),
        (
            "the opt-in debounce under a steady stream ships within the hold",
            10,
            (0..110).flat_map(|_| [Whole("a"), Wait(5), Done]).collect(),
            vec![b(500, &["a"]), b(555, &["a"])],
        ),
    ];
    for (what, debounce, steps, want) in table {
        assert_eq!(play(debounce, &steps), want, "{what}");
    }
}

#[test]
fn the_root_and_too_many_paths_ask_for_the_whole_watch() {
    let now = Instant::now();
    let mut batcher = Batcher::default();
    for p in ["a", "b", "c"] {
        batcher.add(1, p.into(), Edge::Partial, Duration::ZERO, now, 2);
    }
    assert_eq!(batcher.due(now + MAX_HOLD), vec![(1, vec![String::new()])]);
    batcher.add(2, "a".into(), Edge::Partial, Duration::ZERO, now, 10);
    batcher.add(2, String::new(), Edge::Complete, Duration::ZERO, now, 10);
    batcher.add(2, "b".into(), Edge::Complete, Duration::ZERO, now, 10);
    assert_eq!(batcher.due(now), vec![(2, vec![String::new()])]);
    assert!(batcher.next().is_none());
}

#[test]
fn a_partial_change_in_the_same_round_does_not_hold_a_complete_one_back() {
    // One round of the watcher: a close, then the create of the next file.
    let now = Instant::now();
    let mut batcher = Batcher::default();
    batcher.add(0, "a".into(), Edge::Complete, Duration::ZERO, now, 10);
    batcher.add(0, "b".into(), Edge::Partial, Duration::ZERO, now, 10);
    assert_eq!(batcher.next(), Some(now));
    assert_eq!(batcher.due(now), vec![(0, vec!["a".to_string(), "b".to_string()])]);
    // The other way round too.
    batcher.add(0, "b".into(), Edge::Partial, Duration::ZERO, now, 10);
    batcher.add(0, "a".into(), Edge::Complete, Duration::ZERO, now, 10);
    assert_eq!(batcher.due(now), vec![(0, vec!["b".to_string(), "a".to_string()])]);
    // Partial changes alone wait.
    batcher.add(0, "c".into(), Edge::Partial, Duration::ZERO, now, 10);
    assert!(batcher.due(now).is_empty());
    assert_eq!(batcher.next(), Some(now + super::PARTIAL_QUIET));
}

#[test]
fn which_events_are_complete() {
    let complete = [
        EventKind::Access(AccessKind::Close(AccessMode::Write)),
        EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)),
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        EventKind::Create(CreateKind::Folder),
        EventKind::Remove(RemoveKind::File),
        EventKind::Remove(RemoveKind::Folder),
    ];
    let partial = [
        EventKind::Create(CreateKind::File),
        EventKind::Create(CreateKind::Any),
        EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        EventKind::Modify(ModifyKind::Any),
        EventKind::Any,
        EventKind::Other,
    ];
    for k in complete {
        assert_eq!(Edge::of(&k), Edge::Complete, "{k:?}");
    }
    for k in partial {
        assert_eq!(Edge::of(&k), Edge::Partial, "{k:?}");
    }
}
