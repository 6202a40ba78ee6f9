//! The harness the end-to-end tests (`tests/`) and the benchmarks (`emu-bench`) share: runs real
//! `emu` processes (real KVM, real sockets), talks to their monitors, and reads what the kernel
//! says about them (/proc). `proxy` sits between a migration's two ends and breaks things.

pub mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The emu binary: `$EMU` if set, else the one cargo built beside the running executable
/// (`target/*/emu` next to `emu-bench`, or one directory up from a test in `target/*/deps`).
pub fn emu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EMU") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the path of the running executable");
    let dir = exe.parent().expect("an executable lives in a directory");
    [dir.join("emu"), dir.join("../emu")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no emu binary beside {} (cargo build, or set EMU)", exe.display()))
}

/// The guest images the build made.
pub fn guest_image(name: &str) -> PathBuf {
    Path::new(guest_images::IMAGE_DIR).join(name)
}

/// Whether tests that need KVM can run. Under `CI=true` a missing /dev/kvm fails the test; elsewhere
/// the test says why it did not run and passes.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: /dev/kvm is not usable ({e}); CI must run on a host with KVM")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e}); this test boots real guests under KVM");
            false
        }
    }
}

#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_or_skip(concat!(module_path!(), ":", line!())) {
            return;
        }
    };
}

