//! The destination side: reads the stream, checks every record, fills guest RAM and, once all of it
//! has arrived, restores the machine state and says READY. A guest whose state arrived incomplete
//! never runs: anything wrong ends the migration with an ERROR reply to the source and an error here.
//! Whether the restored guest then runs is the handover's to decide (`handover.rs`): only on GO.
//!
//! The receiver is a phase plus a step per record (after Cloud Hypervisor's
//! `ReceiveMigrationState`); the preamble and HEADER were read when the connection was screened
//! (`incoming.rs`):
//!
//! ```text
//! HEADER --> Ram --PAGES/ZERO_PAGES/PASS_END/SYNC--> Ram
//!            Ram --VCPU/VM/DEVICE_STATE--> State --...STATE--> State --END--> restored, READY
//! ```
//!
//! What stays bounded whatever the peer sends: one record buffer (`MAX_PAYLOAD`), RAM of the size the
//! header declares (capped, and checked against the VM the emulator builds), one state blob per vCPU
//! (`MAX_STATE_BLOB` each), and at most `MAX_DEVICES` device states.

use std::io::BufReader;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::channel;
use crate::checkpoint::Checkpoint;
use crate::handover::{self, Handover};
use crate::incoming::{Accepted, ChannelJoin};
use crate::postcopy::dest::IncomingPostcopy;
use crate::ram::{GuestRam, RamError, RamLayout, RamRegion, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, Frame, Record, RecordType, StreamError, StreamHeader, MAX_VCPUS};
use crate::transport::Connection;
use crate::vm::{MachineState, RestorableVm, VmError};

/// Device states one stream may carry.
pub const MAX_DEVICES: usize = 64;
const READ_BUFFER: usize = 256 << 10;
/// How long the further channels of a migration have to connect once its HEADER is in.
const CHANNELS_DEADLINE: Duration = Duration::from_secs(10);
/// At END, how long the page channels have to report their last pass (the source closed them
/// before it sent the machine state, so they are normally done already).
const CHANNELS_FINISH: Duration = Duration::from_secs(5);

