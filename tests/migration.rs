//! Live migration between real emu processes over TCP on 127.0.0.1: the guest's RAM must be equal
//! page for page before the destination resumes, and the guest must go on there as if nothing
//! happened. Failures (cancel, a killed destination, a refused stream) must leave the source running.

use emu_harness as common;
use emu_harness::require_kvm;

use std::time::Duration;

use common::{number_after, Emu};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// Fails with the first differing pages if the two guests' RAM differs.
fn assert_ram_equal(a: &Emu, b: &Emu) {
    let (da, db) = (a.ram_digest(), b.ram_digest());
    if da["digest"] == db["digest"] {
        return;
    }
    let (pa, pb) = (da["pages"].as_array().unwrap(), db["pages"].as_array().unwrap());
    assert_eq!(pa.len(), pb.len(), "RAM sizes differ");
    let diff: Vec<usize> = (0..pa.len()).filter(|&i| pa[i] != pb[i]).collect();
    panic!("RAM differs in {} pages, first {:?}", diff.len(), &diff[..diff.len().min(10)]);
}

/// Migrates `src` to a new destination started paused, checks RAM page for page and the run
/// states, then lets the destination run. Returns it with the final `query-migrate`.
fn migrate_checked(src: &Emu) -> (Emu, Value) {
    // The destination may migrate on: it gets the source's tracker (kvm-dirty-ring needs it at start).
    let tracker = src.qmp_ok("query-migrate-parameters", json!({}))["dirty-tracker"].as_str().unwrap().to_string();
    let (dst, uri) = Emu::incoming(&["-S", "--dirty-tracker", &tracker]);
    let info = common::migrate(src, &uri, T);
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource stderr: {}\ndestination stderr: {}",
        src.stderr(),
        dst.stderr()
    );
    assert!(dst.wait_monitor(T), "destination monitor: {}", dst.stderr());
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    assert_ram_equal(src, &dst);
    dst.qmp_ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
    (dst, info)
}

