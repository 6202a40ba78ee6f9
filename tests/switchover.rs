//! The switchover under a hostile network and dying peers: a proxy between source and destination
//! drops, delays or cuts at each final record (END, READY, GO, STARTED), or holds one while the test
//! kills a side with SIGKILL. Whatever happens, there is never more than one running copy of the
//! guest, and never zero without a clear status and a way out (`migrate-resolve`). Also: the run
//! state travels with the guest, and a migrated-away source refuses to run again.

use emu_harness as common;
use emu_harness::require_kvm;

use std::time::{Duration, Instant};

use common::Emu;
use emu_harness::proxy::{Action, Dir, Proxy, Release};
use migrate::stream::RecordType;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A source running the verify workload (so any lost write would show), small enough to migrate
/// in a moment.
fn source() -> Emu {
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=verify:8:20000"]);
    src.expect_line("verify: written=", T);
    src
}

/// The guest makes progress in `emu`: a new verify line, and never a failed check.
fn assert_guest_runs(emu: &Emu, who: &str) {
    assert_eq!(emu.status(), "running", "{who}");
    let n = emu.line_count();
    emu.wait_line_from(n, |l| l.contains("verify: written="), T)
        .unwrap_or_else(|| panic!("{who}: the guest does not run; stderr: {}", emu.stderr()));
    assert!(!emu.output().contains("VERIFY-FAIL"), "{who}: {}", emu.output());
}

/// A destination that never ran the guest and has ended with a failure.
fn assert_never_ran_and_exited(dst: &mut Emu) {
    let code = dst.wait_exit(T);
    assert!(matches!(code, Some(c) if c != 0), "destination exit {code:?}; stderr: {}", dst.stderr());
    assert!(dst.lines().is_empty(), "the destination ran the guest: {}", dst.output());
}

/// The guest is paused in `emu` and stays so for a while.
fn assert_paused(emu: &Emu, status: &str) {
    assert_eq!(emu.status(), status);
    let n = emu.line_count();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(emu.line_count(), n, "a {status} guest printed: {}", emu.output());
}

/// Starts migrating `src` to a fresh destination through a proxy with one rule.
fn migrate_through(src: &Emu, dir: Dir, record: RecordType, action: Action) -> (Emu, Proxy) {
    let (dst, uri) = Emu::incoming(&[]);
    let proxy = Proxy::start(&uri, dir, record as u8, action);
    src.qmp_ok("migrate", json!({"uri": proxy.uri}));
    (dst, proxy)
}

/// The source resumed and the destination gave the guest up: one copy, at the source.
fn expect_source_keeps_it(dir: Dir, record: RecordType, action: Action) {
    let src = source();
    let (mut dst, proxy) = migrate_through(&src, dir, record, action);
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(proxy.fired(), "the {record:?} rule never fired: {info}");
    assert_guest_runs(&src, "source");
    assert_never_ran_and_exited(&mut dst);
}

/// The guest moved: it runs at the destination, the source is postmigrate.
fn expect_destination_has_it(src: &Emu, dst: &Emu, info: &Value) {
    assert_eq!(info["status"], "completed", "{info}\nsource: {}\ndestination: {}", src.stderr(), dst.stderr());
    assert!(dst.wait_monitor(T));
    assert_guest_runs(dst, "destination");
    assert_paused(src, "postmigrate");
}

/// GO or STARTED lost in flight: the source cannot know, stays unresolved, asks the destination
/// again on a new connection, and learns that it has the guest.
fn expect_resolved_to_the_destination(dir: Dir, record: RecordType, action: Action) {
    let src = source();
    let (dst, proxy) = migrate_through(&src, dir, record, action);
    let info = common::wait_migration(&src, T);
    assert!(proxy.fired(), "the {record:?} rule never fired: {info}");
    expect_destination_has_it(&src, &dst, &info);
    assert!(info["resolution"].as_str().is_some_and(|r| r.contains("confirmed")), "{info}");
}

#[test]
fn lost_end_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToDestination, RecordType::End, Action::Drop);
}

#[test]
fn delayed_end_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToDestination, RecordType::End, Action::Delay(Duration::from_secs(2)));
}

#[test]
fn cut_at_end_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToDestination, RecordType::End, Action::Cut);
}

#[test]
fn lost_ready_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToSource, RecordType::Ready, Action::Drop);
}

#[test]
fn delayed_ready_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToSource, RecordType::Ready, Action::Delay(Duration::from_secs(2)));
}

