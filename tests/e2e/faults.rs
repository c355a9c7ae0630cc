//! The fault cases at CI scale (see `warmspare_tests::faults`; the soak run
//! is `cargo run --release -p warmspare-tests --bin soak`).

use warmspare_tests::faults::{self, Scale, Victim};

fn show(r: &faults::Report) {
    eprintln!(
        "{}: {} faults, {} checks, converged in median {:?} / worst {:?}; {}",
        r.case,
        r.faults,
        r.checked,
        r.median(),
        r.worst(),
        r.notes.join("; ")
    );
    assert!(r.faults > 0, "no fault was injected");
    assert_eq!(r.lost, 0);
}

#[test]
fn kill_receiver_during_a_large_file() {
    show(&faults::kill_during_large_file(&Scale::ci(), Victim::Receiver));
}

#[test]
fn kill_sender_during_a_large_file() {
    show(&faults::kill_during_large_file(&Scale::ci(), Victim::Sender));
}

#[test]
fn kill_receiver_during_many_files() {
    show(&faults::kill_during_many_files(&Scale::ci(), Victim::Receiver));
}

#[test]
fn kill_sender_during_many_files() {
    show(&faults::kill_during_many_files(&Scale::ci(), Victim::Sender));
}

#[test]
fn a_cut_link_heals() {
    match faults::cut_link(&Scale::ci()) {
        Ok(r) => show(&r),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn a_full_disk_on_the_receiver_recovers() {
    match faults::disk_full(&Scale::ci()) {
        Ok(r) => show(&r),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn an_inotify_queue_overflow_rescans() {
    match faults::queue_overflow(&Scale::ci()) {
        Ok(r) => show(&r),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn a_burst_of_creates_modifies_and_deletes_converges() {
    show(&faults::burst(&Scale::ci()));
}

#[test]
fn content_hashes_decide_under_clock_skew() {
    show(&faults::clock_skew(&Scale::ci()));
}
