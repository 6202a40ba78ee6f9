//! Dirty-page trackers: how the source learns which guest pages changed since it last copied them.
//!
//! Every tracker implements [`DirtyTracker`]; the sender holds a [`DirtyLog`], which adds the pages
//! the emulator itself wrote (they bypass some trackers: KVM's log never sees them), and never knows
//! which tracker it has.

pub mod kvm;
mod kvm_log;
pub mod kvm_ring;
pub mod mprotect;
mod uffd_async;
mod uffd_wp;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::ram::GuestRam;
use crate::uffd::UffdError;
use kvm::KvmSlots;
use kvm_ring::DirtyRings;
use mprotect::{EventStacks, WriteFaultSlot};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    #[error("cannot start the tracker's thread")]
    Thread(#[source] std::io::Error),
    #[error("the tracker's fault thread failed: {0}")]
    FaultThread(String),
    #[error("cannot populate guest RAM")]
    Populate(#[source] std::io::Error),
    /// This tracker cannot be used with this VM or host (chosen at the wrong time, or missing a
    /// kernel feature); another one can.
    #[error("{0}")]
    Unavailable(String),
    /// The tracker could not keep tracking exactly and stopped (RAM is writable again); the
    /// migration fails, the guest loses nothing.
    #[error("{0}")]
    GaveUp(String),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Which tracker a migration uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect, synchronous: a fault thread resolves every first write to a page.
    UffdWp,
    /// userfaultfd write-protect, asynchronous (WP_ASYNC): the kernel resolves faults itself and
    /// PAGEMAP_SCAN collects and re-protects written pages; no fault thread.
    UffdWpAsync,
    /// KVM's dirty bitmap, with manual protect and chunked clears.
    KvmDirtyLog,
    /// KVM's per-vCPU dirty rings (set up when emu starts).
    KvmDirtyRing,
    /// mprotect(PROT_READ) of copied pages; faulting writes are tied to pages by decoding them.
    Mprotect,
}

impl TrackerKind {
    pub const ALL: &'static [TrackerKind] = &[
        TrackerKind::UffdWp,
        TrackerKind::UffdWpAsync,
        TrackerKind::KvmDirtyLog,
        TrackerKind::KvmDirtyRing,
        TrackerKind::Mprotect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::UffdWp => "uffd-wp",
            TrackerKind::UffdWpAsync => "uffd-wp-async",
            TrackerKind::KvmDirtyLog => "kvm-dirty-log",
            TrackerKind::KvmDirtyRing => "kvm-dirty-ring",
            TrackerKind::Mprotect => "mprotect",
        }
    }
}

impl FromStr for TrackerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TrackerKind::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = TrackerKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown dirty tracker '{s}' (one of: {})", names.join(", "))
        })
    }
}

/// One way of tracking guest writes to RAM.
pub trait DirtyTracker: Send {
    fn kind(&self) -> TrackerKind;

    /// From now on every guest write to RAM is recorded.
    fn start(&mut self) -> Result<(), TrackerError>;

    /// Adds to `dirty` every page written since `start` or the previous call, and re-arms tracking
    /// for those pages *before* returning: a page is read for sending only once a later write to it
    /// would be recorded again.
    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError>;