/// The stream is gone, so ABORT reaches the destination on a new connection (RESOLVE abort).
#[test]
fn cut_at_ready_source_keeps_the_guest() {
    require_kvm!();
    expect_source_keeps_it(Dir::ToSource, RecordType::Ready, Action::Cut);
}

/// One flipped length bit in a switchover record: caught by the frame checksum at once, refused,
/// and the source runs again within about a second, not after a 60 s stall.
#[test]
fn corrupt_length_while_paused_costs_about_a_second() {
    require_kvm!();
    let src = source();
    let started = Instant::now();
    let (mut dst, proxy) = migrate_through(&src, Dir::ToDestination, RecordType::VcpuState, Action::CorruptLength);
    let info = common::wait_migration(&src, T);
    let took = started.elapsed();
    assert!(proxy.fired());
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("frame fails its checksum"), "{info}");
    assert!(took < Duration::from_secs(10), "the source waited {took:?}");
    assert_guest_runs(&src, "source");
    assert_never_ran_and_exited(&mut dst);
}

#[test]
fn lost_go_is_resolved_by_asking_again() {
    require_kvm!();
    expect_resolved_to_the_destination(Dir::ToDestination, RecordType::Go, Action::Drop);
}

#[test]
fn delayed_go_is_resolved_by_asking_again() {
    require_kvm!();
    expect_resolved_to_the_destination(Dir::ToDestination, RecordType::Go, Action::Delay(Duration::from_secs(3)));
}

#[test]
fn cut_at_go_is_resolved_by_asking_again() {
    require_kvm!();
    expect_resolved_to_the_destination(Dir::ToDestination, RecordType::Go, Action::Cut);
}

#[test]
fn lost_started_is_resolved_by_asking_again() {
    require_kvm!();
    expect_resolved_to_the_destination(Dir::ToSource, RecordType::Started, Action::Drop);
}

/// Holds `record` at the proxy, kills one side with SIGKILL, then lets the record go on (or cuts).
fn kill_at(record: RecordType, dir: Dir, kill_source: bool, then: Release) -> (Emu, Emu, Value) {
    let mut src = source();
    let (mut dst, proxy) = migrate_through(&src, dir, record, Action::Hold);
    assert!(proxy.wait_held(T), "{record:?} never reached the proxy: {}", src.stderr());
    if kill_source {
        src.kill();
    } else {
        dst.kill();
    }
    proxy.release(then);
    let info = if kill_source { json!({}) } else { wait_settled(&src) };
    (src, dst, info)
}

