//! The source side of a precopy migration, top to bottom:
//!
//! 1. setup: connect, start the dirty tracker (all of RAM write-protected), send the header;
//! 2. pass 0: every page, zero pages as markers;
//! 3. passes 1..n: take the dirty set (re-protected before it is read), send it, until the
//!    convergence rule says the rest fits in the downtime limit (or `max_passes` is reached);
//! 4. switchover: pause every vCPU, send the last dirty pages and the vCPU, VM and device state, wait
//!    for READY, say GO, wait for STARTED; the source stays paused ("postmigrate").
//!
//! Any failure before GO (connection lost, destination refused, cancel, a stall of more than
//! `switchover_timeout` while the guest is paused) stops the tracker (RAM writable again, fault
//! thread gone), puts the guest back as it was and tells the destination ABORT. Once GO may have
//! reached the destination the source never resumes by itself: without STARTED the migration is
//! "unresolved" until the destination answers a RESOLVE or the operator decides (`handover.rs`).

use std::io::{BufWriter, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::channel::{ChannelOut, PassShared};
use crate::compress::{Codec, CompressStats, Compressor};
use crate::convergence::{self, Decision, PassOutcome};
use crate::handover::{self, Side};
use crate::pagemap::{self, ZeroHints};
use crate::postcopy::{
    self,
    source::{OwedPages, PostcopyControl, UrgentLink},
};
use crate::progress::{Observer, PassRecord, PostcopyStats, Progress, ProgressCell, Status, SwitchoverTimes};
use crate::ram::{GuestRam, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, Record, Resolution, ResolveAction, StreamError, StreamHeader};
use crate::tracker::{DirtyLog, TrackerError, TrackerFactory, TrackerKind};
use crate::transport::{self, Connection, Uri};
use crate::vm::{MigratableVm, VmError};

/// How long the source waits (guest running) for the destination to catch up with a SYNC.
const SYNC_TIMEOUT: Duration = transport::STALL_TIMEOUT;
/// What an unresolved migration's `error-desc` says to do.
const RESOLVE_HINT: &str = r#"migrate-resolve {"keep": "source" or "destination"} decides"#;
/// Attempts to tell a destination ABORT on new connections after a failed switchover.
const ABORT_NOTICES: u32 = 5;
/// Stream buffer for small records (PAGES records of 1 MiB go out directly).
const WRITE_BUFFER: usize = 256 << 10;
/// The urgent connection's buffer: one answer (a few pages) at a time.
const URGENT_WRITE_BUFFER: usize = 64 << 10;

/// The tracker a migration uses unless told otherwise (README.md: "Dirty trackers" says why).
pub const DEFAULT_TRACKER: TrackerKind = TrackerKind::UffdWpAsync;

/// Tunables of an outgoing migration (`migrate-set-parameters`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationParams {
    /// Switch over once the dirty pages left would take at most this long to send. QEMU's default
    /// is 300 ms, sized for 1 Gb/s links; emu defaults to 50 ms because on the links it targets
    /// (10 Gb/s and up, loopback) that still converges for guests dirtying memory at up to about
    /// half the link rate, and a pause stays below what interactive users notice.
    pub downtime_limit: Duration,
    /// Bytes per second the stream may use while the guest runs; 0 = no limit (the default: the
    /// sooner precopy ends, the less the guest redirties). The switchover is never throttled.
    pub max_bandwidth: u64,
    /// Passes after pass 0 before the switchover is forced even if it will exceed the downtime
    /// limit. 30 bounds the migration of a guest that writes faster than the link (QEMU would loop
    /// until cancelled); converging guests stop far earlier.
    pub max_passes: u32,
    /// `cpr-transfer`: a same-host handover of shared RAM (`--memfd`, a `unix:` URI): the
    /// destination maps the guest's memory itself and only vCPU, VM and device state travel.
    pub handover: bool,
    /// Bytes per second postcopy's background push may use (0: no limit, QEMU's default too);
    /// pages the destination asks for are sent at once whatever it says.
    pub max_postcopy_bandwidth: u64,
    /// Switch to postcopy once this many passes after pass 0 are done (0: only when told, or by
    /// the stall policy).
    pub postcopy_after_passes: u32,
    /// `postcopy-preempt` (QEMU's capability): an urgent connection, opened with the others, on
    /// which postcopy's requested pages overtake the background push (`stream.rs`). Not on
    /// `exec:`/`ssh:` (one stream). On by default: docs/postcopy.md has the fault latencies with
    /// and without it.
    pub postcopy_preempt: bool,
    /// How dirty pages are tracked (takes effect at the next `migrate`).
    pub tracker: TrackerKind,
    /// While the guest is paused for the switchover, the longest the source waits on the
    /// destination (one write, READY, STARTED) before it gives up. 1 s: a working link answers in
    /// microseconds to milliseconds, and a paused guest is an outage, so a stalled or corrupt
    /// stream must cost about a second, not the 60 s a running guest can afford.
    pub switchover_timeout: Duration,
    /// What precopy does once passes stop paying (`convergence::stalled`).
    pub stall_policy: StallPolicy,
    /// Auto-converge (the `throttle` policy): the first throttle step and each further one, in
    /// percent of vCPU time taken away, as QEMU's cpu-throttle-initial (20) and
    /// cpu-throttle-increment (10).
    pub throttle_initial: u8,
    pub throttle_increment: u8,
    /// Newly dirtied pages per second the guest may make while precopy runs (0: no limit), held in
    /// the fault path by the tracker (uffd-wp); from the migration's start.
    pub dirty_rate_limit: u64,
    /// Connections the pages travel on, one sender thread each (`channel.rs`); 1 to
    /// [`crate::stream::MAX_CHANNELS`]. Takes effect at the next `migrate`.
    pub channels: u32,
    /// Mutual TLS for `tcp:` (`tls-cert`, `tls-key`, `tls-ca`; `transport/tls.rs`): the monitor
    /// turns a `tcp:` URI into a TLS one with them; the sender never looks.
    pub tls: crate::transport::TlsCreds,
    /// How page data is compressed where that pays (`compress.rs`), and zstd's level.
    pub compress: Codec,
    pub compress_level: i32,
    /// A checkpoint to a file (`file:`) is taken live, the guest running on (QEMU's
    /// `background-snapshot` capability).
    pub background_snapshot: bool,
    /// Fault injection for tests: leave this many dirty pages out of the final pass, so the
    /// destination's RAM is known to differ. Never set outside tests.
    pub drop_final_pages: u32,
}

/// Channels a migration uses unless told otherwise (README.md: "Channels" says why).
pub const DEFAULT_CHANNELS: u32 = 4;

/// The most vCPU time auto-converge takes away (QEMU's cpu-throttle maximum).
pub const MAX_THROTTLE: u8 = 99;

