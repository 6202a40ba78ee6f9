//! The synchronous userfaultfd write-protect tracker: the design of the original KVM migration.
//!
//! All of RAM is write-protected; the first guest write to a page blocks the vCPU inside KVM_RUN
//! and queues a fault event. The tracker's fault thread unprotects the page (which wakes the vCPU)
//! and then marks it dirty. `collect` takes the marks and protects those pages again.
//!
//! The order in the fault thread matters: unprotect, *then* mark. Marking first would let `collect`
//! take the mark, re-protect and read the page while the vCPU is still blocked, after which the
//! unprotect would let the write through unrecorded.
//!
//! That order leaves one window: between the unprotect (the write is done) and the mark. Later passes
//! pick such a late mark up, but the final one has no later pass, so at the switchover
//! (`collect_final`, guest stopped) the fault thread is first stopped and joined and anything still
//! queued is resolved here: every completed write is marked before the last dirty set is taken.
//!
//! The emulator's own writes into guest RAM fault like the guest's and are resolved by the same
//! thread, so no emulator thread may ever be the one resolving its own fault: only the fault thread
//! resolves, and it never writes guest RAM.
//!
//! Because every first write to a page waits for the fault thread, the fault thread can also hold
//! the guest to a dirty rate ([`DirtyTracker::set_dirty_rate_limit`]): it resolves at most that many
//! faults per second, and a vCPU whose write would exceed it waits in its fault. A guest that writes
//! faster than the link can then still converge, and only its first writes to pages pay: a guest
//! rewriting pages it already dirtied runs at full speed. No kernel bitmap can do this.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DirtyTracker, TrackerError, TrackerKind};
use crate::bitmap::{AtomicBitmap, PageBitmap};
use crate::ram::{GuestRam, PAGE_SIZE};
use crate::uffd::{self, Uffd, UffdError, UffdMsg};

struct Running {
    uffd: Arc<Uffd>,
    dirty: Arc<AtomicBitmap>,
    stop: OwnedFd,
    thread: Option<JoinHandle<Result<(), UffdError>>>,
}

pub struct UffdWpTracker {
    ram: Arc<GuestRam>,
    running: Option<Running>,
    /// Faults resolved per second at most (0: no limit); read by the fault thread at every fault.
    rate_limit: Arc<AtomicU64>,
}

impl UffdWpTracker {
    pub fn new(ram: Arc<GuestRam>) -> Self {
        UffdWpTracker { ram, running: None, rate_limit: Arc::new(AtomicU64::new(0)) }
    }

    /// A userfaultfd that write-protects unpopulated pages too; without WP_UNPOPULATED (older
    /// kernels) every page is populated first, or writes to untouched pages would go unseen.
    fn open(&self) -> Result<Uffd, TrackerError> {
        let base = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_THREAD_ID;
        match Uffd::open(base | uffd::FEATURE_WP_UNPOPULATED) {
            Ok(u) => Ok(u),
            Err(_) => {
                self.ram.populate().map_err(TrackerError::Populate)?;
                Ok(Uffd::open(base)?)
            }
        }
    }

    fn start_inner(&mut self, uffd: Arc<Uffd>) -> Result<Running, TrackerError> {
        uffd.register_wp_ranges(&self.ram.host_ranges())?;
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(TrackerError::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let dirty = Arc::new(AtomicBitmap::new(self.ram.page_count()));
        let thread = {
            let (uffd, dirty, ram) = (uffd.clone(), dirty.clone(), self.ram.clone());
            let stop_fd = stop.try_clone().map_err(TrackerError::Thread)?;
            let mut pacer = Pacer { limit: self.rate_limit.clone(), next: None };
            std::thread::Builder::new()
                .name("uffd-wp".into())
                .spawn(move || fault_loop(&uffd, &ram, &dirty, &stop_fd, &mut pacer))
                .map_err(TrackerError::Thread)?
        };
        Ok(Running { uffd, dirty, stop, thread: Some(thread) })
    }
}

/// Wakes the fault thread's poll on its stop eventfd.
fn signal(stop: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
    unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Holds fault resolution to at most `limit` per second: one every 1/limit s, no burst saved up.
struct Pacer {
    limit: Arc<AtomicU64>,
    next: Option<Instant>,
}

impl Pacer {
    /// Waits until the next fault may be resolved; `false` if told to stop meanwhile.
    fn wait(&mut self, stop: &OwnedFd) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            self.next = None;
            return true;
        }
        let now = Instant::now();
        let at = self.next.map_or(now, |n| n.max(now));
        if at > now && stop_signalled(stop, at - now) {
            return false;
        }
        self.next = Some(at + Duration::from_secs_f64(1.0 / limit as f64));
        true
    }
}

