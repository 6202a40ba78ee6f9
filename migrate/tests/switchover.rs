//! The switchover's failure paths, against a hand-written destination that speaks the stream
//! itself: refused, lost before READY, no STARTED after GO (unresolved, then resolved by the
//! destination's answer to RESOLVE or by the operator), ERROR after GO, and a cancel while the
//! destination falls behind. The rule under test: the source resumes its guest only when the
//! destination cannot be running it, and never runs it once GO may have arrived until someone
//! knows.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    answer_resolve, fake_destination, fake_destination_plan, fill, flat_ram, join, machine_state, params, scripted,
    wait_status, AfterGo, AtEnd, FakeSource, Fill, Plan, Script, SrcEvent, TempDir, WAIT,
};
use migrate::handover::Side;
use migrate::progress::{Progress, Status};
use migrate::sender::{self, Outgoing};
use migrate::stream::{Resolution, ResolveAction};
use migrate::transport::Uri;

const PAGES: usize = 128;

/// A running source with a little dirty RAM, migrating to `uri` with a 200 ms switchover timeout.
fn start(uri: Uri) -> (Outgoing, Arc<FakeSource>, Arc<std::sync::Mutex<common::TrackerLog>>) {
    let ram = flat_ram(PAGES);
    fill(&ram);
    let (trackers, log) = scripted(&ram, Script { rounds: vec![vec![(9, Fill::Data)]], ..Script::default() });
    let src = Arc::new(FakeSource::new(ram, machine_state(2), true));
    let params = params(|p| p.switchover_timeout = Duration::from_millis(200));
    let outgoing = sender::start(src.clone(), uri, params, trackers).expect("start the migration");
    (outgoing, src, log)
}

fn error(p: &Progress) -> String {
    p.error.clone().unwrap_or_default()
}

const PAUSED_SAVED: [SrcEvent; 2] = [SrcEvent::Paused { was_running: true }, SrcEvent::Saved];

fn events(tail: &[SrcEvent]) -> Vec<SrcEvent> {
    PAUSED_SAVED.iter().chain(tail).cloned().collect()
}

/// The destination answers END with ERROR: it will never run the guest, so the source resumes at
/// once, says ABORT, and (END having gone out) tells the destination again on a new connection.
#[test]
fn a_refused_switchover_fails_and_resumes_the_guest() {
    let dir = TempDir::new("refused");
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Error("no room for this guest".into()));
    let (outgoing, src, log) = start(uri);
    let p = join(outgoing);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert!(error(&p).contains("refused") && error(&p).contains("no room for this guest"), "{}", error(&p));
    assert_eq!(p.downtime, None, "no downtime is reported for a migration that did not happen");
    assert_eq!(src.events(), events(&[SrcEvent::Failed]), "paused, then failed: never completed or unresolved");
    assert!(src.is_running(), "the guest runs again on the source");
    assert_eq!(common::lock(&log).stops, 1, "the tracker was stopped");

    let (seen, listener) = fake.join().expect("the fake destination panicked");
    assert_eq!(seen.stopped, None, "{seen:?}");
    assert!(seen.end.is_some() && !seen.got_go, "END arrived and GO never did: {seen:?}");
    assert_eq!(seen.after_end, vec!["ABORT"], "the source said ABORT on the stream");
    let id = seen.header.as_ref().expect("a header").migration_id;
    let listener = listener.expect("still listening");
    let asked = answer_resolve(&listener, Resolution::DestinationDiscarded, Duration::from_secs(5));
    assert_eq!(asked, Some(Ok((id, ResolveAction::Abort))), "and RESOLVE abort on a new connection");
}

