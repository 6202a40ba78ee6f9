//! `emu-bench vs-qemu`: the same migrations under emu and under QEMU, side by side, in one run.
//!
//! Both VMMs boot the same guest (`target/guest-images/emu-guest32.elf`, QEMU through `-kernel`),
//! a 1 GiB guest migrating over TCP on 127.0.0.1 with a 50 ms downtime limit and no bandwidth
//! limit. QEMU is driven through its QMP socket (plain JSON lines), emu through its monitor. Per
//! scenario the VMMs alternate (the order reversed in the second round, so that a host getting
//! slower or faster during the run does not favour one), and every total time is also given as a
//! ratio to QEMU multifd-4's in the same round: the host's speed varies by 2x between days, the
//! ratios much less. Single-stream TCP loopback throughput is measured before and after, as the
//! reference of the run.
//!
//! One JSON line per run on stdout; `docs/vs-qemu.md` (tables) and `docs/vs-qemu-dirty-per-pass.svg`
//! (emu's dirty pages left per pass; QEMU does not report per pass).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use emu_harness::{self as common, number_after, Emu, ScratchDir};
use serde_json::{json, Value};

use super::{emit, machine, measure_loopback, median, Loopback};

mod postcopy;

const QEMU: &str = "qemu-system-x86_64";
const IMAGE: &str = "emu-guest32.elf";
const MEM: &str = "1G";
/// The same on both VMMs; emu's default.
const DOWNTIME_LIMIT_MS: u64 = 50;
const MULTIFD_CHANNELS: u64 = 4;
/// A migration still running after this is cancelled and reported as not converged.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
const ROUNDS: usize = 2;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Idle,
    Dirty,
    Verify,
}

struct Scenario {
    name: &'static str,
    kind: Kind,
}

impl Scenario {
    fn append(&self) -> String {
        format!("wl={}", self.name)
    }
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "idle", kind: Kind::Idle },
    Scenario { name: "dirty:256:25000", kind: Kind::Dirty },
    Scenario { name: "dirty:256:250000", kind: Kind::Dirty },
    Scenario { name: "dirty:256:0", kind: Kind::Dirty },
    Scenario { name: "verify:256:0", kind: Kind::Verify },
];

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    QemuPrecopy,
    QemuMultifd4,
    /// emu with its defaults but the tracker named (so that the two rows compare trackers).
    EmuKvmDirtyLog,
    EmuUffdWpAsync,
    /// emu's defaults, but one channel: what the channels are worth.
    EmuOneChannel,
    // The capped run (`--capped`):
    /// QEMU precopy with its `auto-converge` capability.
    QemuAutoConverge,
    /// emu with uffd-wp and `dirty-rate-limit` at a quarter of the link.
    EmuRateLimit,
    /// emu with its default tracker and stall policy (auto-converge by throttling).
    EmuThrottle,
    // The postcopy run (`--postcopy`):
    /// QEMU with `postcopy-ram` on both sides (and `postcopy-blocktime` on the destination), then
    /// `migrate-start-postcopy` by the switch rule.
    QemuPostcopy,
    /// emu, `migrate-start-postcopy` by the same rule, without the urgent connection
    /// (`postcopy-preempt` off).
    EmuPostcopy,
    /// As `EmuPostcopy` with `postcopy-preempt` on: requested pages overtake the background push.
    EmuPostcopyPreempt,
    /// emu with `stall-policy` postcopy: it switches by itself once precopy stops paying.
    EmuPostcopyPolicy,
    /// The reference "the time to send its RAM once": emu migrating the guest paused (`stop` on
    /// the source first), so that every page goes exactly once.
    EmuPausedOnce,
}

/// The capped run: a writer that outruns a 100 MiB/s link.
const CAPPED_VMMS: &[Vmm] = &[Vmm::QemuPrecopy, Vmm::QemuAutoConverge, Vmm::EmuRateLimit, Vmm::EmuThrottle];
const CAPPED_SCENARIO: Scenario = Scenario { name: "dirty:256:0", kind: Kind::Dirty };
const CAPPED_BANDWIDTH: u64 = 100 << 20;
/// A quarter of the capped link, in pages per second.
const CAPPED_DIRTY_RATE: u64 = CAPPED_BANDWIDTH / 4096 / 4;

/// The postcopy run: the capped link, then uncapped against the time to send the RAM once.
const POSTCOPY_CAPPED_VMMS: &[Vmm] =
    &[Vmm::QemuPostcopy, Vmm::EmuPostcopy, Vmm::EmuRateLimit, Vmm::EmuPostcopyPolicy, Vmm::EmuThrottle];
const POSTCOPY_UNCAPPED_VMMS: &[Vmm] =
    &[Vmm::QemuPostcopy, Vmm::EmuPostcopy, Vmm::EmuPostcopyPreempt, Vmm::EmuPausedOnce];
const POSTCOPY_UNCAPPED_SCENARIOS: &[Scenario] =
    &[Scenario { name: "dirty:256:0", kind: Kind::Dirty }, Scenario { name: "verify:256:0", kind: Kind::Verify }];
/// The switch rule, the same for both VMMs: `migrate-start-postcopy` at the first `query-migrate`
/// poll (every `FAST_POLL`) that shows status `active` with at least this much in `ram.transferred`.
const POSTCOPY_AFTER_BYTES: u64 = 64 << 20;
const FAST_POLL: Duration = Duration::from_millis(10);
/// How long the destination may take to say `completed` after the source did.
const DESTINATION_COMPLETE_TIMEOUT: Duration = Duration::from_secs(10);

const VMMS: &[Vmm] =
    &[Vmm::QemuPrecopy, Vmm::QemuMultifd4, Vmm::EmuKvmDirtyLog, Vmm::EmuUffdWpAsync, Vmm::EmuOneChannel];
