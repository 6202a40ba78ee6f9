//! Guest RAM: the one owner of the host mapping behind the guest's physical memory.
//!
//! It hands host addresses to KVM and to the dirty trackers, reads pages for the sender, and is the
//! only way the emulator itself writes into the guest: every such write is recorded in the VMM dirty
//! log while a migration runs, whatever tracker is in use (KVM's dirty log never sees them, and the
//! write-protect trackers would see them only as faults of the emulator's own threads).
//!
//! Guest memory is touched through raw-pointer copies, not Rust references: the guest writes it
//! concurrently, and a `&[u8]` over it would promise the compiler otherwise. The one exception is
//! the `unsafe` [`GuestRam::pages_mut`], for a destination whose guest has not run yet.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use memmap2::{MmapMut, MmapOptions};

use crate::bitmap::{AtomicBitmap, PageBitmap};

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Below 4 GiB, RAM stops at 3 GiB; the gap holds the IOAPIC, the LAPIC and room for MMIO devices.
pub const LOW_RAM_END: u64 = 3 << 30;
/// RAM beyond the first 3 GiB continues at 4 GiB.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// The largest guest emu accepts (also the bound a migration stream's header is checked against).
pub const MAX_RAM_BYTES: u64 = 1 << 40;

/// Each message is complete on its own (the monitor and the migration report them with `{}`), so no
/// variant also exposes its cause through `source()`: printed as a chain (`{:#}`), it would repeat.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("guest RAM size {0} is not a positive multiple of 4 KiB")]
    BadSize(u64),
    #[error("guest RAM of {0} bytes is more than the {MAX_RAM_BYTES} emu supports")]
    TooLarge(u64),
    #[error("RAM region {index} (gpa {gpa:#x}, {size:#x} bytes) is empty, unaligned or overlaps the previous one")]
    BadRegion { index: usize, gpa: u64, size: u64 },
    #[error("guest range {gpa:#x}+{len:#x} is not inside one RAM region")]
    OutOfRange { gpa: u64, len: usize },
    // `error`, not `source`: thiserror would make a field named `source` the cause as well.
    #[error("cannot map {size} bytes of guest RAM: {error}")]
    Map { size: u64, error: std::io::Error },
}

/// One contiguous range of guest-physical RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Where RAM sits in guest-physical space, and the numbering of its pages: page indices run through
/// the regions in order, so one bitmap covers all of RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<RamRegion>,
    first_page: Vec<usize>,
    pages: usize,
}

