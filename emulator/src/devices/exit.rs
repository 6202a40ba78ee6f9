//! The exit device: a guest write to its port ends the VM, and the value written becomes emu's exit
//! status. Like QEMU's isa-debug-exit, but the status is the value itself (its low 8 bits), not
//! `value << 1 | 1`.

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use super::PioDevice;
use crate::events::VmEvent;
use crate::state::{self, StateError, StateKind, Versioned};

/// The port, as for isa-debug-exit in QEMU's default configuration.
pub const EXIT_PORT: u16 = 0xf4;

pub struct ExitDevice {
    events: Sender<VmEvent>,
}

/// The exit device keeps no state, but it still saves a versioned record so that a stream missing
/// it, or from a build whose device differs, is caught.
#[derive(Serialize, Deserialize)]
struct ExitDeviceState {
    port: u16,
}

impl Versioned for ExitDeviceState {
    const KIND: StateKind = StateKind::ExitDevice;
    const VERSION: u16 = 1;
}

impl ExitDevice {
    pub fn new(events: Sender<VmEvent>) -> Self {
        ExitDevice { events }
    }
}

impl PioDevice for ExitDevice {
    fn name(&self) -> &'static str {
        "exit"
    }

    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        let status = data.first().copied().unwrap_or(0);
        // The receiver is the main thread; if it is gone the process is exiting anyway.
        let _ = self.events.send(VmEvent::GuestExit(status));
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode(&ExitDeviceState { port: EXIT_PORT })
    }

    fn check_state(&self, blob: &[u8]) -> Result<(), StateError> {
        let s: ExitDeviceState = state::decode(blob)?;
        if s.port != EXIT_PORT {
            return Err(StateError::Invalid(format!("exit device at port {:#x}, expected {EXIT_PORT:#x}", s.port)));
        }
        Ok(())
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), StateError> {
        // Nothing to apply: the device has no state beyond what check_state verifies.
        self.check_state(blob)
    }
}
