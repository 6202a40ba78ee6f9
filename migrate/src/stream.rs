//! The migration stream: the one place that knows the wire format. The encoder and decoder sit side
//! by side; the decoder is the only code that reads bytes a peer sent.
//!
//! # Format (version 1)
//!
//! All integers are little-endian. The stream opens with a preamble, then carries records.
//!
//! ```text
//! preamble:  magic "EMU-MIG\n" (8 bytes) | version: u32
//! record:    type: u8 | reserved: 3 bytes (0) | length: u32 | crc32: u32 | payload: length bytes
//! ```
//!
//! `crc32` is CRC-32 (IEEE) over the first 8 bytes of the frame and the payload. `length` is at most
//! [`MAX_PAYLOAD`]; the decoder allocates nothing larger, whatever a peer claims.
//!
//! | type | record       | payload |
//! |------|--------------|---------|
//! | 0x01 | HEADER       | page_size: u32, vcpu_count: u32, region_count: u32, reserved: u32, then (gpa: u64, size: u64) per region |
//! | 0x02 | PAGES        | gpa: u64, count: u32, reserved: u32, then count x 4096 bytes (contiguous pages, one region) |
//! | 0x03 | ZERO_PAGES   | gpa: u64, count: u64 (contiguous pages that are all zero) |
//! | 0x04 | PASS_END     | pass: u32, reserved: u32, pages sent in the pass: u64 |
//! | 0x05 | VCPU_STATE   | index: u32, then the vCPU's state blob |
//! | 0x06 | VM_STATE     | the VM's state blob (irqchip, PIT, clock) |
//! | 0x07 | DEVICE_STATE | name_length: u16, name (UTF-8), then the device's state blob |
//! | 0x08 | END          | vcpu_states: u32, device_states: u32 |
//! | 0x09 | SYNC         | (empty): answer SYNCED once everything before this record is applied |
//! | 0x81 | ACK          | (empty): destination to source, state restored, guest resuming there |
//! | 0x82 | ERROR        | UTF-8 reason: destination to source, stream refused |
//! | 0x83 | SYNCED       | (empty): destination to source, answer to SYNC |
//!
//! State blobs are opaque here: the emulator versions and checks them (`emulator/src/state.rs`).
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
//!   | END  -------------------------------------->  | every page seen? every state? restore
//!   |  <---------------------------------------- ACK | resume the guest
//!   | postmigrate                                   |
//! ```
//!
//! The destination may answer ERROR at any point and close; the source then resumes its guest.

use std::io::{self, Read, Write};

use crate::ram::{RamRegion, PAGE_SIZE};

pub const MAGIC: &[u8; 8] = b"EMU-MIG\n";
pub const VERSION: u32 = 1;
pub const FRAME_LEN: usize = 12;
/// Pages in one PAGES record.
pub const MAX_PAGES_PER_RECORD: usize = 256;
const PAGES_PREFIX: usize = 16;
/// The largest payload: a full PAGES record, with room to spare for state blobs.
pub const MAX_PAYLOAD: usize = PAGES_PREFIX + MAX_PAGES_PER_RECORD * PAGE_SIZE;
/// The largest state blob a destination accepts (a vCPU's state is about 10 KiB).
pub const MAX_STATE_BLOB: usize = 256 << 10;
pub const MAX_REGIONS: usize = 64;
pub const MAX_VCPUS: u32 = 64;
pub const MAX_DEVICE_NAME: usize = 64;
const MAX_ERROR_TEXT: usize = 4096;

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
    Ack = 0x81,
    Error = 0x82,
    Synced = 0x83,
}

impl RecordType {
    const ALL: [RecordType; 12] = [
        RecordType::Header,
        RecordType::Pages,
        RecordType::ZeroPages,
        RecordType::PassEnd,
        RecordType::VcpuState,
        RecordType::VmState,
        RecordType::DeviceState,
        RecordType::End,
        RecordType::Sync,
        RecordType::Ack,
        RecordType::Error,
        RecordType::Synced,
    ];

