//! The QMP-shaped monitor: every command, malformed input (bad JSON, not UTF-8), clients that come
//! and go, the cap on clients at once, and the `emu qmp` client.

use emu_harness as common;
use emu_harness::require_kvm;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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

/// A raw monitor connection, for tests that need more than one line on one connection, or bytes
/// that are not a well-formed request.
struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(emu: &Emu) -> Client {
        let conn = UnixStream::connect(emu.dir.path("monitor.sock")).expect("connect to the monitor");
        // A monitor that stops answering fails the test instead of hanging it.
        conn.set_read_timeout(Some(T)).unwrap();
        Client { w: conn.try_clone().unwrap(), r: BufReader::new(conn) }
    }

    /// Connects and reads the greeting.
    fn greeted(emu: &Emu) -> Client {
        let mut c = Client::connect(emu);
        let greeting = c.reply();
        assert!(greeting["QMP"].is_object(), "greeting: {greeting}");
        c
    }

    /// One line as sent ("" at the end of the connection).
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap_or_else(|e| panic!("no line from the monitor: {e}"));
        l
    }

    fn reply(&mut self) -> Value {
        let l = self.line();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON from the monitor: {l:?}: {e}"))
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("write to the monitor");
    }

    fn request(&mut self, request: Value) -> Value {
        self.send(format!("{request}\n").as_bytes());
        self.reply()
    }
}

/// The monitor's client threads in `emu` (one per connected client).
fn client_threads(emu: &Emu) -> usize {
    emu.thread_names().iter().filter(|n| *n == "monitor-client").count()
}

/// Waits until `emu` has `n` monitor client threads; fails the test with the count if it does not.
fn wait_client_threads(emu: &Emu, n: usize) {
    let deadline = Instant::now() + T;
    while client_threads(emu) != n {
        assert!(Instant::now() < deadline, "{} monitor client threads, {n} expected", client_threads(emu));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn task_count(emu: &Emu) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", emu.pid())).expect("emu's /proc/PID/task").count()
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays() {
    require_kvm!();
    // 128 MiB: a RAM digest with every page's CRC is a reply of about 330 KB, more than a socket buffer
    let emu = Emu::boot(&["--mem", "128M", "--append", "wl=idle"]);
    let mut c = Client::greeted(&emu);
    for bad in [
        "garbage",
        "{\"execute\": 5}",
        "[1, 2]",
        "{\"execute\": \"stop\", \"arguments\": 3}",
        "{\"execute\": \"no-such-command\"}",
    ] {
        c.send(format!("{bad}\n").as_bytes());
        let reply = c.reply();
        assert!(reply["error"]["desc"].is_string(), "{bad}: {reply}");
    }
    assert_eq!(c.request(json!({"execute": "no-such-command"}))["error"]["class"], "CommandNotFound");
    let reply = c.request(json!({"execute": "query-status", "id": "x7"}));
    assert_eq!((reply["id"].clone(), reply["return"]["status"].clone()), (json!("x7"), json!("running")));

    // Clients come and go, several times, and the monitor goes on serving the others (`c`, and
    // `emu.status()`'s own connections).
    let sock = emu.dir.path("monitor.sock");
    for round in 0..3 {
        // gone before reading the greeting
        drop(UnixStream::connect(&sock).unwrap());
        // gone in the middle of a request line
        let mut half = Client::greeted(&emu);
        half.send(b"{\"execute\": \"query-");
        drop(half);
        // gone after a request, without reading its reply: the reply is larger than the socket
        // buffer, so the monitor's write fails part way
        let mut impatient = Client::greeted(&emu);
        impatient
            .send(format!("{}\n", json!({"execute": "query-ram-digest", "arguments": {"pages": true}})).as_bytes());
        drop(impatient);
        assert_eq!(emu.status(), "running", "round {round}");
        let reply = c.request(json!({"execute": "query-status", "id": round}));
        assert_eq!((reply["id"].clone(), reply["return"]["running"].clone()), (json!(round), json!(true)));
    }
    // They really went: only `c`'s thread is left, and once `c` goes too, none.
    wait_client_threads(&emu, 1);
    drop(c);
    wait_client_threads(&emu, 0);
    assert_eq!(emu.status(), "running");
}

#[test]
fn invalid_utf8_gets_an_error_and_the_connection_stays() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    let mut c = Client::greeted(&emu);
    let not_utf8: [&[u8]; 3] = [
        b"\xff\xfe\n",
        // a request that would be fine but for one invalid sequence inside a string
        b"{\"execute\": \"query-status\", \"id\": \"\xc3\x28\"}\n",
        // a sequence cut short by the end of the line
        b"{\"execute\": \"query-status\"} \xe2\x82\n",
    ];
    for bad in not_utf8 {
        c.send(bad);
        let reply = c.reply();
        assert_eq!(
            reply,
            json!({"error": {"class": "GenericError", "desc": "request is not UTF-8"}}),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // the same connection goes on, and UTF-8 beyond ASCII is still fine
    let reply = c.request(json!({"execute": "query-status", "id": "ünï"}));
    assert_eq!((reply["id"].clone(), reply["return"]["status"].clone()), (json!("ünï"), json!("running")));
}

/// `MAX_CLIENTS` in emulator/src/qmp.rs.
const MAX_CLIENTS: usize = 128;

#[test]
fn clients_over_the_cap_are_refused_and_threads_stay_bounded() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    assert_eq!(emu.status(), "running");
    // No client connected (boot's and status's connections have gone): the baseline.
    wait_client_threads(&emu, 0);
    let base = task_count(&emu);
    let mut idle: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::greeted(&emu)).collect();
    let refusal = json!({"error": {"class": "GenericError", "desc": "too many monitor clients (at most 128)"}});
    const EXTRA: usize = 72;
    for i in 0..EXTRA {
        let mut c = Client::connect(&emu);
        assert_eq!(c.reply(), refusal, "client {} of {}", MAX_CLIENTS + i + 1, MAX_CLIENTS + EXTRA);
        assert_eq!(c.line(), "", "a refused client is closed");
    }
    // One thread per accepted client and none for the refused ones. A little slack for threads that
    // come and go on their own; without the cap there would be EXTRA more.
    assert_eq!(client_threads(&emu), MAX_CLIENTS);
    let tasks = task_count(&emu);
    assert!(tasks <= base + MAX_CLIENTS + 2, "{tasks} threads with {MAX_CLIENTS} clients, {base} with none");
    // the clients in the monitor are served
    let reply = idle[MAX_CLIENTS - 1].request(json!({"execute": "query-status"}));
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    // Some leave; as many new clients are served, and the one after them is refused again.
    idle.truncate(MAX_CLIENTS - 10);
    wait_client_threads(&emu, MAX_CLIENTS - 10);
    assert_eq!(emu.status(), "running");
    idle.extend((0..10).map(|_| Client::greeted(&emu)));
    let mut over = Client::connect(&emu);
    assert_eq!(over.reply(), refusal);
    drop(idle);
    wait_client_threads(&emu, 0);
    assert_eq!(emu.status(), "running");
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
