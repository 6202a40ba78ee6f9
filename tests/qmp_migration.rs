//! Migration as a QMP client watches and steers it: a destination started with `--incoming defer`
//! that takes parameters before `migrate-incoming`, the MIGRATION and MIGRATION_PASS events on both
//! sides (waited for, never polled), `query-migrate` and `info migrate` on the destination, and the
//! plot of the passes.

use emu_harness::{require_kvm, Emu};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_deferred_destination_is_steered_and_both_sides_tell_by_events() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=dirty:16:2000"]);
    src.expect_line("dirty: rate=", T);
    let dst = Emu::incoming_deferred(&[]);
    let mut dq = dst.qmp_client().unwrap();
    let hmp = |q: &mut emu_harness::Qmp, line: &str| {
        q.call_ok("human-monitor-command", json!({"command-line": line})).as_str().unwrap().to_string()
    };
    // Up before anything listens: in migration, nothing received, parameters taken.
    assert_eq!(dq.call_ok("query-status", json!({})), json!({"status": "inmigrate", "running": false}));
    assert_eq!(hmp(&mut dq, "info status"), "VM status: paused (inmigrate)\r\n");
    assert_eq!(dq.call_ok("query-migrate", json!({})), json!({}));
    dq.call_ok("migrate-set-parameters", json!({"downtime-limit": 77}));
    assert_eq!(
        dq.call("query-vcpus", json!({})).unwrap_err(),
        "no guest here yet: an incoming migration is in progress"
    );
    // A bad address is refused and leaves migrate-incoming to be tried again.
    let e = dq.call("migrate-incoming", json!({"uri": "bogus:1"})).unwrap_err();
    assert!(e.contains("bogus:1"), "{e}");
    dq.call_ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let uri = dst.listening_uri();
    assert_eq!(
        dq.call("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"})).unwrap_err(),
        "The incoming migration has already been started"
    );
    assert_eq!(
        src.qmp("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"})).unwrap_err(),
        "'-incoming' was not specified on the command line"
    );

    let mut sq = src.qmp_client().unwrap();
    sq.call_ok("migrate", json!({"uri": uri}));
    sq.wait_event("MIGRATION", |e| e["data"]["status"] == "completed", T);
    // The source told every status in order, each pass, and the guest's stop.
    let seen = statuses(&sq.events);
    assert_eq!(seen.first().map(String::as_str), Some("setup"), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "a status told twice: {seen:?}");
    for s in ["active", "device"] {
        assert!(seen.iter().any(|x| x == s), "no {s} in {seen:?}");
    }
    let passes: Vec<u64> = sq
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION_PASS")
        .map(|e| e["data"]["pass"].as_u64().unwrap())
        .collect();
    let info = sq.call_ok("query-migrate", json!({}));
    let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert_eq!(passes, (1..=syncs).collect::<Vec<_>>(), "MIGRATION_PASS events against dirty-sync-count {syncs}");
    assert!(sq.event_names().contains(&"STOP".to_string()), "{:?}", sq.event_names());
    let text = hmp(&mut sq, "info migrate");
    assert!(text.starts_with("Migration status: completed\r\ntotal time: "), "{text}");
    assert!(text.contains(&format!("dirty sync count: {syncs}\r\n")), "{text}");

    // The destination: its events, what it received, the parameters it was given.
    dq.wait_event("MIGRATION", |e| e["data"]["status"] == "completed", T);
    dq.wait_event("RESUME", |_| true, T);
    assert_eq!(statuses(&dq.events), vec!["setup", "active", "completed"]);
    let got = dq.call_ok("query-migrate", json!({}));
    assert_eq!((got["status"].clone(), got["incoming"].clone()), (json!("completed"), json!(true)), "{got}");
    let ram = &got["ram"];
    assert_eq!(ram["total"], 64 << 20, "{got}");
    assert_eq!(ram["dirty-sync-count"].as_u64(), Some(syncs), "{got}");
    let pages = ram["normal"].as_u64().unwrap() + ram["duplicate"].as_u64().unwrap();
    assert!(pages >= (64 << 20) / 4096, "{got}");
    // The destination read at least the pages sent with data, and (from preamble to END) about
    // what the source wrote.
    let (sent, read) = (info["ram"]["transferred"].as_u64().unwrap(), ram["transferred"].as_u64().unwrap());
    assert!(
        read >= ram["normal"].as_u64().unwrap() * 4096 && read.abs_diff(sent) < 1 << 20,
        "read {read}, sent {sent}"
    );
    assert!(hmp(&mut dq, "info migrate").starts_with("Migration status: completed\r\n"));
    assert_eq!(dq.call_ok("query-migrate-parameters", json!({}))["downtime-limit"], 77);
    assert_eq!(dq.call_ok("query-status", json!({}))["status"], "running");

    // The passes, drawn.
    let svg = src.dir.path("passes.svg");
    let r = sq.call_ok("x-migration-plot", json!({"filename": svg.to_str().unwrap()}));
    assert_eq!(r["passes"].as_u64(), Some(syncs));
    let drawn = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(drawn.contains("throughput per pass") && drawn.contains("dirty pages left"), "{drawn}");
    assert_eq!(
        dq.call("x-migration-plot", json!({"filename": "/tmp/x.svg"})).unwrap_err(),
        "no migration with a completed pass to draw"
    );
}