/// Why a destination refused a stream (sent back to the source as ERROR).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bad stream")]
    Stream(#[from] StreamError),
    #[error("the source closed the connection before the end of the stream")]
    SourceClosed,
    #[error("page size {0} (this emu uses {PAGE_SIZE})")]
    PageSize(u32),
    #[error("{0} vCPUs (1 to {MAX_VCPUS} supported)")]
    VcpuCount(u32),
    #[error("RAM layout")]
    Layout(#[source] RamError),
    /// The emulator would not build the VM the header describes (a mismatch with `--mem`, `--smp`).
    #[error("{0}")]
    Create(String),
    #[error("RAM layout {stream:?} does not match this VM's {vm:?}")]
    LayoutMismatch { stream: Vec<RamRegion>, vm: Vec<RamRegion> },
    #[error("{stream} vCPUs in the stream, {vm} here")]
    VcpuMismatch { stream: u32, vm: usize },
    #[error("address {0:#x} is not guest RAM")]
    NotRam(u64),
    #[error("{count} pages at {gpa:#x} run past the end of its RAM region")]
    PastRegion { gpa: u64, count: u64 },
    #[error("{count} pages at {gpa:#x} are not all channel {index}'s (of {channels})")]
    WrongChannel { gpa: u64, count: u64, index: u32, channels: u32 },
    #[error("{missing} of {channels} channels did not connect within {CHANNELS_DEADLINE:?}")]
    ChannelsMissing { missing: u32, channels: u32 },
    #[error("channel {0} connected twice")]
    ChannelTwice(u32),
    #[error("channel {index}: {why}")]
    Channel { index: u32, why: String },
    #[error("ZERO_PAGES at unaligned address {0:#x}")]
    Unaligned(u64),
    #[error("PASS_END for pass {got} where pass {due} was due")]
    PassOrder { got: u32, due: u32 },
    #[error("state for vCPU {index}, but the VM has {count}")]
    VcpuIndex { index: u32, count: usize },
    #[error("second state for {0}")]
    Duplicate(String),
    #[error("more than {MAX_DEVICES} device states")]
    TooManyDevices,
    #[error("END before any vCPU or device state")]
    EndBeforeState,
    #[error("{0} record after the device state began")]
    RamAfterState(&'static str),
    #[error("unexpected {0} record")]
    Unexpected(&'static str),
    #[error("END, but {0} pages never arrived")]
    MissingPages(usize),
    #[error("END, but no state for vCPU {0}")]
    MissingVcpu(usize),
    #[error("END, but no VM state")]
    MissingVmState,
    #[error("END counts {end_vcpus} vCPU and {end_devices} device states, {vcpus} and {devices} arrived")]
    EndCounts { end_vcpus: u32, end_devices: u32, vcpus: usize, devices: usize },
    #[error(transparent)]
    Restore(VmError),
    #[error("the source gave the migration up (ABORT)")]
    Aborted,
    #[error("the guest was given up here: {0}")]
    Discarded(String),
    #[error("cannot answer the source")]
    Reply(#[source] std::io::Error),
    #[error("OWED for pages {first}+{count}, beyond the guest's {pages}")]
    OwedRange { first: u64, count: u32, pages: usize },
    #[error("OWED records, but END is not for postcopy")]
    OwedWithoutPostcopy,
    #[error("same-host handover: {0}")]
    Handover(String),
    #[error("cannot prepare for postcopy")]
    Postcopy(#[source] crate::postcopy::PostcopyError),
}

/// Where the receiver was, and what went wrong there.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration, {phase}")]
pub struct ReceiveError {
    pub phase: String,
    #[source]
    pub problem: Refusal,
}

/// An incoming migration whose guest is restored and paused, READY sent; the handover decides what
/// happens to it.
pub struct Received<V> {
    pub vm: Arc<V>,
    pub passes: u32,
    pub bytes: u64,
    replies: Encoder<Connection>,
    /// Postcopy: the pages still owed, and the fault handling that waits for them.
    pub postcopy: Option<Arc<IncomingPostcopy>>,
}

impl<V> Received<V> {
    /// Tells the source the guest is the destination's now (best effort: a source that misses it
    /// asks again with RESOLVE).
    pub fn started(&mut self) {
        if let Err(e) = self.replies.started().and_then(|_| self.replies.flush()) {
            log::warn!("incoming migration: cannot send STARTED ({e}); the source will ask");
        }
        // Postcopy: faults are served from before the first vCPU instruction. Requests go on the
        // migration connection, after STARTED.
        if let Some(pc) = &self.postcopy {
            let started = self.replies.get_mut().try_clone().and_then(|link| pc.start(Encoder::new(link)));
            if let Err(e) = started {
                log::error!("postcopy: cannot start serving faults: {e}");
            }
        }
    }
}

/// One channel's pages on the destination: what arrived, and what holds data. Each channel's
/// thread has its own, for its own share of the pages (`channel.rs`).
struct PageSink {
    ram: Arc<GuestRam>,
    /// Where `query-migrate` on the destination reads what has arrived.
    handover: Arc<Handover>,
    layout: RamLayout,
    index: u32,
    channels: u32,
    /// Pages that arrived at least once: all of them must have by END.
    received: PageBitmap,
    /// Pages holding data (not known zero): a later zero marker must clear them.
    nonzero: PageBitmap,
}

impl PageSink {
    fn new(ram: Arc<GuestRam>, handover: Arc<Handover>, index: u32, channels: u32) -> Self {
        let layout = ram.layout().clone();
        let pages = layout.page_count();
        let (received, nonzero) = (PageBitmap::new(pages), PageBitmap::new(pages));
        PageSink { ram, handover, layout, index, channels, received, nonzero }
    }

    /// Starts from a base checkpoint: the base's pages with data hold data (a zero marker must
    /// clear them), and, once the source has their digests, every page counts as arrived (the
    /// source sends each that differs).
    fn with_base(mut self, base: Option<&BaseLoaded>) -> Self {
        if let Some(b) = base {
            if b.told {
                self.received = PageBitmap::full(self.layout.page_count());
            }
            self.nonzero.union_with(&b.data);
        }
        self
    }

    /// The page range of a record, checked to be RAM, inside one region, and this channel's.
    fn page_range(&self, gpa: u64, count: u64) -> Result<usize, Refusal> {
        let first = self.layout.page_of(gpa).ok_or(Refusal::NotRam(gpa))?;
        let fits = usize::try_from(count).ok().filter(|&c| c > 0 && self.layout.is_contiguous(first, c));
        let Some(n) = fits else {
            return Err(Refusal::PastRegion { gpa, count });
        };
        if self.channels > 1 && !channel::owns(self.index, self.channels, first, n) {
            return Err(Refusal::WrongChannel { gpa, count, index: self.index, channels: self.channels });
        }
        Ok(first)
    }

    fn read_pages<R: std::io::Read>(&mut self, dec: &mut Decoder<R>, frame: &Frame) -> Result<(), Refusal> {
        let ram = self.ram.clone();
        let sink = &*self;
        let r = dec.read_pages(frame, |gpa, count| {
            let first = sink.page_range(gpa, count as u64)?;
            // Pages arriving for the first time are fresh memory: one populate call for the record
            // instead of a page fault per page (failure only costs the faults it would have saved).
            if sink.nonzero.ones_in_range(first, count).count() < count {
                let _ = ram.populate_pages(first, count);
            }
            // SAFETY: the destination's vCPUs have not run, and no other thread touches these pages
            // until the receiver returns: every channel's thread writes only its own share of the
            // pages (`page_range` checks it), and this slice is used only for this record's read.
            Ok::<_, Refusal>(unsafe { ram.pages_mut(first, count) })
        });
        let (gpa, count) = r??;
        let first = self.layout.page_of(gpa).expect("checked in page_range");
        self.received.set_range(first, count);
        self.nonzero.set_range(first, count);
        self.handover.received.normal_pages.fetch_add(count as u64, Relaxed);
        Ok(())
    }

    fn zero_pages(&mut self, gpa: u64, count: u64) -> Result<(), Refusal> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Refusal::Unaligned(gpa));
        }
        let first = self.page_range(gpa, count)?;
        let count = count as usize;
        // Only pages that hold data need clearing; fresh RAM is zero already.
        let had_data: Vec<usize> = self.nonzero.ones_in_range(first, count).collect();
        for p in had_data {
            self.ram.zero_page(p);
            self.nonzero.clear_bit(p);
        }
        self.received.set_range(first, count);
        self.handover.received.zero_pages.fetch_add(count as u64, Relaxed);
        Ok(())
    }
}

/// RAM_FDS and its memfds, one per RAM region, right after a handover's HEADER.
fn read_ram_fds(conn: &Connection, regions: usize) -> Result<Vec<std::os::fd::OwnedFd>, Refusal> {
    let mut record = [0u8; crate::stream::FRAME_LEN + 8];
    let fds = conn.recv_with_fds(&mut record).map_err(Refusal::Reply)?;
    match Decoder::new(&record[..]).next_record()? {
        Record::RamFds { regions: n } if n as usize == regions && fds.len() == regions => Ok(fds),
        Record::RamFds { regions: n } => Err(Refusal::Handover(format!(
            "RAM_FDS for {n} regions with {} memfds; the header has {regions} regions",
            fds.len()
        ))),
        _ => Err(Refusal::Unexpected("record in place of RAM_FDS")),
    }
}

/// A base checkpoint loaded into guest RAM before the stream's pages.
struct BaseLoaded {
    /// Pages that may hold the base's data (all of them, when loading failed part-way).
    data: PageBitmap,
    /// Whether the source has the digests (and skips the pages that match).
    told: bool,
}

/// What the page channels 1..n have applied, as their threads report it.
#[derive(Default)]
struct LaneProgress {
    /// Per channel (index - 1): the last pass whose PASS_END it has applied.
    applied: Vec<Option<u32>>,
    finished: usize,
    failed: Option<Refusal>,
}

/// The page channels 1..n of an incoming migration, each read and applied by its own thread.
struct Lanes {
    conns: Vec<Connection>,
    threads: Vec<JoinHandle<Result<PageSink, Refusal>>>,
    state: Arc<(Mutex<LaneProgress>, Condvar)>,
}

impl Lanes {
    fn none() -> Self {
        Lanes { conns: Vec::new(), threads: Vec::new(), state: Arc::default() }
    }

    /// Waits for channels 1..`channels` to connect (and, with `urgent`, the urgent connection,
    /// CHANNEL index 0), and starts a thread for each page channel. Returns the urgent connection
    /// unread: it carries nothing before postcopy.
    fn start(
        joins: &mpsc::Receiver<ChannelJoin>,
        channels: u32,
        urgent: bool,
        ram: &Arc<GuestRam>,
        handover: &Arc<Handover>,
        base: Option<&BaseLoaded>,
    ) -> Result<(Lanes, Option<Connection>), Refusal> {
        let mut lanes = Lanes::none();
        lanes.state.0.lock().unwrap_or_else(|e| e.into_inner()).applied = vec![None; channels as usize - 1];
        // Slot 0: the urgent connection (if one comes); slot i: page channel i.
        let mut conns: Vec<Option<Connection>> = (0..channels).map(|_| None).collect();
        let wanted = |i: usize| i > 0 || urgent;
        let deadline = Instant::now() + CHANNELS_DEADLINE;
        while (0..conns.len()).any(|i| wanted(i) && conns[i].is_none()) {
            let missing = (0..conns.len()).filter(|&i| wanted(i) && conns[i].is_none()).count() as u32;
            let left = deadline.saturating_duration_since(Instant::now());
            let (index, conn) = joins.recv_timeout(left).map_err(|_| Refusal::ChannelsMissing { missing, channels })?;
            let slot = conns.get_mut(index as usize).filter(|_| wanted(index as usize)).ok_or_else(|| {
                Refusal::Channel { index, why: format!("no such channel: the migration has {channels}") }
            })?;
            if slot.is_some() {
                return Err(Refusal::ChannelTwice(index));
            }
            *slot = Some(conn);
        }
        let urgent = conns[0].take();
        for (i, conn) in conns.into_iter().skip(1).flatten().enumerate() {
            let index = i as u32 + 1;
            let reader = conn.try_clone().map_err(Refusal::Reply)?;
            reader.set_read_timeout(Some(crate::transport::STALL_TIMEOUT)).map_err(Refusal::Reply)?;
            lanes.conns.push(conn);
            let sink = PageSink::new(ram.clone(), handover.clone(), index, channels).with_base(base);
            let state = lanes.state.clone();
            let t = std::thread::Builder::new()
                .name(format!("incoming-ch{index}"))
                .spawn(move || run_lane(reader, sink, &state))
                .map_err(Refusal::Reply)?;
            lanes.threads.push(t);
        }
        Ok((lanes, urgent))
    }

    /// Waits until every page channel has applied pass `pass` (what SYNC promises).
    fn wait_applied(&self, pass: u32, timeout: Duration) -> Result<(), Refusal> {
        let (m, cv) = &*self.state;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let done = |p: &LaneProgress| p.failed.is_some() || p.applied.iter().all(|a| a.is_some_and(|a| a >= pass));
        let (mut g, _) = cv.wait_timeout_while(g, timeout, |p| !done(p)).unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        if let Some(i) = g.applied.iter().position(|a| !a.is_some_and(|a| a >= pass)) {
            return Err(Refusal::Channel { index: i as u32 + 1, why: format!("pass {pass} not applied in time") });
        }
        Ok(())
    }

    /// END: waits for every page channel to end after pass `last_pass`, and hands back their pages.
    fn finish(mut self, last_pass: Option<u32>) -> Result<Vec<PageSink>, Refusal> {
        {
            let (m, cv) = &*self.state;
            let g = m.lock().unwrap_or_else(|e| e.into_inner());
            let n = self.threads.len();
            let (mut g, _) = cv
                .wait_timeout_while(g, CHANNELS_FINISH, |p| p.failed.is_none() && p.finished < n)
                .unwrap_or_else(|e| e.into_inner());
            if let Some(e) = g.failed.take() {
                return Err(e);
            }
            if g.finished < n {
                return Err(Refusal::Channel { index: 0, why: "page channels still open at END".into() });
            }
            if let Some(i) = g.applied.iter().position(|a| *a != last_pass) {
                return Err(Refusal::Channel {
                    index: i as u32 + 1,
                    why: format!("ended after pass {:?}, channel 0 after pass {last_pass:?}", g.applied[i]),
                });
            }
        }
        let mut sinks = Vec::new();
        for (i, t) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            let index = i as u32 + 1;
            match t.join() {
                Ok(r) => sinks.push(r?),
                Err(_) => return Err(Refusal::Channel { index, why: "its thread panicked".into() }),
            }
        }
        Ok(sinks)
    }
}

impl Drop for Lanes {
    /// A migration that failed or ended: channel threads still reading return at once.
    fn drop(&mut self) {
        for c in &self.conns {
            c.shutdown();
        }
    }
}

/// One page channel's thread: PAGES, ZERO_PAGES and PASS_END until the source closes it.
fn run_lane(conn: Connection, mut sink: PageSink, state: &(Mutex<LaneProgress>, Condvar)) -> Result<PageSink, Refusal> {
    let index = sink.index;
    let mut dec = Decoder::new(BufReader::with_capacity(READ_BUFFER, conn));
    let mut last_pass: Option<u32> = None;
    let mut counted = 0;
    let result = loop {
        let read = dec.bytes_read();
        sink.handover.received.bytes.fetch_add(read - counted, Relaxed);
        counted = read;
        let frame = match dec.next_frame() {
            Ok(f) => f,
            Err(StreamError::Closed) if last_pass.is_some() => break Ok(()),
            Err(StreamError::Closed) => break Err(Refusal::SourceClosed),
            Err(e) => break Err(Refusal::Stream(e)),
        };
        let step = match frame.kind {
            RecordType::Pages | RecordType::PagesCompressed => sink.read_pages(&mut dec, &frame),
            RecordType::ZeroPages | RecordType::PassEnd => match dec.read_record(&frame) {
                Ok(Record::ZeroPages { gpa, count }) => sink.zero_pages(gpa, count),
                Ok(Record::PassEnd { pass, .. }) => {
                    let due = last_pass.map_or(0, |p| p + 1);
                    if pass != due {
                        break Err(Refusal::PassOrder { got: pass, due });
                    }
                    last_pass = Some(pass);
                    let (m, cv) = state;
                    m.lock().unwrap_or_else(|e| e.into_inner()).applied[index as usize - 1] = Some(pass);
                    cv.notify_all();
                    Ok(())
                }
                Ok(_) => unreachable!("a ZERO_PAGES or PASS_END frame decodes to one"),
                Err(e) => Err(e.into()),
            },
            kind => Err(Refusal::Unexpected(kind.name())),
        };
        if let Err(e) = step {
            break Err(e);
        }
    };
    let (m, cv) = state;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    g.finished += 1;
    let result = match result {
        Ok(()) => Ok(sink),
        Err(e) => {
            if g.failed.is_none() {
                g.failed = Some(Refusal::Channel { index, why: crate::report(&e) });
            }
            Err(Refusal::Channel { index, why: crate::report(&e) })
        }
    };
    cv.notify_all();
    result
}

struct Target<V> {
    vm: Arc<V>,
    /// Channel 0's pages.
    sink: PageSink,
    lanes: Lanes,
    /// postcopy-preempt: the urgent connection, idle until postcopy (dropped at a precopy END).
    urgent: Option<Connection>,
    last_pass: Option<u32>,
    /// Postcopy: the pages the source will send after GO (OWED records).
    owed: Option<PageBitmap>,
    vcpus: Vec<Option<Vec<u8>>>,
    vm_state: Option<Vec<u8>>,
    devices: Vec<(String, Vec<u8>)>,
}

enum Phase<V> {
    AwaitHeader,
    Ram(Box<Target<V>>),
    State(Box<Target<V>>),
}

impl<V> Phase<V> {
    fn describe(&self) -> String {
        match self {
            Phase::AwaitHeader => "checking the header".into(),
            Phase::Ram(t) => match t.last_pass {
                None => "receiving RAM (pass 0)".into(),
                Some(p) => format!("receiving RAM (after pass {p})"),
            },
            Phase::State(_) => "receiving device state".into(),
        }
    }
}

/// Receives the migration `accepted` (its header already read). `create` builds the VM once the
/// header says what it must look like (and may refuse: a RAM or vCPU mismatch with what the user
/// asked for). On success the guest is restored, paused, and READY is sent; a thread then follows
/// what the source says on the connection and reports to `handover`.
pub fn receive<V: RestorableVm>(
    accepted: Accepted,
    handover: &Arc<Handover>,
    create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
) -> Result<Received<V>, ReceiveError> {
    receive_with_base(accepted, handover, create, None)
}

/// [`receive`], starting from `base`, an older checkpoint of the same guest (`--base`): its pages
/// are loaded first and their digests told to the source, which then sends only the pages that
/// differ. A base that does not fit the incoming guest (another RAM layout) is left unused, and
/// the migration is a full one; `query-migrate` says which.
pub fn receive_with_base<V: RestorableVm>(
    accepted: Accepted,
    handover: &Arc<Handover>,
    create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    base: Option<&Checkpoint>,
) -> Result<Received<V>, ReceiveError> {
    let start_err = |e: std::io::Error| ReceiveError { phase: "starting".into(), problem: Refusal::Reply(e) };
    let Accepted { conn, header, bytes_so_far, channels } = accepted;
    handover.begin(header.migration_id, conn.try_clone().ok());
    conn.set_read_timeout(Some(crate::transport::STALL_TIMEOUT)).map_err(start_err)?;
    let clone = || conn.try_clone().map_err(start_err);
    // A handover's RAM comes first, as memfds attached to RAM_FDS: read before anything buffers.
    let shared_ram = if header.handover {
        Some(
            read_ram_fds(&conn, header.regions.len())
                .map_err(|problem| ReceiveError { phase: "taking over the guest's RAM".into(), problem })?,
        )
    } else {
        None
    };
    let mut rx = Receiver {
        dec: Decoder::new(BufReader::with_capacity(READ_BUFFER, clone()?)),
        replies: Encoder::new(clone()?),
        handover: handover.clone(),
        bytes_before: bytes_so_far,
        base,
        shared_ram,
    };
    let mut phase = Phase::AwaitHeader;
    let result = rx.run(&mut phase, header, &channels, create).and_then(|restored| {
        // The operator may have given the incoming guest up meanwhile.
        handover.ready(restored.guest_running).map_err(Refusal::Discarded)?;
        if let Some(pc) = &restored.postcopy {
            handover.set_postcopy(pc.clone());
        }
        rx.replies.ready().and_then(|_| rx.replies.flush()).map_err(Refusal::Reply)?;
        Ok(restored)
    });
    match result {
        Ok(restored) => {
            let Restored { vm, passes, postcopy, .. } = *restored;
            let bytes = bytes_so_far + rx.dec.bytes_read();
            let Receiver { dec, replies, .. } = rx;
            let (h, pc) = (handover.clone(), postcopy.clone());
            std::thread::Builder::new()
                .name("incoming-handover".into())
                .spawn(move || {
                    let rest = handover::read_after_ready(dec, &conn, &h);
                    // Postcopy: after DONE the same connection carries the owed pages; a link
                    // lost before DONE pauses it (the guest may run here already, waiting).
                    match (rest, pc) {
                        (Some(mut dec), Some(pc)) => {
                            let _ = pc.receive(&mut dec);
                        }
                        (None, Some(pc)) => pc.link_lost("the link to the source broke before its pages came"),
                        _ => {}
                    }
                })
                .map_err(start_err)?;
            Ok(Received { vm, passes, bytes, replies, postcopy })
        }
        Err(problem) => {
            let err = ReceiveError { phase: phase.describe(), problem };
            let why = crate::report(&err);
            // Best effort: tell the source why, and keep reading until it hangs up, so that it reads
            // our reason rather than a connection reset.
            let _ = rx.replies.error(&why);
            let _ = rx.replies.flush();
            crate::transport::drain_and_close(conn);
            // Never to run here, whatever comes later.
            handover.abort(&why);
            Err(err)
        }
    }
}

struct Receiver<'b, R: std::io::Read> {
    dec: Decoder<BufReader<R>>,
    replies: Encoder<Connection>,
    /// Where the counters of what has arrived are kept (`Handover::received`).
    handover: Arc<Handover>,
    /// Stream bytes read before the decoder took over (preamble and header).
    bytes_before: u64,
    base: Option<&'b Checkpoint>,
    /// A same-host handover: the source's guest RAM, one memfd per region.
    shared_ram: Option<Vec<std::os::fd::OwnedFd>>,
}