/// Polls `query-migrate` until the migration has ended or is waiting to be resolved.
fn wait_settled(src: &Emu) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let info = src.qmp_ok("query-migrate", json!({}));
        if matches!(info["status"].as_str(), Some("completed" | "failed" | "cancelled" | "unresolved")) {
            return info;
        }
        assert!(Instant::now() < deadline, "migration did not settle: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The source dies after the destination has the whole state: the destination says it cannot
/// know, stays paused, and the operator runs it there.
#[test]
fn source_killed_at_ready_leaves_an_unresolved_destination_the_operator_runs() {
    require_kvm!();
    let (_src, dst, _) = kill_at(RecordType::Ready, Dir::ToSource, true, Release::Forward);
    let deadline = Instant::now() + T;
    while dst.status() != "migrate-unresolved" {
        assert!(Instant::now() < deadline, "destination: {}", dst.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = dst.qmp_ok("query-migrate", json!({}));
    assert_eq!(info["status"], "unresolved", "{info}");
    assert!(info["error-desc"].as_str().is_some_and(|r| r.contains("source")), "{info}");
    assert_paused(&dst, "migrate-unresolved");
    let refused = dst.qmp("cont", json!({})).unwrap_err();
    assert!(refused.contains("migrate-resolve"), "{refused}");
    dst.qmp_ok("migrate-resolve", json!({"keep": "destination"}));
    assert_guest_runs(&dst, "destination");
}

/// Same, but the operator knows the source kept the guest: the destination discards it.
#[test]
fn source_killed_at_ready_destination_discards_when_told() {
    require_kvm!();
    let (_src, mut dst, _) = kill_at(RecordType::Ready, Dir::ToSource, true, Release::Forward);
    let deadline = Instant::now() + T;
    while dst.status() != "migrate-unresolved" {
        assert!(Instant::now() < deadline, "destination: {}", dst.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    dst.qmp_ok("migrate-resolve", json!({"keep": "source"}));
    assert_never_ran_and_exited(&mut dst);
    assert!(dst.stderr().contains("operator kept the guest on the source"), "{}", dst.stderr());
}

/// The source dies before END arrives: the destination's guest is incomplete and never runs.
#[test]
fn source_killed_at_end_destination_never_runs_an_incomplete_guest() {
    require_kvm!();
    let (_src, mut dst, _) = kill_at(RecordType::End, Dir::ToDestination, true, Release::Cut);
    assert_never_ran_and_exited(&mut dst);
}

/// The source dies with GO in flight: GO arrives, the destination runs the guest.
#[test]
fn source_killed_at_go_destination_runs_the_guest() {
    require_kvm!();
    let (_src, dst, _) = kill_at(RecordType::Go, Dir::ToDestination, true, Release::Forward);
    assert!(dst.wait_monitor(T));
    let deadline = Instant::now() + T;
    while dst.status() != "running" {
        assert!(Instant::now() < deadline, "destination: {}", dst.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_guest_runs(&dst, "destination");
}

/// The destination dies before READY reaches the source: the source keeps the guest.
#[test]
fn destination_killed_at_ready_source_keeps_the_guest() {
    require_kvm!();
    let (src, _dst, info) = kill_at(RecordType::Ready, Dir::ToSource, false, Release::Cut);
    assert_eq!(info["status"], "failed", "{info}");
    assert_guest_runs(&src, "source");
}

/// The destination dies before END reaches it: the source keeps the guest, and says it lost the
/// destination (not that the destination refused).
#[test]
fn destination_killed_at_end_source_keeps_the_guest() {
    require_kvm!();
    let (src, _dst, info) = kill_at(RecordType::End, Dir::ToDestination, false, Release::Forward);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap();
    assert!(why.contains("lost the destination") && !why.contains("refused"), "{why}");
    assert_guest_runs(&src, "source");
}

/// The destination dies with GO in flight: the source cannot know whether it ran the guest, stays
/// paused and unresolved, refuses `cont` and `migrate`, and the operator keeps it at the source.
#[test]
fn destination_killed_at_go_leaves_an_unresolved_source_the_operator_resumes() {
    require_kvm!();
    let (src, _dst, info) = kill_at(RecordType::Go, Dir::ToDestination, false, Release::Forward);
    assert_eq!(info["status"], "unresolved", "{info}");
    assert!(info["error-desc"].as_str().is_some_and(|e| e.contains("migrate-resolve")), "{info}");
    assert_paused(&src, "migrate-unresolved");
    let e = src.qmp("cont", json!({})).unwrap_err();
    assert!(e.contains("migrate-unresolved"), "{e}");
    let e = src.qmp("migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap_err();
    assert!(e.contains("unresolved"), "{e}");
    let done = src.qmp_ok("migrate-resolve", json!({"keep": "source"}));
    assert_eq!(done["status"], "failed", "{done}");
    assert_guest_runs(&src, "source");
    // and it can migrate again, for real this time
    let (dst2, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    expect_destination_has_it(&src, &dst2, &info);
}

/// The extra round trip the handover costs is reported, and the whole downtime stays small.
#[test]
fn the_handover_round_trip_is_reported() {
    require_kvm!();
    let src = source();
    let (dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    expect_destination_has_it(&src, &dst, &info);
    let b = &info["downtime-breakdown-us"];
    assert!(b["go-and-started"].as_u64().is_some() && b["send-state-and-ready"].as_u64().is_some(), "{info}");
    assert!(info["resolution"].is_null(), "{info}");
}

/// A guest stopped on the source stays stopped on the destination (QEMU does the same).
#[test]
fn a_stopped_guest_stays_stopped_after_migrating() {
    require_kvm!();
    let src = source();
    src.qmp_ok("stop", json!({}));
    let (dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(dst.wait_monitor(T));
    assert_paused(&dst, "paused");
    dst.qmp_ok("cont", json!({}));
    assert_guest_runs(&dst, "destination");
}

/// A source in postmigrate refuses to run or migrate again (that would be a second copy), unless
/// the operator forces it.
#[test]
fn a_migrated_away_source_refuses_to_run_again() {
    require_kvm!();
    let src = source();
    let (dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    expect_destination_has_it(&src, &dst, &info);
    let e = src.qmp("cont", json!({})).unwrap_err();
    assert!(e.contains("migrated away") && e.contains("force"), "{e}");
    let e = src.qmp("migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap_err();
    assert!(e.contains("migrated away"), "{e}");
    assert_eq!(src.status(), "postmigrate");
    let e = src.qmp("cont", json!({"force": "yes"})).unwrap_err();
    assert!(e.contains("force must be true or false"), "{e}");
    src.qmp_ok("cont", json!({"force": true}));
    assert_guest_runs(&src, "source (forced)");
}