#[test]
fn a_failed_migration_says_so_by_event_and_the_capability_silences_them() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "32M", "--append", "wl=idle"]);
    let mut sq = src.qmp_client().unwrap();
    // Nothing listens there: the migration fails at once.
    let dead = src.dir.path("nobody.sock");
    sq.call_ok("migrate", json!({"uri": format!("unix:{}", dead.display())}));
    sq.wait_event("MIGRATION", |e| e["data"]["status"] == "failed", T);
    assert_eq!(statuses(&sq.events), vec!["setup", "failed"]);
    let failed = sq.call_ok("human-monitor-command", json!({"command-line": "info migrate"}));
    assert!(failed.as_str().unwrap().starts_with("Migration status: failed ("), "{failed}");
    // With the capability off (QEMU's default), a migration says nothing; with it on again, it does.
    assert_eq!(
        sq.call_ok("query-migrate-capabilities", json!({})),
        json!([
            {"capability": "events", "state": true},
            {"capability": "postcopy-ram", "state": true},
            {"capability": "postcopy-preempt", "state": true},
            {"capability": "background-snapshot", "state": false},
        ])
    );
    sq.call_ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-preempt", "state": false}]}),
    );
    let caps = sq.call_ok("query-migrate-capabilities", json!({}));
    assert_eq!(caps[2], json!({"capability": "postcopy-preempt", "state": false}), "{caps}");
    sq.call_ok("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": false}]}));
    let e = sq.call("migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": true}]}));
    assert_eq!(e.unwrap_err(), "migration capability 'multifd' is not supported by emu");
    sq.events.clear();
    sq.call_ok("migrate", json!({"uri": format!("unix:{}", dead.display())}));
    emu_harness::wait_migration(&src, T);
    sq.call_ok("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}));
    sq.call_ok("migrate", json!({"uri": format!("unix:{}", dead.display())}));
    sq.wait_event("MIGRATION", |e| e["data"]["status"] == "failed", T);
    assert_eq!(statuses(&sq.events), vec!["setup", "failed"], "the silenced migration told nothing");
}

#[test]
fn migrate_sh_shows_progress_that_never_runs_backwards_and_sums_up_as_json() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=dirty:16:500"]);
    src.expect_line("dirty: rate=", T);
    let (dst, uri) = Emu::incoming(&[]);
    // Slow enough for several samples at 0.2 s.
    src.qmp_ok("migrate-set-parameters", json!({"max-bandwidth": 12 << 20}));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/migrate.sh");
    let svg = src.dir.path("passes.svg");
    let monitor = format!("unix:{}", src.monitor_path().display());
    let out = std::process::Command::new(&script)
        .args(["--json", "--interval", "0.2", "--plot", svg.to_str().unwrap(), &monitor, &uri])
        .env("EMU", emu_harness::emu_bin())
        .output()
        .expect("run scripts/migrate.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect();
    let (summary, samples) = lines.split_last().expect("a summary");
    assert!(samples.len() >= 3, "{stdout}");
    let shown: Vec<u64> = samples.iter().map(|s| s["in-place-percent"].as_u64().unwrap()).collect();
    assert!(shown.windows(2).all(|w| w[0] <= w[1]), "progress ran backwards: {shown:?}");
    assert!(shown.iter().all(|&p| p < 100) && shown.last() > shown.first(), "{shown:?}");
    let passes: Vec<u64> = samples.iter().map(|s| s["pass"].as_u64().unwrap()).collect();
    assert!(passes.windows(2).all(|w| w[0] <= w[1]), "{passes:?}");
    for key in ["mbps", "dirty-pages-rate", "dirty-pages", "expected-downtime", "converging"] {
        assert!(samples[0].get(key).is_some(), "no {key} in {}", samples[0]);
    }
    assert_eq!(summary["result"], "completed", "{summary}");
    assert_eq!(summary["ram"], 64 << 20, "{summary}");
    assert!(summary["passes"].as_u64().unwrap() >= 1 && summary["downtime-us"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["plot"], svg.to_str().unwrap());
    assert!(std::fs::read_to_string(&svg).unwrap().contains("throughput per pass"));
    assert_eq!(dst.status(), "running");
    // A wrong call says how to call it.
    let bad = std::process::Command::new(&script).arg("--bogus").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("usage: "));
}
