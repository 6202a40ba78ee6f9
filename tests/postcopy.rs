//! Postcopy between real emu processes over TCP on 127.0.0.1: the guest moves to the destination
//! in the middle of precopy and its remaining pages follow, those its vCPUs fault on first. RAM
//! must end equal page for page, the verify guest (which checks every page it wrote) must find no
//! lost write, and a link cut during postcopy (a proxy between the two) must lose nothing: both
//! sides pause, `migrate-recover` and `migrate {"resume": true}` finish the job. postcopy-preempt
//! is on (emu's default) unless a test says otherwise: requests and the pages asked for travel the
//! urgent connection, so a proxy that acts on PAGE_REQUEST acts on that one.

use emu_harness as common;
use emu_harness::proxy::{Action, Dir, Proxy};
use emu_harness::require_kvm;

use std::time::{Duration, Instant};

use common::Emu;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const PAGE_REQUEST: u8 = 0x86;
const PAGES: u8 = 0x02;

/// Starts a migration of `src` to `uri` slow enough (capped precopy) that it is still in pass 0
/// when it switches to postcopy.
fn start_then_postcopy(src: &Emu, uri: &str) {
    start_then_postcopy_paced(src, uri, 0);
}

/// As [`start_then_postcopy`], with postcopy's background push held to `postcopy_bandwidth`
/// bytes/s (0: none), so that a running destination surely faults on pages still owed, however
/// busy the host.
fn start_then_postcopy_paced(src: &Emu, uri: &str, postcopy_bandwidth: u64) {
    src.qmp_ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 16 << 20, "max-postcopy-bandwidth": postcopy_bandwidth}),
    );
    src.qmp_ok("migrate", json!({"uri": uri}));
    let deadline = Instant::now() + T;
    loop {
        let info = src.qmp_ok("query-migrate", json!({}));
        if info["status"] == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "migration did not get going: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.qmp_ok("migrate-start-postcopy", json!({}));
}

fn wait_status(emu: &Emu, want: &str) -> Value {
    common::wait_migration_status(emu, want, T)
}

fn assert_ram_equal(a: &Emu, b: &Emu) {
    let (da, db) = (a.ram_digest(), b.ram_digest());
    if da["digest"] == db["digest"] {
        return;
    }
    let (pa, pb) = (da["pages"].as_array().unwrap(), db["pages"].as_array().unwrap());
    let diff: Vec<usize> = (0..pa.len()).filter(|&i| pa[i] != pb[i]).collect();
    panic!("RAM differs in {} pages, first {:?}", diff.len(), &diff[..diff.len().min(10)]);
}

/// Lets the verify guest run some seconds on `dst` and checks it found every write it made.
fn verify_goes_on(dst: &Emu) {
    for _ in 0..3 {
        let n = dst.line_count();
        dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on at the destination");
    }
    let out = dst.output();
    assert!(!out.contains("VERIFY-FAIL"), "{out}");
}

