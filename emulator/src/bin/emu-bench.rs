//! emu-bench: benchmarks that print figures as JSON lines (one per measurement), with the baseline
//! each is compared against measured in the same run. They assert nothing; the scripts in
//! `scripts/bench-*.sh` run them.
//!
//!   emu-bench boot      time from start to the guest's first line; guest ns per page store
//!                       (dirty workload) against the same loop run natively on the host
//!   emu-bench migrate   the precopy scenarios, and single-stream TCP loopback throughput

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{number_after, Emu};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(300);

fn emit(v: Value) {
    println!("{v}");
    let _ = std::io::stdout().flush();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !common::kvm_or_skip("emu-bench") {
        std::process::exit(1);
    }
    match args.first().map(String::as_str) {
        Some("boot") => boot(),
        Some("migrate") => migrate(&args[1..]),
        _ => {
            eprintln!("usage: emu-bench boot | migrate [SCENARIO...]");
            std::process::exit(2);
        }
    }
}

// ---- boot -------------------------------------------------------------------------------------

fn boot() {
    let mut runs = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        let mut emu = Emu::spawn_with(&["--serial", "stdio", "--append", "wl=idle"], false);
        emu.wait_line(|_| true, T).expect("a first line");
        runs.push(t0.elapsed().as_secs_f64() * 1e3);
        emu.kill();
    }
    emit(json!({"bench": "boot", "metric": "start-to-first-line-ms", "median": median(runs.clone()), "runs": runs}));

    let guest = guest_ns_per_page();
    let native = native_ns_per_page(256 << 20);
    emit(json!({
        "bench": "boot", "metric": "dirty-ns-per-page-store",
        "guest": guest, "native": native, "guest-over-native": guest / native,
        "note": "one 8-byte store per 4 KiB page over 256 MiB, warm; guest = wl=dirty:256:0 in ring 3",
    }));
}

/// The dirty workload's own figure, median over its reports after the first.
fn guest_ns_per_page() -> f64 {
    let mut emu = Emu::spawn_with(&["--mem", "1G", "--append", "wl=dirty:256:0 runtime=6"], false);
    emu.wait_exit(T);
    let v: Vec<f64> = emu
        .lines()
        .iter()
        .filter(|l| l.contains("ns/page="))
        .skip(1)
        .filter_map(|l| l.split("ns/page=").nth(1)?.parse().ok())
        .collect();
    median(v)
}

/// The same loop natively: one volatile 8-byte store per page, pages in turn, memory warm.
fn native_ns_per_page(bytes: usize) -> f64 {
    let words = bytes / 8;
    let mut mem = vec![1u64; words];
    let pages = bytes / 4096;
    let ptr = mem.as_mut_ptr();
    let mut counter = 0u64;
    let rounds = 16;
    let t0 = Instant::now();
    for round in 0..rounds {
        for p in 0..pages {
            counter += 1;
            // SAFETY: p * 512 + round % 512 < words; the Vec lives across the loop.
            unsafe { ptr.add(p * 512 + round % 512).write_volatile(counter) };
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / (rounds * pages) as f64;
    std::hint::black_box(&mem);
    ns
}

// ---- migrate ----------------------------------------------------------------------------------

/// Single-stream TCP over loopback: one thread writes `total` bytes in `chunk`-byte writes, another
/// reads them, in this process. The iperf-style figure, from a cache-resident buffer.
fn loopback_throughput(total: usize, chunk: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; chunk];
        let mut n = 0;
        while n < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(r) => n += r,
            }
        }
        n
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![0x5au8; chunk];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).unwrap();
        sent += chunk;
    }
    drop(s);
    let got = reader.join().unwrap();
    got as f64 / t0.elapsed().as_secs_f64()
}