/// What every total time is divided by.
const REFERENCE: Vmm = Vmm::QemuMultifd4;

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::QemuPrecopy => "qemu-precopy",
            Vmm::QemuMultifd4 => "qemu-multifd4",
            Vmm::EmuKvmDirtyLog => "emu-kvm-dirty-log",
            Vmm::EmuUffdWpAsync => "emu-uffd-wp-async",
            Vmm::EmuOneChannel => "emu-1-channel",
            Vmm::QemuAutoConverge => "qemu-auto-converge",
            Vmm::EmuRateLimit => "emu-uffd-wp-dirty-rate-limit",
            Vmm::EmuThrottle => "emu-throttle",
            Vmm::QemuPostcopy => "qemu-postcopy",
            Vmm::EmuPostcopy => "emu-postcopy",
            Vmm::EmuPostcopyPreempt => "emu-postcopy-preempt",
            Vmm::EmuPostcopyPolicy => "emu-postcopy-policy",
            Vmm::EmuPausedOnce => "emu-paused-send-once",
        }
    }

    fn is_qemu(self) -> bool {
        matches!(self, Vmm::QemuPrecopy | Vmm::QemuMultifd4 | Vmm::QemuAutoConverge | Vmm::QemuPostcopy)
    }

    /// The benchmark sends `migrate-start-postcopy` (by the switch rule).
    fn starts_postcopy(self) -> bool {
        matches!(self, Vmm::QemuPostcopy | Vmm::EmuPostcopy | Vmm::EmuPostcopyPreempt)
    }

    /// The migration may end in postcopy (by command or by policy).
    fn postcopy(self) -> bool {
        self.starts_postcopy() || self == Vmm::EmuPostcopyPolicy
    }

    fn multifd(self) -> bool {
        self == Vmm::QemuMultifd4
    }
}

/// Copies of the emu binary and the guest image taken at the start, so that a build by someone else
/// during the run (the target directory is shared) cannot change what is measured halfway.
struct Frozen {
    _dir: ScratchDir,
    image: PathBuf,
}

static FROZEN: std::sync::OnceLock<Frozen> = std::sync::OnceLock::new();

fn freeze() -> Result<(), String> {
    let dir = ScratchDir::new();
    let emu = dir.path("emu");
    let image = dir.path(IMAGE);
    std::fs::copy(common::emu_bin(), &emu).map_err(|e| format!("copy emu: {e}"))?;
    std::fs::copy(common::guest_image(IMAGE), &image).map_err(|e| format!("copy {IMAGE}: {e}"))?;
    // Read by the harness when it starts emu (no other thread runs yet).
    std::env::set_var("EMU", &emu);
    let _ = FROZEN.set(Frozen { _dir: dir, image });
    Ok(())
}

fn guest_image() -> PathBuf {
    FROZEN.get().map(|f| f.image.clone()).unwrap_or_else(|| common::guest_image(IMAGE))
}

/// The commit emu was built from, and whether the working tree had changes then.
fn emu_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let changed = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| s.lines().count()).unwrap_or(0);
    if changed > 0 {
        format!("{head} with uncommitted changes in {changed} tracked files")
    } else {
        head
    }
}

// ---- the two kinds of VM ------------------------------------------------------------------------

/// What a run needs of a VM, whichever VMM runs it.
trait Vm {
    /// The guest's serial lines so far.
    fn lines(&self) -> Vec<String>;
    fn qmp(&self, command: &str, arguments: Value) -> Result<Value, String>;
    /// For error messages: the VMM's stderr.
    fn stderr(&self) -> String;
}

impl Vm for Emu {
    fn lines(&self) -> Vec<String> {
        Emu::lines(self)
    }
    fn qmp(&self, command: &str, arguments: Value) -> Result<Value, String> {
        Emu::qmp(self, command, arguments)
    }
    fn stderr(&self) -> String {
        Emu::stderr(self)
    }
}

struct QmpConn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

/// A QEMU process: serial to a file, QMP on a Unix socket (one connection, kept).
struct Qemu {
    child: Child,
    dir: ScratchDir,
    conn: Mutex<QmpConn>,
}

