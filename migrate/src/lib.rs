//! The migration path of emu: guest RAM and its dirty trackers, the stream format, transports, and
//! the precopy sender and receiver. It knows nothing of KVM vCPUs or devices: the emulator plugs in
//! through the [`vm::MigratableVm`] trait.

pub mod bitmap;
pub mod convergence;
pub mod handover;
pub mod incoming;
pub mod pagemap;
pub mod progress;
pub mod ram;
pub mod receiver;
pub mod sender;
pub mod stream;
pub mod tracker;
pub mod transport;
pub mod uffd;
pub mod vm;