    /// `collect` at the switchover, with the guest and the emulator's writers stopped: must also count
    /// every write that has completed but whose recording is still in flight (a tracker that marks
    /// after letting a write through has to finish marking first).
    fn collect_final(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError> {
        self.collect(dirty)
    }

    /// Holds the guest to at most `pages_per_sec` newly dirtied pages per second from now on (0: no
    /// limit), by making writes wait where the tracker sees them first. `false` if this tracker
    /// cannot (it learns of writes only after they are done).
    fn set_dirty_rate_limit(&mut self, _pages_per_sec: u64) -> bool {
        false
    }

    /// Stops tracking: all of RAM writable, no thread left behind. Idempotent.
    fn stop(&mut self) -> Result<(), TrackerError>;
}

/// No tracking at all, for a migration that copies no page (a same-host handover of shared RAM):
/// reports nothing dirty, costs nothing to start. `kind` is only what progress shows.
pub fn untracked(kind: TrackerKind) -> Box<dyn DirtyTracker> {
    struct Untracked(TrackerKind);
    impl DirtyTracker for Untracked {
        fn kind(&self) -> TrackerKind {
            self.0
        }
        fn start(&mut self) -> Result<(), TrackerError> {
            Ok(())
        }
        fn collect(&mut self, _dirty: &mut PageBitmap) -> Result<(), TrackerError> {
            Ok(())
        }
        fn stop(&mut self) -> Result<(), TrackerError> {
            Ok(())
        }
    }
    Box::new(Untracked(kind))
}

/// Builds a tracker for each migration (the sender asks for the kind its parameters name). Tests
/// supply scripted ones; a VM supplies its [`TrackerSources`].
pub trait TrackerFactory: Send + Sync {
    fn build(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, TrackerError>;
}

/// Everything the trackers of one VM are built from: guest RAM, and what the emulator's KVM VM and
/// vCPU loop provide. The emulator fills it once, when it creates the VM; [`TrackerSources::build`]
/// is the one place where a tracker's name becomes a tracker.
pub struct TrackerSources {
    pub ram: Arc<GuestRam>,
    /// The VM's KVM memory slots (kvm-dirty-log); `None` outside a KVM VM.
    pub kvm_slots: Option<Arc<KvmSlots>>,
    /// KVM's per-vCPU dirty rings, if the VM was created with them (KVM's bitmap is then off).
    pub dirty_rings: Option<Arc<DirtyRings>>,
    /// The vCPU loop's half of the mprotect tracker: where write faults are resolved, and the
    /// vCPUs' event-stack pages (never protected; see `mprotect.rs`).
    pub mprotect: Option<(Arc<WriteFaultSlot>, Arc<EventStacks>)>,
}

impl TrackerSources {
    /// Sources for trackers that need guest RAM alone (the userfaultfd ones).
    pub fn ram_only(ram: Arc<GuestRam>) -> Self {
        TrackerSources { ram, kvm_slots: None, dirty_rings: None, mprotect: None }
    }
}

impl TrackerFactory for TrackerSources {
    fn build(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, TrackerError> {
        let unavailable =
            |why: &str| Err(TrackerError::Unavailable(format!("{} is not available: {why}", kind.name())));
        match kind {
            TrackerKind::UffdWp => Ok(Box::new(uffd_wp::UffdWpTracker::new(self.ram.clone()))),
            TrackerKind::UffdWpAsync => Ok(Box::new(uffd_async::UffdWpAsyncTracker::new(self.ram.clone()))),
            TrackerKind::KvmDirtyLog => match (&self.kvm_slots, &self.dirty_rings) {
                (Some(slots), None) => Ok(Box::new(kvm_log::KvmDirtyLogTracker::new(slots.clone()))),
                (Some(_), Some(_)) => {
                    unavailable("this VM uses KVM's dirty rings instead (--dirty-tracker kvm-dirty-ring)")
                }
                (None, _) => unavailable("not a KVM VM"),
            },
            TrackerKind::KvmDirtyRing => match &self.dirty_rings {
                Some(rings) => Ok(Box::new(kvm_ring::KvmDirtyRingTracker::new(rings.clone()))),
                None => unavailable(
                    "KVM's dirty rings must be set up before the vCPUs exist: start emu with --dirty-tracker kvm-dirty-ring",
                ),
            },
            TrackerKind::Mprotect => match &self.mprotect {
                Some((slot, stacks)) => {
                    Ok(Box::new(mprotect::MprotectTracker::new(self.ram.clone(), slot.clone(), stacks.clone())))
                }
                None => unavailable("it needs the vCPU loop to resolve write faults"),
            },
        }
    }
}

/// A running tracker plus the emulator's own writes: the dirty set the sender sees.
pub struct DirtyLog {
    tracker: Box<dyn DirtyTracker>,
    ram: Arc<GuestRam>,
    running: bool,
}

impl DirtyLog {
    pub fn start(mut tracker: Box<dyn DirtyTracker>, ram: Arc<GuestRam>) -> Result<Self, TrackerError> {
        ram.start_vmm_dirty_log();
        if let Err(e) = tracker.start() {
            ram.stop_vmm_dirty_log();
            let _ = tracker.stop();
            return Err(e);
        }
        Ok(DirtyLog { tracker, ram, running: true })
    }

    pub fn kind(&self) -> TrackerKind {
        self.tracker.kind()
    }

    /// Adds the pages written since the last call (guest and emulator) to `dirty`, re-armed.
    pub fn collect(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError> {
        self.tracker.collect(dirty)?;
        self.ram.drain_vmm_dirty(dirty);
        Ok(())
    }

    /// The last collection, at the switchover (see `DirtyTracker::collect_final`).
    pub fn collect_final(&mut self, dirty: &mut PageBitmap) -> Result<(), TrackerError> {
        self.tracker.collect_final(dirty)?;
        self.ram.drain_vmm_dirty(dirty);
        Ok(())
    }

    /// See [`DirtyTracker::set_dirty_rate_limit`].
    pub fn set_dirty_rate_limit(&mut self, pages_per_sec: u64) -> bool {
        self.tracker.set_dirty_rate_limit(pages_per_sec)
    }

    pub fn stop(&mut self) -> Result<(), TrackerError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        self.ram.stop_vmm_dirty_log();
        self.tracker.stop()
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("stopping the dirty tracker: {}", crate::report(&e));
        }
    }
}

/// One `collect` of [`exercise`]: how long it took and how many pages it found.
#[derive(Clone, Copy, Debug)]
pub struct CollectSample {
    pub time: Duration,
    pub pages: usize,
}

/// What running a tracker cost on a live guest.
#[derive(Clone, Debug)]
pub struct TrackingSample {
    pub start: Duration,
    pub collects: Vec<CollectSample>,
    pub stop: Duration,
}

/// Runs `tracker` on `ram` for `duration`, collecting every `interval` (as back-to-back precopy
/// passes would), and times each step. For the tracker benchmark (`x-dirty-tracking`).
pub fn exercise(
    tracker: Box<dyn DirtyTracker>,
    ram: Arc<GuestRam>,
    duration: Duration,
    interval: Duration,
) -> Result<TrackingSample, TrackerError> {
    let t = Instant::now();
    let mut log = DirtyLog::start(tracker, ram.clone())?;
    let start = t.elapsed();
    let mut dirty = PageBitmap::new(ram.page_count());
    let mut collects = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        std::thread::sleep(interval);
        let t = Instant::now();
        log.collect(&mut dirty)?;
        collects.push(CollectSample { time: t.elapsed(), pages: dirty.count() });
        dirty.clear();
    }
    let t = Instant::now();
    log.stop()?;
    Ok(TrackingSample { start, collects, stop: t.elapsed() })
}
