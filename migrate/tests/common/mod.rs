//! Fakes for the migration tests that need no /dev/kvm: a source VM and a destination VM over real
//! anonymous `GuestRam`, a scripted dirty tracker, a hand-written destination that speaks the
//! stream itself, and temporary `unix:` addresses. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migrate::handover::{Decision, Handover};
use migrate::incoming::IncomingServer;
use migrate::progress::{Progress, Status};
use migrate::ram::{GuestRam, RamLayout, RamRegion, PAGE_SIZE};
use migrate::receiver;
use migrate::sender::{MigrationParams, Outgoing};
use migrate::stream::{Decoder, Encoder, Record, RecordType, Resolution, ResolveAction, StreamHeader};
use migrate::tracker::{DirtyTracker, TrackerError, TrackerFactory, TrackerKind};
use migrate::transport::Uri;
use migrate::vm::{MachineState, MigratableVm, RestorableVm, VmError};
use migrate::PageBitmap;

/// The longest any single wait in these tests may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Addresses

/// A directory of its own per test, for `unix:` sockets; removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        // Short: a unix socket path must fit in 108 bytes.
        let p = std::env::temp_dir().join(format!("emu-mt-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create a temporary directory");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn uri(&self, name: &str) -> Uri {
        Uri::Unix(self.path(name))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// RAM

pub fn ram(layout: RamLayout) -> Arc<GuestRam> {
    Arc::new(GuestRam::new(layout).expect("map guest RAM"))
}

/// One region of `pages` pages at guest-physical 0.
pub fn flat_ram(pages: usize) -> Arc<GuestRam> {
    ram(RamLayout::new(vec![RamRegion { gpa: 0, size: (pages * PAGE_SIZE) as u64 }]).expect("layout"))
}

/// Two regions with a hole between them, so that page numbering and region ends are exercised.
pub fn split_layout() -> RamLayout {
    RamLayout::new(vec![RamRegion { gpa: 0, size: 2 << 20 }, RamRegion { gpa: 4 << 20, size: 1 << 20 }])
        .expect("layout")
}

/// The contents of page `page` at generation `generation`: never zero, different for every page
/// and every generation.
pub fn pattern(page: usize, generation: u32) -> Vec<u8> {
    let mut b: Vec<u8> = (0..PAGE_SIZE).map(|i| (page * 31 + generation as usize * 13 + i) as u8).collect();
    b[..8].copy_from_slice(&(page as u64).to_le_bytes());
    b[8..12].copy_from_slice(&generation.to_le_bytes());
    b[12] = 0xee;
    b
}

/// How [`fill`] leaves page `page`: some never touched (zero, and the host's page tables say so),
/// some written with zeroes (zero, but present), the rest data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    Untouched,
    WrittenZero,
    Data,
}

pub fn initial(page: usize) -> Initial {
    match page % 7 {
        3 => Initial::Untouched,
        5 => Initial::WrittenZero,
        _ => Initial::Data,
    }
}

/// Fills RAM as [`initial`] says (generation 0 for data pages).
pub fn fill(ram: &GuestRam) {
    for p in 0..ram.page_count() {
        let gpa = ram.layout().gpa_of(p);
        match initial(p) {
            Initial::Untouched => {}
            Initial::WrittenZero => ram.write(gpa, &[0u8; PAGE_SIZE]).expect("write RAM"),
            Initial::Data => ram.write(gpa, &pattern(p, 0)).expect("write RAM"),
        }
    }
}

/// A write as a vCPU makes it: straight into the mapping, past the VMM dirty log, so that only a
/// tracker can know of it.
pub fn guest_write(ram: &GuestRam, page: usize, data: &[u8]) {
    assert!(page < ram.page_count() && data.len() == PAGE_SIZE);
    let dst = ram.page_host_addr(page);
    // SAFETY: `page` is a page of this mapping (checked above), so its PAGE_SIZE bytes are mapped
    // and writable; they are disjoint from `data` (test memory). Guest RAM is only ever accessed
    // by raw copies, so no Rust reference to it is invalidated.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
}

pub fn read_page(ram: &GuestRam, page: usize) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    ram.read_page(page, &mut b);
    b
}

/// Fails with the first differing pages if the two RAMs differ.
pub fn assert_same_ram(src: &GuestRam, dst: &GuestRam) {
    let (a, b) = (src.page_digests(), dst.page_digests());
    assert_eq!(a.len(), b.len(), "RAM sizes differ");
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(diff.is_empty(), "RAM differs in {} pages, first {:?}", diff.len(), &diff[..diff.len().min(10)]);
}

