//! The QMP monitor: every command, the wire format as QEMU's QMP spec has it (greeting,
//! negotiation, ids, objects split or several per write), malformed input (bad JSON, not UTF-8,
//! binary garbage, a 100 MB object), clients that come and go, 100 at once, the cap on clients,
//! events, the human monitor, and the `emu qmp` client.

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

    /// Connects and reads the greeting, and no more (capabilities negotiation mode).
    fn greeted_only(emu: &Emu) -> Client {
        let mut c = Client::connect(emu);
        let greeting = c.reply();
        assert!(greeting["QMP"].is_object(), "greeting: {greeting}");
        c
    }

    /// Connects, reads the greeting and negotiates (command mode).
    fn greeted(emu: &Emu) -> Client {
        let mut c = Client::greeted_only(emu);
        assert_eq!(c.request(json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
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
        // (not 0xff: that byte is the spec's parser reset, a lexical error of its own)
        b"\xfe\xfd\n",
        // a request that would be fine but for one invalid sequence inside a string
        b"{\"execute\": \"query-status\", \"id\": \"\xc3\x28\"}\n",
        // a sequence cut short, in a top-level string (which ends at the whitespace after it)
        b"\"\xe2\x82\n\"\n",
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

#[test]
fn the_wire_format_is_qemus() {
    require_kvm!();
    let emu = Emu::boot(&["--name", "guest-7", "--append", "wl=idle"]);
    let mut c = Client::connect(&emu);
    // Every message from the server is one line ending in CRLF.
    let greeting = c.line();
    assert!(greeting.ends_with("}\r\n"), "{greeting:?}");
    let greeting: Value = serde_json::from_str(&greeting).unwrap();
    let qemu = &greeting["QMP"]["version"]["qemu"];
    assert!(qemu["major"].is_u64() && qemu["minor"].is_u64() && qemu["micro"].is_u64(), "{greeting}");
    assert!(greeting["QMP"]["version"]["package"].as_str().unwrap().starts_with("emu-"), "{greeting}");
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    // Negotiation mode: everything but qmp_capabilities is refused, with QEMU's words.
    assert_eq!(
        c.request(json!({"execute": "query-status", "id": "early"})),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "early"})
    );
    assert_eq!(c.request(json!({"execute": "qmp_capabilities", "id": 0})), json!({"return": {}, "id": 0}));
    assert_eq!(c.request(json!({"execute": "qmp_capabilities"}))["error"]["class"], "CommandNotFound");
    // A request in pieces, with pauses between them, spanning lines.
    let split = b"{\"execute\":\n \"query-status\",\r\n \"id\": {\"n\": [1, \"}\"]}}";
    for piece in split.chunks(7) {
        c.send(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = c.reply();
    assert_eq!((reply["id"].clone(), reply["return"]["status"].clone()), (json!({"n": [1, "}"]}), json!("running")));
    // Several in one write, with and without anything between them.
    c.send(b"{\"execute\": \"query-name\", \"id\": 1}{\"execute\": \"query-version\", \"id\": 2}\n{\"execute\": \"bogus\", \"id\": 3}");
    assert_eq!(c.reply(), json!({"return": {"name": "guest-7"}, "id": 1}));
    assert_eq!(c.reply(), json!({"return": greeting["QMP"]["version"], "id": 2}));
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": 3})
    );
    let commands = c.request(json!({"execute": "query-commands"}))["return"].clone();
    let names: Vec<&str> = commands.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in [
        "qmp_capabilities",
        "query-status",
        "query-version",
        "query-commands",
        "query-name",
        "migrate-incoming",
        "human-monitor-command",
    ] {
        assert!(names.contains(&n), "{n} not in {names:?}");
    }
    // Every listed command is found (none answers CommandNotFound); harmless ones only are run
    // for real, the rest with arguments that fail their checks.
    for n in &names {
        let args = if ["query-", "qmp_"].iter().any(|p| n.starts_with(p)) {
            json!({})
        } else {
            json!({"x-no-such-argument": []})
        };
        if ["quit", "stop", "cont", "qmp_capabilities"].contains(n) {
            continue;
        }
        let r = c.request(json!({"execute": n, "arguments": args}));
        assert_ne!(r["error"]["class"], "CommandNotFound", "{n}: {r}");
    }
    // QEMU's spellings with underscores find the same commands.
    assert_eq!(c.request(json!({"execute": "query_status"}))["return"]["status"], "running");
    assert_eq!(c.request(json!({"execute": "migrate_cancel", "id": 5})), json!({"return": {}, "id": 5}));
    // Errors for what is not a request, as QEMU words them, id included where it could be read.
    assert_eq!(
        c.request(json!({"id": 6, "arguments": {}})),
        json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 6})
    );
    assert_eq!(
        c.request(json!({"exec-oob": "stop", "id": 7}))["error"]["desc"],
        "QMP input member 'exec-oob' is unexpected"
    );
    assert_eq!(c.request(json!([1]))["error"]["desc"], "QMP input must be a JSON object");
}

