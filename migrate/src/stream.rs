//! The migration stream: the one place that knows the wire format. The encoder and decoder sit side
//! by side; the decoder is the only code that reads bytes a peer sent.
//!
//! # Format (version 2)
//!
//! All integers are little-endian. Every connection opens with a preamble, then carries records.
//!
//! ```text
//! preamble:  magic "EMU-MIG\n" (8 bytes) | version: u32
//! record:    type: u8 | reserved: 3 bytes (0) | length: u32 | payload_crc: u32 | frame_crc: u32 | payload
//! ```
//!
//! `frame_crc` is CRC-32 (IEEE) over the 12 bytes before it, and is checked before the length is
//! believed: a flipped length byte is caught at once instead of leaving the reader waiting for
//! bytes that never come (with the guest paused). `payload_crc` is CRC-32 over the payload. The
//! length is also bounded per record type ([`max_payload`]); the decoder allocates nothing larger,
//! whatever a peer claims.
//!
//! | type | record       | payload |
//! |------|--------------|---------|
//! | 0x01 | HEADER       | page_size: u32, vcpu_count: u32, region_count: u32, channels: u16 (0 is read as 1), flags: u16 (bit 0: the source asks for the destination's base, see BASE; bit 1: a same-host handover, see RAM_FDS; bit 2: postcopy-preempt, an urgent connection joins, see *The urgent connection*), migration_id: u64, then (gpa: u64, size: u64) per region |
//! | 0x02 | PAGES        | gpa: u64, count: u32, reserved: u32, then count x 4096 bytes (contiguous pages, one region) |
//! | 0x03 | ZERO_PAGES   | gpa: u64, count: u64 (contiguous pages that are all zero) |
//! | 0x04 | PASS_END     | pass: u32, reserved: u32, pages sent in the pass: u64 |
//! | 0x05 | VCPU_STATE   | index: u32, then the vCPU's state blob |
//! | 0x06 | VM_STATE     | the VM's state blob (irqchip, PIT, clock) |
//! | 0x07 | DEVICE_STATE | name_length: u16, name (UTF-8), then the device's state blob |
//! | 0x08 | END          | vcpu_states: u32, device_states: u32, flags: u32 (bit 0: the guest was running; bit 1: postcopy, the pages of OWED follow after GO), reserved: u32 |
//! | 0x09 | SYNC         | (empty): answer SYNCED once everything before this record is applied |
//! | 0x0a | GO           | (empty): the guest is the destination's; resume it if END says it was running |
//! | 0x0b | ABORT        | (empty): the source keeps the guest; discard it |
//! | 0x0c | RESOLVE      | migration_id: u64, action: u32 (1 = GO, 2 = ABORT), reserved: u32: first record of a resolution connection |
//! | 0x0d | DONE         | (empty): the source has STARTED; nothing is left to resolve |
//! | 0x0f | PAGES_COMPRESSED | gpa: u64, count: u32, codec: u8 (1 = lz4 block, 2 = zstd frame), reserved: 3 bytes, then the count x 4096 bytes compressed (`compress.rs`) |
//! | 0x0e | CHANNEL      | migration_id: u64, index: u32, reserved: u32: first record of page channel `index` (1 to channels - 1), or, index 0, of the urgent connection (postcopy-preempt) |
//! | 0x10 | OWED         | first_page: u64, pages: u32, reserved: u32, then ceil(pages / 8) bytes: bit i (byte i / 8, bit i % 8) set = page first_page + i is still owed. Source to destination before END in postcopy (the pages it will send after GO); destination to source after RESUME (the pages it still lacks) |
//! | 0x11 | RESUME       | migration_id: u64, flags: u32 (bit 0: an urgent connection follows, CHANNEL index 0, on the same address), reserved: u32: first record of a connection that resumes a broken postcopy |
//! | 0x12 | RAM_FDS      | regions: u32, reserved: u32, sent with one memfd per RAM region attached (SCM_RIGHTS, unix: only): a same-host handover (HEADER flag bit 1) passes guest RAM itself, right after HEADER; no page records follow |
//! | 0x81 | READY        | (empty): destination to source, state restored, guest paused, waiting for GO |
//! | 0x82 | ERROR        | UTF-8 reason: destination to source, stream refused |
//! | 0x83 | SYNCED       | (empty): destination to source, answer to SYNC |
//! | 0x84 | STARTED      | (empty): destination to source, answer to GO: the guest is the destination's now |
//! | 0x86 | PAGE_REQUEST | gpa: u64, count: u64: destination to source in postcopy, a vCPU waits on these pages: send them first |
//! | 0x87 | COMPLETE     | (empty): destination to source in postcopy: every owed page has arrived; the source may let the guest go |
//! | 0x88 | RESUMED      | pages_owed: u64: destination to source, answer to RESUME after its OWED records |
//! | 0x89 | BASE         | first_page: u64, count: u32, reserved: u32, then count x 16 bytes: the XXH3-128 digest (little-endian) of each page the destination holds from its base checkpoint: destination to source, answer to a HEADER that asks, before anything else |
//! | 0x8a | BASE_END     | pages: u64 (digests sent; 0: no base), reserved: u64: ends the answer; the source skips, in pass 0, every page whose digest matches |
//! | 0x85 | RESOLVED     | outcome: u32 (1 = the destination has the guest, 2 = it discarded it, 3 = unknown migration): answer to RESOLVE |
//!
//! State blobs are opaque here: the emulator versions and checks them (`emulator/src/state.rs`).
//!
//! # Channels
//!
//! A migration may use several connections (HEADER's `channels`, `migrate-set-parameters`
//! `channels`). The first, the one that opens with HEADER, is channel 0: it carries every control
//! record and its share of the pages. Each further one opens with the preamble and CHANNEL, then
//! carries PAGES, ZERO_PAGES and PASS_END only, and the source closes it after the last pass.
//! Pages are dealt to channels by a fixed rule ([`crate::channel::owner`]: runs of
//! [`crate::channel::CHUNK_PAGES`] pages in turn), so a page only ever travels on one channel: a copy
//! from a later pass can never be overtaken by an older one, and the channels' threads on the
//! destination write disjoint pages. A record that crosses into another channel's pages is refused.
//! Every channel ends each pass with its own PASS_END; the destination answers SYNC, and takes END,
//! only once every channel has applied the pass before it.
//!
//! # Compatibility
//!
//! A source writes [`VERSION`] only. A destination reads its own version and the one before it, so
//! that destinations can be upgraded first and still take guests from sources one release behind
//! (Cloud Hypervisor's rule), unless the older version cannot keep a promise this one makes; then
//! it is refused with an error that says which. Version 1 is such a case: without the frame
//! checksum and the READY/GO handover, a destination reading it would resume the guest on its own,
//! which can leave two running copies. So version 2 reads version 2 only. Each version bump
//! extends the test `older_versions_follow_the_policy`.
//!
//! # Sequence
//!
//! ```text
//! source                                         destination
//!   | preamble, HEADER  ------------------------->  | check version, page size, RAM layout, vCPUs
//!   | pass 0: PAGES / ZERO_PAGES for every page ->  |
//!   | PASS_END(0)  ------------------------------>  |
//!   | pass n: PAGES / ZERO_PAGES (dirty pages) -->  |   (repeated while precopy converges)
//!   | PASS_END(n)  ------------------------------>  |
//!   | SYNC  ------------------------------------->  |   (caught up with everything sent?)
//!   |  <------------------------------------- SYNCED |   then one more collect, and if it still fits:
//!   |   pause vCPUs                                 |
//!   | final PAGES / ZERO_PAGES, PASS_END  ------->  |
//!   | VCPU_STATE x n, VM_STATE, DEVICE_STATE x m ->  |
//!   | END  -------------------------------------->  | every page seen? every state? restore, stay paused
//!   |  <-------------------------------------- READY |
//!   | GO  --------------------------------------->  | resume the guest (if it ran on the source)
//!   |  <------------------------------------ STARTED |
//!   | DONE  ------------------------------------->  | (stop listening for RESOLVE)
//!   | postmigrate                                   |
//! ```
//!
//! Postcopy (`postcopy/mod.rs` draws it): precopy may stop at any page; OWED records then list
//! every page still to come, END carries the postcopy flag, and after GO, STARTED and DONE the
//! source sends the owed pages (PAGES, ZERO_PAGES) on the same connection while the destination
//! asks for pages (PAGE_REQUEST) and finally says COMPLETE. A broken postcopy goes on over a new
//! connection that opens with RESUME, which the destination answers with OWED and RESUMED.
//!
//! # The urgent connection (postcopy-preempt)
//!
//! In postcopy a vCPU on the destination waits for every page it asks for, and on one connection
//! that page queues behind whatever background push is in the socket buffers (megabytes). With
//! HEADER flag bit 2 (the `postcopy-preempt` capability, QEMU's name) the source opens one more
//! connection after the page channels: preamble, then CHANNEL with index 0 (channel 0 itself opens
//! with HEADER, so index 0 names nothing else). It idles through precopy and is closed at a
//! precopy switchover. In postcopy it carries the requests and their answers only: the destination
//! writes PAGE_REQUEST on it, the source answers on it with PAGES / ZERO_PAGES holding the page
//! asked for (sent again if the background push sent it already: it may still be queued there)
//! and a few owed pages after it; the background push and COMPLETE stay on channel 0. A page may
//! therefore arrive twice; the destination places the first copy and drops the second (both are
//! the source's one copy: its guest never runs again). A recovery (RESUME with flag bit 0) makes
//! the urgent connection again, the same way, on the address `migrate-recover` listens at. Pipes
//! (`exec:`, `ssh:`) have one stream and no urgent connection.
//!
//! # At most one running copy
//!
//! The destination never runs the guest without GO (or RESOLVE with action GO), and the source never
//! resumes it once GO may have reached the destination. So:
//! - no READY (refused, timed out, link lost): the source resumes and sends ABORT (on the stream,
//!   or on a new connection with RESOLVE action ABORT); a destination that sent READY and gets
//!   ABORT discards the guest;
//! - GO written but no STARTED: nobody can know whether GO arrived (the two generals). The source
//!   stays paused, "unresolved", and asks again on new connections: RESOLVE action GO, which a
//!   destination still waiting takes as the GO it missed, answering RESOLVED;
//! - READY sent but neither GO nor ABORT (link lost): the destination stays paused, "unresolved",
//!   and keeps listening for RESOLVE; an operator may decide either side (`migrate-resolve`).
//!
//! The destination keeps its listening address open until the source is known to know the outcome
//! (DONE, or a RESOLVE answered), so that a source that missed STARTED can still learn it.
//!
//! The destination may answer ERROR at any point before READY and close; the source then resumes
//! its guest.