// ---------------------------------------------------------------------------------------------
// The source VM

/// What the migration did to the source VM, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SrcEvent {
    Paused { was_running: bool },
    Saved,
    Completed,
    Failed,
    Unresolved,
    Suspended,
}

/// A thread that writes guest RAM through `GuestRam::write`, as a device model does (the VMM
/// dirty log records it, whatever the tracker): pages `pages`, round after round, until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(ram: Arc<GuestRam>, pages: std::ops::Range<usize>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            // Generations from 1000 on, so that they never equal a scripted tracker's.
            let mut generation = 1000;
            while !s.load(Ordering::SeqCst) {
                for p in pages.clone() {
                    ram.write(ram.layout().gpa_of(p), &pattern(p, generation)).expect("write RAM");
                    w.fetch_add(1, Ordering::SeqCst);
                }
                generation += 1;
                // Leave the two shared CPUs to the sender and receiver most of the time.
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Writer { stop, writes, thread: Some(thread) }
    }

    pub fn writes(&self) -> Arc<AtomicU64> {
        self.writes.clone()
    }

    /// Stops the thread and waits for it: no write is in flight once this returns.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer thread panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The source side as the emulator implements it, minus KVM: pausing stops the writer thread (as
/// pausing vCPUs waits for them to leave KVM_RUN), a failed migration resumes what ran.
pub struct FakeSource {
    ram: Arc<GuestRam>,
    state: MachineState,
    save_error: Option<String>,
    running: Mutex<bool>,
    running_at_switchover: Mutex<Option<bool>>,
    writer: Mutex<Option<Writer>>,
    events: Mutex<Vec<SrcEvent>>,
    /// Every auto-converge step asked for, in order.
    throttles: Mutex<Vec<u8>>,
}

impl FakeSource {
    pub fn new(ram: Arc<GuestRam>, state: MachineState, running: bool) -> FakeSource {
        FakeSource {
            ram,
            state,
            save_error: None,
            running: Mutex::new(running),
            running_at_switchover: Mutex::new(None),
            writer: Mutex::new(None),
            events: Mutex::new(Vec::new()),
            throttles: Mutex::new(Vec::new()),
        }
    }

    /// The auto-converge steps asked for so far.
    pub fn throttles(&self) -> Vec<u8> {
        lock(&self.throttles).clone()
    }

    /// The writer runs while the guest does, and stops at the switchover.
    pub fn with_writer(self, writer: Writer) -> FakeSource {
        *lock(&self.writer) = Some(writer);
        self
    }

    /// `save_state` fails with this (a device that cannot save, say).
    pub fn with_save_error(mut self, why: &str) -> FakeSource {
        self.save_error = Some(why.to_string());
        self
    }

    pub fn events(&self) -> Vec<SrcEvent> {
        lock(&self.events).clone()
    }

    pub fn is_running(&self) -> bool {
        *lock(&self.running)
    }

    fn event(&self, e: SrcEvent) {
        lock(&self.events).push(e);
    }
}

impl MigratableVm for FakeSource {
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.state.vcpus.len()
    }

    fn pause_for_switchover(&self) -> Result<bool, VmError> {
        let mut running = lock(&self.running);
        if let Some(mut w) = lock(&self.writer).take() {
            w.stop();
        }
        let was = *running;
        *running = false;
        *lock(&self.running_at_switchover) = Some(was);
        self.event(SrcEvent::Paused { was_running: was });
        Ok(was)
    }

    fn save_state(&self) -> Result<MachineState, VmError> {
        self.event(SrcEvent::Saved);
        match &self.save_error {
            Some(why) => Err(VmError::Save(why.clone().into())),
            None => Ok(self.state.clone()),
        }
    }

    fn migration_completed(&self) {
        self.event(SrcEvent::Completed);
    }

    fn migration_failed(&self) {
        // Put back what was: running if it ran at the switchover (a guest never paused is untouched).
        if let Some(was) = *lock(&self.running_at_switchover) {
            *lock(&self.running) = was;
        }
        self.event(SrcEvent::Failed);
    }

    fn migration_unresolved(&self) {
        self.event(SrcEvent::Unresolved);
    }

    fn suspended(&self) {
        self.event(SrcEvent::Suspended);
    }

    fn set_throttle(&self, percent: u8) {
        lock(&self.throttles).push(percent);
    }
}

