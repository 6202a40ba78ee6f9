//! KVM's per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL): each vCPU pushes the pages it dirties
//! into a ring shared with userspace. Harvesting reads the entries (acquire), marks them collected
//! (release), and KVM_RESET_DIRTY_RINGS re-protects those pages before they are read.
//!
//! A full ring stops its vCPU with KVM_EXIT_DIRTY_RING_FULL; the vCPU thread harvests (into the same
//! set the tracker collects from) and runs on, so a fast writer is slowed, never losing a page.
//! The ring must be enabled before the vCPUs exist, so the emulator sets it up at start when asked
//! (`--dirty-tracker kvm-dirty-ring`); with it on, KVM's dirty bitmap is not available.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

use super::kvm::KvmSlots;
use super::{DirtyTracker, TrackerError, TrackerKind};
use crate::bitmap::{AtomicBitmap, PageBitmap};
use crate::ram::PAGE_SIZE;

const GFN_DIRTY: u32 = 1 << 0;
const GFN_RESET: u32 = 1 << 1;

nix::ioctl_none!(kvm_reset_dirty_rings, 0xAE, 0xc7);

/// One vCPU's ring, mapped from its vCPU fd.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// The next entry to look at.
    next: u32,
}

/// The rings of every vCPU and the pages harvested from them but not yet collected.
pub struct DirtyRings {
    slots: Arc<KvmSlots>,
    rings: Mutex<Vec<Ring>>,
    harvested: AtomicBitmap,
    bytes: usize,
}

// SAFETY: the ring pointers are shared mappings that live as long as `DirtyRings` (unmapped in Drop);
// every access to them happens under the `rings` mutex, entry flags with atomic operations.
unsafe impl Send for DirtyRings {}
// SAFETY: as for Send.
unsafe impl Sync for DirtyRings {}

impl DirtyRings {
    /// Maps the ring of each vCPU (`vcpu_fds`, in order), each `bytes` long as enabled on the VM.
    pub fn new(slots: Arc<KvmSlots>, vcpu_fds: &[RawFd], bytes: usize, pages: usize) -> std::io::Result<Self> {
        let mut rings = Vec::with_capacity(vcpu_fds.len());
        for &fd in vcpu_fds {
            // SAFETY: maps the dirty ring KVM exposes at this offset of a vCPU fd, with the size the
            // VM was configured with; checked for failure.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    (KVM_DIRTY_LOG_PAGE_OFFSET as usize * PAGE_SIZE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                for r in &rings {
                    unmap(r, bytes);
                }
                return Err(e);
            }
            rings.push(Ring {
                entries: p.cast(),
                count: (bytes / std::mem::size_of::<kvm_dirty_gfn>()) as u32,
                next: 0,
            });
        }
        Ok(DirtyRings { slots, rings: Mutex::new(rings), harvested: AtomicBitmap::new(pages), bytes })
    }

    /// Moves every dirty entry of every ring into the harvested set, then has KVM re-protect those
    /// pages and recycle the entries. Called by the tracker, and by a vCPU whose ring is full.
    pub fn harvest(&self) -> Result<(), TrackerError> {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for ring in rings.iter_mut() {
            loop {
                let i = (ring.next % ring.count) as usize;
                // SAFETY: i < count, inside the mapped ring.
                let e = unsafe { ring.entries.add(i) };
                // SAFETY: `flags` is the first u32 of the entry, aligned, and KVM updates it
                // concurrently: access it only atomically.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: KVM wrote the entry before publishing DIRTY (acquire above).
                let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
                let as_slot = slot & 0xffff;
                if let Some(s) = self.slots.slots.iter().find(|s| s.slot == as_slot) {
                    if (offset as usize) < s.pages() {
                        self.harvested.set(s.first_page + offset as usize);
                    }
                }
                flags.store(GFN_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                any = true;
            }
        }
        if any {
            // SAFETY: a VM fd and an ioctl without argument.
            unsafe { kvm_reset_dirty_rings(self.slots.vm.as_raw_fd()) }
                .map_err(|e| TrackerError::Io { what: "KVM_RESET_DIRTY_RINGS failed", source: e.into() })?;
        }
        Ok(())
    }
}

fn unmap(r: &Ring, bytes: usize) {
    // SAFETY: unmaps exactly a ring this struct mapped.
    unsafe { libc::munmap(r.entries.cast(), bytes) };
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        let rings = self.rings.get_mut().unwrap_or_else(|e| e.into_inner());
        for r in rings.iter() {
            unmap(r, self.bytes);
        }
    }
}

pub struct KvmDirtyRingTracker {
    rings: Arc<DirtyRings>,
    running: bool,
}

impl KvmDirtyRingTracker {
    pub fn new(rings: Arc<DirtyRings>) -> Self {
        KvmDirtyRingTracker { rings, running: false }
    }
}

impl DirtyTracker for KvmDirtyRingTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmDirtyRing
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        self.stop()?;
        // Enabling logging write-protects every page; what the rings held before is stale.
        self.rings.slots.set_logging(true)?;
        self.running = true;
        self.rings.harvest()?;
        self.rings.harvested.clear();
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        if !self.running {
            return Ok(());
        }
        self.rings.harvest()?;
        self.rings.harvested.drain_into(into);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        if !std::mem::take(&mut self.running) {
            return Ok(());
        }
        let off = self.rings.slots.set_logging(false);
        let _ = self.rings.harvest();
        self.rings.harvested.clear();
        off
    }
}

impl Drop for KvmDirtyRingTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