#[test]
fn garbage_a_100_mb_object_and_a_control_character_reset_leave_emu_serving() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", emu.pid())).unwrap();
        // "VmRSS:     12345 kB"
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
        line.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()).expect("VmRSS in kB")
    };
    let mut c = Client::greeted(&emu);
    let before = rss();
    // 100 MB in one object, written by a thread while this one waits for the answer: it is refused
    // as soon as it passes the limit, and the rest of it is read and dropped.
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(b"{\"execute\": \"query-status\", \"arguments\": {\"pad\": \"").unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\"}, \"id\": \"big\"}").unwrap();
    });
    assert_eq!(c.reply(), json!({"error": {"class": "GenericError", "desc": "request longer than 1048576 bytes"}}));
    writer.join().expect("emu read all 100 MB");
    // The same connection goes on, and another client is served too.
    assert_eq!(c.request(json!({"execute": "query-status", "id": 1}))["return"]["status"], "running");
    assert_eq!(emu.status(), "running");
    let grown = rss().saturating_sub(before);
    assert!(grown < 16 << 10, "emu grew by {grown} kB reading a 100 MB request");

    // Binary garbage (every byte value, in a fixed pseudo-random order), then the spec's reset (a
    // control character), then a request: each error reply is well-formed, and the request is
    // answered.
    let mut x: u32 = 12345;
    let garbage: Vec<u8> = (0..64 << 10)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    c.send(&garbage);
    c.send(b"\x01{\"execute\": \"query-status\", \"id\": \"after-garbage\"}");
    let (reply, _) = loop {
        let m = c.reply();
        if m.get("id") == Some(&json!("after-garbage")) {
            break (m, ());
        }
        assert_eq!(m["error"]["class"], "GenericError", "{m}");
    };
    assert_eq!(reply["return"]["status"], "running");
    assert_eq!(emu.status(), "running");
}

#[test]
fn a_hundred_clients_at_once_are_each_answered_and_each_hear_the_events() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    emu.expect_line("tick 1 ", T);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(101));
    let sock = emu.dir.path("monitor.sock");
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let (b, sock) = (barrier.clone(), sock.clone());
            std::thread::spawn(move || {
                let mut q = common::Qmp::connect(&sock).unwrap_or_else(|e| panic!("client {i}: {e}"));
                let r = q.call_ok("query-status", json!({}));
                assert_eq!(r["status"], "running", "client {i}");
                b.wait(); // all connected and negotiated
                b.wait(); // the guest was stopped
                let stop = q.wait_event("STOP", |_| true, T);
                assert!(stop["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000, "{stop}");
                q.event_names()
            })
        })
        .collect();
    barrier.wait();
    emu.qmp_ok("stop", json!({}));
    barrier.wait();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap_or_else(|_| panic!("client {i} failed")), vec!["STOP"], "client {i}");
    }
    emu.qmp_ok("cont", json!({}));
    assert_eq!(emu.status(), "running");
}