/// Machine state with recognisable blobs: `vcpus` vCPUs, a VM blob and two devices.
pub fn machine_state(vcpus: usize) -> MachineState {
    MachineState {
        vcpus: (0..vcpus).map(|i| format!("vcpu {i}: rip=0x{:x}", 0x1000 + i).into_bytes()).collect(),
        vm: b"irqchip+pit+clock".repeat(100),
        devices: vec![("serial0".to_string(), b"uart lcr=3".to_vec()), ("virtio-blk0".to_string(), vec![0xab; 3000])],
    }
}

// ---------------------------------------------------------------------------------------------
// The destination VM

/// The destination side: RAM, and a restore that records what it was given (and may refuse).
pub struct FakeDest {
    ram: Arc<GuestRam>,
    vcpus: usize,
    refuse: Option<String>,
    restored: Mutex<Vec<MachineState>>,
}

impl FakeDest {
    pub fn new(ram: Arc<GuestRam>, vcpus: usize, refuse: Option<String>) -> FakeDest {
        FakeDest { ram, vcpus, refuse, restored: Mutex::new(Vec::new()) }
    }

    /// Every state `restore_state` was called with.
    pub fn restored(&self) -> Vec<MachineState> {
        lock(&self.restored).clone()
    }
}

impl RestorableVm for FakeDest {
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn restore_state(&self, state: &MachineState) -> Result<(), VmError> {
        lock(&self.restored).push(state.clone());
        match &self.refuse {
            Some(why) => Err(VmError::Restore(why.clone().into())),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted tracker

/// What a scripted "guest" writes into a page just before a collect reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    Data,
    Zero,
}

/// The pages a [`ScriptedTracker`] reports, one list per collect (`collect_final` included); past
/// the end of the list, the last round again (`repeat_last`) or nothing.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub rounds: Vec<Vec<(usize, Fill)>>,
    pub repeat_last: bool,
    /// The collect (0 = the first) that fails instead.
    pub fail_at: Option<usize>,
}

impl Script {
    pub fn round(&self, i: usize) -> &[(usize, Fill)] {
        match self.rounds.get(i) {
            Some(r) => r,
            None if self.repeat_last => self.rounds.last().map_or(&[], |r| r),
            None => &[],
        }
    }

    /// The contents a page holds after round `i` wrote it.
    pub fn contents(page: usize, round: usize, fill: Fill) -> Vec<u8> {
        match fill {
            Fill::Data => pattern(page, round as u32 + 1),
            Fill::Zero => vec![0u8; PAGE_SIZE],
        }
    }
}

/// What the sender did with a scripted tracker.
#[derive(Clone, Debug, Default)]
pub struct TrackerLog {
    pub built: Vec<TrackerKind>,
    pub starts: u32,
    pub collects: u32,
    pub finals: u32,
    pub stops: u32,
    /// Pages reported, per collect (the final one last).
    pub reported: Vec<Vec<usize>>,
}

/// A tracker that plays a guest: at each collect it writes the round's pages (straight into the
/// mapping, so nothing else can know) and reports exactly those.
pub struct ScriptedTracker {
    kind: TrackerKind,
    ram: Arc<GuestRam>,
    script: Arc<Script>,
    log: Arc<Mutex<TrackerLog>>,
    round: usize,
    running: bool,
}

impl DirtyTracker for ScriptedTracker {
    fn kind(&self) -> TrackerKind {
        self.kind
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        lock(&self.log).starts += 1;
        self.running = true;
        Ok(())
    }

    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError> {
        assert!(self.running, "collect on a tracker that is not running");
        if self.script.fail_at == Some(self.round) {
            lock(&self.log).collects += 1;
            return Err(TrackerError::FaultThread("scripted failure".into()));
        }
        let round = self.script.round(self.round).to_vec();
        for &(page, fill) in &round {
            guest_write(&self.ram, page, &Script::contents(page, self.round, fill));
            dirty.set(page);
        }
        let mut log = lock(&self.log);
        log.collects += 1;
        log.reported.push(round.iter().map(|&(p, _)| p).collect());
        self.round += 1;
        Ok(())
    }