impl RamLayout {
    /// The PC layout emu gives a guest of `bytes` of RAM: [0, min(bytes, 3 GiB)) and the rest from 4 GiB.
    pub fn pc(bytes: u64) -> Result<Self, RamError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(RamError::BadSize(bytes));
        }
        let low = bytes.min(LOW_RAM_END);
        let mut regions = vec![RamRegion { gpa: 0, size: low }];
        if bytes > low {
            regions.push(RamRegion { gpa: HIGH_RAM_START, size: bytes - low });
        }
        Self::new(regions)
    }

    /// A layout from regions that must be page-aligned, non-empty, sorted and disjoint, and at most
    /// [`MAX_RAM_BYTES`] in all.
    pub fn new(regions: Vec<RamRegion>) -> Result<Self, RamError> {
        let page = PAGE_SIZE as u64;
        let mut first_page = Vec::with_capacity(regions.len());
        let mut pages = 0usize;
        let mut total = 0u64;
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            let bad = r.size == 0
                || r.gpa % page != 0
                || r.size % page != 0
                || (index > 0 && r.gpa < prev_end)
                || r.gpa.checked_add(r.size).is_none();
            if bad {
                return Err(RamError::BadRegion { index, gpa: r.gpa, size: r.size });
            }
            total = total.saturating_add(r.size);
            if total > MAX_RAM_BYTES {
                return Err(RamError::TooLarge(total));
            }
            first_page.push(pages);
            pages += (r.size / page) as usize;
            prev_end = r.end();
        }
        Ok(RamLayout { regions, first_page, pages })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// Index of the first page of region `region`.
    pub fn first_page_of_region(&self, region: usize) -> usize {
        self.first_page[region]
    }

    /// Panics unless `page` is a page of this layout. The page accessors of [`GuestRam`] are safe
    /// functions that turn a page index into a pointer, so this check is what keeps an index that
    /// is out of range (a bug, or a peer's stream not checked well enough) from touching memory
    /// outside guest RAM; it is one compare per page, so it stays in release builds too.
    #[track_caller]
    fn check_page(&self, page: usize) {
        assert!(page < self.pages, "page {page} is outside guest RAM ({} pages)", self.pages);
    }

    /// (region index, byte offset) of `gpa`, if it is RAM.
    fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        let i = self.regions.partition_point(|r| r.end() <= gpa);
        let r = self.regions.get(i)?;
        (gpa >= r.gpa).then(|| (i, gpa - r.gpa))
    }

    /// Page index of `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<usize> {
        let (i, off) = self.locate(gpa)?;
        Some(self.first_page[i] + (off >> PAGE_SHIFT) as usize)
    }

    /// Guest-physical address of page `page`; panics if `page` is not below `page_count()`.
    pub fn gpa_of(&self, page: usize) -> u64 {
        self.check_page(page);
        let i = self.first_page.partition_point(|&f| f <= page) - 1;
        self.regions[i].gpa + (((page - self.first_page[i]) as u64) << PAGE_SHIFT)
    }

    /// Whether pages `first..first + count` are contiguous in guest-physical space (one region).
    pub fn is_contiguous(&self, first: usize, count: usize) -> bool {
        // Checked: `count` may come from a peer (a ZERO_PAGES record), and a sum that wraps would
        // pass for a short range.
        let end = match first.checked_add(count) {
            Some(end) if count > 0 && end <= self.pages => end,
            _ => return count == 0,
        };
        let i = self.first_page.partition_point(|&f| f <= first) - 1;
        let region_pages = (self.regions[i].size >> PAGE_SHIFT) as usize;
        end <= self.first_page[i] + region_pages
    }
}

/// Stands between the emulator's writes and guest RAM while a tracker keeps pages read-only in the
/// emulator's own mapping (mprotect): it makes the pages writable for the write, and records them.
pub trait WriteGate: Send + Sync {
    fn write(&self, first_page: usize, pages: usize, write: &mut dyn FnMut());
}

struct Mapping {
    /// Keeps the mapping alive; never dereferenced as a slice (see the module comment).
    _mmap: MmapMut,
    host: *mut u8,
    len: usize,
}

/// Asks for transparent huge pages behind guest RAM, as QEMU does for its RAM blocks. A fault on
/// fresh memory then populates 2 MiB at once: filling fresh memory ran 2.3-3x faster this way on the
/// project's host (1.0-1.5 GB/s with 4 KiB pages, 3.2-3.5 GB/s with THP), and a migration
/// destination fills all of its RAM from the stream. Trackers still see 4 KiB pages: KVM's dirty
/// log maps huge pages small while it logs, and write-protecting part of a huge page splits it.
/// Advice only: with THP off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) nothing
/// changes.
fn advise_huge_pages(host: *mut u8, len: usize) {
    // SAFETY: the range is exactly one of our own anonymous mappings; advice changes no contents.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!("MADV_HUGEPAGE on guest RAM: {}", std::io::Error::last_os_error());
    }
}

/// The guest's RAM, mapped in this process.
pub struct GuestRam {
    layout: RamLayout,
    maps: Vec<Mapping>,
    vmm_dirty: AtomicBitmap,
    vmm_logging: AtomicBool,
    gate: RwLock<Option<Arc<dyn WriteGate>>>,
    /// Shared RAM (`--memfd`): one memfd per region, mapped MAP_SHARED, so that a same-host
    /// handover can pass the memory itself to another emu instead of copying it.
    shared: Mutex<Vec<OwnedFd>>,
}