/// The destination closes the connection after END without a word: the link is lost (not a
/// refusal), and the source resumes.
#[test]
fn a_destination_that_closes_before_ready_is_lost_and_the_guest_resumes() {
    let dir = TempDir::new("closed");
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Close);
    let (outgoing, src, _) = start(uri);
    let p = join(outgoing);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert!(error(&p).contains("lost the destination"), "{}", error(&p));
    assert!(!error(&p).contains("refused"), "{}", error(&p));
    assert_eq!(src.events(), events(&[SrcEvent::Failed]));
    assert!(src.is_running());
    let (seen, listener) = fake.join().expect("the fake destination panicked");
    assert!(seen.end.is_some() && !seen.got_go, "{seen:?}");
    // A destination that had sent READY and lost the link would wait for word: it gets RESOLVE abort.
    let id = seen.header.as_ref().expect("a header").migration_id;
    let asked = answer_resolve(&listener.expect("listening"), Resolution::DestinationDiscarded, Duration::from_secs(5));
    assert_eq!(asked, Some(Ok((id, ResolveAction::Abort))));
}

/// READY, GO, and then silence: GO may have arrived, so the source may not resume. It stays
/// paused, unresolved, and asks the destination again (RESOLVE go) until it answers.
fn unresolved_then_answered(answer: Resolution) -> (Progress, Arc<FakeSource>) {
    let dir = TempDir::new("silent");
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Ready(AfterGo::Silent));
    let (outgoing, src, log) = start(uri);
    let p = wait_status(&outgoing, Status::Unresolved);
    assert!(error(&p).contains("no STARTED after GO"), "{}", error(&p));
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved]), "unresolved: neither resumed nor completed");
    assert!(!src.is_running());
    assert!(!outgoing.cancel.cancel(), "past GO a cancel is refused");
    let (seen, listener) = fake.join().expect("the fake destination panicked");
    assert!(seen.got_go && seen.after_end.is_empty(), "GO arrived, then nothing (no ABORT): {seen:?}");
    assert_eq!(common::lock(&log).stops, 1, "the tracker is stopped while unresolved");
    let id = seen.header.as_ref().expect("a header").migration_id;
    let asked = answer_resolve(&listener.expect("listening"), answer, WAIT);
    assert_eq!(asked, Some(Ok((id, ResolveAction::Go))), "the source asks with RESOLVE go");
    (join(outgoing), src)
}

#[test]
fn no_started_after_go_is_unresolved_until_the_destination_says_it_has_the_guest() {
    let (p, src) = unresolved_then_answered(Resolution::DestinationHasGuest);
    assert_eq!(p.status, Status::Completed, "{p:?}");
    assert_eq!(p.resolution.as_deref(), Some("the destination confirmed it has the guest"));
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved, SrcEvent::Completed]), "never failed, never resumed");
    assert!(!src.is_running());
}

#[test]
fn no_started_after_go_then_discarded_by_the_destination_resumes_the_source() {
    let (p, src) = unresolved_then_answered(Resolution::DestinationDiscarded);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert_eq!(p.resolution.as_deref(), Some("the destination discarded the guest; the source keeps it"));
    assert!(error(&p).contains("no STARTED after GO"), "{}", error(&p));
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved, SrcEvent::Failed]));
    assert!(src.is_running(), "the guest runs again on the source");
}

/// GO went out and the destination vanished: RESOLVE cannot reach it, so only the operator can
/// decide. Returns once the source has tried at least once.
fn unresolved_and_unreachable() -> (Outgoing, Arc<FakeSource>) {
    let dir = TempDir::new("gone");
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Ready(AfterGo::Vanish));
    let (outgoing, src, _) = start(uri);
    let (seen, listener) = fake.join().expect("the fake destination panicked");
    assert!(seen.got_go && listener.is_none(), "{seen:?}");
    wait_status(&outgoing, Status::Unresolved);
    let until = Instant::now() + WAIT;
    while !error(&outgoing.progress.snapshot()).contains("asked the destination") {
        assert!(Instant::now() < until, "the source never reported asking: {:?}", outgoing.progress.snapshot());
        std::thread::sleep(Duration::from_millis(5));
    }
    let p = outgoing.progress.snapshot();
    assert!(error(&p).contains("cannot reach the destination"), "{}", error(&p));
    assert_eq!(p.status, Status::Unresolved, "an unreachable destination decides nothing");
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved]));
    (outgoing, src)
}

