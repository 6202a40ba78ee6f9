//! emu-bench: benchmarks that print figures as JSON lines (one per measurement), with the baseline
//! each is compared against measured in the same run. They assert nothing; the scripts in
//! `scripts/bench-*.sh` run them.
//!
//!   emu-bench boot      time from start to the guest's first line; guest ns per page store
//!                       (dirty workload) against the same loop run natively on the host
//!   emu-bench migrate   the precopy scenarios, and single-stream TCP loopback throughput
//!   emu-bench trackers  per dirty tracker: cost per tracked write, time to start tracking and to
//!                       collect a pass per GiB, and the precopy scenarios; writes docs/trackers.md
//!                       and docs/trackers-dirty-per-pass.svg

use emu_plot as plot;
mod vs_qemu;

use emu_harness as common;

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
        Some("trackers") => trackers(&args[1..]),
        Some("vs-qemu") => vs_qemu::vs_qemu(&args[1..]),
        _ => {
            eprintln!("usage: emu-bench boot | migrate [SCENARIO...] | trackers [TRACKER...] | vs-qemu [--rounds N] [SCENARIO...]");
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

/// The same, but the reader reads into freshly mapped memory, as a migration destination does: the
/// ceiling for any destination on this host (first-touch page faults and zeroing included).
fn loopback_into_fresh_memory(total: usize, chunk: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // SAFETY: a fresh private anonymous mapping, checked below, unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping is `total` bytes, ours alone until unmapped below.
        let buf = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), total) };
        let mut n = 0;
        while n < total {
            match s.read(&mut buf[n..(n + chunk).min(total)]) {
                Ok(0) | Err(_) => break,
                Ok(r) => n += r,
            }
        }
        // SAFETY: unmaps the mapping made above; `buf` is not used after.
        unsafe { libc::munmap(p, total) };
        n
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let src = vec![0x5au8; total];
    let t0 = Instant::now();
    for c in src.chunks(chunk) {
        s.write_all(c).unwrap();
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
    /// Migration parameters other than the defaults (JSON object).
    params: &'static str,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "idle-1G", mem: "1G", workload: "wl=idle", ready: "tick 2 ", params: "{}" },
    Scenario { name: "idle-4G", mem: "4G", workload: "wl=idle", ready: "tick 2 ", params: "{}" },
    Scenario { name: "dirty-256M-25k", mem: "1G", workload: "wl=dirty:256:25000", ready: "dirty: rate=", params: "{}" },
    Scenario {
        name: "dirty-256M-250k",
        mem: "1G",
        workload: "wl=dirty:256:250000",
        ready: "dirty: rate=",
        params: "{}",
    },
    Scenario { name: "dirty-256M-max", mem: "1G", workload: "wl=dirty:256:0", ready: "dirty: rate=", params: "{}" },
];

/// For the tracker comparison only: a 5 ms downtime limit makes precopy iterate, which shows how
/// each tracker's dirty set shrinks pass by pass.
const ITERATING: Scenario = Scenario {
    name: "dirty-256M-250k-limit-5ms",
    mem: "1G",
    workload: "wl=dirty:256:250000",
    ready: "dirty: rate=",
    params: r#"{"downtime-limit": 5}"#,
};