use std::io::{self, Read, Write};

use crate::compress::{self, Codec, CompressStats, Compressor};
use crate::ram::{RamRegion, PAGE_SIZE};

pub const MAGIC: &[u8; 8] = b"EMU-MIG\n";
/// Version 2 added the frame checksum and the READY/GO handover; a version 1 peer (which resumes
/// the destination on its own) is refused, since it cannot keep the one-copy promise.
pub const VERSION: u32 = 2;
pub const PREAMBLE_LEN: usize = 12;
pub const FRAME_LEN: usize = 16;
/// Pages in one PAGES record.
pub const MAX_PAGES_PER_RECORD: usize = 256;
const PAGES_PREFIX: usize = 16;
const HEADER_PREFIX: usize = 24;
/// The largest payload of any record: a full PAGES record.
pub const MAX_PAYLOAD: usize = PAGES_PREFIX + MAX_PAGES_PER_RECORD * PAGE_SIZE;
/// The largest state blob a destination accepts (a vCPU's state is about 10 KiB).
pub const MAX_STATE_BLOB: usize = 256 << 10;
pub const MAX_REGIONS: usize = 64;
pub const MAX_VCPUS: u32 = 64;
pub const MAX_DEVICE_NAME: usize = 64;
/// The most connections one migration may use.
pub const MAX_CHANNELS: u32 = 16;
const MAX_ERROR_TEXT: usize = 4096;
const OWED_PREFIX: usize = 16;
/// Page digests in one BASE record (1 MiB of them).
pub const BASE_MAX_PAGES: usize = 65536;
const HEADER_ASKS_BASE: u32 = 1 << 16;
const HEADER_HANDOVER: u32 = 1 << 17;
const HEADER_PREEMPT: u32 = 1 << 18;
/// RESUME flag: an urgent connection follows.
const RESUME_URGENT: u32 = 1;
/// Pages one OWED record covers (a 1 MiB bitmap: 32 GiB of guest RAM).
pub const OWED_MAX_PAGES: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    Header = 0x01,
    Pages = 0x02,
    ZeroPages = 0x03,
    PassEnd = 0x04,
    VcpuState = 0x05,
    VmState = 0x06,
    DeviceState = 0x07,
    End = 0x08,
    Sync = 0x09,
    Go = 0x0a,
    Abort = 0x0b,
    Resolve = 0x0c,
    Done = 0x0d,
    Channel = 0x0e,
    PagesCompressed = 0x0f,
    Owed = 0x10,
    Resume = 0x11,
    RamFds = 0x12,
    Ready = 0x81,
    Error = 0x82,
    Synced = 0x83,
    Started = 0x84,
    Resolved = 0x85,
    PageRequest = 0x86,
    Complete = 0x87,
    Resumed = 0x88,
    Base = 0x89,
    BaseEnd = 0x8a,
}