// SAFETY: the raw pointers in `maps` point into mappings owned by the same struct, valid for its
// whole life; all access through them is by raw copies that tolerate concurrent writers (the guest
// and other threads), so sharing the struct between threads adds no aliasing of Rust references.
unsafe impl Send for GuestRam {}
// SAFETY: as for Send; every method takes `&self` and touches guest memory only by raw copies.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps anonymous, lazily-populated memory for every region of `layout`.
    pub fn new(layout: RamLayout) -> Result<Self, RamError> {
        let mut maps = Vec::new();
        for r in layout.regions() {
            let len = r.size as usize;
            let mut mmap = MmapOptions::new()
                .len(len)
                .no_reserve_swap()
                .map_anon()
                .map_err(|error| RamError::Map { size: r.size, error })?;
            let host = mmap.as_mut_ptr();
            advise_huge_pages(host, len);
            maps.push(Mapping { _mmap: mmap, host, len });
        }
        Ok(Self::with_maps(layout, maps, Vec::new()))
    }

    fn with_maps(layout: RamLayout, maps: Vec<Mapping>, shared: Vec<OwnedFd>) -> Self {
        let vmm_dirty = AtomicBitmap::new(layout.page_count());
        GuestRam {
            layout,
            maps,
            vmm_dirty,
            vmm_logging: AtomicBool::new(false),
            gate: RwLock::new(None),
            shared: Mutex::new(shared),
        }
    }

    /// Guest RAM in memfds (one per region, MAP_SHARED): what a same-host handover passes on.
    pub fn new_shared(layout: RamLayout) -> Result<Self, RamError> {
        let mut maps = Vec::new();
        let mut fds = Vec::new();
        for r in layout.regions() {
            let map_err = |error| RamError::Map { size: r.size, error };
            // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
            let fd = unsafe { libc::memfd_create(c"emu-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(map_err(std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd that nothing else owns.
            let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            file.set_len(r.size).map_err(map_err)?;
            // SAFETY: the memfd is ours; other mappings of it (a handover's destination) are the
            // point, and guest memory is only ever touched by raw copies (module comment).
            let mut mmap = unsafe { MmapOptions::new().len(r.size as usize).map_mut(&file) }.map_err(map_err)?;
            let host = mmap.as_mut_ptr();
            advise_huge_pages(host, r.size as usize);
            maps.push(Mapping { _mmap: mmap, host, len: r.size as usize });
            fds.push(OwnedFd::from(file));
        }
        Ok(Self::with_maps(layout, maps, fds))
    }

    /// The memfds behind shared RAM, one per region (none for private RAM).
    pub fn shared_fds(&self) -> Vec<RawFd> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Takes over another emu's shared RAM (a handover's destination): maps `fds`, one memfd per
    /// region, over this RAM's own mappings, at the same addresses (KVM's memory slots stay valid;
    /// the kernel drops the old pages). Only before the guest runs here.
    pub fn adopt_shared(&self, fds: Vec<OwnedFd>) -> Result<(), RamError> {
        if fds.len() != self.maps.len() {
            return Err(RamError::Map {
                size: 0,
                error: std::io::Error::other(format!("{} memfds for {} RAM regions", fds.len(), self.maps.len())),
            });
        }
        for (m, fd) in self.maps.iter().zip(&fds) {
            let file = std::fs::File::from(fd.try_clone().map_err(|error| RamError::Map { size: 0, error })?);
            let size = file.metadata().map_err(|error| RamError::Map { size: m.len as u64, error })?.len();
            if size != m.len as u64 {
                return Err(RamError::Map {
                    size: m.len as u64,
                    error: std::io::Error::other(format!("the memfd holds {size} bytes")),
                });
            }
            // SAFETY: replaces exactly one of our own mappings (same address and length) with the
            // memfd, shared; nothing holds a reference into it (raw copies only).
            let p = unsafe {
                libc::mmap(
                    m.host.cast(),
                    m.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED || p.cast::<u8>() != m.host {
                return Err(RamError::Map { size: m.len as u64, error: std::io::Error::last_os_error() });
            }
        }
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = fds;
        Ok(())
    }

    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    pub fn page_count(&self) -> usize {
        self.layout.page_count()
    }

    /// Each region with its host address and length, for KVM memory slots and the trackers.
    pub fn host_regions(&self) -> impl Iterator<Item = (RamRegion, *mut u8, usize)> + '_ {
        self.layout.regions().iter().zip(&self.maps).map(|(r, m)| (*r, m.host, m.len))
    }

    /// Each region's host range as (address, bytes), for the trackers' system calls.
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|m| (m.host as u64, m.len as u64)).collect()
    }

    /// Host address of page `page`; panics if `page` is not below `page_count()` (see
    /// `RamLayout::check_page`), which every safe accessor taking a page index relies on.
    #[track_caller]
    pub fn page_host_addr(&self, page: usize) -> *mut u8 {
        self.layout.check_page(page);
        let i = self.layout.first_page.partition_point(|&f| f <= page) - 1;
        let off = (page - self.layout.first_page[i]) << PAGE_SHIFT;
        // SAFETY: page < page_count (checked above), so page lies in region i, the last region whose
        // first page is at or below it, and `off` is inside that region's mapping.
        unsafe { self.maps[i].host.add(off) }
    }

    /// The page whose host address is `addr`, if `addr` is in guest RAM.
    pub fn page_of_host(&self, addr: u64) -> Option<usize> {
        self.maps.iter().enumerate().find_map(|(i, m)| {
            let start = m.host as u64;
            (addr >= start && addr < start + m.len as u64)
                .then(|| self.layout.first_page[i] + ((addr - start) >> PAGE_SHIFT) as usize)
        })
    }

    /// The set pages of `pages` as host ranges (address, bytes), split where regions end.
    pub fn host_runs<'a>(&'a self, pages: &'a PageBitmap) -> impl Iterator<Item = (u64, u64)> + 'a {
        pages.runs().flat_map(move |(first, count)| {
            let mut out = Vec::with_capacity(1);
            let (mut p, end) = (first, first + count);
            while p < end {
                let i = self.layout.first_page.partition_point(|&f| f <= p) - 1;
                let region_end = self.layout.first_page[i] + (self.layout.regions[i].size >> PAGE_SHIFT) as usize;
                let n = end.min(region_end) - p;
                out.push((self.page_host_addr(p) as u64, (n << PAGE_SHIFT) as u64));
                p += n;
            }
            out
        })
    }

    /// A mutable view of pages `first..first + count` (one region), for the migration receiver to
    /// read page data straight into guest RAM.
    ///
    /// # Safety
    /// Nothing else may access those pages while the slice lives: no vCPU has run (a destination
    /// before resume) and no other thread writes them.
    #[allow(clippy::mut_from_ref)] // the point of this unsafe fn; exclusivity is the caller's contract
    pub unsafe fn pages_mut(&self, first: usize, count: usize) -> &mut [u8] {
        assert!(self.layout.is_contiguous(first, count), "pages {first}+{count} span regions");
        let p = self.page_host_addr(first);
        // SAFETY: the pages are one mapped, contiguous range of a region (asserted above); the
        // caller guarantees exclusive access for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(p, count << PAGE_SHIFT) }
    }

    /// Faults in pages `first..first + count` (one region) for writing, in one call: cheaper than one
    /// page fault per page when a migration destination is about to fill them.
    pub fn populate_pages(&self, first: usize, count: usize) -> std::io::Result<()> {
        if !self.layout.is_contiguous(first, count) {
            return Err(std::io::Error::other(format!("pages {first}+{count} span regions")));
        }
        let addr = self.page_host_addr(first);
        // SAFETY: a range of our own anonymous mapping (checked contiguous above); advice only.
        let r = unsafe { libc::madvise(addr.cast(), count << PAGE_SHIFT, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Faults in every page for writing (MADV_POPULATE_WRITE), for trackers that cannot see writes to
    /// pages that were never populated.
    pub fn populate(&self) -> std::io::Result<()> {
        for m in &self.maps {
            // SAFETY: the range is exactly one of our own anonymous mappings.
            let r = unsafe { libc::madvise(m.host.cast(), m.len, libc::MADV_POPULATE_WRITE) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Host pointer for [gpa, gpa + len), which must lie inside one region.
    fn host_range(&self, gpa: u64, len: usize) -> Result<*mut u8, RamError> {
        let out = || RamError::OutOfRange { gpa, len };
        let (i, off) = self.layout.locate(gpa).ok_or_else(out)?;
        let end = off.checked_add(len as u64).ok_or_else(out)?;
        if end > self.layout.regions[i].size {
            return Err(out());
        }
        // SAFETY: off + len <= region size, so the result and the range after it are in the mapping.
        Ok(unsafe { self.maps[i].host.add(off as usize) })
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let src = self.host_range(gpa, buf.len())?;
        // SAFETY: src..src+len is mapped guest RAM (checked above) and cannot overlap `buf`, which is
        // emulator memory.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Writes `data` into guest memory at `gpa` on behalf of the emulator (a device, the loader),
    /// recording the pages in the VMM dirty log while one is active.
    ///
    /// Under a write-protect tracker the copy may fault; that fault is resolved by the tracker's own
    /// thread, never by the writer, so the caller must not be that thread (`tracker/uffd_wp.rs`:
    /// its fault thread never writes guest RAM).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        let dst = self.host_range(gpa, data.len())?;
        // SAFETY: dst..dst+len is mapped guest RAM (checked above), disjoint from `data`.
        let mut copy = || unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner()).clone();
        match (gate, self.layout.page_of(gpa), self.layout.page_of(gpa + data.len().max(1) as u64 - 1)) {
            (Some(gate), Some(first), Some(last)) => gate.write(first, last - first + 1, &mut copy),
            _ => copy(),
        }
        // Marked after the copy: a sender that takes the mark reads the page after it, so it cannot
        // send the old contents and drop the mark.
        self.mark_vmm_dirty(gpa, data.len());
        Ok(())
    }

    fn mark_vmm_dirty(&self, gpa: u64, len: usize) {
        if len == 0 || !self.vmm_logging.load(Ordering::Acquire) {
            return;
        }
        if let (Some(first), Some(last)) = (self.layout.page_of(gpa), self.layout.page_of(gpa + len as u64 - 1)) {
            self.vmm_dirty.set_range(first, last - first + 1);
        }
    }

    /// Copies page `page` into `buf` (`PAGE_SIZE` bytes); panics if there is no such page.
    #[track_caller]
    pub fn read_page(&self, page: usize, buf: &mut [u8]) {
        assert_eq!(buf.len(), PAGE_SIZE);
        let src = self.page_host_addr(page);
        // SAFETY: a page of mapped guest RAM (page_host_addr checked the index), copied into a
        // distinct emulator buffer of PAGE_SIZE bytes (asserted above).
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), PAGE_SIZE) };
    }

    /// Stores a received page. Used by the migration receiver before the guest runs, so it does not
    /// go through the VMM dirty log. Panics if there is no such page.
    #[track_caller]
    pub fn write_page(&self, page: usize, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE);
        let dst = self.page_host_addr(page);
        // SAFETY: a page of mapped guest RAM (page_host_addr checked the index), written from a
        // distinct emulator buffer of PAGE_SIZE bytes (asserted above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
    }

    /// Zeroes page `page` (receiver side, like `write_page`); panics if there is no such page.
    #[track_caller]
    pub fn zero_page(&self, page: usize) {
        let dst = self.page_host_addr(page);
        // SAFETY: a page of mapped guest RAM (page_host_addr checked the index).
        unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
    }

    /// Routes the emulator's writes through `gate` (None: straight to RAM again).
    pub fn set_write_gate(&self, gate: Option<Arc<dyn WriteGate>>) {
        *self.gate.write().unwrap_or_else(|e| e.into_inner()) = gate;
    }

    /// Starts recording the emulator's own writes; they are merged into every tracker's dirty set.
    pub fn start_vmm_dirty_log(&self) {
        self.vmm_dirty.clear();
        self.vmm_logging.store(true, Ordering::Release);
    }

    pub fn stop_vmm_dirty_log(&self) {
        self.vmm_logging.store(false, Ordering::Release);
        self.vmm_dirty.clear();
    }

    /// Moves the pages the emulator wrote since the last call into `into`.
    pub fn drain_vmm_dirty(&self, into: &mut PageBitmap) {
        self.vmm_dirty.drain_into(into);
    }

    /// CRC-32 of every page, in page order: the page-for-page comparison of two guests' RAM.
    pub fn page_digests(&self) -> Vec<u32> {
        let mut buf = vec![0u8; PAGE_SIZE];
        (0..self.page_count())
            .map(|p| {
                self.read_page(p, &mut buf);
                crc32fast::hash(&buf)
            })
            .collect()
    }
}