/// The last line of `emu` that contains `text`.
fn last_line(emu: &Emu, text: &str) -> String {
    emu.lines()
        .into_iter()
        .rev()
        .find(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no {text:?} in {}", emu.output()))
}

fn check_ticks_continue(src: &Emu, dst: &Emu, prefix: &str) {
    let last = number_after(&last_line(src, &format!("{prefix}tick ")), "tick ").unwrap();
    let next = format!("{prefix}tick {} ", last + 1);
    dst.expect_line(&next, T);
    assert!(!dst.output().contains(&format!("{prefix}tick {last} ")), "tick {last} repeated");
}

/// Boots a source that migrates with `tracker`.
fn source(tracker: &str, args: &[&str]) -> Emu {
    let mut all = vec!["--dirty-tracker", tracker];
    all.extend_from_slice(args);
    Emu::boot(&all)
}

fn idle_guest_migrates_and_ticks_on(tracker: &str) {
    let src = source(tracker, &["--mem", "256M", "--append", "wl=idle"]);
    src.expect_line("tick 2 ", T);
    let (dst, info) = migrate_checked(&src);
    check_ticks_continue(&src, &dst, "");
    assert!(info["downtime"].as_u64().is_some() && info["total-time"].as_u64().is_some(), "{info}");
    assert!(info["setup-time"].as_u64().is_some(), "{info}");
    assert_eq!(info["ram"]["total"], 256 << 20);
    assert_eq!(info["dirty-tracker"], tracker);
}

fn idle_smp2_guest_migrates(tracker: &str) {
    let src = source(tracker, &["--smp", "2", "--mem", "256M", "--append", "wl=idle"]);
    src.expect_line("cpu1: tick 2 ", T);
    let (dst, _) = migrate_checked(&src);
    check_ticks_continue(&src, &dst, "cpu0: ");
    check_ticks_continue(&src, &dst, "cpu1: ");
}

fn dirty_guest_migrates(tracker: &str, smp: &str, workload: &str) {
    let src = source(tracker, &["--smp", smp, "--mem", "256M", "--append", workload]);
    src.expect_line("dirty: rate=", T);
    let (dst, info) = migrate_checked(&src);
    let last = last_line(&src, "dirty: rate=");
    let before = number_after(&last, "total=").unwrap();
    // The same vCPU's counter (`cpuN: ` with --smp): each CPU counts its own pages, at the same
    // rate, so another CPU's may stand at the very same figure.
    let cpu = &last[..last.find("dirty: rate=").unwrap()];
    let line = dst
        .wait_line(|l| l.starts_with(cpu) && l.contains("dirty: rate="), T)
        .expect("dirty goes on at the destination");
    let after = number_after(&line, "total=").unwrap();
    assert!(after > before, "the page counter went back: {before} -> {after}");
    assert!(info["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
}

fn verify_guest_migrates(tracker: &str, smp: &str) {
    let src = source(tracker, &["--smp", smp, "--mem", "256M", "--append", "wl=verify:32"]);
    src.expect_line("verify: written=", T);
    let (dst, _) = migrate_checked(&src);
    let from = dst.line_count();
    // several seconds of rewriting and re-checking every page at the destination
    for _ in 0..4 {
        let n = dst.line_count();
        dst.wait_line_from(n.max(from), |l| l.contains("verify: written="), T).expect("verify goes on");
    }
    let out = dst.output();
    assert!(!out.contains("VERIFY-FAIL"), "{out}");
    assert!(out.lines().filter(|l| l.contains("written=")).all(|l| l.contains("failures=0")), "{out}");
}

fn there_and_back_again(tracker: &str) {
    let a = source(tracker, &["--mem", "128M", "--append", "wl=verify:16:50000"]);
    a.expect_line("verify: written=", T);
    let (b, _) = migrate_checked(&a);
    b.expect_line("verify: written=", T);
    let (a2, _) = migrate_checked(&b);
    let n = a2.line_count();
    a2.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on back home");
    assert!(!a2.output().contains("VERIFY-FAIL") && !b.output().contains("VERIFY-FAIL"));
}

/// Starts a migration that pass 0 will take a while to finish (bandwidth-limited).
fn slow_migration(src: &Emu, uri: &str) {
    src.qmp_ok("migrate-set-parameters", json!({"max-bandwidth": 4 << 20}));
    src.qmp_ok("migrate", json!({"uri": uri}));
    let deadline = std::time::Instant::now() + T;
    loop {
        let info = src.qmp_ok("query-migrate", json!({}));
        if info["status"] == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "migration did not get going: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failed migration: running, nothing write-protected, no fault thread, guest at full speed.
fn assert_source_recovered(src: &Emu, rate_before: u64) {
    assert_eq!(src.status(), "running");
    // The migration thread reports the end just before it returns: give it a moment to be gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let names = src.thread_names();
        if !names.iter().any(|n| n == "uffd-wp" || n == "migration") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "threads left: {names:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing of guest RAM left read-only (mprotect) or userfaultfd write-protected (uffd-wp,
    // uffd-wp-async), seen from outside, in /proc/PID/smaps and /proc/PID/pagemap. KVM's own
    // write protection (the KVM trackers) is not visible there: the write rate below covers it.
    let ram_bytes = src.qmp_ok("query-migrate", json!({}))["ram"]["total"].as_u64().expect("query-migrate ram.total");
    let left = common::ram_protection_left(src.pid(), ram_bytes);
    assert!(left.is_empty(), "guest RAM still protected after the migration ended:\n{}", left.join("\n"));
    // Write-protected pages would cost a fault per page per pass, every window; unprotected, the
    // guest is back to native speed. A busy 2-core host (CI runs other tests beside this one) can
    // slow any single window, so the best of a few one-second windows is compared, with a wide margin.
    let mut best = 0;
    let mut n = src.line_count();
    src.wait_line_from(n, |l| l.contains("verify: written="), T).expect("guest runs");
    for _ in 0..5 {
        n = src.line_count();
        src.wait_line_from(n, |l| l.contains("verify: written="), T).expect("guest runs");
        best = best.max(verify_rate(src));
        if best * 3 > rate_before {
            break;
        }
    }
    assert!(best * 3 > rate_before, "guest writes {best}/s after (best of 5 windows), {rate_before}/s before");
    assert!(!src.output().contains("VERIFY-FAIL"), "{}", src.output());
}

fn verify_rate(src: &Emu) -> u64 {
    let lines: Vec<String> = src.lines().into_iter().filter(|l| l.contains("written=")).collect();
    let n = lines.len();
    number_after(&lines[n - 1], "written=").unwrap() - number_after(&lines[n - 2], "written=").unwrap()
}

/// A source writing memory fast, its write rate, and a destination it is migrating to slowly.
fn slow_migration_of_a_writer(tracker: &str) -> (Emu, u64, Emu) {
    let src = source(tracker, &["--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("written="), T).unwrap();
    let rate_before = verify_rate(&src);
    let (dst, uri) = Emu::incoming(&[]);
    slow_migration(&src, &uri);
    (src, rate_before, dst)
}

fn cancel_mid_pass_leaves_the_source_running(tracker: &str) {
    let (src, rate_before, mut dst) = slow_migration_of_a_writer(tracker);
    src.qmp_ok("migrate-cancel", json!({}));
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_source_recovered(&src, rate_before);
    // The destination saw the stream end early: it fails and never runs the guest.
    let code = dst.wait_exit(T);
    assert!(matches!(code, Some(c) if c != 0), "destination exit {code:?}");
    assert!(dst.lines().is_empty(), "destination ran a guest: {}", dst.output());
    // and a later migration succeeds
    src.qmp_ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let (dst2, _) = migrate_checked(&src);
    dst2.expect_line("verify: written=", T);
}

fn killed_destination_leaves_the_source_running(tracker: &str) {
    let (src, rate_before, mut dst) = slow_migration_of_a_writer(tracker);
    dst.kill();
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().is_some(), "{info}");
    assert_source_recovered(&src, rate_before);
    src.qmp_ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let (dst2, _) = migrate_checked(&src);
    dst2.expect_line("verify: written=", T);
}

#[test]
fn mismatched_destination_refuses_and_the_source_goes_on() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=idle"]);
    src.expect_line("tick 1 ", T);
    let (mut dst, uri) = Emu::incoming(&["--mem", "128M"]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap();
    assert!(why.contains("refused") && why.contains("--mem"), "{why}");
    assert_eq!(src.status(), "running");
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("tick "), T).expect("source goes on");
    assert!(matches!(dst.wait_exit(T), Some(c) if c != 0));
    assert!(dst.stderr().contains("--mem"), "{}", dst.stderr());
    let (mut dst, uri) = Emu::incoming(&["--smp", "2"]);
    let info = common::migrate(&src, &uri, T);
    assert!(info["error-desc"].as_str().unwrap().contains("--smp"), "{info}");
    assert!(matches!(dst.wait_exit(T), Some(c) if c != 0));
}

/// A destination given --mem builds its VM before the source connects (one vCPU unless --smp
/// says): a guest of that shape lands in it, one with two vCPUs gets a VM built for it, and both
/// arrive whole and run on.
#[test]
fn a_destination_built_ahead_takes_its_guest_and_builds_anew_for_another() {
    require_kvm!();
    for smp in ["1", "2"] {
        let src = Emu::boot(&["--smp", smp, "--mem", "256M", "--append", "wl=verify:16"]);
        src.expect_line("verify: written=", T);
        let (dst, uri) = Emu::incoming(&["--mem", "256M", "-S"]);
        assert!(dst.wait_monitor(T));
        let info = common::migrate(&src, &uri, T);
        assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());
        assert_ram_equal(&src, &dst);
        dst.qmp_ok("cont", json!({}));
        let n = dst.line_count();
        let cpu1 = |l: &str| l.starts_with("cpu1: verify: written=");
        let want: &dyn Fn(&str) -> bool = if smp == "2" { &cpu1 } else { &|l: &str| l.contains("verify: written=") };
        dst.wait_line_from(n, want, T).unwrap_or_else(|| panic!("smp {smp}: no verify on: {}", dst.output()));
        assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    }
}

/// The checks above are only worth something if they catch a broken migration: leave pages out of
/// the final pass on purpose and expect the page comparison to see it.
fn a_lost_write_is_detected(tracker: &str) {
    let src = source(tracker, &["--mem", "128M", "--append", "wl=verify:16"]);
    src.expect_line("verify: written=", T);
    src.qmp_ok("migrate-set-parameters", json!({"x-drop-final-pages": 8}));
    let (dst, uri) = Emu::incoming(&["-S"]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(dst.wait_monitor(T));
    let (a, b) = (src.ram_digest(), dst.ram_digest());
    assert_ne!(a["digest"], b["digest"], "dropped pages went unnoticed");
}

#[test]
fn migration_parameters_are_checked() {
    require_kvm!();
    let src = Emu::boot(&["--append", "wl=idle"]);
    let defaults = src.qmp_ok("query-migrate-parameters", json!({}));
    assert_eq!(
        defaults,
        json!({
            "downtime-limit": 50, "max-bandwidth": 0, "max-passes": 30, "dirty-tracker": "uffd-wp-async",
            "switchover-timeout": 1000, "stall-policy": "throttle", "cpu-throttle-initial": 20,
            "cpu-throttle-increment": 10, "dirty-rate-limit": 0, "channels": 4, "compress": "none",
            "compress-level": 1, "postcopy-after-passes": 0, "max-postcopy-bandwidth": 0, "mode": "normal", "tls-cert": "", "tls-key": "", "tls-ca": "",
            "tls-psk": "",
        })
    );
    // Each refused for its own reason, named in the error (a refusal for another reason would hide
    // a check that does not work).
    for (bad, why) in [
        (json!({"downtime-limit": -1}), "downtime-limit must be a non-negative integer"),
        (json!({"downtime-limit": 2_000_001}), "downtime-limit is at most 2000000 ms"),
        (json!({"max-passes": "x"}), "max-passes must be a non-negative integer"),
        (json!({"max-passes": 1u64 << 32}), "max-passes is too large"),
        (json!({"max-bandwidth": 1.5}), "max-bandwidth must be a non-negative integer"),
        (json!({"compress": "zlib"}), "unknown compression 'zlib' (one of: none, lz4, zstd)"),
        (json!({"compress": 1}), "compress must be a string"),
        (json!({"compress-level": 0}), "compress-level is 1 to 19"),
        (json!({"multifd-zstd-level": 20}), "multifd-zstd-level is 1 to 19"),
        (json!({"dirty-tracker": "magic"}), "unknown dirty tracker 'magic'"),
        (json!({"dirty-tracker": 3}), "dirty-tracker must be a string"),
        (json!({"bogus": 1}), "unknown migration parameter bogus"),
        (json!({"switchover-timeout": 0}), "switchover-timeout is 1 to 600000 ms"),
        (json!({"switchover-timeout": "1s"}), "switchover-timeout must be a non-negative integer"),
        (json!({"stall-policy": "pray"}), "unknown stall policy 'pray'"),
        (json!({"cpu-throttle-initial": 0}), "cpu-throttle-initial is 1 to 99 (percent)"),
        (json!({"cpu-throttle-increment": 100}), "cpu-throttle-increment is 1 to 99 (percent)"),
        (json!({"dirty-rate-limit": -5}), "dirty-rate-limit must be a non-negative integer"),
        (json!({"tls-cert": 1}), "tls-cert must be a string (a path)"),
        // The credentials are read once all three are there (tests/transports.rs migrates with good ones).
        (
            json!({"tls-cert": "/nonexistent.pem", "tls-key": "/k", "tls-ca": "/c"}),
            "cannot read tls-cert /nonexistent.pem",
        ),
        // A good change before a bad one (parameters are checked in key order): refused as a
        // whole, checked below by nothing having changed.
        (json!({"max-passes": 3, "x-unknown": 1}), "unknown migration parameter x-unknown"),
    ] {
        match src.qmp("migrate-set-parameters", bad.clone()) {
            Err(e) => assert!(e.contains(why), "{bad}: {e:?} does not say {why:?}"),
            Ok(v) => panic!("{bad} accepted: {v}"),
        }
    }
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({})), defaults, "a refused change changed something");
    src.qmp_ok("migrate-set-parameters", json!({"downtime-limit": 10, "max-passes": 3}));
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({}))["max-passes"], 3);
    for (args, why) in [
        (json!({"uri": "nonsense"}), "'nonsense' is not a migration URI (unknown scheme)"),
        (json!({"uri": "tcp:127.0.0.1"}), "'tcp:127.0.0.1' is not a migration URI (no port)"),
        (json!({}), "migrate needs \"uri\""),
        (json!({"uri": 5}), "migrate needs \"uri\""),
    ] {
        match src.qmp("migrate", args.clone()) {
            Err(e) => assert!(e.contains(why), "migrate {args}: {e:?} does not say {why:?}"),
            Ok(v) => panic!("migrate {args} accepted: {v}"),
        }
    }
    assert_eq!(src.qmp_ok("query-migrate", json!({})), json!({}));
    // nothing listens there: fails, guest keeps running
    let info = common::migrate(&src, "tcp:127.0.0.1:1", T);
    assert_eq!(info["status"], "failed");
    assert!(info["error-desc"].as_str().unwrap().contains("cannot connect"), "{info}");
    assert_eq!(src.status(), "running");
}

/// Trackers that need something set up when emu starts refuse clearly, and the guest goes on.
#[test]
fn unavailable_trackers_are_refused() {
    require_kvm!();
    let plain = Emu::boot(&["--dirty-tracker", "uffd-wp", "--append", "wl=idle"]);
    plain.qmp_ok("migrate-set-parameters", json!({"dirty-tracker": "kvm-dirty-ring"}));
    let (_dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&plain, &uri, T);
    assert_eq!(info["status"], "failed");
    assert!(info["error-desc"].as_str().unwrap().contains("--dirty-tracker kvm-dirty-ring"), "{info}");
    assert_eq!(plain.status(), "running");
    let ring = Emu::boot(&["--dirty-tracker", "kvm-dirty-ring", "--append", "wl=idle"]);
    ring.qmp_ok("migrate-set-parameters", json!({"dirty-tracker": "kvm-dirty-log"}));
    let (_dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&ring, &uri, T);
    assert!(info["error-desc"].as_str().unwrap().contains("dirty rings"), "{info}");
    assert_eq!(ring.status(), "running");
}

/// The migration suite, once per tracker: `suite!` lists the tests once; `per_tracker!` makes a
/// module of them for each tracker.
macro_rules! suite {
    ($($name:ident => |$t:ident| $body:expr;)*) => {$(
        #[test]
        fn $name() {
            crate::require_kvm!();
            let $t = TRACKER;
            $body;
        }
    )*};
}

macro_rules! per_tracker {
    ($($module:ident => $tracker:literal),* $(,)?) => {$(
        mod $module {
            const TRACKER: &str = $tracker;

            suite! {
                idle_guest_migrates_and_ticks_on => |t| super::idle_guest_migrates_and_ticks_on(t);
                idle_smp2_guest_migrates => |t| super::idle_smp2_guest_migrates(t);
                dirty_guest_at_moderate_rate_migrates => |t| super::dirty_guest_migrates(t, "1", "wl=dirty:64:25000");
                dirty_guest_at_maximum_rate_migrates => |t| super::dirty_guest_migrates(t, "1", "wl=dirty:64:0");
                dirty_smp2_guest_migrates => |t| super::dirty_guest_migrates(t, "2", "wl=dirty:32:25000");
                verify_guest_migrates_without_a_lost_write => |t| super::verify_guest_migrates(t, "1");
                verify_smp2_guest_migrates_without_a_lost_write => |t| super::verify_guest_migrates(t, "2");
                there_and_back_again => |t| super::there_and_back_again(t);
                cancel_mid_pass_leaves_the_source_running => |t| super::cancel_mid_pass_leaves_the_source_running(t);
                killed_destination_leaves_the_source_running => |t| super::killed_destination_leaves_the_source_running(t);
                a_lost_write_is_detected => |t| super::a_lost_write_is_detected(t);
            }
        }
    )*};
}

per_tracker!(
    uffd_wp => "uffd-wp",
    uffd_wp_async => "uffd-wp-async",
    kvm_dirty_log => "kvm-dirty-log",
    kvm_dirty_ring => "kvm-dirty-ring",
    mprotect => "mprotect",
);

/// A guest that rewrites 32 MiB as fast as it can, over a link held to 32 MiB/s: the dirty set
/// never shrinks.
fn writer_over_a_slow_link(params: Value) -> (Emu, Emu, Value) {
    writer_over_a_slow_link_tracked("kvm-dirty-log", params)
}

fn writer_over_a_slow_link_tracked(tracker: &str, params: Value) -> (Emu, Emu, Value) {
    let src = Emu::boot(&["--dirty-tracker", tracker, "--mem", "128M", "--append", "wl=dirty:32:0"]);
    src.expect_line("dirty: rate=", T);
    let mut all = json!({"max-bandwidth": 32 << 20});
    all.as_object_mut().unwrap().extend(params.as_object().unwrap().clone());
    src.qmp_ok("migrate-set-parameters", all);
    let (dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    (src, dst, info)
}

/// Stall policy `fail`: the migration gives up once its passes stop paying, says why, and the
/// guest runs on at the source at full speed.
#[test]
fn a_migration_that_cannot_converge_fails_when_told_and_the_source_runs_on() {
    require_kvm!();
    let (src, mut dst, info) = writer_over_a_slow_link(json!({"stall-policy": "fail"}));
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("not converging") && why.contains("stopped shrinking"), "{why}");
    assert_eq!(info["converging"], false, "{info}");
    assert!(info["stall-reason"].as_str().is_some(), "{info}");
    assert_eq!(src.status(), "running");
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("dirty: rate="), T).expect("the guest runs on");
    assert!(matches!(dst.wait_exit(T), Some(c) if c != 0), "the destination gives up too");
    assert!(dst.lines().is_empty(), "the destination ran a guest: {}", dst.output());
}