impl Qemu {
    fn spawn(append: &str, incoming: bool) -> Result<Qemu, String> {
        let dir = ScratchDir::new();
        let (serial, qmp, log) = (dir.path("serial.txt"), dir.path("qmp.sock"), dir.path("qemu.log"));
        let image = guest_image();
        let mut cmd = Command::new(QEMU);
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", MEM, "-nographic", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp.display()))
            .arg("-kernel")
            .arg(&image)
            .arg("-append")
            .arg(append);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let out = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e} (scripts/install-qemu.sh installs it)"))?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let sock = loop {
            match UnixStream::connect(&qmp) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("no QMP socket: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let w = sock.try_clone().map_err(|e| e.to_string())?;
        let q = Qemu { child, dir, conn: Mutex::new(QmpConn { r: BufReader::new(sock), w }) };
        {
            let mut c = q.conn.lock().unwrap();
            let mut greeting = String::new();
            c.r.read_line(&mut greeting).map_err(|e| format!("QMP greeting: {e}"))?;
            if !greeting.contains("QMP") {
                return Err(format!("not a QMP greeting: {greeting:?}"));
            }
        }
        q.qmp("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn serial(&self) -> PathBuf {
        self.dir.path("serial.txt")
    }
}

impl Vm for Qemu {
    fn lines(&self) -> Vec<String> {
        let text = std::fs::read(self.serial()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        // Only whole lines: the last one may still be being written.
        let whole = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        whole.split('\n').map(|l| l.trim_end_matches('\r').to_string()).collect()
    }

    /// One command; events that come before its answer are skipped.
    fn qmp(&self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut c = self.conn.lock().unwrap();
        writeln!(c.w, "{}", json!({"execute": command, "arguments": arguments}))
            .map_err(|e| format!("{command}: {e}"))?;
        loop {
            let mut line = String::new();
            let n = c.r.read_line(&mut line).map_err(|e| format!("{command}: {e}"))?;
            if n == 0 {
                return Err(format!("{command}: QMP connection closed"));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("{command}: bad QMP line {line:?}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{command}: {}", e["desc"].as_str().unwrap_or("?")));
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path("qemu.log")).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- one run --------------------------------------------------------------------------------------

/// The workload's rate per report: `rate=` of the dirty workload, the difference between
/// consecutive `written=` of verify (both once a second). Empty for idle.
fn rates(kind: Kind, lines: &[String]) -> Vec<f64> {
    match kind {
        Kind::Idle => Vec::new(),
        Kind::Dirty => lines
            .iter()
            .filter(|l| l.contains("dirty: rate="))
            .filter_map(|l| number_after(l, "rate=").map(|r| r as f64))
            .collect(),
        Kind::Verify => {
            let w: Vec<f64> = lines
                .iter()
                .filter(|l| l.contains("verify: written="))
                .filter_map(|l| number_after(l, "written=").map(|r| r as f64))
                .collect();
            w.windows(2).map(|p| p[1] - p[0]).collect()
        }
    }
}

/// A line that shows the workload runs.
fn workload_line(l: &str) -> bool {
    l.contains("dirty: rate=") || l.contains("verify: written=") || l.contains("tick ")
}

/// Waits until `enough` holds for the VM's serial lines; the lines then.
fn wait_lines(vm: &dyn Vm, timeout: Duration, enough: impl Fn(&[String]) -> bool) -> Result<Vec<String>, Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = vm.lines();
        if enough(&lines) {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            return Err(lines);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reports wanted in the steady state: the first is skipped (it straddles the start, or the
/// migration), the rest are the figure.
const RATE_REPORTS: usize = 3;

fn steady(kind: Kind, lines: &[String]) -> bool {
    match kind {
        Kind::Idle => lines.iter().filter(|l| l.contains("tick ")).count() >= 2,
        _ => rates(kind, lines).len() >= RATE_REPORTS,
    }
}

fn rate_of(kind: Kind, lines: &[String]) -> Value {
    let r = rates(kind, lines);
    if r.len() < 2 {
        return Value::Null;
    }
    json!(median(r[1..].to_vec()))
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn migration_params(vmm: Vmm, max_bandwidth: u64) -> Value {
    let mut p = json!({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": max_bandwidth});
    if vmm == Vmm::EmuRateLimit {
        p["dirty-rate-limit"] = json!(CAPPED_DIRTY_RATE);
    }
    if vmm.multifd() {
        p["multifd-channels"] = json!(MULTIFD_CHANNELS);
    }
    if vmm == Vmm::EmuOneChannel {
        p["channels"] = json!(1);
    }
    if vmm == Vmm::EmuPostcopyPolicy {
        p["stall-policy"] = json!("postcopy");
    }
    p
}

fn set_capabilities(vm: &dyn Vm, names: &[&str]) -> Result<(), String> {
    let caps: Vec<Value> = names.iter().map(|n| json!({"capability": n, "state": true})).collect();
    vm.qmp("migrate-set-capabilities", json!({"capabilities": caps}))?;
    Ok(())
}

fn set_multifd(vm: &dyn Vm) -> Result<(), String> {
    vm.qmp("migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": true}]}))?;
    vm.qmp("migrate-set-parameters", json!({"multifd-channels": MULTIFD_CHANNELS}))?;
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn start_source(vmm: Vmm, s: &Scenario) -> Result<Box<dyn Vm>, String> {
    let append = s.append();
    if vmm.is_qemu() {
        return Ok(Box::new(Qemu::spawn(&append, false)?));
    }
    let image = guest_image();
    let image = image.to_str().ok_or("guest image path is not UTF-8")?;
    let mut args = vec!["--guest", image, "--mem", MEM, "--append", &append];
    match vmm {
        Vmm::EmuUffdWpAsync => args.extend_from_slice(&["--dirty-tracker", "uffd-wp-async"]),
        Vmm::EmuKvmDirtyLog => args.extend_from_slice(&["--dirty-tracker", "kvm-dirty-log"]),
        Vmm::EmuRateLimit => args.extend_from_slice(&["--dirty-tracker", "uffd-wp"]),
        _ => {}
    }
    Ok(Box::new(Emu::boot(&args)))
}

/// A destination waiting for the migration, and the URI to send it to.
fn start_destination(vmm: Vmm, s: &Scenario) -> Result<(Box<dyn Vm>, String), String> {
    if !vmm.is_qemu() {
        let (dst, uri) = Emu::incoming(&[]);
        return Ok((Box::new(dst), uri));
    }
    let dst = Qemu::spawn(&s.append(), true)?;
    if vmm.multifd() {
        set_multifd(&dst)?;
    }
    if vmm == Vmm::QemuPostcopy {
        set_capabilities(&dst, &["postcopy-ram", "postcopy-blocktime"])?;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    dst.qmp("migrate-incoming", json!({"uri": uri}))?;
    Ok((Box::new(dst), uri))
}

fn run(s: &Scenario, vmm: Vmm, round: usize, loopback: Loopback, max_bandwidth: u64) -> Value {
    let base = json!({"bench": "vs-qemu", "scenario": s.name, "vmm": vmm.name(), "round": round});
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(s, vmm, loopback, max_bandwidth)));
    let mut out = match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({"error": e}),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            json!({"error": msg})
        }
    };
    for (k, v) in base.as_object().unwrap() {
        out[k] = v.clone();
    }
    out
}

fn run_one(s: &Scenario, vmm: Vmm, loopback: Loopback, max_bandwidth: u64) -> Result<Value, String> {
    let src = start_source(vmm, s)?;
    wait_lines(src.as_ref(), BOOT_TIMEOUT, |l| steady(s.kind, l)).map_err(|l| {
        format!(
            "{}: the guest did not reach its steady state; serial: {}; stderr: {}",
            vmm.name(),
            tail(&l, 5),
            src.stderr()
        )
    })?;
    src.qmp("migrate-set-parameters", migration_params(vmm, max_bandwidth))?;
    if vmm.multifd() {
        set_multifd(src.as_ref())?;
    }
    if vmm == Vmm::QemuAutoConverge {
        set_capabilities(src.as_ref(), &["auto-converge"])?;
    }
    if vmm == Vmm::QemuPostcopy {
        set_capabilities(src.as_ref(), &["postcopy-ram"])?;
    }
    // Both emu postcopy rows say it, whatever emu's default.
    if matches!(vmm, Vmm::EmuPostcopy | Vmm::EmuPostcopyPreempt) {
        let on = vmm == Vmm::EmuPostcopyPreempt;
        src.qmp(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-preempt", "state": on}]}),
        )?;
    }
    // What the source will migrate with, as it says (the parameters this benchmark sets).
    let all = src.qmp("query-migrate-parameters", json!({}))?;
    let mut params = json!({});
    for k in [
        "downtime-limit",
        "max-bandwidth",
        "multifd-channels",
        "channels",
        "dirty-tracker",
        "max-passes",
        "stall-policy",
        "dirty-rate-limit",
    ] {
        if let Some(v) = all.get(k) {
            params[k] = v.clone();
        }
    }
    if vmm.is_qemu() {
        let caps = src.qmp("query-migrate-capabilities", json!({}))?;
        let on =
            caps.as_array().into_iter().flatten().find(|c| c["capability"] == "multifd").map(|c| c["state"].clone());
        params["multifd"] = on.unwrap_or(Value::Null);
    }
    let (dst, uri) = start_destination(vmm, s)?;
    // The source's reports up to the start of the migration (its lines only grow).
    let lines_before = src.lines().len();
    let rate_before = rate_of(s.kind, &src.lines());
    if vmm == Vmm::EmuPausedOnce {
        src.qmp("stop", json!({}))?;
    }

    src.qmp("migrate", json!({"uri": uri}))?;
    let t0 = Instant::now();
    // When the benchmark sent migrate-start-postcopy (ms after migrate, bytes sent then), and when
    // a poll first saw the source in postcopy.
    let mut switched: Option<(f64, u64)> = None;
    let mut postcopy_seen: Option<Instant> = None;
    let info = loop {
        let info = src.qmp("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("");
        if matches!(status, "completed" | "failed" | "cancelled") {
            break info;
        }
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        if vmm.starts_postcopy() && switched.is_none() && status == "active" && sent >= POSTCOPY_AFTER_BYTES {
            src.qmp("migrate-start-postcopy", json!({}))?;
            switched = Some((t0.elapsed().as_secs_f64() * 1e3, sent));
        }
        if status.starts_with("postcopy") && postcopy_seen.is_none() {
            postcopy_seen = Some(Instant::now());
        }
        if t0.elapsed() > MIGRATION_TIMEOUT {
            let last = info.clone();
            let _ = src.qmp("migrate-cancel", json!({}));
            // Wait for the cancel to land, keeping the last figures of the running migration.
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let i = src.qmp("query-migrate", json!({}))?;
                if matches!(i["status"].as_str(), Some("cancelled" | "failed" | "completed")) {
                    break;
                }
                std::thread::sleep(POLL);
            }
            let mut last = last;
            last["status"] = json!("cancelled-after-timeout");
            break last;
        }
        std::thread::sleep(if vmm.postcopy() { FAST_POLL } else { POLL });
    };
    let done_at = Instant::now();
    let status = info["status"].as_str().unwrap_or("?").to_string();
    let completed = status == "completed";
    // The guest's reports while it migrated: on the source (the first may straddle the start),
    // and in postcopy on the destination until the source said completed.
    let during = src.lines().get(lines_before..).map(|l| l.to_vec()).unwrap_or_default();
    let dst_during = if vmm.postcopy() { dst.lines() } else { Vec::new() };
    let rate_during = {
        let mut r = rates(s.kind, &during);
        r.extend(rates(s.kind, &dst_during));
        if r.is_empty() {
            Value::Null
        } else {
            json!(median(r))
        }
    };
    // The destination's own account of a postcopy, once it says completed too.
    let dst_info = if completed && vmm.postcopy() {
        let deadline = Instant::now() + DESTINATION_COMPLETE_TIMEOUT;
        loop {
            let i = dst.qmp("query-migrate", json!({}))?;
            if i["status"] == "completed" || Instant::now() > deadline {
                break i;
            }
            std::thread::sleep(FAST_POLL);
        }
    } else {
        Value::Null
    };

    // The guest at the destination: goes on, and at what rate (the reports after the migration;
    // the paused guest of the reference does not run there).
    let (after_lines, goes_on, rate_after, dst_status) = if completed && vmm != Vmm::EmuPausedOnce {
        let from = dst_during.len();
        let got = wait_lines(dst.as_ref(), Duration::from_secs(15), |l| steady(s.kind, l.get(from..).unwrap_or(&[])));
        let lines = match got {
            Ok(l) | Err(l) => l.get(from..).map(|l| l.to_vec()).unwrap_or_default(),
        };
        let st = dst.qmp("query-status", json!({})).map(|v| v["status"].clone()).unwrap_or(Value::Null);
        let on = lines.iter().any(|l| workload_line(l));
        (lines.clone(), on, rate_of(s.kind, &lines), st)
    } else {
        (Vec::new(), false, Value::Null, Value::Null)
    };
    let verify_failures = if s.kind == Kind::Verify {
        let last =
            after_lines.iter().rev().find(|l| l.contains("failures=")).and_then(|l| number_after(l, "failures="));
        json!({"failures": last, "fail-lines": after_lines.iter().filter(|l| l.contains("VERIFY-FAIL")).count()})
    } else {
        Value::Null
    };

    let num = |v: &Value| v.as_f64();
    let total_ms = num(&info["total-time"]);
    let downtime_ms = if vmm.is_qemu() { num(&info["downtime"]) } else { num(&info["downtime-us"]).map(|us| us / 1e3) };
    let bytes = num(&info["ram"]["transferred"]);
    let throughput = match (bytes, total_ms) {
        (Some(b), Some(t)) if t > 0.0 => Some(b / t / 1e3),
        _ => None,
    };
    let converged = completed && info["converged"].as_bool() != Some(false);
    let mut out = json!({
        "status": status,
        "converged": converged,
        "completed": completed,
        "total-ms": total_ms,
        "setup-ms": info["setup-time"],
        "downtime-ms": downtime_ms,
        "bytes": bytes,
        "passes": info["ram"]["dirty-sync-count"],
        "throughput-MBps": throughput,
        "of-loopback": throughput.map(|t| t * 1e6 / loopback.hot),
        "guest-rate-before": rate_before,
        "guest-rate-during": rate_during,
        "guest-rate-after": rate_after,
        "guest-goes-on": goes_on,
        "destination-status": dst_status,
        "guest-after": after_lines.iter().rev().find(|l| workload_line(l)),
        "params": params,
        "error-desc": info["error-desc"],
    });
    if s.kind == Kind::Verify {
        out["verify"] = verify_failures;
    }
    if vmm.postcopy() {
        out["postcopy"] = json!({
            "switch-at-ms": switched.map(|s| s.0),
            "switch-at-bytes": switched.map(|s| s.1),
            // The source's ram.postcopy-requests (QEMU's name; emu reports it too).
            "requests": info["ram"]["postcopy-requests"],
            "source": info["postcopy"],
            "destination": dst_info["postcopy"],
            "destination-status": dst_info["status"],
            // QEMU 10.0 with postcopy-blocktime on the destination (ms).
            "blocktime-ms": dst_info["postcopy-blocktime"],
            "vcpu-blocktime-ms": dst_info["postcopy-vcpu-blocktime"],
            "destination-keys": dst_info.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
            "polled-postcopy-ms": postcopy_seen.map(|t| (done_at - t).as_secs_f64() * 1e3),
        });
    }
    if vmm.is_qemu() {
        out["qemu"] = json!({
            "expected-downtime": info["expected-downtime"],
            "ram": info["ram"],
        });
    } else {
        let passes = info["passes"].as_array().cloned().unwrap_or_default();
        out["emu"] = json!({
            "tracker": info["dirty-tracker"],
            "stop-reason": info["stop-reason"],
            "converging": info["converging"],
            "stall-reason": info["stall-reason"],
            "cpu-throttle-percentage": info["cpu-throttle-percentage"],
            "downtime-breakdown-us": info["downtime-breakdown-us"],
            "pass-dirty-pages": passes.iter().map(|p| p["dirty-after"].clone()).collect::<Vec<_>>(),
            "pass-pages-sent": passes.iter().map(|p| p["pages"].clone()).collect::<Vec<_>>(),
            "pass-time-us": passes.iter().map(|p| p["time-us"].clone()).collect::<Vec<_>>(),
            // Everything emu says per pass (send-us, read-us, bandwidth-wait-us where it has them).
            "passes": passes,
            "duplicate": info["ram"]["duplicate"],
            "normal": info["ram"]["normal"],
        });
    }
    let _ = dst.qmp("quit", json!({}));
    let _ = src.qmp("quit", json!({}));
    Ok(out)
}

// ---- the host ----------------------------------------------------------------------------------------

/// CPU time (user + system, clock ticks) of every process but this one, by pid, with its name.
fn cpu_ticks() -> Vec<(u32, String, u64)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after comm.
        let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        out.push((pid, comm, ticks));
    }
    out
}

/// What other processes keep the host busy with, over one second while this benchmark runs no VM:
/// the cores they use in all, and the busiest of them. On a 2-core host a compile, a test suite or
/// a forgotten guest during the run changes every figure, the ratios included (it takes more from
/// a VMM with fewer busy threads).
fn host_load(when: &str) -> Value {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let a = cpu_ticks();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let b = cpu_ticks();
    let secs = t0.elapsed().as_secs_f64();
    let mut busy: Vec<(f64, String)> = b
        .iter()
        .filter_map(|(pid, comm, t)| {
            let before = a.iter().find(|(p, _, _)| p == pid).map(|x| x.2)?;
            let cores = t.saturating_sub(before) as f64 / hz / secs;
            (cores > 0.0).then(|| (cores, format!("{comm} ({pid})")))
        })
        .collect();
    busy.sort_by(|x, y| y.0.total_cmp(&x.0));
    // (A sum of nothing is -0.0.)
    let total: f64 = busy.iter().map(|x| x.0).fold(0.0, |a, b| a + b);
    let top: Vec<Value> =
        busy.iter().take(3).map(|(c, n)| json!({"process": n, "cores": (c * 100.0).round() / 100.0})).collect();
    let v = json!({"bench": "host-load", "when": when, "other-processes-cores": (total * 100.0).round() / 100.0, "busiest": top});
    emit(v.clone());
    v
}

// ---- the benchmark --------------------------------------------------------------------------------

pub fn vs_qemu(args: &[String]) {
    let mut rounds = None;
    let mut names: Vec<&str> = Vec::new();
    let mut capped = false;
    let mut postcopy = false;
    let mut emu_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().and_then(|n| n.parse().ok()),
            "--capped" => capped = true,
            "--postcopy" => postcopy = true,
            "--emu-only" => emu_only = true,
            other => names.push(other),
        }
    }
    if capped {
        // Each round takes minutes (QEMU precopy runs into the 60 s timeout): one by default.
        return vs_qemu_capped(rounds.unwrap_or(1));
    }
    if postcopy {
        // Minutes a round too (the throttled precopy row alone takes most of one).
        return if emu_only { postcopy::run_emu_only(rounds.unwrap_or(1)) } else { postcopy::run(rounds.unwrap_or(1)) };
    }
    let rounds = rounds.unwrap_or(ROUNDS);
    let scenarios: Vec<&Scenario> = SCENARIOS.iter().filter(|s| names.is_empty() || names.contains(&s.name)).collect();
    if scenarios.is_empty() {
        eprintln!("no scenario among {names:?}; scenarios: {:?}", SCENARIOS.iter().map(|s| s.name).collect::<Vec<_>>());
        std::process::exit(2);
    }
    let (version, revision, started) = begin("vs-qemu", rounds);
    let mut loads = vec![host_load("start")];
    let loop_before = measure_loopback("before");
    let mut runs: Vec<Value> = Vec::new();
    for s in &scenarios {
        if s.name != scenarios[0].name {
            loads.push(host_load(&format!("before {}", s.name)));
        }
        for round in 0..rounds {
            let mut this: Vec<Value> =
                order(VMMS, round).iter().map(|&v| run(s, v, round + 1, loop_before, 0)).collect();
            let reference = this
                .iter()
                .find(|r| r["vmm"] == REFERENCE.name() && r["completed"] == true)
                .and_then(|r| r["total-ms"].as_f64());
            for r in &mut this {
                r["ratio-to-qemu-multifd4"] = match (r["completed"].as_bool(), r["total-ms"].as_f64(), reference) {
                    (Some(true), Some(t), Some(q)) if q > 0.0 => json!(t / q),
                    _ => Value::Null,
                };
                emit(r.clone());
            }
            runs.extend(this);
        }
    }
    let loop_after = measure_loopback("after");
    loads.push(host_load("end"));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    emit(json!({"bench": "vs-qemu", "done": true, "minutes": minutes}));

    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let _ = std::fs::create_dir_all(&docs);
    let run = RunInfo {
        version: &version,
        revision: &revision,
        before: loop_before,
        after: loop_after,
        minutes,
        rounds,
        loads: &loads,
    };
    let md = report(&run, &scenarios, &runs);
    if let Err(e) = std::fs::write(docs.join("vs-qemu.md"), md) {
        eprintln!("cannot write docs/vs-qemu.md: {e}");
    }
    if let Err(e) = plot_emu_dirty_per_pass(&runs, &docs.join("vs-qemu-dirty-per-pass.svg")) {
        eprintln!("cannot write the plot: {e}");
    }
}

