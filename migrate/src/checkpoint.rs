//! Checkpoints: a guest written to a file (`migrate {"uri": "file:PATH"}`) and restored from it
//! (`emu --incoming file:PATH`).
//!
//! Two ways to take one:
//! - suspend: the guest is paused, written, and stays paused (it may `cont`: no copy runs
//!   elsewhere);
//! - live (the `background-snapshot` capability, as QEMU names it): the guest is paused only to
//!   save its vCPU and device state and write-protect its RAM (userfaultfd), then runs on while the
//!   pages are written. A page the guest is about to change is written first, by the fault thread,
//!   before its write goes ahead, so the file holds RAM exactly as it was at the command, matching
//!   the saved vCPU state.
//!
//! # Format (version 1)
//!
//! Little-endian; every part checksummed (CRC-32); pages at fixed offsets, so that a restore reads
//! only the pages that hold data (and could map them) rather than the whole file.
//!
//! ```text
//! 0       header, 4096 bytes:
//!         magic "EMU-CKPT" | version: u32 | flags: u32 (bit 0: the guest was running, bit 1: live)
//!         page_size: u32 | vcpu_count: u32 | region_count: u32 | reserved: u32
//!         bitmap_offset: u64 | digests_offset: u64 | ram_offset: u64 | state_offset: u64
//!         state_len: u64 | file_len: u64 | created (Unix ns): u64 | checkpoint_id: u64
//!         (gpa: u64, size: u64) x region_count | zero padding | header_crc: u32 (last 4 bytes,
//!         over the 4092 before it)
//! bitmap  ceil(pages / 8) bytes, bit i set = page i holds data | crc: u32
//! digests CRC-32 of every page that holds data (0 for the others), u32 each | crc: u32
//! ram     page i at ram_offset + i * 4096 (ram_offset is 4096-aligned); pages without data are
//!         holes (a sparse file)
//! state   vcpus: u32, then (len: u32, blob) each | vm: (len: u32, blob) | devices: u32, then
//!         (name_len: u16, name, len: u32, blob) each | crc: u32
//! ```
//!
//! The file is written as PATH.tmp and renamed when complete (the header last), so a checkpoint
//! that fails half-way leaves any older one at PATH whole, and a truncated file has no valid
//! header. A reader refuses a foreign magic, another version, a bad checksum anywhere, a length
//! that does not match, and a layout the VM it builds does not have.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::bitmap::PageBitmap;
use crate::progress::{Progress, ProgressCell, Status};
use crate::ram::{is_zero_page, GuestRam, RamLayout, RamRegion, PAGE_SIZE};
use crate::stream::{MAX_DEVICE_NAME, MAX_REGIONS, MAX_STATE_BLOB, MAX_VCPUS};
use crate::tracker::TrackerKind;
use crate::uffd::{self, Uffd, UffdMsg};
use crate::vm::{MachineState, MigratableVm, VmError};

pub const MAGIC: &[u8; 8] = b"EMU-CKPT";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
const FLAG_RUNNING: u32 = 1;
const FLAG_LIVE: u32 = 2;
/// Pages written (and, live, unprotected) per step; read per call on a restore.
const CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an emu checkpoint (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path} is checkpoint version {found}; this emu reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is damaged: {what} fails its checksum")]
    Checksum { path: PathBuf, what: String },
    #[error("{path} is damaged or truncated: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("the VM")]
    Vm(#[from] VmError),
    #[error("write-protecting guest RAM for a live checkpoint")]
    Uffd(#[from] crate::UffdError),
}

/// What a checkpoint file says about its guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub regions: Vec<RamRegion>,
    pub vcpu_count: u32,
    pub guest_was_running: bool,
    pub live: bool,
    pub checkpoint_id: u64,
    /// Pages that hold data (the others are zero).
    pub data_pages: u64,
}

/// The fixed offsets of a checkpoint of `pages` pages.
struct Layout {
    bitmap: u64,
    digests: u64,
    ram: u64,
    state: u64,
}