impl RecordType {
    const ALL: [RecordType; 28] = [
        RecordType::Header,
        RecordType::Pages,
        RecordType::ZeroPages,
        RecordType::PassEnd,
        RecordType::VcpuState,
        RecordType::VmState,
        RecordType::DeviceState,
        RecordType::End,
        RecordType::Sync,
        RecordType::Go,
        RecordType::Abort,
        RecordType::Resolve,
        RecordType::Done,
        RecordType::Channel,
        RecordType::PagesCompressed,
        RecordType::Ready,
        RecordType::Error,
        RecordType::Synced,
        RecordType::Started,
        RecordType::Resolved,
        RecordType::Owed,
        RecordType::Resume,
        RecordType::PageRequest,
        RecordType::Complete,
        RecordType::Resumed,
        RecordType::Base,
        RecordType::BaseEnd,
        RecordType::RamFds,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|&t| t as u8 == v)
    }

    pub fn name(self) -> &'static str {
        use RecordType::*;
        match self {
            Header => "HEADER",
            Pages => "PAGES",
            ZeroPages => "ZERO_PAGES",
            PassEnd => "PASS_END",
            VcpuState => "VCPU_STATE",
            VmState => "VM_STATE",
            DeviceState => "DEVICE_STATE",
            End => "END",
            Sync => "SYNC",
            Go => "GO",
            Abort => "ABORT",
            Resolve => "RESOLVE",
            Done => "DONE",
            Channel => "CHANNEL",
            PagesCompressed => "PAGES_COMPRESSED",
            Ready => "READY",
            Error => "ERROR",
            Synced => "SYNCED",
            Started => "STARTED",
            Resolved => "RESOLVED",
            Owed => "OWED",
            Resume => "RESUME",
            PageRequest => "PAGE_REQUEST",
            Complete => "COMPLETE",
            Resumed => "RESUMED",
            Base => "BASE",
            BaseEnd => "BASE_END",
            RamFds => "RAM_FDS",
        }
    }
}

/// The longest payload a record of `kind` may have: a frame claiming more is refused before any
/// of its payload is read.
pub fn max_payload(kind: RecordType) -> usize {
    use RecordType::*;
    match kind {
        Header => HEADER_PREFIX + 16 * MAX_REGIONS,
        // Compressed data is sent only when smaller than the raw pages.
        Pages | PagesCompressed => MAX_PAYLOAD,
        ZeroPages | PassEnd | Resolve | End | Channel | Resume | PageRequest | BaseEnd => 16,
        Base => 16 + 16 * BASE_MAX_PAGES,
        Owed => OWED_PREFIX + OWED_MAX_PAGES / 8,
        Resumed | RamFds => 8,
        VcpuState => 4 + MAX_STATE_BLOB,
        VmState => MAX_STATE_BLOB,
        DeviceState => 2 + MAX_DEVICE_NAME + MAX_STATE_BLOB,

        Resolved => 4,
        Sync | Go | Abort | Done | Ready | Synced | Started | Complete => 0,
        Error => MAX_ERROR_TEXT,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the connection ended in the middle of {0}")]
    Truncated(&'static str),
    #[error("the connection closed")]
    Closed,
    #[error("no data from the peer in time (stalled or gone)")]
    Stalled,
    #[error("I/O error")]
    Io(#[from] io::Error),
    #[error("not an emu migration stream (bad magic)")]
    BadMagic,
    #[error("stream version {0}; this emu reads version {VERSION}")]
    Version(u32),
    #[error(
        "stream version {0} cannot keep the one-running-copy promise (it has no READY/GO handover); upgrade the source"
    )]
    Unsafe(u32),
    #[error("a record frame fails its checksum (corrupt stream)")]
    FrameChecksum,
    #[error("unknown record type {0:#04x}")]
    UnknownType(u8),
    #[error("{kind} record of {len} bytes is longer than the {max} allowed")]
    TooLong { kind: &'static str, len: u32, max: usize },
    #[error("{0} record fails its checksum")]
    Checksum(&'static str),
    #[error("malformed {kind} record: {why}")]
    Malformed { kind: &'static str, why: String },
}

impl StreamError {
    /// The peer went away or stopped talking (as opposed to sending something wrong).
    pub fn is_link_failure(&self) -> bool {
        matches!(self, StreamError::Truncated(_) | StreamError::Closed | StreamError::Stalled | StreamError::Io(_))
    }
}

fn malformed(kind: RecordType, why: impl Into<String>) -> StreamError {
    StreamError::Malformed { kind: kind.name(), why: why.into() }
}

/// The first record: what the source's guest looks like, and the migration's identity (random,
/// chosen by the source; RESOLVE names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub page_size: u32,
    pub vcpu_count: u32,
    pub migration_id: u64,
    /// Connections the migration uses, this one included (1 to [`MAX_CHANNELS`]).
    pub channels: u32,
    /// The source asks for the destination's base checkpoint (BASE); new sources always do.
    pub asks_base: bool,
    /// A same-host handover: guest RAM comes as memfds (RAM_FDS), not as pages.
    pub handover: bool,
    /// postcopy-preempt: an urgent connection (CHANNEL index 0) joins after the page channels.
    pub preempt: bool,
    pub regions: Vec<RamRegion>,
}

/// What a RESOLVE asks of the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveAction {
    /// The source sent GO and did not hear STARTED: take the guest (if not done yet).
    Go,
    /// The source kept the guest: discard it.
    Abort,
}

/// The destination's answer to RESOLVE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The destination has the guest (it got GO, or took this RESOLVE as GO).
    DestinationHasGuest = 1,
    /// The destination discarded the guest (it got ABORT, or its operator chose the source).
    DestinationDiscarded = 2,
    /// No migration of that identity here.
    UnknownMigration = 3,
}

impl Resolution {
    fn from_u32(v: u32) -> Option<Self> {
        [Resolution::DestinationHasGuest, Resolution::DestinationDiscarded, Resolution::UnknownMigration]
            .into_iter()
            .find(|&r| r as u32 == v)
    }
}

const END_GUEST_RUNNING: u32 = 1;
const END_POSTCOPY: u32 = 2;
const RESOLVE_GO: u32 = 1;
const RESOLVE_ABORT: u32 = 2;

/// A decoded record, borrowing its payload from the decoder. PAGES never appears here: its data goes
/// straight to its destination through [`Decoder::read_pages`].
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Header(StreamHeader),
    ZeroPages {
        gpa: u64,
        count: u64,
    },
    PassEnd {
        pass: u32,
        pages: u64,
    },
    VcpuState {
        index: u32,
        blob: &'a [u8],
    },
    VmState(&'a [u8]),
    DeviceState {
        name: &'a str,
        blob: &'a [u8],
    },
    End {
        vcpu_states: u32,
        device_states: u32,
        guest_running: bool,
        postcopy: bool,
    },
    /// Pages `first_page..first_page + pages`, as a bitmap (bit i: page first_page + i is owed).
    Owed {
        first_page: u64,
        pages: u32,
        bits: &'a [u8],
    },
    Resume {
        migration_id: u64,
        /// An urgent connection follows (postcopy-preempt).
        urgent: bool,
    },
    PageRequest {
        gpa: u64,
        count: u64,
    },
    Complete,
    Resumed {
        pages_owed: u64,
    },
    /// Digests of pages `first_page..first_page + count` (16 bytes each).
    Base {
        first_page: u64,
        digests: &'a [u8],
    },
    BaseEnd {
        pages: u64,
    },
    RamFds {
        regions: u32,
    },
    Sync,
    Go,
    Abort,
    Resolve {
        migration_id: u64,
        action: ResolveAction,
    },
    Done,
    Channel {
        migration_id: u64,
        index: u32,
    },
    Ready,
    Error(&'a str),
    Synced,
    Started,
    Resolved(Resolution),
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn two_u64(a: u64, b: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&a.to_le_bytes());
    p[8..].copy_from_slice(&b.to_le_bytes());
    p
}

fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

fn two_u32(a: u32, b: u32) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&a.to_le_bytes());
    p[4..].copy_from_slice(&b.to_le_bytes());
    p
}