impl<R: std::io::Read> Receiver<'_, R> {
    /// Checks the header, then steps through records until END has been applied; returns the
    /// restored VM, the passes seen, and whether the guest ran on the source.
    fn run<V: RestorableVm>(
        &mut self,
        phase: &mut Phase<V>,
        header: StreamHeader,
        joins: &mpsc::Receiver<ChannelJoin>,
        create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    ) -> Result<Box<Restored<V>>, Refusal> {
        *phase = Phase::Ram(Box::new(self.accept_header(header, joins, create)?));
        // Added, not stored: the page channels add what they read to the same counter.
        let mut counted = 0;
        loop {
            let frame = self.dec.next_frame().map_err(|e| match e {
                StreamError::Closed => Refusal::SourceClosed,
                e => Refusal::Stream(e),
            })?;
            let read = self.bytes_before + self.dec.bytes_read();
            self.handover.received.bytes.fetch_add(read - counted, Relaxed);
            counted = read;
            let current = std::mem::replace(phase, Phase::AwaitHeader);
            match self.step(current, frame) {
                Ok(Step::Next(p)) => *phase = p,
                Ok(Step::Done(restored)) => return Ok(restored),
                Err((p, problem)) => {
                    *phase = p;
                    return Err(problem);
                }
            }
        }
    }

    fn step<V: RestorableVm>(&mut self, phase: Phase<V>, frame: Frame) -> Result<Step<V>, (Phase<V>, Refusal)> {
        match (phase, frame.kind) {
            (Phase::AwaitHeader, _) => unreachable!("the header is checked before the first step"),
            (Phase::Ram(mut t), RecordType::Pages | RecordType::PagesCompressed) => {
                match t.sink.read_pages(&mut self.dec, &frame) {
                    Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                    Err(e) => Err((Phase::Ram(t), e)),
                }
            }
            (Phase::Ram(t), RecordType::Sync) => {
                // Everything before this record is applied: say so (the source then pauses its guest
                // knowing we will not keep it waiting).
                let answered = self
                    .dec
                    .read_record(&frame)
                    .map_err(Refusal::Stream)
                    .and_then(|_| match t.last_pass {
                        Some(pass) => t.lanes.wait_applied(pass, crate::transport::STALL_TIMEOUT),
                        None => Ok(()),
                    })
                    .and_then(|_| self.replies.synced().map_err(Refusal::Reply));
                match answered {
                    Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                    Err(e) => Err((Phase::Ram(t), e)),
                }
            }
            (Phase::Ram(mut t), RecordType::Owed) => match self.read_owed(&mut t, &frame) {
                Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                Err(e) => Err((Phase::Ram(t), e)),
            },
            (Phase::Ram(mut t), RecordType::ZeroPages | RecordType::PassEnd) => {
                match self.read_ram_record(&mut t, &frame) {
                    Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                    Err(e) => Err((Phase::Ram(t), e)),
                }
            }
            (
                Phase::Ram(t) | Phase::State(t),
                RecordType::VcpuState | RecordType::VmState | RecordType::DeviceState,
            ) => {
                let mut t = t;
                match self.read_state_record(&mut t, &frame) {
                    Ok(()) => Ok(Step::Next(Phase::State(t))),
                    Err(e) => Err((Phase::State(t), e)),
                }
            }
            (Phase::State(t), RecordType::End) => self.finish(t, &frame),
            (p @ (Phase::Ram(_) | Phase::State(_)), RecordType::Abort) => Err((p, Refusal::Aborted)),
            (p @ (Phase::Ram(_) | Phase::State(_)), kind) => {
                let why = match (&p, kind) {
                    (Phase::Ram(_), RecordType::End) => Refusal::EndBeforeState,
                    (
                        Phase::State(_),
                        RecordType::Pages | RecordType::PagesCompressed | RecordType::ZeroPages | RecordType::PassEnd,
                    ) => Refusal::RamAfterState(kind.name()),
                    _ => Refusal::Unexpected(kind.name()),
                };
                Err((p, why))
            }
        }
    }

    fn accept_header<V: RestorableVm>(
        &mut self,
        h: StreamHeader,
        joins: &mpsc::Receiver<ChannelJoin>,
        create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    ) -> Result<Target<V>, Refusal> {
        if h.page_size != PAGE_SIZE as u32 {
            return Err(Refusal::PageSize(h.page_size));
        }
        if h.vcpu_count == 0 || h.vcpu_count > MAX_VCPUS {
            return Err(Refusal::VcpuCount(h.vcpu_count));
        }
        let layout = RamLayout::new(h.regions.clone()).map_err(Refusal::Layout)?;
        let vm = create(&h).map_err(Refusal::Create)?;
        if vm.ram().layout() != &layout {
            return Err(Refusal::LayoutMismatch {
                stream: layout.regions().to_vec(),
                vm: vm.ram().layout().regions().to_vec(),
            });
        }
        if vm.vcpu_count() != h.vcpu_count as usize {
            return Err(Refusal::VcpuMismatch { stream: h.vcpu_count, vm: vm.vcpu_count() });
        }
        let ram = vm.ram().clone();
        if let Some(fds) = self.shared_ram.take() {
            if h.channels > 1 || h.preempt {
                return Err(Refusal::Unexpected("page channels in a handover"));
            }
            ram.adopt_shared(fds).map_err(Refusal::Layout)?;
            self.handover.received.ram_total.store(layout.total_bytes(), Relaxed);
            // Every page is here already: it is the same memory.
            let all = BaseLoaded { data: PageBitmap::new(layout.page_count()), told: true };
            return Ok(Target {
                vm,
                sink: PageSink::new(ram, self.handover.clone(), 0, 1).with_base(Some(&all)),
                lanes: Lanes::none(),
                urgent: None,
                last_pass: None,
                owed: None,
                vcpus: vec![None; h.vcpu_count as usize],
                vm_state: None,
                devices: Vec::new(),
            });
        }
        // Before the page channels start: their pages may come from the base.
        let base = if h.asks_base { self.answer_base(&ram)? } else { None };
        let (lanes, urgent) = if h.channels > 1 || h.preempt {
            Lanes::start(joins, h.channels, h.preempt, &ram, &self.handover, base.as_ref())?
        } else {
            (Lanes::none(), None)
        };
        self.handover.received.ram_total.store(layout.total_bytes(), Relaxed);
        Ok(Target {
            vm,
            sink: PageSink::new(ram, self.handover.clone(), 0, h.channels).with_base(base.as_ref()),
            lanes,
            urgent,
            last_pass: None,
            owed: None,
            vcpus: vec![None; h.vcpu_count as usize],
            vm_state: None,
            devices: Vec::new(),
        })
    }

    /// HEADER asked for a base: loads it into `ram` and sends the digest of every page (BASE),
    /// or says there is none (BASE_END 0). Returns the base's pages holding data.
    fn answer_base(&mut self, ram: &GuestRam) -> Result<Option<BaseLoaded>, Refusal> {
        // The digests of the pages with data are made as they are read; the others are zero.
        let zero = crate::checkpoint::page_digest(&[0u8; PAGE_SIZE]);
        let mut digests = vec![zero; ram.page_count()];
        let loaded = match self.base {
            None => None,
            Some(b) => match b.restore_ram_with(ram, |p, data| digests[p] = crate::checkpoint::page_digest(data)) {
                Ok(()) => Some(b.data_pages()),
                Err(e) => {
                    // Partly loaded pages are rewritten or cleared by the full migration (they
                    // count as holding data), so nothing of a bad base survives.
                    let why = crate::report(&e);
                    log::warn!("incoming migration: base not used: {why}");
                    *self.handover.base_note.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("not used: {why}"));
                    self.replies.base(&[]).and_then(|_| self.replies.flush()).map_err(Refusal::Reply)?;
                    return Ok(Some(BaseLoaded { data: PageBitmap::full(ram.page_count()), told: false }));
                }
            },
        };
        let Some(data) = loaded else {
            self.replies.base(&[]).and_then(|_| self.replies.flush()).map_err(Refusal::Reply)?;
            return Ok(None);
        };
        self.replies.base(&digests).and_then(|_| self.replies.flush()).map_err(Refusal::Reply)?;
        *self.handover.base_note.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("used: {} pages with data", data.count()));
        Ok(Some(BaseLoaded { data, told: true }))
    }

    fn read_ram_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        match self.dec.read_record(frame)? {
            Record::ZeroPages { gpa, count } => t.sink.zero_pages(gpa, count),
            Record::PassEnd { pass, .. } => {
                let expected = t.last_pass.map_or(0, |p| p + 1);
                if pass != expected {
                    return Err(Refusal::PassOrder { got: pass, due: expected });
                }
                t.last_pass = Some(pass);
                self.handover.received.passes.store(u64::from(pass) + 1, Relaxed);
                Ok(())
            }
            _ => unreachable!("only called for ZERO_PAGES and PASS_END"),
        }
    }

    fn read_owed<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        let pages = t.sink.layout.page_count();
        let Record::Owed { first_page, pages: n, bits } = self.dec.read_record(frame)? else {
            unreachable!("an OWED frame decodes to OWED")
        };
        let owed = t.owed.get_or_insert_with(|| PageBitmap::new(pages));
        if !owed.set_from_bits(first_page, n, bits) {
            return Err(Refusal::OwedRange { first: first_page, count: n, pages });
        }
        Ok(())
    }

    fn read_state_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        let count = t.vm.vcpu_count();
        match self.dec.read_record(frame)? {
            Record::VcpuState { index, blob } => {
                let slot = t.vcpus.get_mut(index as usize).ok_or(Refusal::VcpuIndex { index, count })?;
                if slot.is_some() {
                    return Err(Refusal::Duplicate(format!("vCPU {index}")));
                }
                *slot = Some(blob.to_vec());
            }
            Record::VmState(blob) => {
                if t.vm_state.is_some() {
                    return Err(Refusal::Duplicate("the VM".into()));
                }
                t.vm_state = Some(blob.to_vec());
            }
            Record::DeviceState { name, blob } => {
                if t.devices.iter().any(|(n, _)| n == name) {
                    return Err(Refusal::Duplicate(format!("device {name}")));
                }
                if t.devices.len() == MAX_DEVICES {
                    return Err(Refusal::TooManyDevices);
                }
                t.devices.push((name.to_string(), blob.to_vec()));
            }
            _ => unreachable!("only called for state records"),
        }
        Ok(())
    }

    /// END: everything must be here; then the state goes into the VM.
    fn finish<V: RestorableVm>(
        &mut self,
        mut t: Box<Target<V>>,
        frame: &Frame,
    ) -> Result<Step<V>, (Phase<V>, Refusal)> {
        let (vcpu_states, device_states, guest_running, postcopy) = match self.dec.read_record(frame) {
            Ok(Record::End { vcpu_states, device_states, guest_running, postcopy }) => {
                (vcpu_states, device_states, guest_running, postcopy)
            }
            Ok(_) => unreachable!("an END frame decodes to END"),
            Err(e) => return Err((Phase::State(t), e.into())),
        };
        let lanes = std::mem::replace(&mut t.lanes, Lanes::none());
        let others = match lanes.finish(t.last_pass) {
            Ok(sinks) => sinks,
            Err(e) => return Err((Phase::State(t), e)),
        };
        // Every page arrived, or (postcopy) is owed.
        let pages = t.sink.layout.page_count();
        let owed = if postcopy { Some(t.owed.take().unwrap_or_else(|| PageBitmap::new(pages))) } else { None };
        let mut have = owed.clone().unwrap_or_else(|| PageBitmap::new(pages));
        have.union_with(&t.sink.received);
        for s in &others {
            have.union_with(&s.received);
        }
        let missing_pages = pages - have.count();
        let problem = if t.owed.is_some() {
            Some(Refusal::OwedWithoutPostcopy)
        } else if missing_pages > 0 {
            Some(Refusal::MissingPages(missing_pages))
        } else if let Some(i) = t.vcpus.iter().position(Option::is_none) {
            Some(Refusal::MissingVcpu(i))
        } else if t.vm_state.is_none() {
            Some(Refusal::MissingVmState)
        } else if vcpu_states as usize != t.vcpus.len() || device_states as usize != t.devices.len() {
            Some(Refusal::EndCounts {
                end_vcpus: vcpu_states,
                end_devices: device_states,
                vcpus: t.vcpus.len(),
                devices: t.devices.len(),
            })
        } else {
            None
        };
        if let Some(p) = problem {
            return Err((Phase::State(t), p));
        }
        let state = MachineState {
            vcpus: t.vcpus.iter_mut().map(|v| v.take().unwrap_or_default()).collect(),
            vm: t.vm_state.take().unwrap_or_default(),
            devices: std::mem::take(&mut t.devices),
        };
        // Postcopy: the owed pages are dropped and RAM registered before anything can touch it.
        let postcopy = match owed {
            Some(owed) => match IncomingPostcopy::prepare(t.vm.ram().clone(), owed) {
                Ok(pc) => {
                    // Read from now on: the source writes on it only after DONE, and a page it
                    // carries is placed like one from channel 0.
                    if let Some(conn) = t.urgent.take() {
                        if let Err(e) = pc.attach_urgent(conn) {
                            return Err((Phase::State(t), Refusal::Postcopy(e)));
                        }
                    }
                    Some(pc)
                }
                Err(e) => return Err((Phase::State(t), Refusal::Postcopy(e))),
            },
            None => None,
        };
        if let Err(e) = t.vm.restore_state(&state) {
            return Err((Phase::State(t), Refusal::Restore(e)));
        }
        let passes = t.last_pass.map_or(0, |p| p + 1);
        Ok(Step::Done(Box::new(Restored { vm: t.vm, passes, guest_running, postcopy })))
    }
}

enum Step<V> {
    Next(Phase<V>),
    Done(Box<Restored<V>>),
}

/// A guest whose state is restored: the VM, the passes seen, whether it ran on the source, and
/// (postcopy) what it still waits for.
struct Restored<V> {
    vm: Arc<V>,
    passes: u32,
    guest_running: bool,
    postcopy: Option<Arc<IncomingPostcopy>>,
}