/// The VMMs' order in `round` (from 0): as given, reversed in every second round.
fn order(vmms: &[Vmm], round: usize) -> Vec<Vmm> {
    if round.is_multiple_of(2) {
        vmms.to_vec()
    } else {
        vmms.iter().rev().copied().collect()
    }
}

/// `vmms` on `s`, `rounds` times, alternating; each run emitted as it ends.
fn alternate(s: &Scenario, vmms: &[Vmm], rounds: usize, loopback: Loopback, max_bandwidth: u64) -> Vec<Value> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        for v in order(vmms, round) {
            let r = run(s, v, round + 1, loopback, max_bandwidth);
            emit(r.clone());
            runs.push(r);
        }
    }
    runs
}

/// The start of a run: the binary and image frozen, QEMU's version and emu's revision, the first
/// JSON line (`bench` names the mode); the versions and when it started.
fn begin(bench: &str, rounds: usize) -> (String, String, Instant) {
    let version = qemu_version();
    if let Err(e) = freeze() {
        eprintln!("vs-qemu: {e}");
        std::process::exit(1);
    }
    let revision = emu_revision();
    emit(json!({"bench": bench, "machine": machine(), "qemu": version, "emu": revision, "rounds": rounds}));
    (version, revision, Instant::now())
}

/// QEMU's first `--version` line (or why there is none).
fn qemu_version() -> String {
    Command::new(QEMU)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_else(|e| format!("{QEMU}: {e}"))
}