    fn collect_final(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError> {
        lock(&self.log).finals += 1;
        self.collect(dirty)
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        lock(&self.log).stops += 1;
        self.running = false;
        Ok(())
    }
}

/// Builds scripted trackers (whatever kind is asked for) over `ram`, logging into a shared log.
struct ScriptedFactory {
    ram: Arc<GuestRam>,
    script: Arc<Script>,
    log: Arc<Mutex<TrackerLog>>,
}

impl TrackerFactory for ScriptedFactory {
    fn build(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, TrackerError> {
        lock(&self.log).built.push(kind);
        Ok(Box::new(ScriptedTracker {
            kind,
            ram: self.ram.clone(),
            script: self.script.clone(),
            log: self.log.clone(),
            round: 0,
            running: false,
        }))
    }
}

/// A factory of scripted trackers over `ram`, and their shared log.
pub fn scripted(ram: &Arc<GuestRam>, script: Script) -> (Arc<dyn TrackerFactory>, Arc<Mutex<TrackerLog>>) {
    let log = Arc::new(Mutex::new(TrackerLog::default()));
    let factory = ScriptedFactory { ram: ram.clone(), script: Arc::new(script), log: log.clone() };
    (Arc::new(factory), log)
}

// ---------------------------------------------------------------------------------------------
// The source's migration

pub fn params(f: impl FnOnce(&mut MigrationParams)) -> Arc<Mutex<MigrationParams>> {
    let mut p = MigrationParams {
        tracker: TrackerKind::UffdWp,
        // Generous where the destination answers: the two shared CPUs may be busy with other work,
        // and a missed deadline would turn a success test into an unresolved migration. The
        // failure tests that wait on a silent destination set a short one.
        switchover_timeout: Duration::from_secs(5),
        // The hand-written destination reads one connection; the tests of channels (and of the
        // urgent connection) set theirs.
        channels: 1,
        postcopy_preempt: false,
        ..MigrationParams::default()
    };
    f(&mut p);
    Arc::new(Mutex::new(p))
}

/// Waits until the migration's status is `status` (failing after [`WAIT`]).
pub fn wait_status(o: &Outgoing, status: Status) -> Progress {
    let until = Instant::now() + WAIT;
    loop {
        let p = o.progress.snapshot();
        if p.status == status {
            return p;
        }
        assert!(Instant::now() < until, "status {:?} after {WAIT:?}, waiting for {status:?}: {p:?}", p.status);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Joins the migration thread, failing after [`WAIT`] rather than hanging.
pub fn join(o: Outgoing) -> Progress {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(o.join());
    });
    rx.recv_timeout(WAIT).expect("the migration thread did not end")
}

/// Runs `f` in a thread and waits for its result, failing after [`WAIT`] rather than hanging.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WAIT) {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-written destination

/// A reply the destination sent, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ready,
    Synced,
    Started,
    Error(String),
    Resolved(Resolution),
    Other(String),
}

impl Reply {
    pub fn from_record(r: Record<'_>) -> Reply {
        match r {
            Record::Ready => Reply::Ready,
            Record::Synced => Reply::Synced,
            Record::Started => Reply::Started,
            Record::Error(why) => Reply::Error(why.to_string()),
            Record::Resolved(r) => Reply::Resolved(r),
            other => Reply::Other(format!("{other:?}")),
        }
    }
}

/// Reads every record the peer sends until it closes (or `timeout` passes without data).
pub fn read_replies(s: &UnixStream, timeout: Duration) -> Vec<Reply> {
    s.set_read_timeout(Some(timeout)).expect("set a read timeout");
    let mut dec = Decoder::new(s);
    let mut out = Vec::new();
    while let Ok(r) = dec.next_record() {
        out.push(Reply::from_record(r));
    }
    out
}

/// What the fake destination does once END arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtEnd {
    /// READY, then on GO the given answer.
    Ready(AfterGo),
    /// ERROR instead of READY.
    Error(String),
    /// Closes the connection instead of READY.
    Close,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterGo {
    Started,
    /// Says nothing (and keeps reading until the source hangs up).
    Silent,
    /// Stops listening (the socket file removed) and closes the connection: the destination is
    /// gone, and RESOLVE cannot reach it.
    Vanish,
    Error(String),
}

/// How the fake destination behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Whether SYNC is answered (a destination that falls behind does not).
    pub answer_sync: bool,
    pub at_end: AtEnd,
}

/// One precopy pass as the destination saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassSeen {
    pub pass: u32,
    /// The page count PASS_END declared.
    pub declared: u64,
    /// Pages that came as data, with the CRC of their contents, in arrival order.
    pub data: Vec<(usize, u32)>,
    /// Pages that came as zero markers.
    pub zero: Vec<usize>,
}

impl PassSeen {
    pub fn pages(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.data.iter().map(|&(p, _)| p).chain(self.zero.iter().copied()).collect();
        all.sort_unstable();
        all
    }
}