/// A sealed frame of any type byte, for tests and tools that craft hostile streams.
#[doc(hidden)]
pub fn raw_frame(kind: u8, len: u32, payload_crc: u32) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0] = kind;
    f[4..8].copy_from_slice(&len.to_le_bytes());
    f[8..12].copy_from_slice(&payload_crc.to_le_bytes());
    let frame_crc = crc32fast::hash(&f[..12]);
    f[12..16].copy_from_slice(&frame_crc.to_le_bytes());
    f
}

/// A sealed frame for a payload of `len` bytes whose CRC is `payload_crc`.
fn frame(kind: RecordType, len: usize, payload_crc: u32) -> [u8; FRAME_LEN] {
    raw_frame(kind as u8, len as u32, payload_crc)
}

// ---------------------------------------------------------------------------------------------
// Encoder

/// Pages being gathered into one PAGES record, in the buffer they are sent from (no extra copy).
pub struct PageBatch {
    buf: Vec<u8>,
    gpa: u64,
    count: usize,
}

impl Default for PageBatch {
    fn default() -> Self {
        PageBatch { buf: vec![0u8; FRAME_LEN + MAX_PAYLOAD], gpa: 0, count: 0 }
    }
}

impl PageBatch {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the page at `gpa` can join this batch (contiguous, and room left).
    pub fn accepts(&self, gpa: u64) -> bool {
        self.count == 0 || (self.count < MAX_PAGES_PER_RECORD && gpa == self.gpa + (self.count * PAGE_SIZE) as u64)
    }

    /// The buffer for the next page, at `gpa` (which `accepts` must allow). Fill it, then `commit`
    /// to keep it, or leave it to drop it (a zero page, say).
    pub fn next_slot(&mut self, gpa: u64) -> &mut [u8] {
        assert!(self.accepts(gpa), "page {gpa:#x} does not continue the batch");
        if self.count == 0 {
            self.gpa = gpa;
        }
        let at = FRAME_LEN + PAGES_PREFIX + self.count * PAGE_SIZE;
        &mut self.buf[at..at + PAGE_SIZE]
    }

    pub fn commit(&mut self) {
        self.count += 1;
    }
}

/// Writes records. Callers flush the underlying writer when a reply is due.
pub struct Encoder<W: Write> {
    w: W,
    bytes: u64,
    compressor: Option<Compressor>,
}

impl<W: Write> Encoder<W> {
    pub fn new(w: W) -> Self {
        Encoder { w, bytes: 0, compressor: None }
    }

    /// PAGES records from now on go compressed where that pays (`compress.rs`).
    pub fn compress_with(&mut self, c: Compressor) {
        self.compressor = Some(c);
    }

    /// The link's cap for the pass to come (`max-bandwidth`; 0: none): part of whether compressing
    /// pays.
    pub fn set_link_cap(&mut self, cap: u64) {
        if let Some(c) = self.compressor.as_mut() {
            c.set_cap(cap);
        }
    }

    /// The codec PAGES records may be compressed with.
    pub fn codec(&self) -> Codec {
        self.compressor.as_ref().map_or(Codec::None, |c| c.codec())
    }

    /// What compression did on this stream so far.
    pub fn compress_stats(&self) -> CompressStats {
        self.compressor.as_ref().map(|c| c.stats).unwrap_or_default()
    }