/// `--capped`: 1 GiB `dirty:256:0` over a link held to 100 MiB/s, where plain precopy cannot converge:
/// QEMU precopy and auto-converge against emu's dirty-rate limiting and its throttling, alternating.
/// Writes docs/vs-qemu-capped.md.
fn vs_qemu_capped(rounds: usize) {
    let (version, revision, started) = begin("vs-qemu-capped", rounds);
    let loopback = measure_loopback("before");
    let runs = alternate(&CAPPED_SCENARIO, CAPPED_VMMS, rounds, loopback, CAPPED_BANDWIDTH);
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let mut md = format!(
        "# A writer that outruns its link: emu against QEMU\n\nMade by `scripts/bench-vs-qemu.sh --capped` (`emu-bench \
         vs-qemu --capped`) in {minutes:.1} minutes: {}. {version}; emu {revision}. {rounds} round(s), the VMMs \
         alternating.\n\nThe guest: {MEM}, `wl={}` (stores one word into each of 256 MiB of pages, as fast as it \
         can), migrated over TCP on 127.0.0.1 with `max-bandwidth` {} MiB/s and a {DOWNTIME_LIMIT_MS} ms downtime \
         limit. The guest dirties pages hundreds of times faster than the link sends them, so precopy alone cannot \
         converge. `qemu-precopy`: QEMU's defaults (it iterates until cancelled, here after {} s); \
         `qemu-auto-converge`: its `auto-converge` capability (throttling from 20% in 10% steps); \
         `emu-uffd-wp-dirty-rate-limit`: emu with the uffd-wp tracker and `dirty-rate-limit` {CAPPED_DIRTY_RATE} \
         pages/s (a quarter of the link), held in the fault path from the migration's start; `emu-throttle`: emu's \
         default tracker and stall policy (auto-converge by throttling, from 20% in 10% steps). Guest rate: its own \
         once-a-second reports (pages written per second), median before, during and after the migration.\n\n",
        machine(),
        CAPPED_SCENARIO.name,
        CAPPED_BANDWIDTH >> 20,
        MIGRATION_TIMEOUT.as_secs(),
    );
    md += "| VMM | round | status | total ms | downtime ms | MB sent | passes | guest rate before / during / after (pages/s) |\n";
    md += "|---|---|---|---|---|---|---|---|\n";
    for r in &runs {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["vmm"].as_str().unwrap_or("?"),
            r["round"],
            r["status"].as_str().unwrap_or("?"),
            num(&r["total-ms"], 0),
            num(&r["downtime-ms"], 1),
            mb(&r["bytes"]),
            r["passes"],
            rates_cell(r),
        );
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    if let Err(e) = std::fs::write(docs.join("vs-qemu-capped.md"), md) {
        eprintln!("cannot write docs/vs-qemu-capped.md: {e}");
    }
}