#[test]
fn the_operator_keeps_the_source_when_the_destination_is_unreachable() {
    let (outgoing, src) = unresolved_and_unreachable();
    outgoing.resolve.choose(Side::Source);
    let p = join(outgoing);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert_eq!(p.resolution.as_deref(), Some("the operator chose the source"));
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved, SrcEvent::Failed]));
    assert!(src.is_running(), "the guest runs again on the source");
}

#[test]
fn the_operator_keeps_the_destination() {
    let (outgoing, src) = unresolved_and_unreachable();
    outgoing.resolve.choose(Side::Destination);
    let p = join(outgoing);
    assert_eq!(p.status, Status::Completed, "{p:?}");
    assert_eq!(p.resolution.as_deref(), Some("the operator chose the destination"));
    assert_eq!(src.events(), events(&[SrcEvent::Unresolved, SrcEvent::Completed]));
    assert!(!src.is_running());
}

/// ERROR in answer to GO: the destination discarded the guest before GO arrived and will never run
/// it, so the source may resume.
#[test]
fn error_after_go_fails_and_resumes() {
    let dir = TempDir::new("go-error");
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Ready(AfterGo::Error("discarded".into())));
    let (outgoing, src, _) = start(uri);
    let p = join(outgoing);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert!(error(&p).contains("refused") && error(&p).contains("discarded"), "{}", error(&p));
    assert_eq!(src.events(), events(&[SrcEvent::Failed]));
    assert!(src.is_running());
    let (seen, _) = fake.join().expect("the fake destination panicked");
    assert!(seen.got_go, "{seen:?}");
}