/// Stall policy `throttle` (auto-converge): once the passes stop paying the vCPUs are throttled
/// (here in big steps, to keep the test short), the guest slows down, and the migration converges
/// within the downtime limit; the guest runs at the destination, unthrottled.
#[test]
fn auto_converge_throttles_a_writer_until_it_converges() {
    require_kvm!();
    let (src, dst, info) = writer_over_a_slow_link(json!({"cpu-throttle-initial": 90, "cpu-throttle-increment": 9}));
    assert_eq!(info["status"], "completed", "{info}\nsource: {}", src.stderr());
    assert_eq!(info["converged"], true, "{info}");
    assert!(info["cpu-throttle-percentage"].as_u64().is_some_and(|t| t >= 90), "{info}");
    assert!(info["stall-reason"].as_str().is_some(), "{info}");
    // The guest's rate while throttled was far below its rate before.
    let rates: Vec<u64> =
        src.lines().iter().filter(|l| l.contains("dirty: rate=")).filter_map(|l| number_after(l, "rate=")).collect();
    let (first, min) = (rates[0], *rates.iter().min().unwrap());
    assert!(min * 3 < first, "the guest was not slowed down: rates {rates:?}");
    dst.wait_line(|l| l.contains("dirty: rate="), T).expect("the guest runs on at the destination");
}

