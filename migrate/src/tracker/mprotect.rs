//! The mprotect tracker: copied pages are made read-only in the emulator's mapping of guest RAM.
//!
//! KVM cannot map a read-only host page writable for the guest, so a guest write stops:
//! - from guest ring 3 (where the workloads run), KVM_RUN fails with EFAULT and no address: the
//!   emulator decodes the instruction at RIP to find the pages it writes (`emulator/src/write_fault.rs`);
//! - from guest ring 0, KVM hands the store to userspace as an MMIO exit, which the emulator performs
//!   through `GuestRam::write`.
//!
//! Either way the page is made writable again and marked dirty here ([`WriteFaults::resolve`]), and
//! the vCPU runs on. `collect` re-protects what it takes, under the same lock the emulator's own
//! writes take (they must not find a page re-protected between unprotecting and writing it).
//!
//! On PVM the hypervisor writes interrupt and exception frames onto the guest's ring-0 stack itself,
//! and a read-only page there does not fault to userspace: the guest is shut down. So the pages of
//! every vCPU's event stacks (16 KiB below the TSS's RSP0 and IST tops, read from the vCPUs) are never
//! protected and are sent in every pass instead.
//!
//! What cannot be made exact is refused, not guessed: if a fault cannot be tied to a page, if the
//! kernel runs out of mappings (each separately protected run of pages is one, up to
//! `vm.max_map_count`), or if a vCPU's event stack moves (a guest kernel with per-task stacks), the
//! tracker gives up: all of RAM becomes writable again and the migration fails with the reason. The
//! guest never loses a write; the migration may.

use std::sync::{Arc, Mutex, RwLock};

use super::{DirtyTracker, TrackerError, TrackerKind};
use crate::bitmap::{AtomicBitmap, PageBitmap};
use crate::ram::{GuestRam, WriteGate, PAGE_SIZE};

/// Tracking state shared with the vCPUs (which resolve write faults) and guest RAM (the gate).
pub struct WriteFaults {
    ram: Arc<GuestRam>,
    dirty: AtomicBitmap,
    /// Held while protection changes that must not interleave with an emulator write.
    lock: Mutex<()>,
    failed: Mutex<Option<String>>,
}

fn mprotect(addr: u64, len: u64, writable: bool) -> std::io::Result<()> {
    let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: callers pass page-aligned ranges inside guest RAM's own anonymous mappings; changing
    // their protection affects only guest memory, which the emulator never holds references into.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl WriteFaults {
    /// A guest write to `page` was stopped: make the page writable, then mark it (in that order,
    /// for the reason given in `uffd_wp.rs`).
    pub fn resolve(&self, page: usize) -> Result<(), String> {
        if page >= self.ram.page_count() {
            return Err(format!("page {page} is not guest RAM"));
        }
        let addr = self.ram.page_host_addr(page) as u64;
        if let Err(e) = mprotect(addr, PAGE_SIZE as u64, true) {
            let why = format!("cannot make page {page} writable again: {e}");
            self.give_up(&why);
            return Err(why);
        }
        self.dirty.set(page);
        Ok(())
    }

    /// Stops tracking for good: all of RAM writable, the migration to fail with `why`. Takes no lock
    /// (callers may hold it); a re-protection racing with it only costs faults that still resolve,
    /// until the failed migration stops the tracker.
    pub fn give_up(&self, why: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            log::error!("mprotect tracker gives up: {why}");
            *failed = Some(why.to_string());
        }
        for (addr, len) in self.ram.host_ranges() {
            let _ = mprotect(addr, len, true);
        }
    }
}

impl WriteGate for WriteFaults {
    fn write(&self, first_page: usize, pages: usize, write: &mut dyn FnMut()) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let addr = self.ram.page_host_addr(first_page) as u64;
        if let Err(e) = mprotect(addr, (pages * PAGE_SIZE) as u64, true) {
            // Giving up makes all of RAM writable, so the write below is safe either way.
            self.give_up(&format!("cannot unprotect pages for an emulator write: {e}"));
        }
        write();
        self.dirty.set_range(first_page, pages);
    }
}

/// Where the vCPUs find the active mprotect tracker's state, if any.
#[derive(Default)]
pub struct WriteFaultSlot(RwLock<Option<Arc<WriteFaults>>>);