    fn from_u8(v: u8) -> Option<Self> {
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
            Ack => "ACK",
            Error => "ERROR",
            Synced => "SYNCED",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the connection ended in the middle of {0}")]
    Truncated(&'static str),
    #[error("the connection closed")]
    Closed,
    #[error("no data from the peer for {}s (stalled or gone)", crate::transport::STALL_TIMEOUT.as_secs())]
    Stalled,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("not an emu migration stream (bad magic)")]
    BadMagic,
    #[error("stream version {0}; this emu speaks version {VERSION}")]
    Version(u32),
    #[error("unknown record type {0:#04x}")]
    UnknownType(u8),
    #[error("{kind} record of {len} bytes is longer than the {max} allowed")]
    TooLong { kind: &'static str, len: u32, max: usize },
    #[error("{0} record fails its checksum")]
    Checksum(&'static str),
    #[error("malformed {kind} record: {why}")]
    Malformed { kind: &'static str, why: String },
}

fn malformed(kind: RecordType, why: impl Into<String>) -> StreamError {
    StreamError::Malformed { kind: kind.name(), why: why.into() }
}

/// The first record: what the source's guest looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub page_size: u32,
    pub vcpu_count: u32,
    pub regions: Vec<RamRegion>,
}

/// A decoded record, borrowing its payload from the decoder. PAGES never appears here: its data goes
/// straight to its destination through [`Decoder::read_pages`].
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Header(StreamHeader),
    ZeroPages { gpa: u64, count: u64 },
    PassEnd { pass: u32, pages: u64 },
    VcpuState { index: u32, blob: &'a [u8] },
    VmState(&'a [u8]),
    DeviceState { name: &'a str, blob: &'a [u8] },
    End { vcpu_states: u32, device_states: u32 },
    Sync,
    Ack,
    Error(&'a str),
    Synced,
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn frame(kind: RecordType, len: usize) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0] = kind as u8;
    f[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    f
}

fn two_u64(a: u64, b: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&a.to_le_bytes());
    p[8..].copy_from_slice(&b.to_le_bytes());
    p
}

fn seal(frame: &mut [u8; FRAME_LEN], payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..8]);
    h.update(payload);
    frame[8..12].copy_from_slice(&h.finalize().to_le_bytes());
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
        debug_assert!(self.accepts(gpa));
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
}

impl<W: Write> Encoder<W> {
    pub fn new(w: W) -> Self {
        Encoder { w, bytes: 0 }
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
        let mut f = frame(kind, payload.len());
        seal(&mut f, payload);
        self.put(&f)?;
        self.put(payload)
    }

    pub fn preamble(&mut self) -> io::Result<()> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&VERSION.to_le_bytes());
        self.put(&p)
    }