/// Dirty-rate limiting in the fault path (uffd-wp): the guest's first writes to pages are held to
/// a quarter of the link's rate from the start, and a writer that would never converge converges
/// within the downtime limit; the guest runs unlimited at the destination.
#[test]
fn dirty_rate_limiting_converges_a_writer_over_a_slow_link() {
    require_kvm!();
    // 32 MiB/s is 8192 pages/s; a quarter of it.
    let (src, dst, info) = writer_over_a_slow_link_tracked("uffd-wp", json!({"dirty-rate-limit": 2048}));
    assert_eq!(info["status"], "completed", "{info}\nsource: {}", src.stderr());
    assert_eq!(info["converged"], true, "{info}");
    assert_eq!(info["dirty-rate-limit"], 2048, "{info}");
    assert!(info["cpu-throttle-percentage"].is_null(), "no throttling was needed: {info}");
    // What the passes after the first had to resend is what the guest dirtied meanwhile: at most
    // about the limit times the time taken (unheld, it rewrites all 8192 pages every pass).
    let secs = info["total-time"].as_f64().unwrap() / 1e3;
    let resent: u64 = info["passes"].as_array().unwrap()[1..].iter().map(|p| p["pages"].as_u64().unwrap()).sum();
    assert!((resent as f64) <= 2048.0 * secs * 1.5 + 64.0, "{resent} pages resent in {secs} s: not held\n{info}");
    // and the guest felt it (its once-a-second report that covers the migration is far below).
    let rates: Vec<u64> =
        src.lines().iter().filter(|l| l.contains("dirty: rate=")).filter_map(|l| number_after(l, "rate=")).collect();
    assert!(rates.iter().any(|&r| r * 10 < rates[0]), "the guest was not slowed: rates {rates:?}");
    let line = dst.wait_line(|l| l.contains("dirty: rate="), T).expect("the guest runs on at the destination");
    let after = number_after(&line, "rate=").unwrap_or(0);
    assert!(after > 100 * 2048, "the destination's guest is still held: {line}");
}