fn ms(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// One migration scenario with the source's default tracker, or `tracker`.
/// The two loopback references, bytes per second.
#[derive(Clone, Copy)]
struct Loopback {
    hot: f64,
    fresh: f64,
}

fn measure_loopback(when: &str) -> Loopback {
    let hot = loopback_throughput(8 << 30, 128 << 10);
    let fresh = median((0..3).map(|_| loopback_into_fresh_memory(256 << 20, 1 << 20)).collect());
    emit(
        json!({"bench": "reference", "when": when, "tcp-loopback-MBps": hot / 1e6, "tcp-loopback-into-fresh-memory-MBps": fresh / 1e6}),
    );
    Loopback { hot, fresh }
}

fn run_scenario(s: &Scenario, loopback: Loopback, tracker: Option<&str>) -> Value {
    let mut args = vec!["--mem", s.mem, "--append", s.workload];
    if let Some(t) = tracker {
        args.extend_from_slice(&["--dirty-tracker", t]);
    }
    let src = Emu::boot(&args);
    src.expect_line(s.ready, T);
    std::thread::sleep(Duration::from_secs(1));
    let (dst, uri) = Emu::incoming(&[]);
    let params: Value = serde_json::from_str(s.params).expect("scenario parameters are JSON");
    if params.as_object().is_some_and(|o| !o.is_empty()) {
        src.qmp_ok("migrate-set-parameters", params);
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
        // Where the downtime went; go-and-started is the handover's extra round trip (GO out,
        // STARTED back), which keeps a single running copy.
        "downtime-breakdown-us": info["downtime-breakdown-us"],
        "bytes": bytes,
        "passes": passes.len(),
        "throughput-MBps": if total_ms > 0.0 { bytes / total_ms / 1e3 } else { 0.0 },
        "first-pass": {
            "bytes": first_bytes, "ms": first_s * 1e3, "throughput-MBps": first_tp / 1e6,
            "ram-MBps": if first_s > 0.0 { src_ram_bytes(s.mem) / first_s / 1e6 } else { 0.0 },
            "of-loopback": first_tp / loopback.hot,
            "of-loopback-into-fresh-memory": first_tp / loopback.fresh,
        },
        "pass-dirty-pages": passes.iter().map(|p| p["dirty-after"].clone()).collect::<Vec<_>>(),
        "pass-pages-sent": passes.iter().map(|p| p["pages"].clone()).collect::<Vec<_>>(),
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
    let loopback = measure_loopback("before");
    for s in SCENARIOS.iter().filter(|s| args.is_empty() || args.iter().any(|a| a == s.name)) {
        emit(run_scenario(s, loopback, None));
    }
    measure_loopback("after");
}

// ---- trackers ---------------------------------------------------------------------------------

const TRACKERS: &[&str] = &["uffd-wp", "uffd-wp-async", "kvm-dirty-log", "kvm-dirty-ring", "mprotect"];
/// How long each tracker runs on the writing guest, collecting every `INTERVAL_MS`.
const TRACKING_MS: u64 = 6000;
const INTERVAL_MS: u64 = 50;

/// `rate=` of the dirty workload's lines from index `from` on (skipping the first and the last,
/// which straddle the start and end of a measurement).
fn rates(lines: &[String], from: usize, to: usize) -> Vec<f64> {
    let v: Vec<f64> = lines[from..to]
        .iter()
        .filter(|l| l.contains("dirty: rate="))
        .filter_map(|l| number_after(l, "rate=").map(|r| r as f64))
        .collect();
    if v.len() > 2 {
        v[1..v.len() - 1].to_vec()
    } else {
        v
    }
}

/// Cost per tracked write on a 1 GiB guest writing 256 MiB as fast as it can: its own write rate
/// untracked, then while the tracker runs and re-protects every 50 ms (so nearly every write is the
/// first to its page since the last collect, i.e. tracked). The extra time per second, divided by
/// the tracked writes per second (the pages collected), is the cost of one tracked write.
fn tracker_cost(tracker: &str) -> Value {
    let emu = Emu::boot(&["--mem", "1G", "--dirty-tracker", tracker, "--append", "wl=dirty:256:0"]);
    emu.expect_line("dirty: filled", T);
    let n0 = emu.line_count();
    for _ in 0..4 {
        let n = emu.line_count();
        emu.wait_line_from(n, |l| l.contains("dirty: rate="), T);
    }
    let n1 = emu.line_count();
    let untracked = median(rates(&emu.lines(), n0, n1));
    let r = emu.qmp_ok(
        "x-dirty-tracking",
        json!({"tracker": tracker, "duration-ms": TRACKING_MS, "interval-ms": INTERVAL_MS}),
    );
    let n2 = emu.line_count();
    let tracked = median(rates(&emu.lines(), n1, n2));
    let tracked_per_s = r["pages-total"].as_f64().unwrap_or(0.0) / (TRACKING_MS as f64 / 1e3);
    let busy = 1.0 - tracked / untracked; // share of each second the tracking cost the guest
    let gib = 1.0;
    let out = json!({
        "bench": "tracker-cost",
        "tracker": tracker,
        "guest-pages-per-s-untracked": untracked,
        "guest-pages-per-s-tracked": tracked,
        "tracked-writes-per-s": tracked_per_s,
        "cost-us-per-tracked-write": if tracked_per_s > 0.0 { busy / tracked_per_s * 1e6 } else { f64::NAN },
        "start-ms-per-GiB": r["start-us"].as_f64().unwrap_or(0.0) / 1e3 / gib,
        "stop-ms-per-GiB": r["stop-us"].as_f64().unwrap_or(0.0) / 1e3 / gib,
        "collect-ms-per-GiB": r["collect-us-mean"].as_f64().unwrap_or(0.0) / 1e3 / gib,
        "collect-ms-per-GiB-max": r["collect-us-max"].as_f64().unwrap_or(0.0) / 1e3 / gib,
    });
    let _ = emu.qmp("quit", json!({}));
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let pvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() { ", KVM by PVM (shadow paging)" } else { "" };
    format!("{cpu}, {cores} cores, Linux {}{pvm}", kernel.trim())
}

fn trackers(args: &[String]) {
    let which: Vec<&str> =
        TRACKERS.iter().copied().filter(|t| args.is_empty() || args.iter().any(|a| a == t)).collect();
    emit(json!({"bench": "trackers", "machine": machine()}));
    let loopback = measure_loopback("before");
    let mut costs = Vec::new();
    let mut runs: Vec<(String, Value)> = Vec::new();
    for t in &which {
        let c = tracker_cost(t);
        emit(c.clone());
        costs.push(c);
        for s in SCENARIOS.iter().chain([&ITERATING]) {
            let r = run_scenario(s, loopback, Some(t));
            emit(r.clone());
            runs.push((t.to_string(), r));
        }
    }
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let _ = std::fs::create_dir_all(&docs);
    let table = tracker_table(&costs, &runs, loopback);
    if let Err(e) = std::fs::write(docs.join("trackers.md"), table) {
        eprintln!("cannot write docs/trackers.md: {e}");
    }
    if let Err(e) = plot_dirty_per_pass(&runs, &docs.join("trackers-dirty-per-pass.svg")) {
        eprintln!("cannot write the plot: {e}");
    }
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

fn tracker_table(costs: &[Value], runs: &[(String, Value)], loopback: Loopback) -> String {
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = format!(
        "# Dirty trackers, measured\n\nMade by `scripts/bench-trackers.sh` on {date}: {}. TCP loopback reference: {:.0} MB/s (into fresh memory, as a destination receives: {:.0} MB/s).\n\n",
        machine(),
        loopback.hot / 1e6,
        loopback.fresh / 1e6
    );
    md += "## Cost of tracking\n\nA 1 GiB guest stores one word per page over 256 MiB as fast as it can (`wl=dirty:256:0`), first untracked, then while the tracker runs and collects (re-protects) every 50 ms. *Cost per tracked write* is the guest time lost per second divided by the writes tracked per second. *Start*, *collect* and *stop* are per GiB of guest RAM (256 MiB of it populated).\n\n";
    md += "| tracker | guest pages/s untracked | guest pages/s tracked | cost per tracked write (us) | start (ms/GiB) | collect a pass (ms/GiB, mean / max) | stop (ms/GiB) |\n|---|---|---|---|---|---|---|\n";
    for c in costs {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} |\n",
            c["tracker"].as_str().unwrap_or("?"),
            f(&c["guest-pages-per-s-untracked"]),
            f(&c["guest-pages-per-s-tracked"]),
            f(&c["cost-us-per-tracked-write"]),
            f(&c["start-ms-per-GiB"]),
            f(&c["collect-ms-per-GiB"]),
            f(&c["collect-ms-per-GiB-max"]),
            f(&c["stop-ms-per-GiB"]),
        );
    }
    md += "\n## Migrations\n\nThe precopy scenarios of `scripts/bench-migrate.sh`, once per tracker, and the 250k pages/s writer again with a 5 ms downtime limit so that precopy iterates (downtime and total in ms; dirty pages left after each pass). With the default 50 ms limit every tracker switches over after pass 0: the synchronous trackers (uffd-wp, mprotect) slow the writer so much that only a few thousand pages are dirty by then; the cheap ones leave ten times more, still within the limit.\n\n";
    md += "| tracker | scenario | status | passes | total | downtime | first pass MB/s | dirty pages left per pass |\n|---|---|---|---|---|---|---|---|\n";
    for (t, r) in runs {
        md += &format!(
            "| {t} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["status"].as_str().unwrap_or("?"),
            r["passes"],
            f(&r["total-ms"]),
            f(&r["downtime-ms"]),
            f(&r["first-pass"]["throughput-MBps"]),
            r["pass-dirty-pages"],
        );
    }
    md += "\n![dirty pages left per pass](trackers-dirty-per-pass.svg)\n";
    md
}

/// Dirty pages left after each pass, per tracker, for the writing scenarios.
fn plot_dirty_per_pass(runs: &[(String, Value)], path: &std::path::Path) -> Result<(), plot::PlotError> {
    let scenarios = ["dirty-256M-25k", "dirty-256M-250k", "dirty-256M-max", ITERATING.name];
    let panels = scenarios
        .iter()
        .map(|&scenario| plot::Panel {
            caption: scenario.to_string(),
            series: runs
                .iter()
                .filter(|(_, r)| r["scenario"] == scenario)
                .map(|(t, r)| (t.clone(), plot::points(&r["pass-dirty-pages"])))
                .collect(),
        })
        .collect();
    plot::dirty_per_pass(path, panels)
}