/// Everything the fake destination saw on the migration connection.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub header: Option<StreamHeader>,
    pub passes: Vec<PassSeen>,
    pub syncs: u32,
    /// State records, by record name and index or device name.
    pub states: Vec<String>,
    pub end: Option<(u32, u32, bool)>,
    pub got_go: bool,
    /// Records after END other than GO (ABORT, DONE), by name.
    pub after_end: Vec<&'static str>,
    /// Why the fake stopped reading, if not a clean close by the source.
    pub stopped: Option<String>,
}

/// Listens on `path` and plays one destination: takes the stream (answers SYNC), then does what
/// `at_end` says. Returns what it saw, and the listener (unless it vanished) for the RESOLVE
/// connections that may follow.
pub fn fake_destination(path: PathBuf, at_end: AtEnd) -> (Uri, JoinHandle<(Seen, Option<UnixListener>)>) {
    fake_destination_plan(path, Plan { answer_sync: true, at_end })
}

pub fn fake_destination_plan(path: PathBuf, plan: Plan) -> (Uri, JoinHandle<(Seen, Option<UnixListener>)>) {
    let listener = UnixListener::bind(&path).expect("bind the fake destination");
    let uri = Uri::Unix(path.clone());
    let thread = std::thread::spawn(move || {
        let conn = accept(&listener, WAIT).expect("no source connected");
        let mut listener = Some(listener);
        let mut seen = Seen::default();
        let mut vanish = || {
            listener = None;
            let _ = std::fs::remove_file(&path);
        };
        if let Err(e) = play(&conn, &plan, &mut seen, &mut vanish) {
            seen.stopped = Some(e);
        }
        (seen, listener)
    });
    (uri, thread)
}

/// Accepts one connection within `timeout`.
pub fn accept(listener: &UnixListener, timeout: Duration) -> Option<UnixStream> {
    listener.set_nonblocking(true).expect("non-blocking listener");
    let until = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                return Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return None,
        }
    }
}