/// A tracker that learns of writes only after they happened cannot hold them: asking for a dirty
/// rate limit with one fails the migration clearly, and the guest runs on.
#[test]
fn a_dirty_rate_limit_needs_a_tracker_that_can_hold_writes() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=dirty:8:0", "--dirty-tracker", "kvm-dirty-log"]);
    src.expect_line("dirty: rate=", T);
    src.qmp_ok("migrate-set-parameters", json!({"dirty-rate-limit": 1000}));
    let (_dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("dirty-rate-limit needs") && why.contains("kvm-dirty-log"), "{why}");
    assert_eq!(src.status(), "running");
}

/// Stopping the guest while KVM's dirty rings track it lost writes on this host (see README, the
/// throttle parameters), so `stop` is refused during such a migration, and works again once it is
/// cancelled; with another tracker it is allowed.
#[test]
fn stop_is_refused_while_kvm_dirty_rings_track_the_guest() {
    require_kvm!();
    let (src, _, _dst) = slow_migration_of_a_writer("kvm-dirty-ring");
    let e = src.qmp("stop", json!({})).unwrap_err();
    assert!(e.contains("kvm-dirty-ring migration"), "{e}");
    assert_eq!(src.status(), "running");
    src.qmp_ok("migrate-cancel", json!({}));
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "cancelled", "{info}");
    src.qmp_ok("stop", json!({}));
    assert_eq!(src.status(), "paused");

    let (other, _, _dst) = slow_migration_of_a_writer("kvm-dirty-log");
    other.qmp_ok("stop", json!({}));
    other.qmp_ok("cont", json!({}));
    other.qmp_ok("migrate-cancel", json!({}));
}