    /// Bytes written so far, framing included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn record(&mut self, kind: RecordType, payload: &[u8]) -> io::Result<()> {
        let f = frame(kind, payload.len(), crc32fast::hash(payload));
        // One write for the frame and a small payload, so that a record is handed to the kernel
        // whole or not at all as far as one write goes (GO relies on knowing whether it left).
        if payload.len() <= 64 {
            let mut rec = [0u8; FRAME_LEN + 64];
            rec[..FRAME_LEN].copy_from_slice(&f);
            rec[FRAME_LEN..FRAME_LEN + payload.len()].copy_from_slice(payload);
            return self.put(&rec[..FRAME_LEN + payload.len()]);
        }
        self.put(&f)?;
        self.put(payload)
    }

    pub fn preamble(&mut self) -> io::Result<()> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&VERSION.to_le_bytes());
        self.put(&p)
    }

    pub fn header(&mut self, h: &StreamHeader) -> io::Result<()> {
        let mut p = Vec::with_capacity(HEADER_PREFIX + 16 * h.regions.len());
        let channels = h.channels
            | flag(h.asks_base, HEADER_ASKS_BASE)
            | flag(h.handover, HEADER_HANDOVER)
            | flag(h.preempt, HEADER_PREEMPT);
        for v in [h.page_size, h.vcpu_count, h.regions.len() as u32, channels] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(&h.migration_id.to_le_bytes());
        for r in &h.regions {
            p.extend_from_slice(&two_u64(r.gpa, r.size));
        }
        self.record(RecordType::Header, &p)
    }

    /// Sends the batch as one PAGES record and empties it.
    pub fn pages(&mut self, batch: &mut PageBatch) -> io::Result<()> {
        if batch.count == 0 {
            return Ok(());
        }
        let data_len = batch.count * PAGE_SIZE;
        if let Some(c) = self.compressor.as_mut() {
            let data = &batch.buf[FRAME_LEN + PAGES_PREFIX..FRAME_LEN + PAGES_PREFIX + data_len];
            let codec = c.codec().wire();
            if let Some(packed) = c.compress(data, batch.count as u64) {
                let mut prefix = [0u8; PAGES_PREFIX];
                prefix[..8].copy_from_slice(&batch.gpa.to_le_bytes());
                prefix[8..12].copy_from_slice(&(batch.count as u32).to_le_bytes());
                prefix[12] = codec;
                let mut h = crc32fast::Hasher::new();
                h.update(&prefix);
                h.update(packed);
                let f = frame(RecordType::PagesCompressed, PAGES_PREFIX + packed.len(), h.finalize());
                let total = FRAME_LEN + PAGES_PREFIX + packed.len();
                self.w.write_all(&f)?;
                self.w.write_all(&prefix)?;
                self.w.write_all(packed)?;
                batch.count = 0;
                self.bytes += total as u64;
                return Ok(());
            }
        }
        let payload_len = PAGES_PREFIX + data_len;
        let sending = self.compressor.is_some().then(std::time::Instant::now);
        let b = &mut batch.buf;
        b[FRAME_LEN..FRAME_LEN + 8].copy_from_slice(&batch.gpa.to_le_bytes());
        b[FRAME_LEN + 8..FRAME_LEN + 12].copy_from_slice(&(batch.count as u32).to_le_bytes());
        b[FRAME_LEN + 12..FRAME_LEN + 16].fill(0);
        let f = frame(RecordType::Pages, payload_len, crc32fast::hash(&b[FRAME_LEN..FRAME_LEN + payload_len]));
        b[..FRAME_LEN].copy_from_slice(&f);
        batch.count = 0;
        let total = FRAME_LEN + payload_len;
        self.w.write_all(&batch.buf[..total])?;
        self.bytes += total as u64;
        if let (Some(c), Some(t)) = (self.compressor.as_mut(), sending) {
            c.sent(total, t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    pub fn zero_pages(&mut self, gpa: u64, count: u64) -> io::Result<()> {
        self.record(RecordType::ZeroPages, &two_u64(gpa, count))
    }

    /// (`pass` is a u32 followed by 4 reserved bytes, which is `pass` as a little-endian u64.)
    pub fn pass_end(&mut self, pass: u32, pages: u64) -> io::Result<()> {
        self.record(RecordType::PassEnd, &two_u64(u64::from(pass), pages))
    }

    pub fn vcpu_state(&mut self, index: u32, blob: &[u8]) -> io::Result<()> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(blob);
        self.record(RecordType::VcpuState, &p)
    }

    pub fn vm_state(&mut self, blob: &[u8]) -> io::Result<()> {
        self.record(RecordType::VmState, blob)
    }

    pub fn device_state(&mut self, name: &str, blob: &[u8]) -> io::Result<()> {
        let mut p = (name.len() as u16).to_le_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(blob);
        self.record(RecordType::DeviceState, &p)
    }

    /// `guest_running`: whether the guest ran on the source until the switchover (the destination
    /// resumes it on GO only then; a stopped guest stays stopped).
    pub fn end(&mut self, vcpu_states: u32, device_states: u32, guest_running: bool) -> io::Result<()> {
        self.end_with(vcpu_states, device_states, guest_running, false)
    }

    /// END, `postcopy` set when the pages of the OWED records before it come after GO.
    pub fn end_with(
        &mut self,
        vcpu_states: u32,
        device_states: u32,
        guest_running: bool,
        postcopy: bool,
    ) -> io::Result<()> {
        let flags = if guest_running { END_GUEST_RUNNING } else { 0 } | if postcopy { END_POSTCOPY } else { 0 };
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&two_u32(vcpu_states, device_states));
        p[8..12].copy_from_slice(&flags.to_le_bytes());
        self.record(RecordType::End, &p)
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.record(RecordType::Sync, &[])
    }

    pub fn go(&mut self) -> io::Result<()> {
        self.record(RecordType::Go, &[])
    }

    pub fn abort(&mut self) -> io::Result<()> {
        self.record(RecordType::Abort, &[])
    }

    /// The first record of page channel `index` of migration `migration_id`.
    pub fn channel(&mut self, migration_id: u64, index: u32) -> io::Result<()> {
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&migration_id.to_le_bytes());
        p[8..].copy_from_slice(&two_u32(index, 0));
        self.record(RecordType::Channel, &p)
    }

    pub fn resolve(&mut self, migration_id: u64, action: ResolveAction) -> io::Result<()> {
        let action = match action {
            ResolveAction::Go => RESOLVE_GO,
            ResolveAction::Abort => RESOLVE_ABORT,
        };
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&migration_id.to_le_bytes());
        p[8..].copy_from_slice(&two_u32(action, 0));
        self.record(RecordType::Resolve, &p)
    }

    /// The owed pages of `owed` (a page bitmap of the whole RAM), in as many OWED records as it
    /// takes; a stretch with nothing owed is left out.
    pub fn owed(&mut self, owed: &crate::PageBitmap) -> io::Result<()> {
        let pages = owed.len();
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(OWED_MAX_PAGES);
            if owed.ones_in_range(first, n).next().is_some() {
                let mut p = vec![0u8; OWED_PREFIX + n.div_ceil(8)];
                p[..8].copy_from_slice(&(first as u64).to_le_bytes());
                p[8..12].copy_from_slice(&(n as u32).to_le_bytes());
                for page in owed.ones_in_range(first, n) {
                    let i = page - first;
                    p[OWED_PREFIX + i / 8] |= 1 << (i % 8);
                }
                self.record(RecordType::Owed, &p)?;
            }
            first += n;
        }
        Ok(())
    }

    /// `urgent`: an urgent connection (CHANNEL index 0) follows this one.
    pub fn resume(&mut self, migration_id: u64, urgent: bool) -> io::Result<()> {
        self.record(RecordType::Resume, &two_u64(migration_id, u64::from(flag(urgent, RESUME_URGENT))))
    }

    pub fn page_request(&mut self, gpa: u64, count: u64) -> io::Result<()> {
        self.record(RecordType::PageRequest, &two_u64(gpa, count))
    }

    pub fn complete(&mut self) -> io::Result<()> {
        self.record(RecordType::Complete, &[])
    }

    /// The digests of every page (`digests[i]` for page i), in BASE records, then BASE_END.
    pub fn base(&mut self, digests: &[u128]) -> io::Result<()> {
        for (i, chunk) in digests.chunks(BASE_MAX_PAGES).enumerate() {
            let mut p = Vec::with_capacity(16 + 16 * chunk.len());
            p.extend_from_slice(&((i * BASE_MAX_PAGES) as u64).to_le_bytes());
            p.extend_from_slice(&two_u32(chunk.len() as u32, 0));
            for d in chunk {
                p.extend_from_slice(&d.to_le_bytes());
            }
            self.record(RecordType::Base, &p)?;
        }
        self.record(RecordType::BaseEnd, &two_u64(digests.len() as u64, 0))
    }

    /// RAM_FDS; its memfds go with these bytes (`Connection::send_with_fds`).
    pub fn ram_fds(&mut self, regions: u32) -> io::Result<()> {
        self.record(RecordType::RamFds, &two_u32(regions, 0))
    }

    pub fn resumed(&mut self, pages_owed: u64) -> io::Result<()> {
        self.record(RecordType::Resumed, &pages_owed.to_le_bytes())
    }

    pub fn done(&mut self) -> io::Result<()> {
        self.record(RecordType::Done, &[])
    }

    pub fn ready(&mut self) -> io::Result<()> {
        self.record(RecordType::Ready, &[])
    }

    pub fn synced(&mut self) -> io::Result<()> {
        self.record(RecordType::Synced, &[])
    }

    pub fn started(&mut self) -> io::Result<()> {
        self.record(RecordType::Started, &[])
    }

    pub fn resolved(&mut self, r: Resolution) -> io::Result<()> {
        self.record(RecordType::Resolved, &(r as u32).to_le_bytes())
    }

    pub fn error(&mut self, reason: &str) -> io::Result<()> {
        let mut end = reason.len().min(MAX_ERROR_TEXT);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.record(RecordType::Error, &reason.as_bytes()[..end])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder

/// A record's frame, read and checked (frame checksum, type, length); its payload is next on the
/// stream.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub kind: RecordType,
    len: u32,
    payload_crc: u32,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Reads records from an untrusted peer. Every length is checked before anything is allocated or
/// read; every checksum before a record is believed.
pub struct Decoder<R: Read> {
    r: R,
    buf: Vec<u8>,
    bytes: u64,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str, at_start: bool) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_start => return Err(StreamError::Closed),
            Ok(0) => return Err(StreamError::Truncated(what)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(StreamError::Stalled)
            }
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

impl<R: Read> Decoder<R> {
    pub fn new(r: R) -> Self {
        Decoder { r, buf: Vec::new(), bytes: 0 }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Reads and checks the magic and version.
    pub fn preamble(&mut self) -> Result<(), StreamError> {
        let mut p = [0u8; PREAMBLE_LEN];
        read_full(&mut self.r, &mut p[..8], "the preamble", true)?;
        if &p[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        read_full(&mut self.r, &mut p[8..], "the preamble", false)?;
        self.bytes += PREAMBLE_LEN as u64;
        match u32_le(&p, 8) {
            VERSION => Ok(()),
            1 => Err(StreamError::Unsafe(1)),
            other => Err(StreamError::Version(other)),
        }
    }

    /// Reads the next frame. `Err(Closed)` if the peer closed cleanly between records.
    pub fn next_frame(&mut self) -> Result<Frame, StreamError> {
        let mut raw = [0u8; FRAME_LEN];
        read_full(&mut self.r, &mut raw, "a record frame", true)?;
        self.bytes += FRAME_LEN as u64;
        if crc32fast::hash(&raw[..12]) != u32_le(&raw, 12) {
            return Err(StreamError::FrameChecksum);
        }
        let kind = RecordType::from_u8(raw[0]).ok_or(StreamError::UnknownType(raw[0]))?;
        if raw[1..4] != [0, 0, 0] {
            return Err(malformed(kind, "reserved frame bytes are not zero"));
        }
        let len = u32_le(&raw, 4);
        let max = max_payload(kind);
        if len as usize > max {
            return Err(StreamError::TooLong { kind: kind.name(), len, max });
        }
        Ok(Frame { kind, len, payload_crc: u32_le(&raw, 8) })
    }

    /// Reads a (non-PAGES) record's payload, checks its CRC and decodes it.
    pub fn read_record(&mut self, f: &Frame) -> Result<Record<'_>, StreamError> {
        if matches!(f.kind, RecordType::Pages | RecordType::PagesCompressed) {
            return Err(malformed(f.kind, "page data must be read with read_pages"));
        }
        self.buf.resize(f.len(), 0);
        read_full(&mut self.r, &mut self.buf, f.kind.name(), false)?;
        self.bytes += f.len() as u64;
        if crc32fast::hash(&self.buf) != f.payload_crc {
            return Err(StreamError::Checksum(f.kind.name()));
        }
        parse(f.kind, &self.buf)
    }

    /// The next whole record (not PAGES).
    pub fn next_record(&mut self) -> Result<Record<'_>, StreamError> {
        let f = self.next_frame()?;
        self.read_record(&f)
    }

    /// Reads a PAGES or PAGES_COMPRESSED record: checks the prefix, asks `dest(gpa, count)` for
    /// where the page data goes (the caller checks the range), reads it there, then checks the CRC
    /// over all of it. On a CRC failure the destination buffer holds unverified bytes: the caller
    /// must not use them. Compressed data is checked against its CRC before it is decompressed.
    pub fn read_pages<'d, E>(
        &mut self,
        f: &Frame,
        dest: impl FnOnce(u64, usize) -> Result<&'d mut [u8], E>,
    ) -> Result<Result<(u64, usize), E>, StreamError> {
        let kind = f.kind;
        let compressed = kind == RecordType::PagesCompressed;
        assert!(compressed || kind == RecordType::Pages, "read_pages of a {} frame", kind.name());
        if f.len() < PAGES_PREFIX {
            return Err(malformed(kind, format!("{} bytes, shorter than its 16-byte prefix", f.len())));
        }
        let mut prefix = [0u8; PAGES_PREFIX];
        read_full(&mut self.r, &mut prefix, "a PAGES record", false)?;
        let gpa = u64_le(&prefix, 0);
        let count = u32_le(&prefix, 8) as usize;
        if count == 0 || count > MAX_PAGES_PER_RECORD {
            return Err(malformed(kind, format!("{count} pages (1 to {MAX_PAGES_PER_RECORD} allowed)")));
        }
        let codec = if compressed {
            let data = f.len() - PAGES_PREFIX;
            if data == 0 || data >= count * PAGE_SIZE {
                return Err(malformed(kind, format!("{data} compressed bytes for {count} pages")));
            }
            let codec = Codec::from_wire(prefix[12]).ok_or_else(|| malformed(kind, format!("codec {}", prefix[12])))?;
            if prefix[13..16] != [0, 0, 0] {
                return Err(malformed(kind, "non-zero reserved field"));
            }
            Some(codec)
        } else {
            if f.len() != PAGES_PREFIX + count * PAGE_SIZE {
                return Err(malformed(kind, format!("{} bytes for {count} pages", f.len())));
            }
            if u32_le(&prefix, 12) != 0 {
                return Err(malformed(kind, "non-zero reserved field"));
            }
            None
        };
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
        }
        let out = match dest(gpa, count) {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        if out.len() != count * PAGE_SIZE {
            return Err(malformed(kind, "destination buffer of the wrong size"));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&prefix);
        match codec {
            None => {
                read_full(&mut self.r, out, "a PAGES record", false)?;
                h.update(out);
            }
            Some(_) => {
                self.buf.resize(f.len() - PAGES_PREFIX, 0);
                read_full(&mut self.r, &mut self.buf, "a PAGES_COMPRESSED record", false)?;
                h.update(&self.buf);
            }
        }
        self.bytes += f.len() as u64;
        if h.finalize() != f.payload_crc {
            return Err(StreamError::Checksum(kind.name()));
        }
        if let Some(codec) = codec {
            compress::decompress(codec, &self.buf, out)?;
        }
        Ok(Ok((gpa, count)))
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Decodes a checked payload. Lengths and counts are validated here; what they mean for the guest
/// (is the address RAM, is the vCPU index in range) is the receiver's to check.
fn parse(kind: RecordType, p: &[u8]) -> Result<Record<'_>, StreamError> {
    let need = |n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(malformed(kind, format!("{} bytes where {n} are expected", p.len())))
        }
    };
    let at_least = |n: usize| {
        if p.len() >= n {
            Ok(())
        } else {
            Err(malformed(kind, format!("{} bytes, shorter than {n}", p.len())))
        }
    };
    let blob_ok = |blob: &[u8]| {
        if blob.is_empty() || blob.len() > MAX_STATE_BLOB {
            Err(malformed(kind, format!("state of {} bytes (1 to {MAX_STATE_BLOB} allowed)", blob.len())))
        } else {
            Ok(())
        }
    };
    Ok(match kind {
        RecordType::Header => {
            at_least(HEADER_PREFIX)?;
            let count = u32_le(p, 8) as usize;
            if count == 0 || count > MAX_REGIONS {
                return Err(malformed(kind, format!("{count} RAM regions (1 to {MAX_REGIONS} allowed)")));
            }
            let (word, asks_base) = (u32_le(p, 12), u32_le(p, 12) & HEADER_ASKS_BASE != 0);
            let (handover, preempt) = (word & HEADER_HANDOVER != 0, word & HEADER_PREEMPT != 0);
            if word & !(0xffff | HEADER_ASKS_BASE | HEADER_HANDOVER | HEADER_PREEMPT) != 0 {
                return Err(malformed(kind, format!("unknown flags in {word:#x}")));
            }
            let channels = (word & 0xffff).max(1);
            if channels > MAX_CHANNELS {
                return Err(malformed(kind, format!("{channels} channels (1 to {MAX_CHANNELS} allowed)")));
            }
            need(HEADER_PREFIX + 16 * count)?;
            let at = |i: usize| HEADER_PREFIX + 16 * i;
            let regions = (0..count).map(|i| RamRegion { gpa: u64_le(p, at(i)), size: u64_le(p, at(i) + 8) }).collect();
            Record::Header(StreamHeader {
                page_size: u32_le(p, 0),
                vcpu_count: u32_le(p, 4),
                migration_id: u64_le(p, 16),
                channels,
                asks_base,
                handover,
                preempt,
                regions,
            })
        }
        RecordType::ZeroPages => {
            need(16)?;
            Record::ZeroPages { gpa: u64_le(p, 0), count: u64_le(p, 8) }
        }
        RecordType::PassEnd => {
            need(16)?;
            Record::PassEnd { pass: u32_le(p, 0), pages: u64_le(p, 8) }
        }
        RecordType::VcpuState => {
            at_least(4)?;
            blob_ok(&p[4..])?;
            Record::VcpuState { index: u32_le(p, 0), blob: &p[4..] }
        }
        RecordType::VmState => {
            blob_ok(p)?;
            Record::VmState(p)
        }
        RecordType::DeviceState => {
            at_least(2)?;
            let n = u16::from_le_bytes([p[0], p[1]]) as usize;
            if n == 0 || n > MAX_DEVICE_NAME || p.len() < 2 + n {
                return Err(malformed(kind, format!("device name of {n} bytes")));
            }
            let name = std::str::from_utf8(&p[2..2 + n]).map_err(|_| malformed(kind, "device name is not UTF-8"))?;
            blob_ok(&p[2 + n..])?;
            Record::DeviceState { name, blob: &p[2 + n..] }
        }
        RecordType::End => {
            need(16)?;
            let flags = u32_le(p, 8);
            if flags & !(END_GUEST_RUNNING | END_POSTCOPY) != 0 {
                return Err(malformed(kind, format!("unknown flags {flags:#x}")));
            }
            if u32_le(p, 12) != 0 {
                return Err(malformed(kind, "reserved field is not zero"));
            }
            Record::End {
                vcpu_states: u32_le(p, 0),
                device_states: u32_le(p, 4),
                guest_running: flags & END_GUEST_RUNNING != 0,
                postcopy: flags & END_POSTCOPY != 0,
            }
        }
        RecordType::Owed => {
            at_least(OWED_PREFIX)?;
            let (first_page, pages) = (u64_le(p, 0), u32_le(p, 8));
            if pages == 0 || pages as usize > OWED_MAX_PAGES || u32_le(p, 12) != 0 {
                return Err(malformed(kind, format!("{pages} pages (1 to {OWED_MAX_PAGES} allowed)")));
            }
            need(OWED_PREFIX + (pages as usize).div_ceil(8))?;
            Record::Owed { first_page, pages, bits: &p[OWED_PREFIX..] }
        }
        RecordType::Resume => {
            need(16)?;
            let flags = u64_le(p, 8);
            if flags & !u64::from(RESUME_URGENT) != 0 {
                return Err(malformed(kind, format!("unknown flags or reserved bits in {flags:#x}")));
            }
            Record::Resume { migration_id: u64_le(p, 0), urgent: flags != 0 }
        }
        RecordType::PageRequest => {
            need(16)?;
            Record::PageRequest { gpa: u64_le(p, 0), count: u64_le(p, 8) }
        }
        RecordType::Resumed => {
            need(8)?;
            Record::Resumed { pages_owed: u64_le(p, 0) }
        }
        RecordType::Base => {
            at_least(16)?;
            let count = u32_le(p, 8) as usize;
            if count == 0 || count > BASE_MAX_PAGES || u32_le(p, 12) != 0 {
                return Err(malformed(kind, format!("{count} digests (1 to {BASE_MAX_PAGES} allowed)")));
            }
            need(16 + 16 * count)?;
            Record::Base { first_page: u64_le(p, 0), digests: &p[16..] }
        }
        RecordType::BaseEnd => {
            need(16)?;
            Record::BaseEnd { pages: u64_le(p, 0) }
        }
        RecordType::RamFds => {
            need(8)?;
            Record::RamFds { regions: u32_le(p, 0) }
        }
        RecordType::Resolve => {
            need(16)?;
            let action = match (u32_le(p, 8), u32_le(p, 12)) {
                (RESOLVE_GO, 0) => ResolveAction::Go,
                (RESOLVE_ABORT, 0) => ResolveAction::Abort,
                (a, r) => return Err(malformed(kind, format!("unknown action {a} (reserved {r})"))),
            };
            Record::Resolve { migration_id: u64_le(p, 0), action }
        }
        RecordType::Channel => {
            need(16)?;
            let (index, reserved) = (u32_le(p, 8), u32_le(p, 12));
            // Index 0: the urgent connection (channel 0 proper opens with HEADER).
            if index >= MAX_CHANNELS || reserved != 0 {
                return Err(malformed(kind, format!("channel index {index} (reserved {reserved})")));
            }
            Record::Channel { migration_id: u64_le(p, 0), index }
        }
        RecordType::Resolved => {
            need(4)?;
            let v = u32_le(p, 0);
            Record::Resolved(Resolution::from_u32(v).ok_or_else(|| malformed(kind, format!("unknown outcome {v}")))?)
        }
        RecordType::Error => Record::Error(std::str::from_utf8(p).map_err(|_| malformed(kind, "reason is not UTF-8"))?),
        // Empty records: the frame's length bound (0) already checked them.
        RecordType::Sync => Record::Sync,
        RecordType::Go => Record::Go,
        RecordType::Abort => Record::Abort,
        RecordType::Done => Record::Done,
        RecordType::Ready => Record::Ready,
        RecordType::Synced => Record::Synced,
        RecordType::Started => Record::Started,
        RecordType::Complete => Record::Complete,
        RecordType::Pages | RecordType::PagesCompressed => unreachable!("page data is read by read_pages"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn encoded(f: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out);
        e.preamble().unwrap();
        f(&mut e);
        out
    }

    fn header() -> StreamHeader {
        StreamHeader {
            page_size: 4096,
            vcpu_count: 2,
            migration_id: 0x1234_5678_9abc_def0,
            channels: 3,
            asks_base: true,
            handover: false,
            preempt: true,
            regions: vec![RamRegion { gpa: 0, size: 1 << 20 }],
        }
    }

    #[test]
    fn round_trip_every_record() {
        let bytes = encoded(|e| {
            e.header(&header()).unwrap();
            let mut b = PageBatch::default();
            for i in 0..3u8 {
                let gpa = 0x2000 + u64::from(i) * 4096;
                assert!(b.accepts(gpa));
                b.next_slot(gpa).fill(i + 1);
                b.commit();
            }
            assert!(!b.accepts(0x9000));
            e.pages(&mut b).unwrap();
            e.zero_pages(0x10000, 5).unwrap();
            e.pass_end(0, 8).unwrap();
            e.vcpu_state(1, b"cpu").unwrap();
            e.vm_state(b"vm").unwrap();
            e.device_state("serial0", b"uart").unwrap();
            e.end(2, 1, true).unwrap();
            e.sync().unwrap();
            e.go().unwrap();
            e.abort().unwrap();
            e.resolve(7, ResolveAction::Go).unwrap();
            e.resolve(8, ResolveAction::Abort).unwrap();
            e.done().unwrap();
            e.channel(9, 2).unwrap();
            e.channel(9, 0).unwrap();
            e.ready().unwrap();
            e.error("no").unwrap();
            e.synced().unwrap();
            e.started().unwrap();
            e.resolved(Resolution::DestinationDiscarded).unwrap();
            e.end_with(1, 0, false, true).unwrap();
            let mut owed = crate::PageBitmap::new(20);
            owed.set(3);
            owed.set(17);
            e.owed(&owed).unwrap();
            e.resume(11, true).unwrap();
            e.resume(12, false).unwrap();
            e.page_request(0x5000, 2).unwrap();
            e.complete().unwrap();
            e.resumed(9).unwrap();
        });
        let mut d = Decoder::new(Cursor::new(bytes));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert_eq!(d.read_record(&f).unwrap(), Record::Header(header()));
        let f = d.next_frame().unwrap();
        assert_eq!(f.kind, RecordType::Pages);
        let mut ram = vec![0u8; 3 * 4096];
        let got = d.read_pages(&f, |gpa, n| -> Result<&mut [u8], ()> {
            assert_eq!((gpa, n), (0x2000, 3));
            Ok(&mut ram[..])
        });
        assert_eq!(got.unwrap(), Ok((0x2000, 3)));
        assert!(ram[..4096].iter().all(|&b| b == 1) && ram[8192..].iter().all(|&b| b == 3));
        let expect = [
            Record::ZeroPages { gpa: 0x10000, count: 5 },
            Record::PassEnd { pass: 0, pages: 8 },
            Record::VcpuState { index: 1, blob: b"cpu" },
            Record::VmState(b"vm"),
            Record::DeviceState { name: "serial0", blob: b"uart" },
            Record::End { vcpu_states: 2, device_states: 1, guest_running: true, postcopy: false },
            Record::Sync,
            Record::Go,
            Record::Abort,
            Record::Resolve { migration_id: 7, action: ResolveAction::Go },
            Record::Resolve { migration_id: 8, action: ResolveAction::Abort },
            Record::Done,
            Record::Channel { migration_id: 9, index: 2 },
            Record::Channel { migration_id: 9, index: 0 },
            Record::Ready,
            Record::Error("no"),
            Record::Synced,
            Record::Started,
            Record::Resolved(Resolution::DestinationDiscarded),
            Record::End { vcpu_states: 1, device_states: 0, guest_running: false, postcopy: true },
            Record::Owed { first_page: 0, pages: 20, bits: &[0x08, 0x00, 0x02] },
            Record::Resume { migration_id: 11, urgent: true },
            Record::Resume { migration_id: 12, urgent: false },
            Record::PageRequest { gpa: 0x5000, count: 2 },
            Record::Complete,
            Record::Resumed { pages_owed: 9 },
        ];
        for want in expect {
            let f = d.next_frame().unwrap();
            assert_eq!(d.read_record(&f).unwrap(), want);
        }
        assert!(matches!(d.next_frame(), Err(StreamError::Closed)));
    }

    #[test]
    fn refuses_bad_preamble_and_version() {
        let mut d = Decoder::new(Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()));
        assert!(matches!(d.preamble(), Err(StreamError::BadMagic)));
        let mut v3 = MAGIC.to_vec();
        v3.extend_from_slice(&3u32.to_le_bytes());
        assert!(matches!(Decoder::new(Cursor::new(v3)).preamble(), Err(StreamError::Version(3))));
        assert!(matches!(Decoder::new(Cursor::new(MAGIC[..5].to_vec())).preamble(), Err(StreamError::Truncated(_))));
        assert!(matches!(Decoder::new(Cursor::new(Vec::new())).preamble(), Err(StreamError::Closed)));
    }

    /// The compatibility rule at the top of this file: this version, and the one before unless it
    /// cannot keep this version's promises.
    #[test]
    fn older_versions_follow_the_policy() {
        let preamble = |v: u32| [&MAGIC[..], &v.to_le_bytes()].concat();
        assert!(Decoder::new(Cursor::new(preamble(VERSION))).preamble().is_ok());
        // Version 1 resumed the destination without GO: refused, and the error says why.
        let e = Decoder::new(Cursor::new(preamble(1))).preamble().unwrap_err();
        assert!(matches!(e, StreamError::Unsafe(1)));
        assert!(e.to_string().contains("one-running-copy"), "{e}");
    }

    #[test]
    fn refuses_corrupt_records() {
        let good = encoded(|e| e.vm_state(b"state").unwrap());
        let frame_at = 12;

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        let mut d = Decoder::new(Cursor::new(flipped));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert!(matches!(d.read_record(&f), Err(StreamError::Checksum("VM_STATE"))));

        let mut unknown = good.clone();
        unknown[frame_at] = 0x42;
        let resealed = crc32fast::hash(&unknown[frame_at..frame_at + 12]);
        unknown[frame_at + 12..frame_at + 16].copy_from_slice(&resealed.to_le_bytes());
        let mut d = Decoder::new(Cursor::new(unknown));
        d.preamble().unwrap();
        assert!(matches!(d.next_frame(), Err(StreamError::UnknownType(0x42))));

        // One flipped length byte is caught by the frame checksum, before the length is believed.
        let mut huge = good.clone();
        huge[frame_at + 6] ^= 0x01;
        let mut d = Decoder::new(Cursor::new(huge));
        d.preamble().unwrap();
        assert!(matches!(d.next_frame(), Err(StreamError::FrameChecksum)));

        // A well-sealed frame longer than its type allows is refused before its payload is read.
        let mut long = encoded(|_| {});
        long.extend_from_slice(&frame(RecordType::End, 17, 0));
        let mut d = Decoder::new(Cursor::new(long));
        d.preamble().unwrap();
        assert!(matches!(d.next_frame(), Err(StreamError::TooLong { kind: "END", len: 17, max: 16 })));

        let cut = good[..good.len() - 2].to_vec();
        let mut d = Decoder::new(Cursor::new(cut));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert!(matches!(d.read_record(&f), Err(StreamError::Truncated("VM_STATE"))));
    }

    #[test]
    fn refuses_malformed_payloads() {
        // A header claiming more regions than it carries, sealed with a valid CRC.
        let mut p = vec![0u8; 24];
        p[8..12].copy_from_slice(&3u32.to_le_bytes());
        let bytes = encoded(|e| e.record(RecordType::Header, &p).unwrap());
        let mut d = Decoder::new(Cursor::new(bytes));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert!(matches!(d.read_record(&f), Err(StreamError::Malformed { kind: "HEADER", .. })));

        // PAGES whose length disagrees with its count.
        let mut pages = vec![0u8; PAGES_PREFIX + PAGE_SIZE];
        pages[8..12].copy_from_slice(&2u32.to_le_bytes());
        let bytes = encoded(|e| e.record(RecordType::Pages, &pages).unwrap());
        let mut d = Decoder::new(Cursor::new(bytes));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        let r = d.read_pages(&f, |_, _| -> Result<&mut [u8], ()> { unreachable!() });
        assert!(matches!(r, Err(StreamError::Malformed { kind: "PAGES", .. })));

        // A device name longer than its record.
        let bytes = encoded(|e| e.record(RecordType::DeviceState, &[200, 0, b'a']).unwrap());
        let mut d = Decoder::new(Cursor::new(bytes));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert!(matches!(d.read_record(&f), Err(StreamError::Malformed { .. })));
    }
}