// ---- the report -----------------------------------------------------------------------------------

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn rate(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1e6 => format!("{:.2}M", x / 1e6),
        Some(x) if x >= 1e3 => format!("{:.1}k", x / 1e3),
        Some(x) => format!("{x:.0}"),
        None => "-".into(),
    }
}

fn converged_cell(r: &Value) -> String {
    if r.get("error").is_some() {
        return "error".into();
    }
    let status = r["status"].as_str().unwrap_or("?");
    let throttle = match r["emu"]["cpu-throttle-percentage"].as_u64() {
        Some(t) if t > 0 => format!(", throttled {t}%"),
        _ => String::new(),
    };
    match (r["converged"].as_bool(), r["emu"]["stop-reason"].as_str()) {
        (Some(true), _) => format!("yes{throttle}"),
        (_, Some(why)) if status == "completed" => format!("no ({why}: forced switchover{throttle})"),
        _ => format!("no ({status})"),
    }
}

/// MB sent (one decimal below 10 MB).
fn mb(v: &Value) -> String {
    v.as_f64().map(|b| format!("{:.prec$}", b / 1e6, prec = if b < 1e7 { 1 } else { 0 })).unwrap_or("-".into())
}

/// The guest's rate before / during / after the migration.
fn rates_cell(r: &Value) -> String {
    format!("{} / {} / {}", rate(&r["guest-rate-before"]), rate(&r["guest-rate-during"]), rate(&r["guest-rate-after"]))
}

