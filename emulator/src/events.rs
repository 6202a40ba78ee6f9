//! What ends the VM, sent by vCPUs, devices and the monitor to the main thread. A leaf module: the
//! parts that report (vCPU loop, exit device, monitor) and the part that acts (main) meet here,
//! without knowing each other.

use migrate::ram::RamError;
use migrate::tracker::TrackerError;

#[derive(Debug)]
pub enum VmEvent {
    /// The guest wrote its status to the exit device.
    GuestExit(u8),
    /// `quit` on the monitor.
    Quit,
    /// A vCPU hit something it cannot go on from.
    Crashed { vcpu: usize, reason: Crash },
}

/// Why a vCPU cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Crash {
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault,
    #[error("KVM could not enter the guest (reason {reason:#x}, cpu {cpu})")]
    FailEntry { reason: u64, cpu: u32 },
    #[error("KVM internal error")]
    Internal,
    #[error("unexpected exit {0}")]
    UnexpectedExit(String),
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    #[error("{op} RAM at {addr:#x}")]
    Ram {
        op: &'static str,
        addr: u64,
        #[source]
        source: RamError,
    },
    #[error("dirty ring full, and harvesting failed")]
    Harvest(#[source] TrackerError),
    #[error("dirty ring full, but this VM has no dirty rings")]
    NoDirtyRings,
    #[error("a write fault could not be resolved: {0}")]
    WriteFault(String),
}