/// What a migration does when its passes stop paying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallPolicy {
    /// Slow the vCPUs down in growing steps until it converges (auto-converge). The default: the
    /// downtime limit holds, and only a guest that writes faster than the link pays for it.
    Throttle,
    /// Go on passing (until `max_passes`); the guest may calm down by itself.
    KeepGoing,
    /// Switch over now, over the downtime limit: more passes would not make it smaller.
    Switchover,
    /// Give the migration up; the guest runs on at the source.
    Fail,
    /// Hold the guest's dirty rate in the fault path, to a quarter of the link's measured rate,
    /// halved at each further stall (uffd-wp only; other trackers throttle instead).
    RateLimit,
    /// Switch to postcopy: the guest moves now and its remaining pages follow (`postcopy`).
    Postcopy,
}

impl StallPolicy {
    pub const ALL: [StallPolicy; 6] = [
        StallPolicy::Throttle,
        StallPolicy::KeepGoing,
        StallPolicy::Switchover,
        StallPolicy::Fail,
        StallPolicy::RateLimit,
        StallPolicy::Postcopy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StallPolicy::Throttle => "throttle",
            StallPolicy::KeepGoing => "keep-going",
            StallPolicy::Switchover => "switchover",
            StallPolicy::Fail => "fail",
            StallPolicy::RateLimit => "rate-limit",
            StallPolicy::Postcopy => "postcopy",
        }
    }
}

impl std::str::FromStr for StallPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        StallPolicy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<_> = StallPolicy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown stall policy '{s}' (one of: {})", names.join(", "))
        })
    }
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit: Duration::from_millis(50),
            max_bandwidth: 0,
            max_passes: 30,
            postcopy_after_passes: 0,
            max_postcopy_bandwidth: 0,
            handover: false,
            tracker: DEFAULT_TRACKER,
            switchover_timeout: Duration::from_secs(1),
            stall_policy: StallPolicy::Throttle,
            throttle_initial: 20,
            throttle_increment: 10,
            dirty_rate_limit: 0,
            channels: DEFAULT_CHANNELS,
            tls: Default::default(),
            compress: Codec::None,
            compress_level: 1,
            drop_final_pages: 0,
            postcopy_preempt: true,
            background_snapshot: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to {uri}")]
    Connect {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dirty tracking")]
    Tracker(#[from] TrackerError),
    #[error("sending")]
    Send(#[source] std::io::Error),
    #[error("the destination took no data in time (stalled or gone)")]
    Stalled,
    /// The destination sent ERROR: it will never run the guest.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The connection broke, closed or stalled before GO.
    #[error("lost the destination {during}")]
    Lost {
        during: String,
        #[source]
        source: Option<StreamError>,
    },
    #[error("the VM")]
    Vm(#[from] VmError),
    #[error("cancelled")]
    Cancelled,
    /// GO was sent but STARTED did not come: the destination may or may not run the guest. The
    /// source stays paused; never resume on this error.
    #[error("unresolved: {0}")]
    Unresolved(String),
    #[error("cpr-transfer (same-host handover): {0}")]
    Handover(String),
    /// Precopy stopped paying and the stall policy is `fail`.
    #[error("not converging ({0}); the stall policy is fail")]
    NotConverging(String),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => MigrationError::Stalled,
            _ => MigrationError::Send(e),
        }
    }
}

fn lost(during: impl Into<String>, source: Option<StreamError>) -> MigrationError {
    MigrationError::Lost { during: during.into(), source }
}

/// Cancels a migration from another thread, also one blocked on the network; refused once the
/// source is committed to GO (the destination may be running the guest by then).
#[derive(Default)]
pub struct Cancel {
    state: Mutex<CancelState>,
}

#[derive(Default)]
struct CancelState {
    requested: bool,
    committed: bool,
    conns: Vec<Connection>,
}

impl Cancel {
    fn lock(&self) -> MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the migration to stop; `false` if it is past the point where it can.
    pub fn cancel(&self) -> bool {
        let mut s = self.lock();
        if s.committed {
            return false;
        }
        s.requested = true;
        for c in &s.conns {
            c.shutdown();
        }
        true
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().requested
    }

    fn attach(&self, conn: &Connection) {
        if let Ok(c) = conn.try_clone() {
            self.lock().conns.push(c);
        }
    }

    pub(crate) fn check(&self) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The point of no return: from here a cancel is refused.
    fn commit(&self) -> Result<(), MigrationError> {
        let mut s = self.lock();
        if s.requested {
            return Err(MigrationError::Cancelled);
        }
        s.committed = true;
        Ok(())
    }
}

/// The operator's choice for an unresolved migration (`migrate-resolve`), handed to the migration
/// thread, which alone acts on the VM.
#[derive(Default)]
pub struct OperatorChoice {
    choice: Mutex<Option<Side>>,
    chosen: Condvar,
}

impl OperatorChoice {
    pub fn choose(&self, keep: Side) {
        *self.choice.lock().unwrap_or_else(|e| e.into_inner()) = Some(keep);
        self.chosen.notify_all();
    }

    /// Waits up to `timeout` for a choice.
    fn wait(&self, timeout: Duration) -> Option<Side> {
        let c = self.choice.lock().unwrap_or_else(|e| e.into_inner());
        let (mut c, _) = self.chosen.wait_timeout_while(c, timeout, |c| c.is_none()).unwrap_or_else(|e| e.into_inner());
        c.take()
    }
}

/// A migration running in its own thread.
pub struct Outgoing {
    pub progress: Arc<ProgressCell>,
    pub cancel: Arc<Cancel>,
    /// `migrate-start-postcopy`, and resuming a postcopy whose link broke.
    pub postcopy: Arc<PostcopyControl>,
    pub resolve: Arc<OperatorChoice>,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Something reported as a migration that runs in `thread` (a checkpoint to a file): nothing
    /// to cancel, resolve or switch to postcopy.
    pub fn from_thread(progress: Arc<ProgressCell>, thread: JoinHandle<()>) -> Outgoing {
        Outgoing {
            progress,
            cancel: Arc::default(),
            resolve: Arc::default(),
            postcopy: Arc::default(),
            thread: Some(thread),
        }
    }

    /// Waits for the migration thread to end.
    pub fn join(mut self) -> Progress {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.progress.snapshot()
    }
}

/// Starts migrating `vm` to `uri` in a new thread. `params` is read at every pass, so changes to the
/// downtime limit, bandwidth and pass limit apply to a running migration.
pub fn start(
    vm: Arc<dyn MigratableVm>,
    uri: Uri,
    params: Arc<Mutex<MigrationParams>>,
    trackers: Arc<dyn TrackerFactory>,
) -> std::io::Result<Outgoing> {
    start_observed(vm, uri, params, trackers, None)
}

/// [`start`], with an observer told of every status change and pass from the first moment (the
/// monitor's MIGRATION and MIGRATION_PASS events).
pub fn start_observed(
    vm: Arc<dyn MigratableVm>,
    uri: Uri,
    params: Arc<Mutex<MigrationParams>>,
    trackers: Arc<dyn TrackerFactory>,
    observer: Option<Observer>,
) -> std::io::Result<Outgoing> {
    let kind = params.lock().unwrap_or_else(|e| e.into_inner()).tracker;
    let initial = Progress::new(kind, vm.ram().layout().total_bytes());
    let progress = Arc::new(match observer {
        Some(o) => ProgressCell::observed(initial, o),
        None => ProgressCell::new(initial),
    });
    let cancel = Arc::new(Cancel::default());
    let resolve = Arc::new(OperatorChoice::default());
    let postcopy = Arc::new(PostcopyControl::default());
    let (p, c, r, pc) = (progress.clone(), cancel.clone(), resolve.clone(), postcopy.clone());
    let thread = std::thread::Builder::new().name("migration".into()).spawn(move || {
        let id = migration_id();
        let result = migrate(&*vm, &uri, id, &params, &*trackers, &p, Steering { cancel: &c, postcopy: &pc });
        // Whatever happened, the guest (here, or resumed later) runs at full speed again.
        if p.snapshot().throttle_percent > 0 {
            vm.set_throttle(0);
        }
        match result {
            Ok(()) => {}
            Err(MigrationError::Unresolved(why)) => {
                log::warn!("migration to {uri}: {why}; the guest stays paused until resolved");
                vm.migration_unresolved();
                p.update(|p| {
                    p.status = Status::Unresolved;
                    // The way out is named from the first moment, before the first question.
                    p.error = Some(format!("{why}; asking the destination; {RESOLVE_HINT}"));
                });
                settle(&*vm, &uri, id, &why, &p, &r);
            }
            Err(e) => {
                // The tracker is stopped already (dropped inside `migrate`): RAM is writable again
                // before the guest resumes.
                vm.migration_failed();
                let status = if c.is_cancelled() { Status::Cancelled } else { Status::Failed };
                let why = crate::report(&e);
                log::warn!("migration to {uri}: {why}");
                finish(&p, status, Some(why));
            }
        }
    })?;
    Ok(Outgoing { progress, cancel, resolve, postcopy, thread: Some(thread) })
}

fn finish(progress: &ProgressCell, status: Status, error: Option<String>) {
    progress.update(|p| {
        p.status = status;
        p.error = error;
        p.total_time = Some(p.started.elapsed());
        if status == Status::Completed {
            p.dirty_pages = 0;
        }
    });
}

/// A random identity for one migration, so that a RESOLVE names the right one.
fn migration_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// An unresolved migration: asks the destination again and again (RESOLVE GO: a destination still
/// waiting takes it as the GO it missed) until it answers, or the operator decides.
fn settle(vm: &dyn MigratableVm, uri: &Uri, id: u64, why: &str, progress: &ProgressCell, choice: &OperatorChoice) {
    let destination_has_it = |how: String| {
        vm.migration_completed();
        log::info!("migration to {uri} resolved: {how}");
        finish(progress, Status::Completed, None);
        progress.update(|p| p.resolution = Some(how));
    };
    let source_keeps_it = |how: String| {
        vm.migration_failed();
        log::info!("migration to {uri} resolved: {how}");
        finish(progress, Status::Failed, Some(format!("{why}; resolved: {how}")));
        progress.update(|p| p.resolution = Some(how));
    };
    let mut asked = 0u32;
    loop {
        asked += 1;
        let last = match handover::ask(uri, id, ResolveAction::Go) {
            Ok(Resolution::DestinationHasGuest) => {
                return destination_has_it("the destination confirmed it has the guest".into())
            }
            Ok(Resolution::DestinationDiscarded) => {
                return source_keeps_it("the destination discarded the guest; the source keeps it".into())
            }
            Ok(Resolution::UnknownMigration) => "the destination does not know this migration".to_string(),
            Err(e) => e,
        };
        progress.update(|p| {
            p.error = Some(format!("{why}; asked the destination {asked} times (last: {last}); {RESOLVE_HINT}"))
        });
        match choice.wait(Duration::from_secs(1)) {
            None => {}
            Some(Side::Destination) => return destination_has_it("the operator chose the destination".into()),
            Some(Side::Source) => {
                // One last question: a destination that has the guest must not get a twin.
                return match handover::ask(uri, id, ResolveAction::Abort) {
                    Ok(Resolution::DestinationHasGuest) => destination_has_it(
                        "the operator chose the source, but the destination has the guest: it stays there".into(),
                    ),
                    _ => source_keeps_it("the operator chose the source".into()),
                };
            }
        }
    }
}

/// What steers a migration from outside its thread.
struct Steering<'a> {
    cancel: &'a Cancel,
    postcopy: &'a PostcopyControl,
}