impl WriteFaultSlot {
    pub fn get(&self) -> Option<Arc<WriteFaults>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, v: Option<Arc<WriteFaults>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// The guest pages the hypervisor itself writes when it delivers interrupts (the vCPUs' ring-0
/// and IST stacks), as the emulator reads them from the vCPUs.
pub type EventStacks = dyn Fn() -> Result<Vec<usize>, String> + Send + Sync;

pub struct MprotectTracker {
    ram: Arc<GuestRam>,
    slot: Arc<WriteFaultSlot>,
    event_stacks: Arc<EventStacks>,
    running: Option<Arc<WriteFaults>>,
    /// Pages never protected, and so reported dirty at every collect: on PVM a protected page under
    /// an interrupt frame does not fault to userspace, it ends the guest.
    exempt: PageBitmap,
}

impl MprotectTracker {
    pub fn new(ram: Arc<GuestRam>, slot: Arc<WriteFaultSlot>, event_stacks: Arc<EventStacks>) -> Self {
        let exempt = PageBitmap::new(ram.page_count());
        MprotectTracker { ram, slot, event_stacks, running: None, exempt }
    }

    /// The event-stack pages now, as a bitmap.
    fn read_event_stacks(&self) -> Result<PageBitmap, TrackerError> {
        let pages = (self.event_stacks)().map_err(|e| TrackerError::GaveUp(format!("mprotect tracker: {e}")))?;
        let mut b = PageBitmap::new(self.ram.page_count());
        pages.into_iter().for_each(|p| b.set(p));
        Ok(b)
    }

    /// Write-protects the pages of `pages` that are not exempt.
    fn protect_pages(&self, f: &WriteFaults, pages: &PageBitmap) -> Result<(), TrackerError> {
        let mut to_protect = pages.clone();
        for p in self.exempt.iter_ones() {
            to_protect.clear_bit(p);
        }
        let runs: Vec<(u64, u64)> = self.ram.host_runs(&to_protect).collect();
        runs.into_iter().try_for_each(|(addr, len)| self.protect(f, addr, len))
    }

    fn protect(&self, f: &WriteFaults, addr: u64, len: u64) -> Result<(), TrackerError> {
        mprotect(addr, len, false).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENOMEM) {
                format!("out of memory mappings ({e}): too many separately protected page runs for vm.max_map_count")
            } else {
                format!("cannot write-protect guest RAM: {e}")
            };
            f.give_up(&why);
            TrackerError::GaveUp(format!("mprotect tracker: {why}"))
        })
    }
}

impl DirtyTracker for MprotectTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Mprotect
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        self.stop()?;
        self.exempt = self.read_event_stacks()?;
        let faults = Arc::new(WriteFaults {
            ram: self.ram.clone(),
            dirty: AtomicBitmap::new(self.ram.page_count()),
            lock: Mutex::new(()),
            failed: Mutex::new(None),
        });
        // vCPUs and emulator writes must know how to get through before anything is protected.
        self.slot.set(Some(faults.clone()));
        self.ram.set_write_gate(Some(faults.clone()));
        self.running = Some(faults.clone());
        let guard = faults.lock.lock().unwrap_or_else(|e| e.into_inner());
        let protected = self.protect_pages(&faults, &PageBitmap::full(self.ram.page_count()));
        drop(guard);
        if let Err(e) = protected {
            let _ = self.stop();
            return Err(e);
        }
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        let Some(f) = self.running.clone() else { return Ok(()) };
        if let Some(why) = f.failed.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(TrackerError::GaveUp(format!("mprotect tracker gave up: {why}")));
        }
        // A guest that moves its ring-0 stacks (a kernel with per-task stacks) cannot be tracked
        // this way: refuse rather than risk a protected page under an interrupt frame.
        if self.read_event_stacks()? != self.exempt {
            let why = "a vCPU's ring-0 or IST stack moved; mprotect cannot track this guest";
            f.give_up(why);
            return Err(TrackerError::GaveUp(format!("mprotect tracker: {why}")));
        }
        let guard = f.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = PageBitmap::new(self.ram.page_count());
        f.dirty.drain_into(&mut taken);
        let protected = self.protect_pages(&f, &taken);
        drop(guard);
        protected?;
        into.union_with(&taken);
        into.union_with(&self.exempt);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        let Some(f) = self.running.take() else { return Ok(()) };
        // Writable first; only then may a vCPU stop finding the tracker (a fault already in flight
        // then simply runs again and succeeds).
        let guard = f.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.ram.host_ranges().into_iter().try_for_each(|(addr, len)| mprotect(addr, len, true));
        drop(guard);
        self.ram.set_write_gate(None);
        self.slot.set(None);
        result.map_err(|source| TrackerError::Io { what: "cannot make guest RAM writable again", source })
    }
}

impl Drop for MprotectTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