#[test]
fn events_reach_negotiated_clients_only() {
    require_kvm!();
    let mut emu = Emu::boot(&["--append", "wl=idle"]);
    let mut q = emu.qmp_client().unwrap();
    let mut waiting = Client::greeted_only(&emu);
    emu.qmp_ok("stop", json!({}));
    emu.qmp_ok("cont", json!({}));
    let resume = q.wait_event("RESUME", |_| true, T);
    assert_eq!(q.event_names(), vec!["STOP", "RESUME"]);
    assert!(resume.get("data").is_none(), "{resume}");
    let micros = resume["timestamp"]["microseconds"].as_i64().unwrap();
    assert!((0..1_000_000).contains(&micros), "{resume}");
    // The client still in negotiation mode heard nothing: its next message is the reply.
    let r = waiting.request(json!({"execute": "qmp_capabilities", "id": "late"}));
    assert_eq!(r, json!({"return": {}, "id": "late"}));
    // quit: every negotiated client hears SHUTDOWN before emu ends.
    emu.qmp_ok("quit", json!({}));
    let shutdown = q.wait_event("SHUTDOWN", |_| true, T);
    assert_eq!(shutdown["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
    assert_eq!(waiting.reply()["event"], "SHUTDOWN");
    assert_eq!(emu.wait_exit(T), Some(0));
}

#[test]
fn a_guest_that_exits_says_shutdown() {
    require_kvm!();
    // The guest runs three seconds before it exits, time for the client to negotiate.
    let mut emu = Emu::boot(&["--append", "wl=idle runtime=3"]);
    let mut q = emu.qmp_client().unwrap();
    let shutdown = q.wait_event("SHUTDOWN", |_| true, T);
    assert_eq!(shutdown["data"], json!({"guest": true, "reason": "guest-shutdown"}));
    assert_eq!(emu.wait_exit(T), Some(0));
}

#[test]
fn the_human_monitor_speaks_qemus_text() {
    require_kvm!();
    let mut emu = Emu::boot(&["--append", "wl=idle"]);
    let mut q = emu.qmp_client().unwrap();
    let mut hmp =
        |line: &str| q.call_ok("human-monitor-command", json!({"command-line": line})).as_str().unwrap().to_string();
    assert_eq!(hmp("info status"), "VM status: running\r\n");
    assert_eq!(hmp("stop"), "");
    assert_eq!(hmp("info status"), "VM status: paused\r\n");
    assert_eq!(hmp("c"), "");
    assert_eq!(hmp("info migrate"), "", "no migration yet");
    assert_eq!(hmp("migrate_set_parameter downtime-limit 123"), "");
    assert_eq!(hmp("migrate_set_parameter max_bandwidth 100M"), "");
    let params = hmp("info migrate_parameters");
    assert!(
        params.contains("downtime-limit: 123 ms\r\n") && params.contains("max-bandwidth: 104857600 bytes/second\r\n"),
        "{params}"
    );
    assert_eq!(
        hmp("migrate_set_parameter downtime-limit lots"),
        "Error: downtime-limit must be a non-negative integer\r\n"
    );
    assert_eq!(hmp("frobnicate"), "Error: unknown command: 'frobnicate'\r\n");
    assert!(hmp("info version").starts_with("0."), "emu's version");
    assert!(hmp("help").contains("migrate_cancel  -- cancel the current migration\r\n"));
    assert!(hmp("info").contains("info status  -- "));
    assert_eq!(hmp("migrate_cancel"), "");
    assert_eq!(q.call_ok("query-migrate-parameters", json!({}))["downtime-limit"], 123);
    // quit through the human monitor ends emu too
    q.call_ok("human-monitor-command", json!({"command-line": "quit"}));
    assert_eq!(emu.wait_exit(T), Some(0));
}