/// The verify guest (two vCPUs rewriting and re-checking 64 MiB) over four channels, with the
/// default tracker: RAM equal page for page, and the guest goes on checking at the destination.
#[test]
fn a_writer_migrates_over_four_channels() {
    require_kvm!();
    let src = Emu::boot(&["--smp", "2", "--mem", "256M", "--append", "wl=verify:64:0"]);
    src.expect_line("verify: written=", T);
    src.qmp_ok("migrate-set-parameters", json!({"channels": 4}));
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({}))["channels"], 4);
    let (dst, info) = migrate_checked(&src);
    assert!(info["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    // Out of range, and QEMU's spelling.
    for bad in [0, 17] {
        let e = src.qmp("migrate-set-parameters", json!({"channels": bad})).expect_err("refused");
        assert!(e.contains("channels is 1 to 16"), "{e}");
    }
    src.qmp_ok("migrate-set-parameters", json!({"multifd-channels": 2}));
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({}))["channels"], 2);
}

/// A writer whose memory compresses (words built from the page number), over a link held to 64
/// MiB/s, with zstd: compression pays there, RAM arrives equal page for page, and the writer goes on.
#[test]
fn a_writer_migrates_compressed() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=dirty:32:25000"]);
    src.expect_line("dirty: rate=", T);
    src.qmp_ok("migrate-set-parameters", json!({"compress": "zstd", "compress-level": 3, "max-bandwidth": 64 << 20}));
    let (dst, info) = migrate_checked(&src);
    let c = &info["compression"];
    assert_eq!(c["codec"], "zstd", "{info}");
    assert!(c["pages"].as_u64().unwrap() > 0 && c["ratio"].as_f64().unwrap() > 2.0, "{info}");
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("dirty: rate="), T).expect("the writer goes on");
}