fn migrate(
    vm: &dyn MigratableVm,
    uri: &Uri,
    migration_id: u64,
    params: &Mutex<MigrationParams>,
    trackers: &dyn TrackerFactory,
    progress: &ProgressCell,
    steering: Steering<'_>,
) -> Result<(), MigrationError> {
    let Steering { cancel, postcopy } = steering;
    // A handover is checked before anything reaches the destination.
    let handover = params.lock().unwrap_or_else(|e| e.into_inner()).handover;
    if handover {
        if !matches!(uri, Uri::Unix(_)) {
            return Err(MigrationError::Handover(format!(
                "it passes memory by file descriptor: a unix: URI, not {uri}"
            )));
        }
        if vm.ram().shared_fds().is_empty() {
            return Err(MigrationError::Handover("the guest's RAM is private: start emu with --memfd".into()));
        }
    }
    let conn = transport::open(uri).map_err(|source| MigrationError::Connect { uri: uri.to_string(), source })?;
    // A destination that stops taking data fails the migration rather than hanging it.
    conn.set_write_timeout(Some(transport::STALL_TIMEOUT))?;
    cancel.attach(&conn);
    cancel.check()?;
    let ram = vm.ram().clone();
    let kind = params.lock().unwrap_or_else(|e| e.into_inner()).tracker;
    // A handover copies no page: nothing to track.
    let tracker = if handover { crate::tracker::untracked(kind) } else { trackers.build(kind)? };
    let mut log = DirtyLog::start(tracker, ram.clone())?;
    let limit = params.lock().unwrap_or_else(|e| e.into_inner()).dirty_rate_limit;
    if limit > 0 {
        if !log.set_dirty_rate_limit(limit) {
            return Err(MigrationError::Tracker(TrackerError::Unavailable(format!(
                "dirty-rate-limit needs a tracker that sees writes before they happen (uffd-wp), not {}",
                kind.name()
            ))));
        }
        progress.update(|p| p.dirty_rate_limit = limit);
    }
    let mut sender = Sender {
        vm,
        uri,
        migration_id,
        ram,
        out: ChannelOut::new(encoder(&conn, &params.lock().unwrap_or_else(|e| e.into_inner()))?),
        conn,
        extra: Vec::new(),
        extra_conns: Vec::new(),
        urgent: None,
        preempt: false,
        log,
        params,
        progress,
        cancel,
        throughput: Throughput::default(),
        throttle: true,
        end_sent: false,
        postcopy,
        unsent: PageBitmap::new(vm.ram().page_count()),
        base: None,
    };
    let result = sender.run().map_err(|e| sender.explain(e));
    if let Err(e) = &result {
        if !matches!(e, MigrationError::Unresolved(_)) {
            sender.abort_destination();
        }
    }
    result
}

/// A channel's encoder: buffered, compressing if the parameters say so.
fn encoder(conn: &Connection, params: &MigrationParams) -> std::io::Result<Encoder<BufWriter<Connection>>> {
    let mut enc = Encoder::new(BufWriter::with_capacity(WRITE_BUFFER, conn.try_clone()?));
    if params.compress != Codec::None {
        enc.compress_with(Compressor::new(params.compress, params.compress_level)?);
    }
    Ok(enc)
}