struct Scenario {
    name: &'static str,
    mem: &'static str,
    workload: &'static str,
    /// A serial line that shows the workload is in its steady state.
    ready: &'static str,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "idle-1G", mem: "1G", workload: "wl=idle", ready: "tick 2 " },
    Scenario { name: "idle-4G", mem: "4G", workload: "wl=idle", ready: "tick 2 " },
    Scenario { name: "dirty-256M-25k", mem: "1G", workload: "wl=dirty:256:25000", ready: "dirty: rate=" },
    Scenario { name: "dirty-256M-250k", mem: "1G", workload: "wl=dirty:256:250000", ready: "dirty: rate=" },
    Scenario { name: "dirty-256M-max", mem: "1G", workload: "wl=dirty:256:0", ready: "dirty: rate=" },
];

fn ms(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn run_scenario(s: &Scenario, loopback: f64, extra_params: &Value) -> Value {
    let src = Emu::boot(&["--mem", s.mem, "--append", s.workload]);
    src.expect_line(s.ready, T);
    std::thread::sleep(Duration::from_secs(1));
    let (dst, uri) = Emu::incoming(&[]);
    if extra_params.as_object().is_some_and(|o| !o.is_empty()) {
        src.qmp_ok("migrate-set-parameters", extra_params.clone());
    }
    let info = common::migrate(&src, &uri, T);
    let passes = info["passes"].as_array().cloned().unwrap_or_default();
    let first = passes.first().cloned().unwrap_or(json!({}));
    let first_bytes = first["bytes"].as_f64().unwrap_or(0.0);
    let first_s = first["time-us"].as_f64().unwrap_or(0.0) / 1e6;
    let first_tp = if first_s > 0.0 { first_bytes / first_s } else { 0.0 };
    let total_ms = ms(&info["total-time"]).unwrap_or(0.0);
    let bytes = info["ram"]["transferred"].as_f64().unwrap_or(0.0);
    let guest_rate_after = dst.wait_line(|l| l.contains("rate=") || l.contains("tick "), Duration::from_secs(5));
    let out = json!({
        "bench": "migrate",
        "scenario": s.name,
        "tracker": info["dirty-tracker"],
        "status": info["status"],
        "converged": info["converged"],
        "stop-reason": info["stop-reason"],
        "total-ms": total_ms,
        "setup-ms": info["setup-time"],
        "downtime-ms": info["downtime-us"].as_f64().map(|us| us / 1e3),
        "bytes": bytes,
        "passes": passes.len(),
        "throughput-MBps": if total_ms > 0.0 { bytes / total_ms / 1e3 } else { 0.0 },
        "first-pass": {
            "bytes": first_bytes, "ms": first_s * 1e3, "throughput-MBps": first_tp / 1e6,
            "ram-MBps": if first_s > 0.0 { src_ram_bytes(s.mem) / first_s / 1e6 } else { 0.0 },
            "of-loopback": first_tp / loopback,
        },
        "pass-dirty-pages": passes.iter().map(|p| p["dirty-after"].clone()).collect::<Vec<_>>(),
        "guest-after": guest_rate_after,
    });
    let _ = dst.qmp("quit", json!({}));
    let _ = src.qmp("quit", json!({}));
    out
}

fn src_ram_bytes(mem: &str) -> f64 {
    let n: f64 = mem.trim_end_matches('G').parse().unwrap_or(1.0);
    n * (1u64 << 30) as f64
}

fn migrate(args: &[String]) {
    let loopback = loopback_throughput(8 << 30, 128 << 10);
    emit(json!({"bench": "migrate", "reference": "tcp-loopback", "chunk": 128 << 10, "MBps": loopback / 1e6}));
    let extra = json!({});
    for s in SCENARIOS.iter().filter(|s| args.is_empty() || args.iter().any(|a| a == s.name)) {
        emit(run_scenario(s, loopback, &extra));
    }
    let again = loopback_throughput(8 << 30, 128 << 10);
    emit(json!({"bench": "migrate", "reference": "tcp-loopback-after", "chunk": 128 << 10, "MBps": again / 1e6}));
    let _ = number_after; // shared harness helper, used by the tests
}
