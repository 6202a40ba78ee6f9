//! The migration path of emu: guest RAM and its dirty trackers, the stream format, transports, and
//! the precopy sender and receiver. It knows nothing of KVM vCPUs or devices: the emulator plugs in
//! through the [`vm::MigratableVm`] and [`vm::RestorableVm`] traits and fills a
//! [`tracker::TrackerSources`] for its trackers.
//!
//! The public surface, by the order a migration uses it:
//! - [`ram`]: guest RAM, the one owner of the mapping;
//! - [`tracker`]: the [`tracker::DirtyTracker`] trait, its five trackers, and how they are built;
//! - [`sender`]: an outgoing migration ([`sender::start`]), its parameters, cancel and resolve;
//! - [`incoming`] and [`receiver`]: the destination's listener and the stream's receiver;
//! - [`handover`]: who owns the guest at the end (READY, GO, RESOLVE, the operator's choice);
//! - [`stream`], [`transport`]: the wire format and the byte streams it travels on;
//! - [`postcopy`]: the guest runs on the destination before all its pages have arrived;
//! - [`checkpoint`]: a guest written to a file and restored from it;
//! - [`progress`]: what `query-migrate` reports.
//!
//! Internal: the page bitmaps, the stop rule, pagemap and userfaultfd plumbing.

mod bitmap;
pub mod channel;
pub mod checkpoint;
pub mod compress;
mod convergence;
pub mod handover;
pub mod incoming;
mod pagemap;
pub mod postcopy;
pub mod progress;
pub mod ram;
pub mod receiver;
pub mod sender;
pub mod stream;
pub mod tracker;
pub mod transport;
mod uffd;
pub mod vm;

pub use bitmap::PageBitmap;
pub use uffd::UffdError;

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