/// A scratch directory removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ScratchDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p =
            std::env::temp_dir().join(format!("emu-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        ScratchDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

fn collect_lines(r: impl std::io::Read + Send + 'static, into: Lines) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

/// A running emu process: its serial output (stdout) and stderr as lines, and its monitor.
pub struct Emu {
    child: Child,
    pub dir: ScratchDir,
    out: Lines,
    err: Lines,
    monitor: PathBuf,
    exit: Option<i32>,
}

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

impl Emu {
    /// Starts `emu ARGS --monitor unix:...` with serial output on stdout.
    pub fn spawn(args: &[&str]) -> Emu {
        Self::spawn_with(args, true)
    }

    /// Starts `emu ARGS`, with a monitor socket in its scratch directory if `monitor`.
    pub fn spawn_with(args: &[&str], monitor_socket: bool) -> Emu {
        let dir = ScratchDir::new();
        let monitor = dir.path("monitor.sock");
        let mut cmd = Command::new(emu_bin());
        cmd.args(args);
        if monitor_socket {
            cmd.arg("--monitor").arg(format!("unix:{}", monitor.display()));
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start emu");
        let (out, err) = (Lines::default(), Lines::default());
        collect_lines(child.stdout.take().unwrap(), out.clone());
        collect_lines(child.stderr.take().unwrap(), err.clone());
        Emu { child, dir, out, err, monitor, exit: None }
    }

    /// Boots a guest and waits for its monitor.
    pub fn boot(args: &[&str]) -> Emu {
        let emu = Emu::spawn(args);
        assert!(emu.wait_monitor(BOOT_TIMEOUT), "emu {args:?} did not come up; stderr: {}", emu.stderr());
        emu
    }

    /// Starts a destination on an ephemeral port; returns it and the URI to migrate to.
    pub fn incoming(extra: &[&str]) -> (Emu, String) {
        let mut args = vec!["--incoming", "tcp:127.0.0.1:0"];
        args.extend_from_slice(extra);
        let emu = Emu::spawn(&args);
        let uri = emu.listening_uri();
        (emu, uri)
    }

    /// Starts a destination listening at `uri` (a `unix:` path, say); returns it and the URI it
    /// reports.
    pub fn incoming_at(uri: &str, extra: &[&str]) -> (Emu, String) {
        let mut args = vec!["--incoming", uri];
        args.extend_from_slice(extra);
        let emu = Emu::spawn(&args);
        let uri = emu.listening_uri();
        (emu, uri)
    }

    /// Starts a destination with `--incoming defer` and waits for its monitor: it listens once
    /// told to (`migrate-incoming`, then [`Emu::listening_uri`]).
    pub fn incoming_deferred(extra: &[&str]) -> Emu {
        let mut args = vec!["--incoming", "defer"];
        args.extend_from_slice(extra);
        let emu = Emu::spawn(&args);
        assert!(emu.wait_monitor(BOOT_TIMEOUT), "emu {args:?} did not come up; stderr: {}", emu.stderr());
        emu
    }

    /// The address a destination listens on, from its stderr (a `tcp:...:0` gets a port there).
    pub fn listening_uri(&self) -> String {
        let line = self
            .wait_stderr(|l| l.contains("waiting for an incoming migration on "), BOOT_TIMEOUT)
            .unwrap_or_else(|| panic!("destination did not start listening; stderr: {}", self.stderr()));
        line.rsplit(' ').next().unwrap().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    pub fn line_count(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().join("\n")
    }

    fn wait_in(lines: &Lines, from: usize, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = lines.lock().unwrap().iter().skip(from).find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first serial line at index `from` or later that matches.
    pub fn wait_line_from(&self, from: usize, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        Self::wait_in(&self.out, from, pred, timeout)
    }

    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.wait_line_from(0, pred, timeout)
    }

    /// Waits for a serial line containing `text`, failing the test with the output so far if none comes.
    pub fn expect_line(&self, text: &str, timeout: Duration) -> String {
        self.wait_line(|l| l.contains(text), timeout)
            .unwrap_or_else(|| panic!("no line with {text:?}; serial:\n{}\nstderr:\n{}", self.output(), self.stderr()))
    }

    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        Self::wait_in(&self.err, 0, pred, timeout)
    }

    pub fn wait_monitor(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if UnixStream::connect(&self.monitor).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The monitor socket.
    pub fn monitor_path(&self) -> &Path {
        &self.monitor
    }

    /// A negotiated monitor connection of its own, which also hears events.
    pub fn qmp_client(&self) -> Result<Qmp, String> {
        Qmp::connect(&self.monitor)
    }

    /// One monitor command on a connection of its own; `Err` carries the error's description.
    pub fn qmp(&self, command: &str, arguments: Value) -> Result<Value, String> {
        self.qmp_client()?.call(command, arguments)
    }

    pub fn qmp_ok(&self, command: &str, arguments: Value) -> Value {
        self.qmp(command, arguments).unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    pub fn status(&self) -> String {
        self.qmp_ok("query-status", json!({}))["status"].as_str().unwrap().to_string()
    }

    /// Waits for the process to end; its exit code (None if killed by a signal or still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.exit = s.code();
                // let the reader threads catch the last lines
                std::thread::sleep(Duration::from_millis(50));
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CRC of all guest RAM, page by page; meaningful while the guest is paused.
    pub fn ram_digest(&self) -> Value {
        self.qmp_ok("query-ram-digest", json!({"pages": true}))
    }

    /// Names of the process's threads.
    pub fn thread_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in tasks.flatten() {
                if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                    names.push(n.trim().to_string());
                }
            }
        }
        names
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill();
        }
    }
}

/// A negotiated QMP connection: commands, and the events that arrive meanwhile (kept in order
/// until someone waits for them).
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp, String> {
        let conn = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let w = conn.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp { w, r: BufReader::new(conn), next_id: 0, events: Vec::new() };
        let greeting = q.message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no greeting: {greeting}"));
        }
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err("the monitor closed the connection".to_string()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad message {line:?}: {e}")),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// One command; `Err` carries the error's description. Events that come first are kept.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = json!(self.next_id);
        // A wait for an event may have shortened it.
        self.r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let request = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.w, "{request}").map_err(|e| e.to_string())?;
        loop {
            let m = self.message()?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("id") != Some(&id) {
                return Err(format!("a reply to another request: {m}"));
            }
            return match (m.get("return"), m.get("error")) {
                (Some(v), _) => Ok(v.clone()),
                (_, Some(e)) => Err(e["desc"].as_str().unwrap_or("?").to_string()),
                _ => Err(format!("reply without return or error: {m}")),
            };
        }
    }

    pub fn call_ok(&mut self, command: &str, arguments: Value) -> Value {
        self.call(command, arguments).unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    /// The first event `name` (kept, or arriving within `timeout`) for which `pred` holds, and the
    /// events before it (they stay in `events`, so later waits see them too). Fails the test with
    /// the events seen if none comes.
    pub fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let matches = |e: &Value| e["event"] == name && pred(e);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.iter().find(|e| matches(e)) {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {name} event in {timeout:?}; events: {:?}", self.events);
            self.r.get_ref().set_read_timeout(Some(left)).expect("set a read timeout");
            match self.message() {
                Ok(m) if m.get("event").is_some() => self.events.push(m),
                Ok(m) => panic!("a reply while waiting for {name}: {m}"),
                Err(e) if e.contains("timed out") || e.contains("temporarily unavailable") => {}
                Err(e) => panic!("waiting for {name}: {e}; events: {:?}", self.events),
            }
        }
    }

    /// The names of the events so far, in order.
    pub fn event_names(&self) -> Vec<String> {
        self.events.iter().map(|e| e["event"].as_str().unwrap_or("?").to_string()).collect()
    }
}