/// Bytes moved while sending passes, for the convergence rule.
#[derive(Default)]
struct Throughput {
    bytes: u64,
    time: Duration,
}

impl Throughput {
    fn bytes_per_sec(&self) -> f64 {
        if self.time.is_zero() {
            0.0
        } else {
            self.bytes as f64 / self.time.as_secs_f64()
        }
    }
}

struct Sender<'a> {
    vm: &'a dyn MigratableVm,
    uri: &'a Uri,
    migration_id: u64,
    ram: Arc<GuestRam>,
    /// Channel 0: every control record, and its share of the pages.
    out: ChannelOut,
    conn: Connection,
    /// Channels 1..n: pages only (`channel.rs`).
    extra: Vec<ChannelOut>,
    /// Their connections (timeouts, closing, and shutting them when one fails), in the same order.
    extra_conns: Vec<Connection>,
    /// postcopy-preempt: the urgent connection, idle until postcopy (and gone while it is paused).
    urgent: Option<UrgentLink>,
    /// HEADER said postcopy-preempt: a recovery makes the urgent connection again.
    preempt: bool,
    log: DirtyLog,
    params: &'a Mutex<MigrationParams>,
    progress: &'a ProgressCell,
    cancel: &'a Cancel,
    throughput: Throughput,
    /// Whether max-bandwidth applies (not during the switchover).
    throttle: bool,
    /// END went out: the destination may hold a complete guest, waiting for GO.
    end_sent: bool,
    postcopy: &'a PostcopyControl,
    /// Pages of a pass cut short by the switch to postcopy (`channel.rs`), owed with the dirty ones.
    unsent: PageBitmap,
    /// During pass 0: the digests of the pages the destination holds from its base checkpoint.
    base: Option<Vec<u128>>,
}