/// A destination that never answers SYNC keeps the source waiting (for up to a minute, guest
/// running); a cancel ends it at once, and the guest, never paused, runs on untouched.
#[test]
fn cancel_while_the_destination_falls_behind() {
    let dir = TempDir::new("cancel");
    let plan = Plan { answer_sync: false, at_end: AtEnd::Close };
    let (uri, fake) = fake_destination_plan(dir.path("dst.sock"), plan);
    let (outgoing, src, log) = start(uri);
    // Wait until pass 0 is out and the source is waiting on SYNCED.
    let until = Instant::now() + WAIT;
    while outgoing.progress.snapshot().passes.is_empty() {
        assert!(Instant::now() < until, "pass 0 never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(outgoing.progress.snapshot().status, Status::Active);
    let started = Instant::now();
    assert!(outgoing.cancel.cancel(), "a migration before GO can be cancelled");
    let p = join(outgoing);
    assert!(started.elapsed() < Duration::from_secs(5), "the cancel took {:?}", started.elapsed());
    assert_eq!(p.status, Status::Cancelled, "{p:?}");
    assert_eq!(p.error.as_deref(), Some("cancelled"));
    assert_eq!(src.events(), vec![SrcEvent::Failed], "never paused; told to put things back");
    assert!(src.is_running());
    let log = common::lock(&log).clone();
    assert_eq!((log.finals, log.stops), (0, 1), "no final collect; the tracker stopped: {log:?}");
    let (seen, _) = fake.join().expect("the fake destination panicked");
    assert_eq!(seen.syncs, 1, "{seen:?}");
    assert_eq!(seen.end, None);
}

// ---------------------------------------------------------------------------------------------
// Failures on the source, against the real destination

/// Migrates a source built by `src` with `script` to the real destination (whose VM build may
/// refuse); returns the source's progress, and the destination's outcome (its error, if refused).
fn against_real_destination(
    script: Script,
    downtime_limit: Duration,
    src: impl FnOnce(FakeSource) -> FakeSource,
    refuse: Option<&str>,
) -> (Progress, Arc<FakeSource>, Result<common::Arrived, String>) {
    let dir = TempDir::new("real");
    let uri = dir.uri("dst.sock");
    let destination = common::real_destination_refusing(&uri, refuse.map(str::to_string));
    let ram = flat_ram(PAGES);
    fill(&ram);
    let (trackers, _) = scripted(&ram, script);
    let src = Arc::new(src(FakeSource::new(ram, machine_state(2), true)));
    let params = params(|p| p.downtime_limit = downtime_limit);
    let outgoing = sender::start(src.clone(), uri, params, trackers).expect("start the migration");
    let p = join(outgoing);
    let arrived = destination.recv_timeout(WAIT).expect("the destination did not finish");
    (p, src, arrived)
}

/// The destination refuses the header (its VM cannot be built that way): the source learns why
/// during precopy, before it ever pauses the guest.
#[test]
fn a_destination_that_refuses_the_header_fails_the_migration_before_any_pause() {
    let (p, src, arrived) = against_real_destination(Script::default(), LIMIT, |s| s, Some("--mem asks for 2 GiB"));
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert!(error(&p).contains("refused") && error(&p).contains("--mem asks for 2 GiB"), "{}", error(&p));
    assert_eq!(src.events(), vec![SrcEvent::Failed], "never paused");
    assert!(src.is_running());
    let why = arrived.err().expect("the destination refused");
    assert!(why.contains("checking the header: --mem asks for 2 GiB"), "{why}");
}

const LIMIT: Duration = Duration::from_millis(50);

/// The tracker fails in the middle of precopy (a downtime limit of 0 keeps the passes going): the
/// migration fails, the guest (never paused) runs on, and the destination, told ABORT, discards
/// what it got.
#[test]
fn a_tracker_failure_in_precopy_fails_the_migration_and_the_destination_discards() {
    let script = Script { rounds: vec![vec![(9, Fill::Data)]], repeat_last: true, fail_at: Some(2) };
    let (p, src, arrived) = against_real_destination(script, Duration::ZERO, |s| s, None);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert_eq!(error(&p), "dirty tracking: the tracker's fault thread failed: scripted failure");
    assert_eq!(p.passes.len(), 3, "passes 0-2 went out: {:?}", p.passes);
    assert_eq!(src.events(), vec![SrcEvent::Failed], "never paused");
    assert!(src.is_running());
    let why = arrived.err().expect("the destination discarded the guest");
    assert!(why.contains("the source gave the migration up (ABORT)"), "{why}");
}

/// The final collect fails, with the guest paused: it resumes.
#[test]
fn a_tracker_failure_at_the_switchover_resumes_the_guest() {
    // Collect 0 finds page 9 (converged), collect 1 follows SYNC, collect 2 is the final one.
    let script = Script { rounds: vec![vec![(9, Fill::Data)]], repeat_last: false, fail_at: Some(2) };
    let (p, src, arrived) = against_real_destination(script, LIMIT, |s| s, None);
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert_eq!(p.stop_reason, Some("converged"));
    assert_eq!(error(&p), "dirty tracking: the tracker's fault thread failed: scripted failure");
    assert_eq!(src.events(), vec![SrcEvent::Paused { was_running: true }, SrcEvent::Failed]);
    assert!(src.is_running(), "the guest runs again on the source");
    assert!(arrived.is_err(), "the destination discarded the guest");
}

/// Saving the state fails with the guest paused: the guest resumes, and the destination (which got
/// every page but no state) is told ABORT and discards.
#[test]
fn a_state_that_cannot_be_saved_resumes_the_guest_and_the_destination_discards() {
    let (p, src, arrived) = against_real_destination(
        Script::default(),
        LIMIT,
        |s| s.with_save_error("virtio-blk0: request in flight"),
        None,
    );
    assert_eq!(p.status, Status::Failed, "{p:?}");
    assert_eq!(error(&p), "the VM: cannot save the machine state: virtio-blk0: request in flight");
    assert_eq!(src.events(), events(&[SrcEvent::Failed]));
    assert!(src.is_running(), "the guest runs again on the source");
    let why = arrived.err().expect("the destination discarded the guest");
    assert!(why.contains("the source gave the migration up (ABORT)"), "{why}");
}