fn play(conn: &UnixStream, plan: &Plan, seen: &mut Seen, vanish: &mut dyn FnMut()) -> Result<(), String> {
    conn.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let mut dec = Decoder::new(conn);
    let mut replies = Encoder::new(conn);
    dec.preamble().map_err(|e| migrate::report(&e))?;
    let header = match dec.next_record().map_err(|e| migrate::report(&e))? {
        Record::Header(h) => h,
        other => return Err(format!("first record {other:?}")),
    };
    let layout = RamLayout::new(header.regions.clone()).map_err(|e| e.to_string())?;
    if header.asks_base {
        // No base checkpoint here.
        replies.base(&[]).map_err(|e| e.to_string())?;
    }
    seen.header = Some(header);
    let mut pass = PassSeen::default();
    let mut buf = vec![0u8; migrate::stream::MAX_PAGES_PER_RECORD * PAGE_SIZE];
    // The stream up to END.
    loop {
        let f = dec.next_frame().map_err(|e| migrate::report(&e))?;
        if f.kind == RecordType::Pages {
            let (gpa, count) = dec
                .read_pages(&f, |_, count| Ok::<_, ()>(&mut buf[..count * PAGE_SIZE]))
                .map_err(|e| e.to_string())?
                .map_err(|()| "no buffer".to_string())?;
            let first = layout.page_of(gpa).ok_or("PAGES outside RAM")?;
            for i in 0..count {
                pass.data.push((first + i, crc32fast::hash(&buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])));
            }
            continue;
        }
        match dec.read_record(&f).map_err(|e| migrate::report(&e))? {
            Record::ZeroPages { gpa, count } => {
                let first = layout.page_of(gpa).ok_or("ZERO_PAGES outside RAM")?;
                pass.zero.extend(first..first + count as usize);
            }
            Record::PassEnd { pass: n, pages } => {
                pass.pass = n;
                pass.declared = pages;
                seen.passes.push(std::mem::take(&mut pass));
            }
            Record::Sync => {
                seen.syncs += 1;
                if plan.answer_sync {
                    replies.synced().map_err(|e| e.to_string())?;
                }
            }
            Record::VcpuState { index, .. } => seen.states.push(format!("VCPU_STATE {index}")),
            Record::VmState(_) => seen.states.push("VM_STATE".into()),
            Record::DeviceState { name, .. } => seen.states.push(format!("DEVICE_STATE {name}")),
            Record::End { vcpu_states, device_states, guest_running, .. } => {
                seen.end = Some((vcpu_states, device_states, guest_running));
                break;
            }
            other => return Err(format!("unexpected {other:?} before END")),
        }
    }
    match &plan.at_end {
        AtEnd::Error(why) => {
            replies.error(why).map_err(|e| e.to_string())?;
        }
        AtEnd::Close => {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        AtEnd::Ready(after_go) => {
            replies.ready().map_err(|e| e.to_string())?;
            match dec.next_record() {
                Ok(Record::Go) => seen.got_go = true,
                Ok(other) => return Err(format!("{other:?} instead of GO")),
                Err(e) => return Err(format!("no GO: {e}")),
            }
            match after_go {
                AfterGo::Started => replies.started().map_err(|e| e.to_string())?,
                AfterGo::Silent => {}
                AfterGo::Vanish => {
                    vanish();
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                AfterGo::Error(why) => replies.error(why).map_err(|e| e.to_string())?,
            }
        }
    }
    // Whatever else the source says, until it hangs up.
    loop {
        match dec.next_record() {
            Ok(Record::Abort) => seen.after_end.push("ABORT"),
            Ok(Record::Done) => seen.after_end.push("DONE"),
            Ok(Record::Go) => seen.after_end.push("GO"),
            Ok(other) => return Err(format!("unexpected {other:?} after END")),
            Err(migrate::stream::StreamError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Takes one RESOLVE connection on `listener` within `timeout` and answers it with `answer`;
/// returns what it asked (migration id, action), or None if nothing came.
pub fn answer_resolve(
    listener: &UnixListener,
    answer: Resolution,
    timeout: Duration,
) -> Option<Result<(u64, ResolveAction), String>> {
    let conn = accept(listener, timeout)?;
    Some((|| {
        conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut dec = Decoder::new(&conn);
        dec.preamble().map_err(|e| migrate::report(&e))?;
        let asked = match dec.next_record().map_err(|e| migrate::report(&e))? {
            Record::Resolve { migration_id, action } => (migration_id, action),
            other => return Err(format!("{other:?} instead of RESOLVE")),
        };
        Encoder::new(&conn).resolved(answer).map_err(|e| e.to_string())?;
        Ok(asked)
    })())
}

// ---------------------------------------------------------------------------------------------
// The real destination, with a fake VM

/// What a real destination (`IncomingServer` + `receiver::receive`) ended with.
pub struct Arrived {
    pub header: StreamHeader,
    pub decision: Decision,
    pub vm: Arc<FakeDest>,
    /// Passes the receiver counted.
    pub passes: u32,
    pub handover: Arc<Handover>,
    /// Whether the source said DONE (or asked with RESOLVE) before the destination stopped waiting.
    pub source_informed: bool,
    /// A postcopy's pages still on their way.
    pub postcopy: Option<Arc<migrate::postcopy::dest::IncomingPostcopy>>,
}

/// Listens on `uri` and receives one migration into a fake VM built from the header, waits for the
/// handover to decide, says STARTED if the guest is taken, and waits for the source to know.
pub fn real_destination(uri: &Uri) -> mpsc::Receiver<Result<Arrived, String>> {
    real_destination_refusing(uri, None)
}

/// As [`real_destination`], but building the VM fails with `refuse` (a --mem mismatch, say).
pub fn real_destination_refusing(uri: &Uri, refuse: Option<String>) -> mpsc::Receiver<Result<Arrived, String>> {
    let server = IncomingServer::bind(uri).expect("bind the destination");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let arrived = (|| {
            let accepted = server.next_migration().map_err(|e| e.to_string())?;
            let header = accepted.header.clone();
            let handover = server.handover().clone();
            let create = |h: &StreamHeader| {
                if let Some(why) = refuse {
                    return Err(why);
                }
                let layout = RamLayout::new(h.regions.clone()).map_err(|e| e.to_string())?;
                Ok(Arc::new(FakeDest::new(ram(layout), h.vcpu_count as usize, None)))
            };
            let mut received = receiver::receive(accepted, &handover, create).map_err(|e| migrate::report(&e))?;
            let decision = handover.wait_decision();
            if matches!(decision, Decision::Run { .. }) {
                received.started();
            }
            let source_informed = handover.wait_source_informed(WAIT);
            Ok(Arrived {
                header,
                decision,
                vm: received.vm.clone(),
                passes: received.passes,
                handover,
                source_informed,
                postcopy: received.postcopy.clone(),
            })
        })();
        let _ = tx.send(arrived);
    });
    rx
}