/// Waits up to `timeout` for the stop eventfd; whether it was signalled. `ppoll`, not `poll`:
/// the pacer's waits are tens of microseconds, below poll's millisecond.
fn stop_signalled(stop: &OwnedFd, timeout: Duration) -> bool {
    let mut fd = libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and a valid timespec for the duration of the call; no signal mask.
    unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) > 0 }
}

/// The fault thread: unprotect, then mark (see the module comment for why in that order), each
/// fault when the pacer lets it.
fn fault_loop(
    uffd: &Uffd,
    ram: &GuestRam,
    dirty: &AtomicBitmap,
    stop: &OwnedFd,
    pacer: &mut Pacer,
) -> Result<(), UffdError> {
    let mut fds = [
        libc::pollfd { fd: uffd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(UffdError::Read(e));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if !resolve_pending(uffd, ram, dirty, &mut |_| pacer.wait(stop))? {
            return Ok(());
        }
    }
}

/// Resolves every fault event waiting on `uffd`: unprotect (which wakes the vCPU), then mark.
/// `pace` is asked before each fault; `false` stops there (a fault read but not resolved leaves its
/// write undone: the vCPU retries it, and faults again, after it is next resumed). Returns whether
/// it went through.
fn resolve_pending(
    uffd: &Uffd,
    ram: &GuestRam,
    dirty: &AtomicBitmap,
    pace: &mut dyn FnMut(u64) -> bool,
) -> Result<bool, UffdError> {
    let mut msgs = [UffdMsg::default(); 64];
    loop {
        let n = uffd.read_events(&mut msgs)?;
        if n == 0 {
            return Ok(true);
        }
        for m in &msgs[..n] {
            if m.event != uffd::EVENT_PAGEFAULT || m.flags & uffd::PAGEFAULT_FLAG_WP == 0 {
                continue;
            }
            if !pace(m.address) {
                return Ok(false);
            }
            let page_addr = m.address & !(PAGE_SIZE as u64 - 1);
            uffd.write_protect(page_addr, PAGE_SIZE as u64, false)?;
            if let Some(page) = ram.page_of_host(page_addr) {
                dirty.set(page);
            }
        }
    }
}

impl DirtyTracker for UffdWpTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWp
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        self.stop()?;
        let uffd = Arc::new(self.open()?);
        match self.start_inner(uffd.clone()) {
            Ok(r) => self.running = Some(r),
            Err(e) => {
                // Undo whatever part was done; closing the userfaultfd releases the rest.
                let _ = uffd.release_ranges(&self.ram.host_ranges());
                return Err(e);
            }
        }
        // With the fault thread running, protect everything; on failure `stop` undoes it all.
        if let Err(e) = uffd.write_protect_ranges(&self.ram.host_ranges(), true) {
            let _ = self.stop();
            return Err(e.into());
        }
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        let Some(r) = &mut self.running else {
            return Ok(());
        };
        if r.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let result = r.thread.take().map(|t| t.join());
            let why = match result {
                Some(Ok(Err(e))) => crate::report(&e),
                _ => "it stopped".to_string(),
            };
            return Err(TrackerError::FaultThread(why));
        }
        let mut taken = PageBitmap::new(self.ram.page_count());
        r.dirty.drain_into(&mut taken);
        for (addr, len) in self.ram.host_runs(&taken) {
            r.uffd.write_protect(addr, len, true)?;
        }
        into.union_with(&taken);
        Ok(())
    }

    /// The fault thread marks a page just after letting its write through, so it is stopped and
    /// joined first (it finishes the batch it read), and whatever is still queued is resolved here:
    /// every completed write is marked before the marks are taken (see the module comment). The
    /// guest is paused; the fault thread stays stopped until `stop` or the next `start`.
    fn collect_final(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        let Some(r) = &mut self.running else {
            return Ok(());
        };
        if let Some(t) = r.thread.take() {
            signal(&r.stop);
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(TrackerError::FaultThread(e.to_string())),
                Err(_) => return Err(TrackerError::FaultThread("it panicked".into())),
            }
        }
        // The guest is paused: nothing to pace.
        resolve_pending(&r.uffd, &self.ram, &r.dirty, &mut |_| true)?;
        self.collect(into)
    }

    fn set_dirty_rate_limit(&mut self, pages_per_sec: u64) -> bool {
        self.rate_limit.store(pages_per_sec, Ordering::Relaxed);
        true
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        // The next migration starts unlimited.
        self.rate_limit.store(0, Ordering::Relaxed);
        let Some(mut r) = self.running.take() else {
            return Ok(());
        };
        // Unprotect everything first: it also wakes any vCPU blocked on a fault, so nothing waits
        // on the thread we are about to stop.
        let unprotected = r.uffd.release_ranges(&self.ram.host_ranges());
        signal(&r.stop);
        let joined = r.thread.take().map(|t| t.join());
        unprotected?;
        match joined {
            Some(Ok(Err(e))) => Err(TrackerError::FaultThread(crate::report(&e))),
            Some(Err(_)) => Err(TrackerError::FaultThread("it panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
