//! The QMP-shaped monitor: every command, malformed input, clients that come and go, and the
//! `emu qmp` client.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::Emu;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

#[test]
fn stop_pauses_the_guest_and_cont_resumes_it() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    emu.expect_line("tick 1 ", T);
    assert_eq!(emu.qmp_ok("query-status", json!({})), json!({"status": "running", "running": true}));
    emu.qmp_ok("stop", json!({}));
    assert_eq!(emu.status(), "paused");
    let lines = emu.line_count();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(emu.line_count(), lines, "a stopped guest printed: {}", emu.output());
    emu.qmp_ok("stop", json!({})); // stopping twice is fine
    emu.qmp_ok("cont", json!({}));
    assert_eq!(emu.status(), "running");
    emu.wait_line_from(lines, |l| l.contains("tick "), T).expect("the guest went on after cont");
}

#[test]
fn query_vcpus_lists_every_vcpu_thread() {
    require_kvm!();
    let emu = Emu::boot(&["--smp", "2", "--append", "wl=idle"]);
    emu.expect_line("cpu1: tick 1", T);
    let vcpus = emu.qmp_ok("query-vcpus", json!({}));
    let vcpus = vcpus.as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["cpu-index"], json!(i));
        let tid = v["thread-id"].as_u64().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", emu.pid())).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }
}

#[test]
fn quit_ends_emu_with_status_zero() {
    require_kvm!();
    let mut emu = Emu::boot(&["--append", "wl=idle"]);
    emu.qmp_ok("quit", json!({}));
    assert_eq!(emu.wait_exit(T), Some(0));
    let sock = emu.dir.path("monitor.sock");
    assert!(!sock.exists(), "the monitor socket is left behind");
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    let conn = UnixStream::connect(emu.dir.path("monitor.sock")).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut read = || {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap()
    };
    assert!(read()["QMP"].is_object(), "greeting");
    for bad in [
        "garbage",
        "{\"execute\": 5}",
        "[1, 2]",
        "{\"execute\": \"stop\", \"arguments\": 3}",
        "{\"execute\": \"no-such-command\"}",
    ] {
        writeln!(w, "{bad}").unwrap();
        let reply = read();
        assert!(reply["error"]["desc"].is_string(), "{bad}: {reply}");
    }
    writeln!(w, "{}", json!({"execute": "no-such-command"})).unwrap();
    assert_eq!(read()["error"]["class"], "CommandNotFound");
    writeln!(w, "{}", json!({"execute": "query-status", "id": "x7"})).unwrap();
    let reply = read();
    assert_eq!((reply["id"].clone(), reply["return"]["status"].clone()), (json!("x7"), json!("running")));
    // clients come and go; others keep working
    drop(w);
    for _ in 0..5 {
        assert_eq!(emu.status(), "running");
    }
}

#[test]
fn qmp_client_subcommand() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    let sock = format!("unix:{}", emu.dir.path("monitor.sock").display());
    let out = std::process::Command::new(common::emu_bin()).args(["qmp", &sock, "query-status"]).output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "running");
    let out = std::process::Command::new(common::emu_bin()).args(["qmp", &sock, "bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    let out = std::process::Command::new(common::emu_bin())
        .args(["qmp", &sock, "migrate-set-parameters", "{\"downtime-limit\": 20}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(emu.qmp_ok("query-migrate-parameters", json!({}))["downtime-limit"], 20);
}

#[test]
fn paused_start_waits_for_cont() {
    require_kvm!();
    let emu = Emu::boot(&["-S", "--append", "wl=idle"]);
    assert_eq!(emu.status(), "paused");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(emu.lines().is_empty(), "{}", emu.output());
    emu.qmp_ok("cont", json!({}));
    emu.expect_line("tick 1 ", T);
}
