//! What the migration path needs from a virtual machine, and nothing more: the emulator implements
//! these traits, so `migrate` does not depend on it (or on how vCPUs and devices work).

use std::sync::Arc;

use crate::ram::GuestRam;

/// The emulator's own error, whatever it is, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure inside the VM (a KVM ioctl, a device refusing its state), with the emulator's error as
/// its source.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot pause the guest")]
    Pause(#[source] BoxError),
    #[error("cannot save the machine state")]
    Save(#[source] BoxError),
    #[error("cannot restore the machine state")]
    Restore(#[source] BoxError),
}

/// The machine's state other than RAM, as versioned blobs the emulator encodes and checks itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineState {
    /// One blob per vCPU, in vCPU order.
    pub vcpus: Vec<Vec<u8>>,
    /// Interrupt controllers, timer, clock.
    pub vm: Vec<u8>,
    /// (device name, blob) for every device.
    pub devices: Vec<(String, Vec<u8>)>,
}

/// The source side: a running VM that can be stopped for the switchover.
pub trait MigratableVm: Send + Sync {
    fn ram(&self) -> &Arc<GuestRam>;
    fn vcpu_count(&self) -> usize;
    /// Stops every vCPU and leaves them quiescent (no exit half-handled), for the final pass.
    /// Returns whether the guest was running (a stopped guest stays stopped at the destination).
    fn pause_for_switchover(&self) -> Result<bool, VmError>;
    /// Saves vCPU, VM and device state; only called while paused for the switchover.
    fn save_state(&self) -> Result<MachineState, VmError>;
    /// The destination has the guest: stay paused (QEMU's "postmigrate") until told otherwise.
    fn migration_completed(&self);
    /// The migration failed or was cancelled: put the VM back as it was before (running if it was).
    fn migration_failed(&self);
    /// GO went out and STARTED did not come: stay paused, and refuse to run, until resolved (then
    /// `migration_completed` or `migration_failed`).
    fn migration_unresolved(&self);
    /// A checkpoint of the paused guest was written to a file: stay paused, as after `stop` (no
    /// copy of it runs anywhere, so it may run again here).
    fn suspended(&self);
    /// Auto-converge: take `percent` of every vCPU's time away while the guest runs (0: none).
    /// Pausing for the switchover ends it.
    fn set_throttle(&self, percent: u8);
}

/// The destination side: a VM that has not run, into which the stream is restored.
pub trait RestorableVm: Send + Sync {
    fn ram(&self) -> &Arc<GuestRam>;
    fn vcpu_count(&self) -> usize;
    /// Restores non-RAM state; called once, after every page arrived and before the guest runs.
    fn restore_state(&self, state: &MachineState) -> Result<(), VmError>;
}