/// The host-load checks of a run, as a sentence (and a warning when the host was busy).
fn loads_text(loads: &[Value]) -> String {
    let checks: Vec<String> = loads
        .iter()
        .map(|l| {
            let top: Vec<String> = l["busiest"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["cores"].as_f64().unwrap_or(0.0) >= 0.05)
                .map(|b| format!("{} {}", b["process"].as_str().unwrap_or("?"), b["cores"]))
                .collect();
            format!(
                "{}: {:.2}{}",
                l["when"].as_str().unwrap_or("?"),
                l["other-processes-cores"].as_f64().unwrap_or(0.0),
                if top.is_empty() { String::new() } else { format!(" ({})", top.join(", ")) }
            )
        })
        .collect();
    let mut md = String::from(
        "Other processes on the host, over one second at the start, between scenarios and at the end (cores in use, \
         and the busiest): ",
    );
    md += &checks.join("; ");
    let worst = loads.iter().filter_map(|l| l["other-processes-cores"].as_f64()).fold(0.0, f64::max);
    if worst >= 0.5 {
        md += &format!(
            ". **The host was not quiet**: up to {worst:.1} of its {} cores went to other processes at a check, so \
             every figure below, the ratios included, is disturbed (a VMM with fewer busy threads loses more to them).",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
    }
    md
}

/// What the report says about the run as a whole.
struct RunInfo<'a> {
    version: &'a str,
    revision: &'a str,
    before: Loopback,
    after: Loopback,
    minutes: f64,
    rounds: usize,
    /// `host_load` at the start, between scenarios and at the end.
    loads: &'a [Value],
}

