//! KVM's dirty bitmap (KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG), with
//! KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: reading the bitmap does not re-protect anything; the pages found
//! dirty are re-protected with KVM_CLEAR_DIRTY_LOG, a chunk at a time, so a large guest is never
//! stalled behind one huge write-protect operation. KVM's log does not see the emulator's own writes;
//! the dirty log merges them in (`DirtyLog`).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1};

use super::kvm::{KvmSlot, KvmSlots};
use super::{DirtyTracker, TrackerError, TrackerKind};
use crate::bitmap::PageBitmap;

/// Pages per KVM_CLEAR_DIRTY_LOG call (256 MiB of guest RAM); a multiple of 64, as KVM requires.
const CLEAR_CHUNK: usize = 64 * 1024;

nix::ioctl_readwrite!(kvm_clear_dirty_log_ioctl, 0xAE, 0xc0, kvm_clear_dirty_log);

/// Re-protects the pages of `slot` set in `bitmap` (bit i = page i of the slot), a chunk at a time.
pub fn clear_dirty_log(slots: &KvmSlots, slot: &KvmSlot, bitmap: &mut [u64]) -> Result<(), TrackerError> {
    let pages = slot.pages();
    let mut first = 0;
    while first < pages {
        let n = CLEAR_CHUNK.min(pages - first);
        let words = &mut bitmap[first / 64..(first + n).div_ceil(64)];
        if words.iter().any(|&w| w != 0) {
            let mut arg = kvm_clear_dirty_log {
                slot: slot.slot,
                num_pages: n as u32,
                first_page: first as u64,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: words.as_mut_ptr().cast() },
            };
            // SAFETY: `arg` describes `n` pages of an existing slot, with a bitmap of at least
            // ceil(n / 64) words that lives across the call.
            unsafe { kvm_clear_dirty_log_ioctl(slots.vm.as_raw_fd(), &mut arg) }
                .map_err(|e| TrackerError::Io { what: "KVM_CLEAR_DIRTY_LOG failed", source: e.into() })?;
        }
        first += n;
    }
    Ok(())
}

pub struct KvmDirtyLogTracker {
    slots: Arc<KvmSlots>,
    running: bool,
}

impl KvmDirtyLogTracker {
    pub fn new(slots: Arc<KvmSlots>) -> Self {
        KvmDirtyLogTracker { slots, running: false }
    }

    /// Reads each slot's bitmap, re-protects what it found, and adds it to `into`.
    fn harvest(&self, into: Option<&mut PageBitmap>) -> Result<(), TrackerError> {
        let mut into = into;
        for s in &self.slots.slots {
            let mut bitmap = self
                .slots
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|e| TrackerError::Io { what: "KVM_GET_DIRTY_LOG failed", source: e.into() })?;
            if self.slots.manual_protect {
                clear_dirty_log(&self.slots, s, &mut bitmap)?;
            }
            if let Some(into) = into.as_deref_mut() {
                into.or_words_at(s.first_page, &bitmap);
            }
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyLogTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmDirtyLog
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        self.stop()?;
        self.slots.set_logging(true)?;
        self.running = true;
        // With INITIALLY_SET every page starts dirty and unprotected; one harvest protects them all,
        // so that from here on only new writes show (pass 0 sends every page anyway).
        if let Err(e) = self.harvest(None) {
            let _ = self.stop();
            return Err(e);
        }
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        if !self.running {
            return Ok(());
        }
        self.harvest(Some(into))
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        if !std::mem::take(&mut self.running) {
            return Ok(());
        }
        self.slots.set_logging(false)
    }
}

impl Drop for KvmDirtyLogTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