/// A max-rate writer, the destination paused (-S): every owed page is pushed, none asked for;
/// RAM then equal page for page, and the writer goes on once resumed.
#[test]
fn a_max_rate_writer_moves_by_postcopy_with_ram_equal() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=dirty:128:0"]);
    src.expect_line("dirty: rate=", T);
    let (dst, uri) = Emu::incoming(&["-S"]);
    start_then_postcopy(&src, &uri);
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    let pc = &info["postcopy"];
    assert!(pc["owed-at-switchover"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(pc["owed-left"], 0, "{info}");
    assert!(info["downtime"].as_u64().is_some(), "{info}");
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    let dinfo = wait_status(&dst, "completed");
    assert_eq!(dinfo["postcopy"]["owed-left"], 0, "{dinfo}");
    assert_ram_equal(&src, &dst);
    dst.qmp_ok("cont", json!({}));
    dst.wait_line(|l| l.contains("dirty: rate="), T).expect("the writer goes on");
}

/// The verify guest on two vCPUs runs on the destination while its pages arrive: its vCPUs fault
/// on owed pages and ask for them; it must find every write it made, before and after.
#[test]
fn the_verify_guest_runs_on_while_its_pages_arrive() {
    require_kvm!();
    let src = Emu::boot(&["--smp", "2", "--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    let (dst, uri) = Emu::incoming(&[]);
    start_then_postcopy_paced(&src, &uri, 32 << 20);
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    let dinfo = wait_status(&dst, "completed");
    let pc = &dinfo["postcopy"];
    assert!(pc["requests"].as_u64().unwrap() > 0, "the running guest faulted on owed pages: {dinfo}");
    assert!(pc["fault-latency-us"]["p99"].as_u64().is_some(), "{dinfo}");
    assert!(pc["pages-urgent"].as_u64().unwrap() > 0, "pages asked for came on the urgent connection: {dinfo}");
    verify_goes_on(&dst);
    // The source holds nothing any more: it may quit now.
    src.qmp_ok("quit", json!({}));
}

/// The verify guest migrating by postcopy through a proxy that cuts the connection carrying the
/// destination's first page request (the urgent one with postcopy-preempt): returns once both
/// sides are paused, with the source's `query-migrate` then.
fn paused_at_first_request() -> (Emu, Emu, Proxy, Value) {
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    let (dst, uri) = Emu::incoming(&[]);
    let proxy = Proxy::start_any(&uri, Dir::ToSource, PAGE_REQUEST, Action::Cut);
    // A slow postcopy, so that it is still going when the cuts come.
    start_then_postcopy_paced(&src, &proxy.uri, 16 << 20);
    let paused = wait_status(&src, "postcopy-paused");
    wait_status(&dst, "postcopy-paused");
    (src, dst, proxy, paused)
}

/// The link breaks three times during postcopy (cut at the destination's first page request, a
/// corrupt record, cut again): both sides pause, nothing is lost, and recovery on a new connection
/// each time finishes the migration.
#[test]
fn a_link_broken_three_times_during_postcopy_is_recovered() {
    require_kvm!();
    let (src, dst, proxy, paused) = paused_at_first_request();
    assert!(paused["postcopy"]["paused-reason"].as_str().is_some(), "{paused}");
    // The source refuses to quit: it holds pages the destination's guest needs.
    let refused = src.qmp("quit", json!({})).expect_err("quit during postcopy");
    assert!(refused.contains("postcopy"), "{refused}");
    // Recovery through proxies that break the new link again at its first page record: by a
    // corrupt record (caught by its checksum before anything is written), then by a cut.
    let mut proxies = vec![proxy];
    for (n, action) in [(1, Action::CorruptLength), (2, Action::Cut)] {
        let again = dst.qmp_ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
        let p = Proxy::start(again["uri"].as_str().unwrap(), Dir::ToDestination, PAGES, action);
        src.qmp_ok("migrate", json!({"uri": p.uri, "resume": true}));
        let deadline = Instant::now() + T;
        loop {
            let s = src.qmp_ok("query-migrate", json!({}));
            assert_ne!(s["status"], "completed", "the break {action:?} did not come: {s}");
            if s["status"] == "postcopy-paused" && s["postcopy"]["recoveries"] == n {
                break;
            }
            assert!(Instant::now() < deadline, "{s}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let d = wait_status(&dst, "postcopy-paused");
        assert!(d["error-desc"].as_str().is_some_and(|e| e.contains("missing")), "{d}");
        proxies.push(p);
    }
    let again = dst.qmp_ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    src.qmp_ok("migrate", json!({"uri": again["uri"], "resume": true}));
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    assert_eq!(info["postcopy"]["recoveries"], 3, "{info}");
    let dinfo = wait_status(&dst, "completed");
    assert_eq!(dinfo["postcopy"]["owed-left"], 0, "{dinfo}");
    assert!(proxies.iter().all(Proxy::fired));
    verify_goes_on(&dst);
}

/// The source dies during postcopy: the destination says that its guest waits for pages it may
/// never get, and how many, and the guest does not run on with a hole (no VERIFY-FAIL).
#[test]
fn a_source_killed_during_postcopy_leaves_the_destination_waiting() {
    require_kvm!();
    let mut src = Emu::boot(&["--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    let (dst, uri) = Emu::incoming(&[]);
    let proxy = Proxy::start_any(&uri, Dir::ToSource, PAGE_REQUEST, Action::Hold);
    start_then_postcopy_paced(&src, &proxy.uri, 16 << 20);
    assert!(proxy.wait_held(T), "no page request came");
    src.kill();
    proxy.release(common::proxy::Release::Cut);
    let d = wait_status(&dst, "postcopy-paused");
    let left = d["postcopy"]["owed-left"].as_u64().unwrap();
    assert!(left > 0, "{d}");
    assert!(d["error-desc"].as_str().is_some_and(|e| e.contains(&format!("{left} of"))), "{d}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    assert_eq!(
        wait_status(&dst, "postcopy-paused")["postcopy"]["owed-left"],
        left,
        "nothing arrives from a dead source"
    );
}

/// `postcopy-after-passes`: the migration switches to postcopy by itself after that many passes.
#[test]
fn postcopy_after_passes_switches_by_itself() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "128M", "--append", "wl=dirty:64:0"]);
    src.expect_line("dirty: rate=", T);
    let (dst, uri) = Emu::incoming(&[]);
    src.qmp_ok(
        "migrate-set-parameters",
        json!({"postcopy-after-passes": 1, "stall-policy": "keep-going", "downtime-limit": 1}),
    );
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());
    assert_eq!(info["stop-reason"], "postcopy", "{info}");
    assert_eq!(info["ram"]["dirty-sync-count"], 2, "pass 0 and pass 1, then postcopy: {info}");
    dst.wait_line(|l| l.contains("dirty: rate="), T).expect("the writer goes on");
}

/// postcopy-preempt with the verify guest on two vCPUs, the destination paused (-S) so that RAM
/// can be compared: emu's own reads (query-ram-digest) fault on owed pages while the push goes on,
/// and those come on the urgent connection; RAM then equal page for page, and the guest, resumed,
/// finds every write it made.
#[test]
fn the_verify_guest_on_two_vcpus_under_postcopy_preempt_keeps_ram_equal() {
    require_kvm!();
    let src = Emu::boot(&["--smp", "2", "--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    let (dst, uri) = Emu::incoming(&["-S"]);
    src.qmp_ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-preempt", "state": true}]}),
    );
    start_then_postcopy_paced(&src, &uri, 32 << 20);
    wait_status(&src, "postcopy-active");
    // Reads every page; each owed one waits for its request's answer.
    dst.ram_digest();
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    let dinfo = wait_status(&dst, "completed");
    let pc = &dinfo["postcopy"];
    assert!(pc["requests"].as_u64().unwrap() > 0, "{dinfo}");
    assert!(pc["pages-urgent"].as_u64().unwrap() > 0, "{dinfo}");
    assert!(info["postcopy"]["pages-urgent"].as_u64().unwrap() >= pc["requests"].as_u64().unwrap(), "{info}");
    assert_ram_equal(&src, &dst);
    dst.qmp_ok("cont", json!({}));
    verify_goes_on(&dst);
}

/// The urgent connection is cut at the destination's first page request (the main one stays
/// up): both sides pause, and a recovery makes both connections again; the pages asked for after
/// it come on the new urgent connection, and the guest loses nothing.
#[test]
fn a_cut_urgent_connection_pauses_and_recovers() {
    require_kvm!();
    // Which side's reader notices first (the cut urgent connection, or channel 0 that the other
    // side shut on noticing it) is a race: the reasons are not checked, only that both pause.
    let (src, dst, proxy, paused) = paused_at_first_request();
    assert!(proxy.fired());
    let urgent_before = paused["postcopy"]["pages-urgent"].as_u64().unwrap();
    let again = dst.qmp_ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    src.qmp_ok("migrate", json!({"uri": again["uri"], "resume": true}));
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    assert_eq!(info["postcopy"]["recoveries"], 1, "{info}");
    assert!(
        info["postcopy"]["pages-urgent"].as_u64().unwrap() > urgent_before,
        "requests after the recovery were answered on the new urgent connection: {info}"
    );
    let dinfo = wait_status(&dst, "completed");
    assert_eq!(dinfo["postcopy"]["owed-left"], 0, "{dinfo}");
    verify_goes_on(&dst);
}