fn report(run: &RunInfo, scenarios: &[&Scenario], runs: &[Value]) -> String {
    let RunInfo { version, revision, before, after, minutes, rounds, loads } = *run;
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let stall = runs.iter().find_map(|r| r["params"]["stall-policy"].as_str()).unwrap_or("?");
    let mut md = String::from("# emu against QEMU, measured\n\n");
    md += &format!(
        "Made by `scripts/bench-vs-qemu.sh` (`emu-bench vs-qemu`) on {date}, in {minutes:.1} minutes: {}. {version}; \
         emu {revision}.\n\n",
        machine()
    );
    md += &format!(
        "Reference of this run, single-stream TCP loopback: {:.0} MB/s before, {:.0} MB/s after (into fresh memory, as a \
         destination receives: {:.0} / {:.0} MB/s). The host's speed varies by 2x between days and by tens of percent \
         within an hour, so compare the ratios (last column: total time over QEMU multifd-4's in the same round), not \
         the milliseconds, with other days. Another engineer builds and tests on this 2-core machine at times; a \
         compile during a run slows whatever migration runs then, which is one reason for the {rounds} round(s), the \
         order of the VMMs reversed in every second one.\n\n",
        before.hot / 1e6,
        after.hot / 1e6,
        before.fresh / 1e6,
        after.fresh / 1e6
    );
    md += &loads_text(loads);
    md += "\n\n";
    md += &format!(
        "Setup, the same for every VMM: the guest `target/guest-images/emu-guest32.elf` (QEMU: `-kernel IMAGE \
         -append wl=...`; emu: `--guest IMAGE --append wl=...`), {MEM} of RAM, one vCPU, migrated over TCP on \
         127.0.0.1 to a destination started on the same host once the source's guest is steady; downtime limit \
         {DOWNTIME_LIMIT_MS} ms on both; no bandwidth limit (QEMU: `max-bandwidth` 0, which QEMU 8.1 and later treat as \
         unlimited, `RATE_LIMIT_DISABLED` in `migration/migration-stats.c`; its default is 128 MiB/s). QEMU runs with \
         `-enable-kvm -cpu host,-arch-capabilities -m {MEM} -nographic -monitor none -serial file:... -qmp unix:...` and \
         `-incoming defer` + `migrate-incoming` on the destination; `qemu-multifd4` sets the `multifd` capability and \
         `multifd-channels` {MULTIFD_CHANNELS} on both sides. `emu-kvm-dirty-log` and `emu-uffd-wp-async` are emu \
         with its defaults ({} channels, compression off) and that tracker (`{}` is the default); `emu-1-channel` is \
         emu's defaults with one channel. A migration still running after \
         {} s is cancelled and reported as not converged (QEMU has no pass limit; emu forces the switchover after \
         `max-passes` 30, which it reports as not converged either). Everything else is each VMM's default: QEMU \
         without auto-converge; emu with `stall-policy` {stall} (auto-converge once passes stop paying; *converged* \
         says when it throttled). The emu binary and the guest image are copied at the start of the run, so a \
         rebuild during it does not change them.\n\n",
        migrate::sender::DEFAULT_CHANNELS,
        migrate::sender::DEFAULT_TRACKER.name(),
        MIGRATION_TIMEOUT.as_secs()
    );
    md += "Columns: *total* and *downtime* as each VMM reports them in `query-migrate` (QEMU: whole ms); *MB sent* \
           `ram.transferred` (QEMU counts multifd bytes in it); *passes* `ram.dirty-sync-count`; *guest rate* pages \
           written per second by the guest (its own once-a-second report: `rate=` of `dirty`, the growth of \
           `written=` of `verify`), median of the reports before the migration on the source, during it on the \
           source (migrations shorter than a second have none) and after it on the destination (the first report \
           of each side left out); *goes on*: a workload line came from the \
           destination after the migration.\n\n";
    for s in scenarios {
        md += &format!("## `wl={}`\n\n", s.name);
        md += "| VMM | round | total ms | downtime ms | MB sent | passes | converged | guest rate before / during / after (pages/s) | goes on | ratio to qemu-multifd4 |\n|---|---|---|---|---|---|---|---|---|---|\n";
        for vmm in VMMS {
            for r in runs.iter().filter(|r| r["scenario"] == s.name && r["vmm"] == vmm.name()) {
                let mut goes_on = if r["guest-goes-on"] == true { "yes".to_string() } else { "no".to_string() };
                if s.kind == Kind::Verify && r["guest-goes-on"] == true {
                    goes_on += &format!(", failures={}", r["verify"]["failures"]);
                }
                md += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    vmm.name(),
                    r["round"],
                    num(&r["total-ms"], 0),
                    num(&r["downtime-ms"], 1),
                    mb(&r["bytes"]),
                    r["passes"].as_u64().map(|p| p.to_string()).unwrap_or("-".into()),
                    converged_cell(r),
                    rates_cell(r),
                    goes_on,
                    num(&r["ratio-to-qemu-multifd4"], 2),
                );
            }
        }
        let errors: Vec<String> = runs
            .iter()
            .filter(|r| r["scenario"] == s.name && r.get("error").is_some())
            .map(|r| format!("- {} round {}: {}\n", r["vmm"].as_str().unwrap_or("?"), r["round"], r["error"]))
            .collect();
        if !errors.is_empty() {
            md += "\nErrors:\n\n";
            md += &errors.concat();
        }
        md += "\n";
    }
    md += "## emu's passes\n\nPer emu run: pages sent and dirty pages left after each pass, time per pass, of it the \
           time spent handing records to the socket (`send-us`; the rest is reading pages and finding zero ones), and \
           where the downtime went (`downtime-breakdown-us`). QEMU reports no per-pass figures, so it is not in this \
           table nor in the plot.\n\n";
    md += "| scenario | VMM | round | stop reason | pages sent per pass | dirty pages left per pass | ms per pass | of it in socket writes (ms) | downtime breakdown (us) |\n|---|---|---|---|---|---|---|---|---|\n";
    for s in scenarios {
        for r in runs.iter().filter(|r| r["scenario"] == s.name && r.get("emu").is_some()) {
            let e = &r["emu"];
            let ms: Vec<String> = e["pass-time-us"]
                .as_array()
                .map(|a| a.iter().map(|v| format!("{:.1}", v.as_f64().unwrap_or(0.0) / 1e3)).collect())
                .unwrap_or_default();
            let send: Vec<String> = e["passes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| p["send-us"].as_f64().map(|v| format!("{:.1}", v / 1e3)).unwrap_or("-".into()))
                        .collect()
                })
                .unwrap_or_default();
            let breakdown = e["downtime-breakdown-us"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                r["vmm"].as_str().unwrap_or("?"),
                r["round"],
                e["stop-reason"].as_str().unwrap_or("-"),
                e["pass-pages-sent"],
                e["pass-dirty-pages"],
                ms.join(", "),
                send.join(", "),
                breakdown,
            );
        }
    }
    md += "\n![emu: dirty pages left per pass](vs-qemu-dirty-per-pass.svg)\n\n(emu only: QEMU does not report its \
           passes one by one, only their count.)\n";
    md
}

/// emu's dirty pages left after each pass, per emu variant and round, for the writing scenarios.
fn plot_emu_dirty_per_pass(runs: &[Value], path: &Path) -> Result<(), emu_plot::PlotError> {
    let panels = SCENARIOS
        .iter()
        .filter(|s| s.kind != Kind::Idle)
        .map(|s| emu_plot::Panel {
            caption: format!("wl={}", s.name),
            series: runs
                .iter()
                .filter(|r| r["scenario"] == s.name && r["emu"]["pass-dirty-pages"].is_array())
                .map(|r| {
                    let name = format!("{} r{}", r["vmm"].as_str().unwrap_or("?"), r["round"]);
                    (name, emu_plot::points(&r["emu"]["pass-dirty-pages"]))
                })
                .collect(),
        })
        .collect();
    emu_plot::dirty_per_pass(path, panels)
}