    pub fn header(&mut self, h: &StreamHeader) -> io::Result<()> {
        let mut p = Vec::with_capacity(16 + 16 * h.regions.len());
        for v in [h.page_size, h.vcpu_count, h.regions.len() as u32, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for r in &h.regions {
            p.extend_from_slice(&r.gpa.to_le_bytes());
            p.extend_from_slice(&r.size.to_le_bytes());
        }
        self.record(RecordType::Header, &p)
    }

    /// Sends the batch as one PAGES record and empties it.
    pub fn pages(&mut self, batch: &mut PageBatch) -> io::Result<()> {
        if batch.count == 0 {
            return Ok(());
        }
        let payload_len = PAGES_PREFIX + batch.count * PAGE_SIZE;
        let mut f = frame(RecordType::Pages, payload_len);
        let b = &mut batch.buf;
        b[FRAME_LEN..FRAME_LEN + 8].copy_from_slice(&batch.gpa.to_le_bytes());
        b[FRAME_LEN + 8..FRAME_LEN + 12].copy_from_slice(&(batch.count as u32).to_le_bytes());
        b[FRAME_LEN + 12..FRAME_LEN + 16].fill(0);
        seal(&mut f, &b[FRAME_LEN..FRAME_LEN + payload_len]);
        b[..FRAME_LEN].copy_from_slice(&f);
        batch.count = 0;
        let total = FRAME_LEN + payload_len;
        self.w.write_all(&batch.buf[..total])?;
        self.bytes += total as u64;
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

    pub fn end(&mut self, vcpu_states: u32, device_states: u32) -> io::Result<()> {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&vcpu_states.to_le_bytes());
        p[4..].copy_from_slice(&device_states.to_le_bytes());
        self.record(RecordType::End, &p)
    }

    pub fn ack(&mut self) -> io::Result<()> {
        self.record(RecordType::Ack, &[])
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.record(RecordType::Sync, &[])
    }

    pub fn synced(&mut self) -> io::Result<()> {
        self.record(RecordType::Synced, &[])
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

/// A record's frame, read and checked for type and length; its payload is next on the stream.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub kind: RecordType,
    len: u32,
    raw: [u8; FRAME_LEN],
}

impl Frame {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn expected_crc(&self) -> u32 {
        u32_le(&self.raw, 8)
    }

    fn hasher(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.raw[..8]);
        h
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
        let mut p = [0u8; 12];
        read_full(&mut self.r, &mut p[..8], "the preamble", true)?;
        if &p[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        read_full(&mut self.r, &mut p[8..], "the preamble", false)?;
        self.bytes += 12;
        let version = u32_le(&p, 8);
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        Ok(())
    }

    /// Reads the next frame. `Err(Closed)` if the peer closed cleanly between records.
    pub fn next_frame(&mut self) -> Result<Frame, StreamError> {
        let mut raw = [0u8; FRAME_LEN];
        read_full(&mut self.r, &mut raw, "a record frame", true)?;
        self.bytes += FRAME_LEN as u64;
        let kind = RecordType::from_u8(raw[0]).ok_or(StreamError::UnknownType(raw[0]))?;
        if raw[1..4] != [0, 0, 0] {
            return Err(malformed(kind, "reserved frame bytes are not zero"));
        }
        let len = u32_le(&raw, 4);
        if len as usize > MAX_PAYLOAD {
            return Err(StreamError::TooLong { kind: kind.name(), len, max: MAX_PAYLOAD });
        }
        Ok(Frame { kind, len, raw })
    }

    /// Reads a (non-PAGES) record's payload, checks its CRC and decodes it.
    pub fn read_record(&mut self, f: &Frame) -> Result<Record<'_>, StreamError> {
        if f.kind == RecordType::Pages {
            return Err(malformed(f.kind, "PAGES must be read with read_pages"));
        }
        self.buf.resize(f.len(), 0);
        read_full(&mut self.r, &mut self.buf, f.kind.name(), false)?;
        self.bytes += f.len() as u64;
        let mut h = f.hasher();
        h.update(&self.buf);
        if h.finalize() != f.expected_crc() {
            return Err(StreamError::Checksum(f.kind.name()));
        }
        parse(f.kind, &self.buf)
    }

    /// Reads a PAGES record: checks the prefix, asks `dest(gpa, count)` for where the page data goes
    /// (the caller checks the range), reads it there, then checks the CRC over all of it. On a CRC
    /// failure the destination buffer holds unverified bytes: the caller must not use them.
    pub fn read_pages<'d, E>(
        &mut self,
        f: &Frame,
        dest: impl FnOnce(u64, usize) -> Result<&'d mut [u8], E>,
    ) -> Result<Result<(u64, usize), E>, StreamError> {
        let kind = RecordType::Pages;
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
        if f.len() != PAGES_PREFIX + count * PAGE_SIZE {
            return Err(malformed(kind, format!("{} bytes for {count} pages", f.len())));
        }
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || u32_le(&prefix, 12) != 0 {
            return Err(malformed(kind, format!("unaligned address {gpa:#x} or non-zero reserved field")));
        }
        let out = match dest(gpa, count) {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        debug_assert_eq!(out.len(), count * PAGE_SIZE);
        read_full(&mut self.r, out, "a PAGES record", false)?;
        self.bytes += f.len() as u64;
        let mut h = f.hasher();
        h.update(&prefix);
        h.update(out);
        if h.finalize() != f.expected_crc() {
            return Err(StreamError::Checksum(kind.name()));
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
            at_least(16)?;
            let count = u32_le(p, 8) as usize;
            if count == 0 || count > MAX_REGIONS {
                return Err(malformed(kind, format!("{count} RAM regions (1 to {MAX_REGIONS} allowed)")));
            }
            need(16 + 16 * count)?;
            let regions =
                (0..count).map(|i| RamRegion { gpa: u64_le(p, 16 + 16 * i), size: u64_le(p, 24 + 16 * i) }).collect();
            Record::Header(StreamHeader { page_size: u32_le(p, 0), vcpu_count: u32_le(p, 4), regions })
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
            need(8)?;
            Record::End { vcpu_states: u32_le(p, 0), device_states: u32_le(p, 4) }
        }
        RecordType::Ack => {
            need(0)?;
            Record::Ack
        }
        RecordType::Sync => {
            need(0)?;
            Record::Sync
        }
        RecordType::Synced => {
            need(0)?;
            Record::Synced
        }
        RecordType::Error => {
            if p.len() > MAX_ERROR_TEXT {
                return Err(malformed(kind, "reason too long"));
            }
            Record::Error(std::str::from_utf8(p).map_err(|_| malformed(kind, "reason is not UTF-8"))?)
        }
        RecordType::Pages => unreachable!("PAGES is read by read_pages"),
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
        StreamHeader { page_size: 4096, vcpu_count: 2, regions: vec![RamRegion { gpa: 0, size: 1 << 20 }] }
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
            e.end(2, 1).unwrap();
            e.sync().unwrap();
            e.ack().unwrap();
            e.error("no").unwrap();
            e.synced().unwrap();
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
            Record::End { vcpu_states: 2, device_states: 1 },
            Record::Sync,
            Record::Ack,
            Record::Error("no"),
            Record::Synced,
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
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&2u32.to_le_bytes());
        assert!(matches!(Decoder::new(Cursor::new(v2)).preamble(), Err(StreamError::Version(2))));
        assert!(matches!(Decoder::new(Cursor::new(MAGIC[..5].to_vec())).preamble(), Err(StreamError::Truncated(_))));
        assert!(matches!(Decoder::new(Cursor::new(Vec::new())).preamble(), Err(StreamError::Closed)));
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
        let mut d = Decoder::new(Cursor::new(unknown));
        d.preamble().unwrap();
        assert!(matches!(d.next_frame(), Err(StreamError::UnknownType(0x42))));

        let mut huge = good.clone();
        huge[frame_at + 4..frame_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut d = Decoder::new(Cursor::new(huge));
        d.preamble().unwrap();
        assert!(matches!(d.next_frame(), Err(StreamError::TooLong { .. })));

        let cut = good[..good.len() - 2].to_vec();
        let mut d = Decoder::new(Cursor::new(cut));
        d.preamble().unwrap();
        let f = d.next_frame().unwrap();
        assert!(matches!(d.read_record(&f), Err(StreamError::Truncated("VM_STATE"))));
    }

    #[test]
    fn refuses_malformed_payloads() {
        // A header claiming more regions than it carries, sealed with a valid CRC.
        let mut p = vec![0u8; 16];
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