impl Sender<'_> {
    fn params(&self) -> MigrationParams {
        self.params.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run(&mut self) -> Result<(), MigrationError> {
        let started = self.progress.snapshot().started;
        let layout = self.ram.layout().clone();
        self.out.enc.preamble()?;
        let header = StreamHeader {
            migration_id: self.migration_id,
            page_size: PAGE_SIZE as u32,
            vcpu_count: self.vm.vcpu_count() as u32,
            // One on exec:/ssh: (a single pipe): their channels could only start more destinations.
            channels: if self.params().handover {
                1
            } else {
                transport::channels_for(self.uri, self.params().channels)
            },
            asks_base: !self.params().handover,
            handover: self.params().handover,
            // Its own connection, so only where a transport has more than one.
            preempt: self.params().postcopy_preempt && !self.params().handover && !self.uri.single_connection(),
            regions: layout.regions().to_vec(),
        };
        self.out.enc.header(&header)?;
        // The destination knows the migration before its other channels knock.
        self.out.enc.flush()?;
        if header.handover {
            // Guest RAM itself: its memfds, attached to RAM_FDS, straight to the socket. Sent
            // while the guest still runs here (the destination only maps it, and runs nothing
            // before GO), so that mapping it is not part of the downtime.
            let fds = self.ram.shared_fds();
            let mut record = Vec::new();
            Encoder::new(&mut record).ram_fds(fds.len() as u32)?;
            self.conn.send_with_fds(&record, &fds)?;
            // The destination builds its VM and maps the memory before the guest stops here.
            self.sync_with_destination()?;
            self.progress.update(|p| {
                p.status = Status::Active;
                p.setup_time = Some(started.elapsed());
            });
            return self.switchover(0, &mut PageBitmap::new(self.ram.page_count()), Final::Handover);
        }
        let base = self.read_base()?;
        for index in 1..header.channels {
            self.connect_channel(index)?;
        }
        self.preempt = header.preempt;
        if header.preempt {
            self.urgent = Some(self.connect_urgent()?);
        }
        self.progress.update(|p| {
            p.status = Status::Active;
            p.setup_time = Some(started.elapsed());
        });

        // Pass 0: everything. Pages the host's page tables show to be zero are not read.
        {
            // Both bitmaps go once pass 0 is out: the sender keeps two per migration after it (the
            // dirty set, and the pass being sent), 32 KiB per GiB of guest RAM each.
            let known_zero = pagemap::zero_pages(&self.ram, ZeroHints::get()).ok();
            let all = PageBitmap::full(self.ram.page_count());
            self.base = base;
            self.send_pass(0, &all, known_zero.as_ref())?;
            self.base = None;
        }

        // Passes 1..n while the guest runs. Before stopping the guest, wait until the destination has
        // applied what it was sent (SYNC), so that its backlog is not part of the downtime; then look
        // at the dirty set once more, since the guest ran meanwhile.
        let mut dirty = PageBitmap::new(self.ram.page_count());
        let mut pass = 0;
        let mut synced = false;
        let mut last_collect = Instant::now();
        // Dirty pages left after each pass since the last throttle step: what the stall rule sees.
        let mut since_step: Vec<u64> = Vec::new();
        let mut last_pass_pages = self.ram.page_count() as u64;
        loop {
            let left = self.collect(&mut dirty, &mut last_collect)?;
            let after = self.params().postcopy_after_passes;
            if after > 0 && pass >= after && !self.postcopy.is_requested() {
                log::info!("switching to postcopy after {pass} passes (postcopy-after-passes)");
                self.postcopy.start();
            }
            if self.postcopy.is_requested() {
                // Pages not sent yet and never touched (the page tables say so) go as zero
                // markers now, while the guest still runs, not as postcopy pages; one the guest
                // writes before the pause is in the final dirty set, and owed after all.
                if let Ok(mut zero) = pagemap::zero_pages(&self.ram, ZeroHints::get()) {
                    zero.intersect_with(&self.unsent);
                    self.send_zero_runs(&zero)?;
                    self.unsent.subtract(&zero);
                }
                log::info!(
                    "precopy stops after pass {pass} for postcopy: {left} dirty pages, {} unsent",
                    self.unsent.count()
                );
                self.progress.update(|p| p.stop_reason = Some("postcopy"));
                return self.switchover(pass + 1, &mut dirty, Final::Postcopy);
            }
            let params = self.params();
            let outcome = PassOutcome {
                remaining_bytes: (left * PAGE_SIZE) as u64,
                throughput: self.throughput.bytes_per_sec(),
                passes_done: pass,
                last_pass_pages,
            };
            let mut decision = convergence::decide(outcome, params.downtime_limit, params.max_passes);
            self.progress.update(|p| {
                p.expected_downtime = convergence::expected_downtime(outcome.remaining_bytes, outcome.throughput);
                if let Some(last) = p.passes.last_mut() {
                    last.dirty_after = left as u64;
                }
            });
            if !synced {
                since_step.push(left as u64);
            }
            if !decision.stops() {
                decision = self.on_stall(&params, &mut since_step)?;
            }
            if decision.stops() && !synced {
                self.sync_with_destination()?;
                synced = true;
                continue;
            }
            if decision.stops() {
                self.progress.update(|p| {
                    p.stop_reason = Some(decision.name());
                    p.converged = Some(decision.converged());
                });
                log::info!("precopy stops after pass {pass}: {decision:?}, {left} pages left");
                break;
            }
            pass += 1;
            synced = false;
            let to_send = dirty.take();
            last_pass_pages = left as u64;
            self.send_pass(pass, &to_send, None)?;
        }

        self.switchover(pass + 1, &mut dirty, Final::Pages)
    }

    /// Precopy goes on; if it has stopped paying, says so and applies the stall policy: returns
    /// `Stalled` to switch over now, or `Continue`.
    fn on_stall(&mut self, params: &MigrationParams, since_step: &mut Vec<u64>) -> Result<Decision, MigrationError> {
        let Some(why) = convergence::stalled(since_step) else {
            // Paying (again), once there are passes enough to tell; `stall_reason` keeps the last
            // stall for the record.
            if since_step.len() > convergence::STALL_PASSES {
                self.progress.update(|p| p.converging = Some(true));
            }
            return Ok(Decision::Continue);
        };
        log::info!("precopy is not converging: {why}");
        self.progress.update(|p| {
            p.converging = Some(false);
            p.stall_reason = Some(why.clone());
        });
        let policy = match params.stall_policy {
            StallPolicy::RateLimit => {
                let now = self.progress.snapshot().dirty_rate_limit;
                let link = (self.throughput.bytes_per_sec() / PAGE_SIZE as f64) as u64;
                let next = if now == 0 { link / 4 } else { now / 2 }.max(1);
                if self.log.set_dirty_rate_limit(next) {
                    log::info!("dirty-rate limit: {next} pages/s (link {link} pages/s)");
                    self.progress.update(|p| p.dirty_rate_limit = next);
                    since_step.drain(..since_step.len().saturating_sub(1));
                    return Ok(Decision::Continue);
                }
                log::info!("the {} tracker cannot limit the dirty rate: throttling instead", self.log.kind().name());
                StallPolicy::Throttle
            }
            other => other,
        };
        // Pausing and resuming the vCPUs a hundred times a second while KVM's dirty rings track
        // them lost writes in the test suite on this host (pages missing at the destination; a
        // single pause, as at the switchover, does not). Until that is understood, such a
        // migration does not throttle.
        let policy = if policy == StallPolicy::Throttle && self.log.kind() == TrackerKind::KvmDirtyRing {
            log::warn!("auto-converge is not used with kvm-dirty-ring; going on without it");
            StallPolicy::KeepGoing
        } else {
            policy
        };
        match policy {
            StallPolicy::KeepGoing => Ok(Decision::Continue),
            StallPolicy::Switchover => Ok(Decision::Stalled),
            StallPolicy::Fail => Err(MigrationError::NotConverging(why)),
            StallPolicy::RateLimit => unreachable!("handled above"),
            StallPolicy::Postcopy => {
                log::info!("switching to postcopy (stall policy)");
                self.postcopy.start();
                Ok(Decision::Continue)
            }
            StallPolicy::Throttle => {
                let now = self.progress.snapshot().throttle_percent;
                let next =
                    if now == 0 { params.throttle_initial } else { now.saturating_add(params.throttle_increment) }
                        .min(MAX_THROTTLE);
                if next != now {
                    log::info!("auto-converge: vCPUs throttled to {next}%");
                    self.vm.set_throttle(next);
                    self.progress.update(|p| p.throttle_percent = next);
                }
                // Judge the new step on passes made under it.
                since_step.drain(..since_step.len().saturating_sub(1));
                Ok(Decision::Continue)
            }
        }
    }

    /// Pause, final pages (or, for postcopy, the list of pages still owed), state, READY, GO,
    /// STARTED; for postcopy, then the owed pages.
    fn switchover(&mut self, pass: u32, dirty: &mut PageBitmap, kind: Final) -> Result<(), MigrationError> {
        let postcopy = kind == Final::Postcopy;
        self.cancel.check()?;
        self.progress.update(|p| p.status = Status::Device);
        let paused_at = Instant::now();
        let was_running = self.vm.pause_for_switchover()?;
        let mut times = SwitchoverTimes { pause: paused_at.elapsed(), ..Default::default() };
        // The guest is paused: a destination that stalls must cost about a second, not minutes.
        let timeout = self.params().switchover_timeout;
        self.conn.set_write_timeout(Some(timeout))?;
        self.conn.set_read_timeout(Some(timeout))?;
        for c in &self.extra_conns {
            c.set_write_timeout(Some(timeout))?;
        }
        self.throttle = false;
        let step = Instant::now();
        self.log.collect_final(dirty)?;
        let mut last = dirty.take();
        let mut owed = None;
        if kind == Final::Handover {
            // Nothing: the destination mapped the guest's RAM before the pause (`run`).
        } else if postcopy {
            // No final pass: what is dirty or was never sent is owed, and follows after GO.
            last.union_with(&self.unsent);
            self.out.enc.owed(&last)?;
            let n = last.count() as u64;
            self.progress.update(|p| {
                p.postcopy = Some(PostcopyStats { owed_at_switchover: n, owed_left: n, ..Default::default() })
            });
            owed = Some(OwedPages::new(last));
        } else {
            let drop: Vec<usize> = last.iter_ones().take(self.params().drop_final_pages as usize).collect();
            for page in drop {
                log::warn!("fault injection: page {page} left out of the final pass");
                last.clear_bit(page);
            }
            self.send_pass(pass, &last, None)?;
        }
        // The page channels are done: closing them tells the destination their last pass is whole.
        for c in &self.extra_conns {
            c.finish_writing()?;
        }
        // Without postcopy the urgent connection has nothing to carry.
        if !postcopy {
            if let Some(u) = self.urgent.take() {
                u.conn.shutdown();
            }
        }
        times.last_pass = step.elapsed();

        let step = Instant::now();
        let state = self.vm.save_state()?;
        times.save_state = step.elapsed();
        let step = Instant::now();
        for (i, blob) in state.vcpus.iter().enumerate() {
            self.out.enc.vcpu_state(i as u32, blob)?;
        }
        self.out.enc.vm_state(&state.vm)?;
        for (name, blob) in &state.devices {
            self.out.enc.device_state(name, blob)?;
        }
        self.end_sent = true;
        self.out.enc.end_with(state.vcpus.len() as u32, state.devices.len() as u32, was_running, postcopy)?;
        self.out.enc.flush()?;
        self.expect_reply(Reply::Ready, "READY")?;
        times.send_state_and_ready = step.elapsed();

        // GO: from the moment its bytes are handed to the kernel the destination may run the guest,
        // and the source must not. A GO that failed to go out whole cannot be acted on (the
        // destination needs the complete, checksummed record), so that failure may still resume,
        // provided no byte of it can follow later: it is written straight to the socket (nothing
        // of it left in a buffer that a later flush could complete), and on failure the socket is
        // shut down before anything else happens.
        let step = Instant::now();
        self.cancel.commit()?;
        self.out.enc.flush()?;
        if let Err(e) = Encoder::new(&self.conn).go() {
            self.conn.shutdown();
            return Err(lost("sending GO", Some(e.into())));
        }
        match read_reply(&self.conn) {
            Ok(Reply::Started) => {}
            // ERROR means the destination discarded the guest and never runs it.
            Ok(Reply::Refused(reason)) => return Err(MigrationError::Refused(reason)),
            // The destination may be running the guest, which then needs its owed pages: a
            // postcopy whose link broke (RESUME, on a destination that missed GO, counts as GO).
            Ok(other) if owed.is_some() => {
                let why = format!("{} instead of STARTED after GO", other.name());
                return self.postcopy_unstarted(owed, why, paused_at);
            }
            Err(e) if owed.is_some() => {
                let why = format!("no STARTED after GO: {}", crate::report(&e));
                return self.postcopy_unstarted(owed, why, paused_at);
            }
            Ok(other) => {
                return Err(MigrationError::Unresolved(format!("{} instead of STARTED after GO", other.name())))
            }
            Err(e) => return Err(MigrationError::Unresolved(format!("no STARTED after GO: {}", crate::report(&e)))),
        }
        times.go_and_started = step.elapsed();
        let downtime = paused_at.elapsed();
        // Tell the destination we know, so it stops listening for RESOLVE (best effort: it keeps
        // answering if this is lost).
        if let Err(e) = self.out.enc.done().and_then(|_| self.out.enc.flush()) {
            log::info!("cannot send DONE: {}", crate::report(&e));
        }
        // The destination runs the guest now; nothing may fail the migration any more.
        if let Err(e) = self.log.stop() {
            log::error!("stopping the dirty tracker after the switchover: {}", crate::report(&e));
        }
        let bytes = self.bytes_written();
        self.progress.update(|p| {
            p.downtime = Some(downtime);
            p.switchover = Some(times);
            p.bytes = bytes;
        });
        if let Some(owed) = owed {
            self.postcopy_phase(owed, None);
        }
        self.vm.migration_completed();
        let bytes = self.bytes_written();
        self.progress.update(|p| p.bytes = bytes);
        finish(self.progress, Status::Completed, None);
        Ok(())
    }

    /// Sends the pages of `zero` as zero markers, each run on the channel its pages belong to.
    fn send_zero_runs(&mut self, zero: &PageBitmap) -> Result<(), MigrationError> {
        let channels = 1 + self.extra.len() as u32;
        let layout = self.ram.layout().clone();
        for (first, count) in zero.runs() {
            let mut p = first;
            while p < first + count {
                // A run ends where its chunk (its channel's share) or its region ends.
                let chunk_end = (p / crate::channel::CHUNK_PAGES + 1) * crate::channel::CHUNK_PAGES;
                let mut n = (first + count).min(chunk_end) - p;
                while n > 1 && !layout.is_contiguous(p, n) {
                    n -= 1;
                }
                let out = match crate::channel::owner(p, channels) {
                    0 => &mut self.out,
                    c => &mut self.extra[c as usize - 1],
                };
                out.enc.zero_pages(layout.gpa_of(p), n as u64)?;
                p += n;
            }
        }
        self.out.enc.flush()?;
        for o in &mut self.extra {
            o.enc.flush()?;
        }
        self.progress.update(|pr| pr.zero_pages += zero.count() as u64);
        Ok(())
    }

    /// The destination's answer to HEADER: the digests of the pages it holds from a base
    /// checkpoint (`--base`), or none.
    fn read_base(&mut self) -> Result<Option<Vec<u128>>, MigrationError> {
        let pages = self.ram.page_count();
        self.conn.set_read_timeout(Some(transport::STALL_TIMEOUT))?;
        // Unbuffered: nothing after BASE_END is read here.
        let mut dec = Decoder::new(&self.conn);
        let mut table: Vec<u128> = Vec::new();
        loop {
            match dec.next_record() {
                Ok(Record::Base { first_page, digests }) => {
                    let n = digests.len() / 16;
                    if first_page != table.len() as u64 || table.len() + n > pages {
                        return Err(lost(format!("BASE for pages {first_page}+{n} out of order or beyond RAM"), None));
                    }
                    table
                        .extend(digests.chunks_exact(16).map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes"))));
                }
                Ok(Record::BaseEnd { pages: 0 }) if table.is_empty() => return Ok(None),
                Ok(Record::BaseEnd { pages: n }) if n as usize == pages && table.len() == pages => {
                    log::info!("the destination holds a base checkpoint: pages it has are not sent");
                    return Ok(Some(table));
                }
                Ok(Record::BaseEnd { pages: n }) => {
                    return Err(lost(
                        format!("BASE_END says {n} pages, {} digests came for {pages}", table.len()),
                        None,
                    ))
                }
                Ok(Record::Error(why)) => return Err(MigrationError::Refused(why.to_string())),
                Ok(other) => return Err(lost(format!("waiting for BASE_END: {other:?} came"), None)),
                Err(e) => return Err(lost("waiting for BASE_END", Some(e))),
            }
        }
    }

    /// Postcopy after STARTED: the guest runs on the destination, and its owed pages go there.
    /// Nothing here fails the migration (the guest cannot come back: the destination has run
    /// it): a broken link pauses it until the operator resumes it (`migrate {"resume": true}`),
    /// as often as it takes.
    fn postcopy_phase(&mut self, mut owed: OwedPages, mut broken: Option<String>) {
        loop {
            if let Some(mut why) = broken.take() {
                self.conn.shutdown();
                if let Some(u) = self.urgent.take() {
                    u.conn.shutdown();
                }
                loop {
                    log::warn!("postcopy paused: {why}; {} pages owed", owed.unsent());
                    self.progress.update(|p| {
                        p.status = Status::PostcopyPaused;
                        if let Some(s) = p.postcopy.as_mut() {
                            s.paused_reason = Some(why.clone());
                        }
                    });
                    let uri = self.postcopy.wait_resume();
                    self.progress.update(|p| p.status = Status::PostcopyRecover);
                    match self.reconnect(&uri, &mut owed) {
                        Ok(()) => break,
                        Err(e) => why = format!("resuming at {uri}: {}", crate::report(&e)),
                    }
                }
                owed.stats.recoveries += 1;
                owed.stats.paused_reason = None;
                log::info!("postcopy resumed; {} pages still owed", owed.unsent());
            }
            self.progress.update(|p| p.status = Status::PostcopyActive);
            let cap = self.params().max_postcopy_bandwidth;
            let pushed = postcopy::source::push(
                &self.ram,
                &mut self.out.enc,
                &self.conn,
                self.urgent.as_mut(),
                &mut owed,
                self.progress,
                cap,
            );
            // push shut it: done with, or broken (a recovery makes a new one).
            self.urgent = None;
            let bytes = self.bytes_written();
            let stats = owed.stats.clone();
            self.progress.update(|p| {
                p.bytes = bytes;
                p.postcopy = Some(stats);
            });
            match pushed {
                Ok(()) => {
                    log::info!("postcopy complete in {:?}", owed.elapsed());
                    return;
                }
                Err(e) => broken = Some(crate::report(&e)),
            }
        }
    }

    /// GO went out for a postcopy and STARTED did not come back: the pages must follow whether or
    /// not the destination runs the guest yet, so this is a paused postcopy from the start.
    fn postcopy_unstarted(
        &mut self,
        owed: Option<OwedPages>,
        why: String,
        paused_at: Instant,
    ) -> Result<(), MigrationError> {
        if let Err(e) = self.log.stop() {
            log::error!("stopping the dirty tracker after the switchover: {}", crate::report(&e));
        }
        self.progress.update(|p| p.downtime = Some(paused_at.elapsed()));
        if let Some(owed) = owed {
            self.postcopy_phase(owed, Some(why));
        }
        self.vm.migration_completed();
        finish(self.progress, Status::Completed, None);
        Ok(())
    }

    /// A new connection for a paused postcopy: RESUME, and the destination's word on what it
    /// still lacks (OWED, RESUMED).
    fn reconnect(&mut self, uri: &Uri, owed: &mut OwedPages) -> Result<(), MigrationError> {
        let conn =
            transport::connect(uri).map_err(|source| MigrationError::Connect { uri: uri.to_string(), source })?;
        conn.set_write_timeout(Some(transport::STALL_TIMEOUT))?;
        conn.set_read_timeout(Some(transport::STALL_TIMEOUT))?;
        let mut out = ChannelOut::new(encoder(&conn, &self.params())?);
        out.enc.preamble()?;
        out.enc.resume(self.migration_id, self.preempt)?;
        out.enc.flush()?;
        let pages = self.ram.page_count();
        let mut lacking = PageBitmap::new(pages);
        // Unbuffered, so that nothing after RESUMED (the requests) is read here.
        let mut dec = Decoder::new(&conn);
        loop {
            match dec.next_record() {
                Ok(Record::Owed { first_page, pages: n, bits }) => {
                    if !lacking.set_from_bits(first_page, n, bits) {
                        return Err(lost(format!("resuming: OWED for pages {first_page}+{n}, beyond RAM"), None));
                    }
                }
                Ok(Record::Resumed { pages_owed }) if pages_owed == lacking.count() as u64 => break,
                Ok(Record::Resumed { pages_owed }) => {
                    return Err(lost(
                        format!("resuming: RESUMED says {pages_owed} pages, OWED listed {}", lacking.count()),
                        None,
                    ))
                }
                Ok(Record::Error(why)) => return Err(MigrationError::Refused(why.to_string())),
                Ok(other) => return Err(lost(format!("resuming: unexpected {other:?}"), None)),
                Err(e) => return Err(lost("resuming", Some(e))),
            }
        }
        // Requests may wait long now (the guest asks only when it faults).
        conn.set_read_timeout(None)?;
        log::info!("postcopy resumed at {uri}: the destination lacks {} pages", lacking.count());
        owed.replace(lacking);
        self.out = out;
        self.conn = conn;
        if self.preempt {
            // The destination waits for it a while (dest::URGENT_WAIT), and goes on without it.
            match self.connect_urgent_at(uri) {
                Ok(u) => self.urgent = Some(u),
                Err(e) => log::warn!("postcopy resumed without its urgent connection: {}", crate::report(&e)),
            }
        }
        Ok(())
    }

    /// Waits for `want` from the destination (READY or SYNCED).
    fn expect_reply(&mut self, want: Reply, name: &str) -> Result<(), MigrationError> {
        match read_reply(&self.conn) {
            Ok(r) if r == want => Ok(()),
            Ok(Reply::Refused(reason)) => Err(MigrationError::Refused(reason)),
            Ok(other) => Err(lost(format!("waiting for {name}: {} came instead", other.name()), None)),
            Err(e) => Err(lost(format!("waiting for {name}"), Some(e))),
        }
    }

    /// Sends SYNC and waits for SYNCED: the destination has applied everything sent so far.
    fn sync_with_destination(&mut self) -> Result<(), MigrationError> {
        self.out.enc.sync()?;
        self.out.enc.flush()?;
        self.conn.set_read_timeout(Some(SYNC_TIMEOUT))?;
        self.expect_reply(Reply::Synced, "SYNCED")
    }

    /// After a failure before GO: the guest is (or will be) resumed here; make sure the destination
    /// discards its copy. ABORT on the stream, and, if END went out and the stream may be broken,
    /// RESOLVE abort on new connections in the background (a destination that got READY out but
    /// no word since waits for one of them).
    fn abort_destination(&mut self) {
        // Short: the guest is still paused until this returns.
        let _ = self.conn.set_write_timeout(Some(Duration::from_millis(200)));
        let on_stream = self.out.enc.abort().and_then(|_| self.out.enc.flush());
        if !self.end_sent {
            return;
        }
        if let Err(e) = &on_stream {
            log::info!("cannot send ABORT on the migration stream ({}); trying new connections", crate::report(e));
        }
        let (uri, id) = (self.uri.clone(), self.migration_id);
        let _ = std::thread::Builder::new().name("migration-abort".into()).spawn(move || {
            for attempt in 1..=ABORT_NOTICES {
                match handover::ask(&uri, id, ResolveAction::Abort) {
                    Ok(Resolution::DestinationHasGuest) => {
                        // Cannot happen: GO never went out whole. Say it loudly if it does.
                        log::error!("the destination at {uri} claims the guest after ABORT");
                        return;
                    }
                    Ok(r) => {
                        log::info!("destination told to discard the guest: {r:?}");
                        return;
                    }
                    Err(e) => log::info!("ABORT notice {attempt}/{ABORT_NOTICES}: {e}"),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    }

    /// Takes the dirty set (re-protected by the tracker) and measures the dirty rate; returns how many
    /// pages are dirty now.
    fn collect(&mut self, dirty: &mut PageBitmap, last: &mut Instant) -> Result<usize, MigrationError> {
        let before = dirty.count();
        self.log.collect(dirty)?;
        let count = dirty.count();
        let secs = last.elapsed().as_secs_f64();
        *last = Instant::now();
        self.progress.update(|p| {
            p.dirty_pages = count as u64;
            if secs > 0.0 {
                p.dirty_rate = (count - before) as f64 / secs;
            }
        });
        Ok(count)
    }

    /// Opens page channel `index`: connect, preamble, CHANNEL.
    fn connect_channel(&mut self, index: u32) -> Result<(), MigrationError> {
        let conn = transport::connect(self.uri)
            .map_err(|source| MigrationError::Connect { uri: format!("{} (channel {index})", self.uri), source })?;
        conn.set_write_timeout(Some(transport::STALL_TIMEOUT))?;
        self.cancel.attach(&conn);
        self.cancel.check()?;
        let mut out = ChannelOut::new(encoder(&conn, &self.params())?);
        out.enc.preamble()?;
        out.enc.channel(self.migration_id, index)?;
        self.extra.push(out);
        self.extra_conns.push(conn);
        Ok(())
    }

    /// Opens the urgent connection (postcopy-preempt): connect, preamble, CHANNEL index 0. Nothing
    /// more goes on it before postcopy.
    fn connect_urgent(&mut self) -> Result<UrgentLink, MigrationError> {
        let u = self.connect_urgent_at(self.uri)?;
        self.cancel.attach(&u.conn);
        self.cancel.check()?;
        Ok(u)
    }

    fn connect_urgent_at(&self, uri: &Uri) -> Result<UrgentLink, MigrationError> {
        let conn = transport::connect(uri)
            .map_err(|source| MigrationError::Connect { uri: format!("{uri} (urgent connection)"), source })?;
        conn.set_write_timeout(Some(transport::STALL_TIMEOUT))?;
        // Never compressed: its records are a few pages, and every microsecond counts.
        let mut enc = Encoder::new(BufWriter::with_capacity(URGENT_WRITE_BUFFER, conn.try_clone()?));
        enc.preamble()?;
        enc.channel(self.migration_id, 0)?;
        enc.flush()?;
        Ok(UrgentLink { conn, enc })
    }

    /// Stream bytes written so far, all channels together.
    fn bytes_written(&self) -> u64 {
        self.out.enc.bytes_written() + self.extra.iter().map(|o| o.enc.bytes_written()).sum::<u64>()
    }

    /// Sends the pages of `pages` (those in `known_zero` as zero without reading them), each
    /// channel its share in its own thread, each share ending with PASS_END.
    fn send_pass(
        &mut self,
        pass: u32,
        pages: &PageBitmap,
        known_zero: Option<&PageBitmap>,
    ) -> Result<(), MigrationError> {
        self.progress.update(|p| p.pass = pass);
        let max_bandwidth = if self.throttle { self.params().max_bandwidth } else { 0 };
        // Each channel gets its share of the cap; compression weighs itself against it.
        let share = max_bandwidth / (1 + self.extra.len() as u64);
        self.out.enc.set_link_cap(share);
        for o in &mut self.extra {
            o.enc.set_link_cap(share);
        }
        let channels = 1 + self.extra.len() as u32;
        let bytes_before = self.bytes_written();
        let mut shared = PassShared::new(
            &self.ram,
            pages,
            known_zero,
            channels,
            self.progress,
            self.cancel,
            max_bandwidth,
            bytes_before,
            (self.throughput.bytes, self.throughput.time),
            &self.extra_conns,
        );
        shared.stop = Some(self.postcopy.flag());
        shared.base = self.base.as_deref();
        let (out, conn, extra) = (&mut self.out, &self.conn, &mut self.extra);
        let sent = if extra.is_empty() {
            shared.send_share(0, pass, out, Some(conn))?
        } else {
            std::thread::scope(|s| {
                let shared = &shared;
                let others: Vec<_> = extra
                    .iter_mut()
                    .enumerate()
                    .map(|(i, o)| s.spawn(move || shared.send_share(i as u32 + 1, pass, o, None)))
                    .collect();
                // Channel 0's error first: a refusal from the destination comes on it.
                let mut result = shared.send_share(0, pass, out, Some(conn));
                for t in others {
                    let r = t.join().unwrap_or_else(|_| {
                        Err(MigrationError::Send(std::io::Error::other("a channel thread panicked")))
                    });
                    result = match (result, r) {
                        (Ok(a), Ok(b)) => Ok(a + b),
                        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    };
                }
                result
            })?
        };
        let duration = shared.started.elapsed();
        let bytes = self.bytes_written() - bytes_before;
        self.throughput.bytes += bytes;
        self.throughput.time += duration;
        let (total, rate) = (self.bytes_written(), self.throughput.bytes_per_sec());
        let nanos =
            |a: &std::sync::atomic::AtomicU64| Duration::from_nanos(a.load(std::sync::atomic::Ordering::Relaxed));
        let mut compressed = self.out.enc.compress_stats();
        for o in &self.extra {
            compressed.add(&o.enc.compress_stats());
        }
        let codec = self.out.enc.codec();
        self.progress.update(|p| {
            p.bytes = total;
            p.throughput = rate;
            if codec != Codec::None || compressed != CompressStats::default() {
                p.compression = Some((codec, compressed));
            }
            p.passes.push(PassRecord {
                pass,
                pages: sent,
                bytes,
                duration,
                send: nanos(&shared.send_ns),
                bandwidth_wait: nanos(&shared.wait_ns),
                dirty_after: 0,
            });
        });
        self.unsent.union_with(&shared.unsent());
        let skipped = shared.base_skipped.load(std::sync::atomic::Ordering::Relaxed);
        if skipped > 0 {
            self.progress.update(|p| p.base_skipped += skipped);
        }
        Ok(())
    }

    /// A write error often means the destination refused the stream and closed: fetch its reason.
    fn explain(&mut self, e: MigrationError) -> MigrationError {
        if matches!(e, MigrationError::Unresolved(_)) {
            return e; // never turned into anything the source might resume on
        }
        if self.cancel.is_cancelled() {
            return MigrationError::Cancelled;
        }
        if !matches!(e, MigrationError::Send(_)) {
            return e;
        }
        let _ = self.conn.set_read_timeout(Some(Duration::from_secs(1)));
        match read_reply(&self.conn) {
            Ok(Reply::Refused(reason)) => MigrationError::Refused(reason),
            _ => e,
        }
    }
}

/// What the switchover sends besides the machine state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Final {
    /// The last dirty pages: the guest is whole at the destination before it runs.
    Pages,
    /// The list of pages still owed; they follow once the guest runs there.
    Postcopy,
    /// Guest RAM's memfds: nothing to copy (same-host handover).
    Handover,
}

/// What the destination said on the return path.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ready,
    Synced,
    Started,
    Refused(String),
    Unexpected(String),
}

impl Reply {
    fn name(&self) -> String {
        match self {
            Reply::Ready => "READY".into(),
            Reply::Synced => "SYNCED".into(),
            Reply::Started => "STARTED".into(),
            Reply::Refused(why) => format!("ERROR ({why})"),
            Reply::Unexpected(what) => what.clone(),
        }
    }
}

/// The destination speaks before the end only to refuse: notice it between records rather than at
/// the next failed write.
pub(crate) fn check_peer(conn: &Connection) -> Result<(), MigrationError> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
        return Ok(());
    }
    Err(match read_reply(conn) {
        Ok(Reply::Refused(reason)) => MigrationError::Refused(reason),
        Ok(other) => lost(format!("while sending: an unexpected {} came", other.name()), None),
        Err(e) => lost("while sending", Some(e)),
    })
}

fn read_reply(conn: &Connection) -> Result<Reply, StreamError> {
    let mut dec = Decoder::new(conn);
    Ok(match dec.next_record()? {
        Record::Ready => Reply::Ready,
        Record::Synced => Reply::Synced,
        Record::Started => Reply::Started,
        Record::Error(reason) => Reply::Refused(reason.to_string()),
        other => Reply::Unexpected(format!("{other:?}")),
    })
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        // Stop tracking before anything else happens to the guest (DirtyLog's drop does it too;
        // doing it here first keeps the order explicit), then close the stream.
        if let Err(e) = self.log.stop() {
            log::error!("stopping the dirty tracker: {}", crate::report(&e));
        }
        let _ = self.out.enc.get_mut().flush();
        self.conn.shutdown();
        for c in &self.extra_conns {
            c.shutdown();
        }
        if let Some(u) = &self.urgent {
            u.conn.shutdown();
        }
    }
}
