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

/// An error and its sources as one line: "message: source: source's source". Error messages in
/// this crate do not repeat their sources (so that this and anyhow's `{:#}` print each once);
/// whatever turns an error into text for a user or a peer goes through here.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
