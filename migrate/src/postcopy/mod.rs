//! Postcopy: the guest moves to the destination before all of its memory has, and the pages it
//! still lacks follow, those a vCPU waits on first.
//!
//! ```text
//! source                                           destination
//!   | precopy passes (possibly cut short)  ------->  |
//!   |   pause vCPUs                                  |
//!   | OWED (every page not sent, or dirtied since) ->  | forget those pages, register RAM with
//!   | VCPU/VM/DEVICE_STATE, END (postcopy)  ------>  |   userfaultfd (missing mode), restore state
//!   |  <--------------------------------------- READY |
//!   | GO  ---------------------------------------->  | resume the guest; a fault on an owed page
//!   |  <------------------------------------- STARTED |   sends PAGE_REQUEST and waits
//!   | DONE, then PAGES / ZERO_PAGES: requested ones -> | UFFDIO_COPY / UFFDIO_ZEROPAGE each page in
//!   |   first, the rest in the background            |   place, waking whatever waits on it
//!   |  <------------------------------------ COMPLETE | once nothing is owed: unregister
//!   | postmigrate                                    |
//! ```
//!
//! Until COMPLETE the guest's memory is split between the two sides: the source refuses to quit
//! and never runs the guest again (GO went out), and the destination never lets a vCPU read an
//! owed page before it arrives (a missing page blocks its reader in the kernel). A broken link
//! therefore loses nothing: each side keeps what it has, the destination's faulting vCPUs wait,
//! and a new connection (RESUME, answered with the destination's OWED and RESUMED) goes on with
//! only what is still missing.
//!
//! [`dest`] is the destination's side (the fault thread and the placing of pages), [`source`] the
//! source's (serving requests, pushing the rest).

pub mod dest;
pub mod source;

/// Why a postcopy phase stopped before every page arrived.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("userfaultfd")]
    Uffd(#[from] crate::UffdError),
    #[error("the link to the other side")]
    Link(#[source] crate::stream::StreamError),
    #[error("cannot write to the other side")]
    Write(#[source] std::io::Error),
    #[error("cannot prepare guest RAM")]
    Ram(#[source] std::io::Error),
    #[error("{0}")]
    Protocol(String),
    /// Something went wrong on the urgent connection (postcopy-preempt).
    #[error("the urgent connection")]
    Urgent(#[source] Box<PostcopyError>),
    #[error("the other side refused: {0}")]
    Refused(String),
}

impl PostcopyError {
    /// Whether a new connection may recover from it (a broken or corrupt link), as opposed to a
    /// failure of this side.
    pub fn is_link(&self) -> bool {
        match self {
            PostcopyError::Link(_) | PostcopyError::Write(_) => true,
            PostcopyError::Urgent(e) => e.is_link(),
            _ => false,
        }
    }
}