impl Layout {
    fn of(pages: usize) -> Layout {
        let bitmap = HEADER_LEN as u64;
        let digests = bitmap + pages.div_ceil(8) as u64 + 4;
        let ram = (digests + 4 * pages as u64 + 4).next_multiple_of(PAGE_SIZE as u64);
        let state = ram + (pages * PAGE_SIZE) as u64;
        Layout { bitmap, digests, ram, state }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The pages written so far, shared by the writer and (live) the fault thread.
struct Pages {
    file: File,
    path: PathBuf,
    saved: PageBitmap,
    data: PageBitmap,
    digests: Vec<u32>,
    ram_offset: u64,
    bytes: u64,
}

impl Pages {
    /// Writes page `page` as it is in `ram` now (a hole if it is zero).
    fn save(&mut self, ram: &GuestRam, page: usize, buf: &mut [u8]) -> Result<(), CheckpointError> {
        if self.saved.get(page) {
            return Ok(());
        }
        ram.read_page(page, buf);
        if !is_zero_page(buf) {
            let at = self.ram_offset + (page * PAGE_SIZE) as u64;
            self.file.write_all_at(buf, at).map_err(io(&self.path))?;
            self.data.set(page);
            self.digests[page] = crc32fast::hash(buf);
            self.bytes += PAGE_SIZE as u64;
        }
        self.saved.set(page);
        Ok(())
    }
}

/// Writes a checkpoint of `vm` to `path`; `live` lets the guest run meanwhile. Reports through
/// `progress` (status active while writing, then completed or failed, with `downtime` the time the
/// guest was paused). A guest that was running runs on after a live checkpoint, and stays paused
/// after a suspend (as `stop` leaves it).
pub fn write(vm: &dyn MigratableVm, path: &Path, live: bool, progress: &ProgressCell) -> Result<(), CheckpointError> {
    let ram = vm.ram().clone();
    let pages = ram.page_count();
    let layout = Layout::of(pages);
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(io(&tmp))?;
    file.set_len(layout.state).map_err(io(&tmp))?;
    let shared = Arc::new(Mutex::new(Pages {
        file,
        path: tmp.clone(),
        saved: PageBitmap::new(pages),
        data: PageBitmap::new(pages),
        digests: vec![0; pages],
        ram_offset: layout.ram,
        bytes: 0,
    }));
    progress.update(|p| p.status = Status::Active);
    let paused_at = Instant::now();
    let was_running = vm.pause_for_switchover()?;
    let result = (|| {
        let state = vm.save_state()?;
        let protect = if live { Some(Protector::start(ram.clone(), shared.clone())?) } else { None };
        if live {
            // Point in time taken: the guest goes on, its first writes waiting for their page to
            // be saved.
            vm.migration_failed();
        }
        progress.update(|p| p.downtime = if live { Some(paused_at.elapsed()) } else { None });
        let mut buf = vec![0u8; PAGE_SIZE];
        for first in (0..pages).step_by(CHUNK) {
            let n = CHUNK.min(pages - first);
            {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                for page in first..first + n {
                    s.save(&ram, page, &mut buf)?;
                }
                // The fault thread may have saved pages ahead of this chunk: count what is saved.
                let (bytes, zero) = (s.bytes, s.saved.count().saturating_sub(s.data.count()) as u64);
                progress.update(|p| {
                    p.bytes = bytes;
                    p.normal_pages = bytes / PAGE_SIZE as u64;
                    p.zero_pages = zero;
                });
            }
            if let Some(p) = &protect {
                p.release(first, n)?;
            }
        }
        if let Some(p) = protect {
            p.stop()?;
        }
        let s = shared.lock().unwrap_or_else(|e| e.into_inner());
        finish_file(&s, &layout, &ram, &state, was_running, live)?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(s.bytes)
    })();
    match result {
        Ok(bytes) => {
            if !live {
                // Suspended: the guest stays paused here, and may run again (no copy runs elsewhere).
                vm.suspended();
                progress.update(|p| p.downtime = Some(paused_at.elapsed()));
            }
            progress.update(|p| {
                p.bytes = bytes;
                p.status = Status::Completed;
                p.total_time = Some(p.started.elapsed());
            });
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            vm.migration_failed();
            progress.update(|p| {
                p.status = Status::Failed;
                p.error = Some(crate::report(&e));
                p.total_time = Some(p.started.elapsed());
            });
            Err(e)
        }
    }
}

/// Bitmap, digests, state and header, once every page is written.
fn finish_file(
    s: &Pages,
    layout: &Layout,
    ram: &GuestRam,
    state: &MachineState,
    was_running: bool,
    live: bool,
) -> Result<(), CheckpointError> {
    let path = &s.path;
    let pages = ram.page_count();
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    for p in s.data.iter_ones() {
        bitmap[p / 8] |= 1 << (p % 8);
    }
    s.file.write_all_at(&with_crc(bitmap), layout.bitmap).map_err(io(path))?;
    let digests: Vec<u8> = s.digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    s.file.write_all_at(&with_crc(digests), layout.digests).map_err(io(path))?;
    let state_bytes = with_crc(encode_state(state));
    s.file.write_all_at(&state_bytes, layout.state).map_err(io(path))?;
    let file_len = layout.state + state_bytes.len() as u64;
    let regions = ram.layout().regions();
    let mut h = vec![0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    let flags = if was_running { FLAG_RUNNING } else { 0 } | if live { FLAG_LIVE } else { 0 };
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let id = crc32fast::hash(&created.as_nanos().to_le_bytes()) as u64 | (u64::from(std::process::id()) << 32);
    let words32 = [VERSION, flags, PAGE_SIZE as u32, state.vcpus.len() as u32, regions.len() as u32, 0];
    for (i, w) in words32.iter().enumerate() {
        h[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    let words64 = [
        layout.bitmap,
        layout.digests,
        layout.ram,
        layout.state,
        state_bytes.len() as u64,
        file_len,
        created.as_nanos() as u64,
        id,
    ];
    for (i, w) in words64.iter().enumerate() {
        h[32 + 8 * i..40 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    for (i, r) in regions.iter().enumerate() {
        h[96 + 16 * i..104 + 16 * i].copy_from_slice(&r.gpa.to_le_bytes());
        h[104 + 16 * i..112 + 16 * i].copy_from_slice(&r.size.to_le_bytes());
    }
    let crc = crc32fast::hash(&h[..HEADER_LEN - 4]);
    h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    s.file.write_all_at(&h, 0).map_err(io(path))?;
    s.file.sync_all().map_err(io(path))
}

fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn encode_state(s: &MachineState) -> Vec<u8> {
    let mut out = Vec::new();
    let blob = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(&(s.vcpus.len() as u32).to_le_bytes());
    for v in &s.vcpus {
        blob(&mut out, v);
    }
    blob(&mut out, &s.vm);
    out.extend_from_slice(&(s.devices.len() as u32).to_le_bytes());
    for (name, b) in &s.devices {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        blob(&mut out, b);
    }
    out
}

/// A reader over the state bytes that refuses to run past their end.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn blob(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        (n <= MAX_STATE_BLOB).then_some(())?;
        self.take(n).map(<[u8]>::to_vec)
    }
}

fn decode_state(b: &[u8]) -> Option<MachineState> {
    let mut c = Cursor { b, at: 0 };
    let n = c.u32()?;
    (1..=MAX_VCPUS).contains(&n).then_some(())?;
    let vcpus = (0..n).map(|_| c.blob()).collect::<Option<Vec<_>>>()?;
    let vm = c.blob()?;
    let d = c.u32()? as usize;
    (d <= 64).then_some(())?;
    let mut devices = Vec::new();
    for _ in 0..d {
        let len = u16::from_le_bytes(c.take(2)?.try_into().ok()?) as usize;
        (len <= MAX_DEVICE_NAME).then_some(())?;
        let name = std::str::from_utf8(c.take(len)?).ok()?.to_string();
        devices.push((name, c.blob()?));
    }
    (c.at == b.len()).then_some(MachineState { vcpus, vm, devices })
}

/// An opened, checked checkpoint: header, bitmap, digests and state verified; pages checked as
/// they are restored.
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    pub info: CheckpointInfo,
    pub state: MachineState,
    data: Vec<u8>,
    digests: Vec<u32>,
    ram_offset: u64,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let mut file = File::open(path).map_err(io(path))?;
        let bad = |why: String| CheckpointError::Malformed { path: path.to_path_buf(), why };
        let crc_bad = |what: &str| CheckpointError::Checksum { path: path.to_path_buf(), what: what.into() };
        let mut h = vec![0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match file.read(&mut h[got..]).map_err(io(path))? {
                0 => break,
                n => got += n,
            }
        }
        if got < 8 || &h[..8] != MAGIC {
            return Err(CheckpointError::BadMagic { path: path.to_path_buf() });
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if got < HEADER_LEN {
            return Err(bad(format!("{got} bytes, shorter than its header")));
        }
        if u32_at(8) != VERSION {
            return Err(CheckpointError::Version { path: path.to_path_buf(), found: u32_at(8) });
        }
        if crc32fast::hash(&h[..HEADER_LEN - 4]) != u32_at(HEADER_LEN - 4) {
            return Err(crc_bad("the header"));
        }
        let (flags, page_size, vcpu_count, region_count) = (u32_at(12), u32_at(16), u32_at(20), u32_at(24) as usize);
        if page_size != PAGE_SIZE as u32 || flags & !(FLAG_RUNNING | FLAG_LIVE) != 0 {
            return Err(bad(format!("page size {page_size}, flags {flags:#x}")));
        }
        if region_count == 0 || region_count > MAX_REGIONS || vcpu_count == 0 || vcpu_count > MAX_VCPUS {
            return Err(bad(format!("{region_count} RAM regions, {vcpu_count} vCPUs")));
        }
        let regions: Vec<RamRegion> =
            (0..region_count).map(|i| RamRegion { gpa: u64_at(96 + 16 * i), size: u64_at(104 + 16 * i) }).collect();
        let ram_layout = RamLayout::new(regions.clone()).map_err(|e| bad(format!("RAM layout: {e}")))?;
        let pages = ram_layout.page_count();
        let layout = Layout::of(pages);
        let (state_len, file_len) = (u64_at(64), u64_at(72));
        let fixed = [u64_at(32), u64_at(40), u64_at(48), u64_at(56)];
        if fixed != [layout.bitmap, layout.digests, layout.ram, layout.state] || file_len != layout.state + state_len {
            return Err(bad("offsets that do not match its RAM size".into()));
        }
        let actual = file.metadata().map_err(io(path))?.len();
        if actual != file_len {
            return Err(bad(format!("{actual} bytes where its header says {file_len}")));
        }
        let read = |at: u64, len: usize, what: &str| -> Result<Vec<u8>, CheckpointError> {
            let mut b = vec![0u8; len + 4];
            file.read_exact_at(&mut b, at).map_err(io(path))?;
            let crc = u32::from_le_bytes(b[len..].try_into().expect("4 bytes"));
            b.truncate(len);
            if crc32fast::hash(&b) != crc {
                return Err(crc_bad(what));
            }
            Ok(b)
        };
        let data = read(layout.bitmap, pages.div_ceil(8), "the page bitmap")?;
        let digests: Vec<u32> = read(layout.digests, 4 * pages, "the page digests")?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let state_len = usize::try_from(state_len).ok().filter(|&l| l >= 4).ok_or_else(|| bad("no state".into()))?;
        let state_bytes = read(layout.state, state_len - 4, "the machine state")?;
        let state = decode_state(&state_bytes).ok_or_else(|| bad("the machine state does not decode".into()))?;
        if state.vcpus.len() != vcpu_count as usize {
            return Err(bad(format!("{} vCPU states for {vcpu_count} vCPUs", state.vcpus.len())));
        }
        let data_pages = data.iter().map(|b| b.count_ones() as u64).sum();
        let info = CheckpointInfo {
            regions,
            vcpu_count,
            guest_was_running: flags & FLAG_RUNNING != 0,
            live: flags & FLAG_LIVE != 0,
            checkpoint_id: u64_at(88),
            data_pages,
        };
        Ok(Checkpoint { path: path.to_path_buf(), file, info, state, data, digests, ram_offset: layout.ram })
    }

    /// Reads every page that holds data into `ram` (of the checkpoint's layout), checking each;
    /// the others stay as they are (zero in a new VM). Pages are read at their fixed offsets, so a
    /// mostly idle guest restores in the time its data pages take.
    pub fn restore_ram(&self, ram: &GuestRam) -> Result<(), CheckpointError> {
        self.restore_ram_with(ram, |_, _| {})
    }

    fn has_data(&self, page: usize) -> bool {
        self.data[page / 8] & (1 << (page % 8)) != 0
    }

    /// [`Checkpoint::restore_ram`], telling `each` every page read (its index and bytes, checked).
    /// Runs of data pages are read straight into guest RAM, up to [`CHUNK`] pages a read: one
    /// system call and no copy per run, where a read per page made restoring 1000 MiB of data
    /// take seconds here. Only before the guest runs (as `GuestRam::write_page`).
    pub fn restore_ram_with(&self, ram: &GuestRam, mut each: impl FnMut(usize, &[u8])) -> Result<(), CheckpointError> {
        if ram.layout().regions() != self.info.regions.as_slice() {
            return Err(CheckpointError::Malformed {
                path: self.path.clone(),
                why: format!("its RAM layout {:?} is not this VM's {:?}", self.info.regions, ram.layout().regions()),
            });
        }
        let pages = ram.page_count();
        let mut page = 0;
        while page < pages {
            if !self.has_data(page) {
                page += 1;
                continue;
            }
            let mut count = 1;
            while count < CHUNK
                && page + count < pages
                && self.has_data(page + count)
                && ram.layout().is_contiguous(page, count + 1)
            {
                count += 1;
            }
            // SAFETY: a restore runs before the guest does and nothing else touches these pages
            // meanwhile (the contract of write_page, which this replaces for runs).
            let dst = unsafe { ram.pages_mut(page, count) };
            let at = self.ram_offset + (page * PAGE_SIZE) as u64;
            self.file.read_exact_at(dst, at).map_err(io(&self.path))?;
            for (i, data) in dst.chunks_exact(PAGE_SIZE).enumerate() {
                if crc32fast::hash(data) != self.digests[page + i] {
                    return Err(CheckpointError::Checksum {
                        path: self.path.clone(),
                        what: format!("page {}", page + i),
                    });
                }
                each(page + i, data);
            }
            page += count;
        }
        Ok(())
    }
}

/// The live checkpoint's write protection: all of RAM protected at the point in time, a fault
/// thread that saves a page before letting its first write through, and the writer releasing
/// what it has saved.
struct Protector {
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), CheckpointError>>>,
}

impl Protector {
    fn start(ram: Arc<GuestRam>, pages: Arc<Mutex<Pages>>) -> Result<Protector, CheckpointError> {
        let base = uffd::FEATURE_PAGEFAULT_FLAG_WP;
        // Untouched pages must fault too (their first write would otherwise go unseen).
        let uffd = match Uffd::open(base | uffd::FEATURE_WP_UNPOPULATED) {
            Ok(u) => u,
            Err(_) => {
                ram.populate().map_err(|e| CheckpointError::Io { path: "guest RAM".into(), source: e })?;
                Uffd::open(base)?
            }
        };
        let ranges = ram.host_ranges();
        uffd.register_wp_ranges(&ranges)?;
        uffd.write_protect_ranges(&ranges, true)?;
        let uffd = Arc::new(uffd);
        let stop = Arc::new(AtomicBool::new(false));
        let (u, r, s) = (uffd.clone(), ram.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("checkpoint-wp".into())
            .spawn(move || fault_loop(&u, &r, &pages, &s))
            .map_err(|e| CheckpointError::Io { path: "checkpoint thread".into(), source: e })?;
        Ok(Protector { ram, uffd, stop, thread: Some(thread) })
    }

    /// Pages `first..first + n` are saved: let writes to them through.
    fn release(&self, first: usize, n: usize) -> Result<(), CheckpointError> {
        let mut p = PageBitmap::new(self.ram.page_count());
        p.set_range(first, n);
        for (start, len) in self.ram.host_runs(&p) {
            self.uffd.write_protect(start, len, false)?;
        }
        Ok(())
    }

    fn stop(mut self) -> Result<(), CheckpointError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), CheckpointError> {
        self.stop.store(true, Ordering::Release);
        let r = self.thread.take().map_or(Ok(()), |t| {
            t.join().unwrap_or_else(|_| {
                Err(CheckpointError::Io { path: "checkpoint thread".into(), source: std::io::Error::other("panicked") })
            })
        });
        let released = self.uffd.release_ranges(&self.ram.host_ranges()).map_err(CheckpointError::from);
        r.and(released)
    }
}

impl Drop for Protector {
    fn drop(&mut self) {
        // A failed checkpoint: nothing of RAM may stay protected.
        if self.thread.is_some() {
            if let Err(e) = self.finish() {
                log::error!("ending a live checkpoint: {}", crate::report(&e));
            }
        }
    }
}

fn fault_loop(uffd: &Uffd, ram: &GuestRam, pages: &Mutex<Pages>, stop: &AtomicBool) -> Result<(), CheckpointError> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut msgs = [UffdMsg::default(); 64];
    let mut buf = vec![0u8; PAGE_SIZE];
    loop {
        let mut pfd = libc::pollfd { fd: uffd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20) };
        let n = if ready > 0 { uffd.read_events(&mut msgs)? } else { 0 };
        if n == 0 && stop.load(Ordering::Acquire) {
            return Ok(());
        }
        for m in &msgs[..n] {
            if m.event != uffd::EVENT_PAGEFAULT {
                continue;
            }
            let at = m.address & !(PAGE_SIZE as u64 - 1);
            if let Some(page) = ram.page_of_host(at) {
                // Saved as it is now, before the write the fault holds back.
                pages.lock().unwrap_or_else(|e| e.into_inner()).save(ram, page, &mut buf)?;
            }
            uffd.write_protect(at, PAGE_SIZE as u64, false)?;
        }
    }
}

/// A checkpoint running in its own thread, reported as a migration (`query-migrate`).
pub fn start(
    vm: Arc<dyn MigratableVm>,
    path: PathBuf,
    live: bool,
    observer: Option<crate::progress::Observer>,
) -> std::io::Result<crate::sender::Outgoing> {
    // A live checkpoint write-protects RAM with userfaultfd as the uffd-wp tracker does; a
    // suspend tracks nothing (the field then names the default tracker, unused).
    let tracker = if live { TrackerKind::UffdWp } else { crate::sender::DEFAULT_TRACKER };
    let initial = Progress::new(tracker, vm.ram().layout().total_bytes());
    let progress = Arc::new(match observer {
        Some(o) => ProgressCell::observed(initial, o),
        None => ProgressCell::new(initial),
    });
    let p = progress.clone();
    let thread = std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
        let started = Instant::now();
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&*vm, &path, live, &p)));
        let written = written.unwrap_or_else(|_| {
            // Never left "active": say it failed (RAM protection ends with the Protector's drop).
            let e = CheckpointError::Malformed { path: path.clone(), why: "the checkpoint thread panicked".into() };
            p.update(|pr| {
                pr.status = Status::Failed;
                pr.error = Some(crate::report(&e));
            });
            vm.migration_failed();
            Err(e)
        });
        match written {
            Ok(()) => log::info!("checkpoint {} written in {:?}", path.display(), started.elapsed()),
            Err(e) => log::warn!("checkpoint {}: {}", path.display(), crate::report(&e)),
        }
    })?;
    Ok(crate::sender::Outgoing::from_thread(progress, thread))
}

/// The digest by which a destination's base page and a source page are found to be the same
/// (XXH3-128: a chance collision between two different pages is about 2^-128).
pub fn page_digest(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

impl Checkpoint {
    /// Pages that hold data in this checkpoint.
    pub fn data_pages(&self) -> PageBitmap {
        let pages = self.digests.len();
        let mut b = PageBitmap::new(pages);
        for p in (0..pages).filter(|&p| self.has_data(p)) {
            b.set(p);
        }
        b
    }
}