/// One CRC-32 over a list of page digests (as `GuestRam::page_digests` returns them).
pub fn combined_digest(page_digests: &[u32]) -> u32 {
    let mut all = crc32fast::Hasher::new();
    for d in page_digests {
        all.update(&d.to_le_bytes());
    }
    all.finalize()
}

/// Whether a page-sized buffer is all zeroes (checked 64 bytes at a time so it vectorises).
pub fn is_zero_page(buf: &[u8]) -> bool {
    buf.chunks_exact(64)
        .all(|c| c.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))) == 0)
        && buf.chunks_exact(64).remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pc_layout_splits_at_3g() {
        let l = RamLayout::pc(5 << 30).unwrap();
        assert_eq!(l.regions(), &[RamRegion { gpa: 0, size: 3 << 30 }, RamRegion { gpa: 4 << 30, size: 2 << 30 }]);
        let low_pages = (3usize << 30) / PAGE_SIZE;
        assert_eq!(l.page_of(4 << 30), Some(low_pages));
        assert_eq!(l.gpa_of(low_pages), 4 << 30);
        assert_eq!(l.page_of(3 << 30), None);
        assert!(l.is_contiguous(low_pages - 2, 2));
        assert!(!l.is_contiguous(low_pages - 2, 3));
    }

    #[test]
    fn bad_layouts_are_refused() {
        // Each with its own reason: a layout refused for the wrong one would hide a broken check.
        assert!(matches!(RamLayout::pc(0), Err(RamError::BadSize(0))));
        assert!(matches!(RamLayout::pc(4097), Err(RamError::BadSize(4097))));
        let overlapping = vec![RamRegion { gpa: 0, size: 8192 }, RamRegion { gpa: 4096, size: 4096 }];
        assert!(matches!(RamLayout::new(overlapping), Err(RamError::BadRegion { index: 1, .. })));
        assert!(matches!(
            RamLayout::new(vec![RamRegion { gpa: 1, size: 4096 }]),
            Err(RamError::BadRegion { index: 0, .. })
        ));
        assert!(matches!(RamLayout::pc(MAX_RAM_BYTES + 4096), Err(RamError::TooLarge(_))));
    }

    #[test]
    fn contiguity_does_not_wrap() {
        let l = RamLayout::pc(1 << 20).unwrap();
        assert!(l.is_contiguous(0, 256));
        assert!(!l.is_contiguous(1, 256));
        // first + count wraps to 1: must not pass as inside RAM
        assert!(!l.is_contiguous(usize::MAX, 2));
        assert!(!l.is_contiguous(255, usize::MAX));
    }

    /// Two regions (as above 3 GiB), so the checks below cover the index mapping across regions:
    /// 4 pages at 0 and 4 at 4 GiB. Nothing is populated, so this costs no memory.
    fn two_region_ram() -> GuestRam {
        let layout = RamLayout::new(vec![
            RamRegion { gpa: 0, size: 4 * PAGE_SIZE as u64 },
            RamRegion { gpa: HIGH_RAM_START, size: 4 * PAGE_SIZE as u64 },
        ])
        .unwrap();
        GuestRam::new(layout).unwrap()
    }

    #[test]
    fn every_page_index_in_range_reaches_its_own_page() {
        let ram = two_region_ram();
        for p in 0..ram.page_count() {
            ram.write_page(p, &[p as u8 + 1; PAGE_SIZE]);
        }
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in 0..ram.page_count() {
            ram.read_page(p, &mut buf);
            assert!(buf.iter().all(|&b| b == p as u8 + 1), "page {p}");
            let mut one = [0u8];
            ram.read(ram.layout().gpa_of(p), &mut one).unwrap();
            assert_eq!(one[0], p as u8 + 1, "page {p} through its gpa");
        }
        ram.zero_page(7);
        ram.read_page(7, &mut buf);
        assert!(is_zero_page(&buf));
    }

    // An index one past the end must panic with the range check's message, in release builds as in
    // debug ones, rather than compute a pointer past the mapping. The expected text is the check's
    // own, so a panic from somewhere else (a debug-only assertion) would not pass for it.
    #[test]
    #[should_panic(expected = "page 8 is outside guest RAM (8 pages)")]
    fn read_page_out_of_range_panics() {
        let ram = two_region_ram();
        ram.read_page(8, &mut [0u8; PAGE_SIZE]);
    }

    #[test]
    #[should_panic(expected = "page 8 is outside guest RAM (8 pages)")]
    fn write_page_out_of_range_panics() {
        let ram = two_region_ram();
        ram.write_page(8, &[0u8; PAGE_SIZE]);
    }

    #[test]
    #[should_panic(expected = "is outside guest RAM (8 pages)")]
    fn zero_page_far_out_of_range_panics() {
        let ram = two_region_ram();
        ram.zero_page(usize::MAX);
    }

    #[test]
    #[should_panic(expected = "page 8 is outside guest RAM (8 pages)")]
    fn page_host_addr_out_of_range_panics() {
        let ram = two_region_ram();
        let _ = ram.page_host_addr(8);
    }

    #[test]
    #[should_panic(expected = "page 8 is outside guest RAM (8 pages)")]
    fn host_runs_of_a_bitmap_larger_than_ram_panics() {
        let ram = two_region_ram();
        let mut pages = PageBitmap::new(9);
        pages.set(8);
        let _ = ram.host_runs(&pages).count();
    }

    #[test]
    #[should_panic(expected = "page 8 is outside guest RAM (8 pages)")]
    fn gpa_of_out_of_range_panics() {
        let _ = two_region_ram().layout().gpa_of(8);
    }

    #[test]
    fn map_error_says_why_once() {
        let e = RamError::Map { size: 4096, error: std::io::Error::from_raw_os_error(libc::ENOMEM) };
        assert!(std::error::Error::source(&e).is_none(), "the cause is in the message; a source would repeat it");
        let text = e.to_string();
        assert_eq!(text.matches("Cannot allocate memory").count(), 1, "{text}");
    }

    #[test]
    fn write_read_and_vmm_dirty_log() {
        let ram = GuestRam::new(RamLayout::pc(1 << 20).unwrap()).unwrap();
        ram.write(0x1ffe, &[1, 2, 3, 4]).unwrap(); // not logged yet
        ram.start_vmm_dirty_log();
        ram.write(0x3ffe, &[5, 6, 7, 8]).unwrap(); // spans pages 3 and 4
        let mut buf = [0u8; 4];
        ram.read(0x1ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut dirty = PageBitmap::new(ram.page_count());
        ram.drain_vmm_dirty(&mut dirty);
        assert_eq!(dirty.iter_ones().collect::<Vec<_>>(), vec![3, 4]);
        assert!(matches!(ram.write(1 << 20, &[0]), Err(RamError::OutOfRange { gpa: 0x10_0000, len: 1 })));
        assert!(matches!(ram.read((1 << 20) - 2, &mut buf), Err(RamError::OutOfRange { len: 4, .. })));
        // a range whose end wraps around the address space
        assert!(matches!(ram.read(u64::MAX - 1, &mut buf), Err(RamError::OutOfRange { .. })));
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&page));
    }
}