/// Runs emu to completion (killing it after `timeout`); returns (exit code, stdout, stderr).
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut emu = Emu::spawn_with(args, false);
    let code = emu.wait_exit(timeout);
    if code.is_none() {
        emu.kill();
    }
    (code, emu.output(), emu.stderr())
}

/// Starts a migration and polls `query-migrate` until it ends; returns the last answer.
pub fn migrate(src: &Emu, uri: &str, timeout: Duration) -> Value {
    src.qmp_ok("migrate", json!({"uri": uri}));
    wait_migration(src, timeout)
}

/// Polls `query-migrate` on `emu` until its status is `want` (a side of a postcopy, say).
pub fn wait_migration_status(emu: &Emu, want: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = emu.qmp_ok("query-migrate", json!({}));
        if info["status"] == want {
            return info;
        }
        assert!(Instant::now() < deadline, "status never became {want}: {info}\n{}", emu.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_migration(src: &Emu, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = src.qmp_ok("query-migrate", json!({}));
        let status = info["status"].as_str().unwrap_or("");
        if matches!(status, "completed" | "failed" | "cancelled") {
            return info;
        }
        assert!(Instant::now() < deadline, "migration did not end in {timeout:?}: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Numbers after `key=` in a line: `field("tick 5 up=1.0", "tick ")`.
pub fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// One mapping of a process, from /proc/PID/smaps.
#[derive(Clone, Debug)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `rw-p`, `r--p`, ...
    pub perms: String,
    /// The path or `[heap]`-style name; empty for anonymous memory.
    pub name: String,
    /// The `VmFlags:` line's two-letter flags (`rd wr mr mw me nr uw ...`).
    pub flags: Vec<String>,
}

impl Vma {
    /// Bytes mapped.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

impl std::fmt::Display for Vma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{:x} {} {} [{}]", self.start, self.end, self.perms, self.name, self.flags.join(" "))
    }
}

/// Every mapping of process `pid`.
pub fn vmas(pid: u32) -> Vec<Vma> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/smaps: {e}"));
    let mut out: Vec<Vma> = Vec::new();
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(v) = out.last_mut() {
                v.flags = flags.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        // A mapping's header: "start-end perms offset dev inode [name]"; other lines are "Key: value".
        let mut fields = line.split_whitespace();
        let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else { continue };
        let perms = fields.next().unwrap_or("").to_string();
        let name = fields.nth(3).unwrap_or("").to_string();
        out.push(Vma { start, end, perms, name, flags: Vec::new() });
    }
    out
}

/// The mappings that hold the guest RAM of emu process `pid`, whose guest has `ram_bytes` of RAM
/// below 3 GiB (one region).
///
/// migrate/src/ram.rs maps each region as anonymous memory with MAP_NORESERVE: smaps shows it
/// without a name and with VmFlags `nr`. mprotect (the mprotect tracker) splits it into several
/// mappings, readable throughout; the C library's own MAP_NORESERVE mappings (malloc arenas) are
/// partly inaccessible (`---p`) and smaller. So guest RAM is the one run of adjacent, readable,
/// anonymous `nr` mappings that adds up to exactly `ram_bytes`; finding none or several fails the
/// test with the candidates, rather than checking the wrong memory.
pub fn guest_ram_vmas(pid: u32, ram_bytes: u64) -> Vec<Vma> {
    let all = vmas(pid);
    let candidate = |v: &Vma| v.name.is_empty() && v.has_flag("nr") && v.perms.starts_with('r');
    let mut runs: Vec<Vec<Vma>> = Vec::new();
    for v in all.iter().filter(|v| candidate(v)) {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|last| last.end == v.start) => run.push(v.clone()),
            _ => runs.push(vec![v.clone()]),
        }
    }
    let total = |run: &[Vma]| run.iter().map(Vma::size).sum::<u64>();
    let mut ram: Vec<Vec<Vma>> = runs.iter().filter(|r| total(r) == ram_bytes).cloned().collect();
    if ram.len() != 1 {
        let listed: Vec<String> =
            runs.iter().map(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" + ")).collect();
        panic!(
            "{} runs of anonymous MAP_NORESERVE mappings of {ram_bytes} bytes in emu {pid}, 1 expected; \
             candidates:\n{}",
            ram.len(),
            listed.join("\n")
        );
    }
    ram.remove(0)
}

