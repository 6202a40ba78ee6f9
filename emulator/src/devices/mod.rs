//! Port-I/O devices and the bus that routes guest `in`/`out` exits to them.
//!
//! The in-kernel irqchip and PIT (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) live in KVM; what is here is
//! emulated in userspace. An access to a port no device claims is logged at debug level, reads as
//! all-ones, and is otherwise ignored, as on a PC with nothing on that port.

pub mod exit;
pub mod serial;

use std::sync::{Arc, Mutex};

use crate::state::StateError;

/// A device on the port-I/O bus.
pub trait PioDevice: Send {
    /// Name of the device's saved state in a migration stream ("serial0", "exit").
    fn name(&self) -> &'static str;
    /// `data.len()` bytes from port `base + offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
    fn save_state(&self) -> Result<Vec<u8>, StateError>;
    /// Decodes and validates a saved state without applying it: a restore checks every blob
    /// before it changes anything.
    fn check_state(&self, blob: &[u8]) -> Result<(), StateError>;
    fn restore_state(&mut self, blob: &[u8]) -> Result<(), StateError>;
}

struct Mapping {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// The port-I/O bus: a handful of devices, so a list beats a tree.
#[derive(Default)]
pub struct PioBus {
    devices: Vec<Mapping>,
}

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) {
        self.devices.push(Mapping { base, len, device });
    }

    fn find(&self, port: u16) -> Option<(&Mapping, u16)> {
        self.devices.iter().find(|m| port >= m.base && port - m.base < m.len).map(|m| (m, port - m.base))
    }

    /// Handles an `in` exit. `data` is `count * size` bytes for string I/O; each `size`-byte item is
    /// one access.
    pub fn read(&self, port: u16, size: usize, data: &mut [u8]) {
        match self.find(port) {
            Some((m, offset)) => {
                let mut dev = m.device.lock().unwrap_or_else(|e| e.into_inner());
                for item in data.chunks_mut(size.max(1)) {
                    dev.read(offset, item);
                }
            }
            None => {
                log::debug!("read of {} bytes from port {port:#x}, which has no device", data.len());
                data.fill(0xff);
            }
        }
    }

    /// Handles an `out` exit (see `read` for string I/O).
    pub fn write(&self, port: u16, size: usize, data: &[u8]) {
        match self.find(port) {
            Some((m, offset)) => {
                let mut dev = m.device.lock().unwrap_or_else(|e| e.into_inner());
                for item in data.chunks(size.max(1)) {
                    dev.write(offset, item);
                }
            }
            None => log::debug!("write of {data:02x?} to port {port:#x}, which has no device"),
        }
    }

    /// Every device, for saving and restoring state.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<Mutex<dyn PioDevice>>> {
        self.devices.iter().map(|m| &m.device)
    }
}
