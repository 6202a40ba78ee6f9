//! What ends the VM, sent by vCPUs, devices and the monitor to the main thread ([`VmEvent`]), and
//! what monitor clients hear about as it happens ([`Notice`]). A leaf module: the parts that report
//! (vCPU loop, exit device, VM lifecycle, migrations, monitor) and the parts that act (main, the
//! monitor's event bus) meet here, without knowing each other.

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

/// What monitor clients hear about as it happens (QMP events, `qmp.rs`): reported by the VM's
/// lifecycle and the migrations, turned into QEMU's events by the monitor. Kept apart from
/// [`VmEvent`], which only the main thread reads and which ends the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The guest stopped running (`stop`, a migration's switchover).
    Stop,
    /// The guest runs again (or for the first time here).
    Resume,
    /// emu is ending: `guest` when the guest caused it; `reason` with QEMU's names
    /// (`host-qmp-quit`, `guest-shutdown`, `guest-reset`, `host-error`).
    Shutdown { guest: bool, reason: &'static str },
    /// A migration, outgoing or incoming, changed status (QEMU's status names).
    Migration { status: &'static str },
    /// An outgoing migration began pass `pass` (QEMU counts dirty-bitmap syncs from 1).
    MigrationPass { pass: u64 },
}

/// Where [`Notice`]s go; cheap to clone, and a no-op where nobody listens.
#[derive(Clone, Default)]
pub struct Notifier(Option<std::sync::Arc<dyn Fn(Notice) + Send + Sync>>);

impl Notifier {
    pub fn new(f: impl Fn(Notice) + Send + Sync + 'static) -> Self {
        Notifier(Some(std::sync::Arc::new(f)))
    }

    pub fn notify(&self, n: Notice) {
        if let Some(f) = &self.0 {
            f(n);
        }
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Notifier" } else { "Notifier(none)" })
    }
}
