//! What KVM's own trackers share: the VM's memory slots, and switching dirty logging on them.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use super::TrackerError;
use crate::ram::{GuestRam, PAGE_SHIFT};

/// One KVM memory slot and where its pages sit in the RAM's page numbering.
#[derive(Clone, Copy, Debug)]
pub struct KvmSlot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
    pub first_page: usize,
}

impl KvmSlot {
    pub fn pages(&self) -> usize {
        (self.size >> PAGE_SHIFT) as usize
    }
}

/// The VM and its RAM slots (slot i = RAM region i, as the emulator registers them).
pub struct KvmSlots {
    pub vm: Arc<VmFd>,
    pub slots: Vec<KvmSlot>,
    /// Whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: GET_DIRTY_LOG only reads, and
    /// KVM_CLEAR_DIRTY_LOG re-protects, in chunks.
    pub manual_protect: bool,
}

impl KvmSlots {
    pub fn new(vm: Arc<VmFd>, ram: &GuestRam, manual_protect: bool) -> Self {
        let slots = ram
            .host_regions()
            .enumerate()
            .map(|(i, (r, host, _))| KvmSlot {
                slot: i as u32,
                gpa: r.gpa,
                size: r.size,
                host: host as u64,
                first_page: ram.layout().first_page_of_region(i),
            })
            .collect();
        KvmSlots { vm, slots, manual_protect }
    }

    /// Turns KVM's dirty logging on or off for every slot.
    pub fn set_logging(&self, on: bool) -> Result<(), TrackerError> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.gpa,
                memory_size: s.size,
                userspace_addr: s.host,
            };
            // SAFETY: the same slot, address and mapping the emulator registered (still owned by
            // its GuestRam); only the logging flag changes.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| TrackerError::Io {
                what: if on { "cannot enable KVM dirty logging" } else { "cannot disable KVM dirty logging" },
                source: e.into(),
            })?;
        }
        Ok(())
    }
}