/// PM_UFFD_WP in a /proc/PID/pagemap entry: the page (present, swapped or a never-populated page's
/// marker) is write-protected by userfaultfd.
pub const PM_UFFD_WP: u64 = 1 << 57;

/// Addresses of the pages in [start, end) of process `pid` whose pagemap entry has PM_UFFD_WP.
pub fn uffd_wp_pages(pid: u32, start: u64, end: u64) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .unwrap_or_else(|e| panic!("cannot open /proc/{pid}/pagemap: {e}"));
    let mut protected = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = start >> 12;
    while page < end >> 12 {
        let n = (buf.len() as u64 / 8).min((end >> 12) - page) as usize;
        pagemap
            .read_exact_at(&mut buf[..n * 8], page * 8)
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/pagemap at page {page:#x}: {e}"));
        for (i, entry) in buf[..n * 8].chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & PM_UFFD_WP != 0 {
                protected.push((page + i as u64) << 12);
            }
        }
        page += n as u64;
    }
    protected
}

/// What is left write-protected of the guest RAM (`ram_bytes`) of emu process `pid`: mappings of
/// it that are not writable (mprotect) or still registered with a userfaultfd, and pages with the
/// userfaultfd write-protect bit. Empty when nothing is.
pub fn ram_protection_left(pid: u32, ram_bytes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for v in guest_ram_vmas(pid, ram_bytes) {
        if !v.perms.starts_with("rw") {
            problems.push(format!("guest RAM mapping not writable: {v}"));
        }
        // `uw`: still registered for userfaultfd write-protect faults, so a tracker was left behind
        // (a stopped one unregisters; closing its userfaultfd would too).
        if v.has_flag("uw") {
            problems.push(format!("guest RAM mapping still registered with a userfaultfd: {v}"));
        }
        let wp = uffd_wp_pages(pid, v.start, v.end);
        if !wp.is_empty() {
            problems.push(format!(
                "{} pages of guest RAM mapping {v} are uffd write-protected, the first at {:#x}",
                wp.len(),
                wp[0]
            ));
        }
    }
    problems
}
