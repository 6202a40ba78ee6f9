//! The asynchronous userfaultfd write-protect tracker (UFFD_FEATURE_WP_ASYNC).
//!
//! RAM is write-protected as for the synchronous tracker, but a write fault is resolved by the kernel
//! itself: it makes the page writable and remembers that it was written, with no event and no thread
//! to wake. `collect` finds the written pages with one PAGEMAP_SCAN per region, which write-protects
//! them again in the same walk (`PM_SCAN_WP_MATCHING`), so they are protected before the sender reads
//! them. The emulator's own writes are resolved the same way and cannot block.

use std::sync::Arc;

use super::{DirtyTracker, TrackerError, TrackerKind};
use crate::bitmap::PageBitmap;
use crate::pagemap::WrittenScanner;
use crate::ram::{GuestRam, PAGE_SHIFT};
use crate::uffd::{self, Uffd};

pub struct UffdWpAsyncTracker {
    ram: Arc<GuestRam>,
    running: Option<(Uffd, WrittenScanner)>,
}

impl UffdWpAsyncTracker {
    pub fn new(ram: Arc<GuestRam>) -> Self {
        UffdWpAsyncTracker { ram, running: None }
    }
}

impl DirtyTracker for UffdWpAsyncTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWpAsync
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        self.stop()?;
        let uffd = Uffd::open(uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED).map_err(|e| {
            TrackerError::Unavailable(format!(
                "uffd-wp-async needs userfaultfd WP_ASYNC and WP_UNPOPULATED (Linux 6.7): {}",
                crate::report(&e)
            ))
        })?;
        let scanner =
            WrittenScanner::new().map_err(|source| TrackerError::Io { what: "cannot open pagemap", source })?;
        let ranges = self.ram.host_ranges();
        let armed = uffd.register_wp_ranges(&ranges).and_then(|()| uffd.write_protect_ranges(&ranges, true));
        if let Err(e) = armed {
            let _ = uffd.release_ranges(&ranges);
            return Err(e.into());
        }
        self.running = Some((uffd, scanner));
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<(), TrackerError> {
        let Some((_, scanner)) = &mut self.running else { return Ok(()) };
        for (addr, len) in self.ram.host_ranges() {
            let ram = &self.ram;
            scanner
                .scan_and_protect(addr, len, |start, bytes| {
                    if let Some(first) = ram.page_of_host(start) {
                        for p in first..first + (bytes >> PAGE_SHIFT) as usize {
                            into.set(p);
                        }
                    }
                })
                .map_err(|source| TrackerError::Io { what: "PAGEMAP_SCAN failed", source })?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        let Some((uffd, _)) = self.running.take() else { return Ok(()) };
        uffd.release_ranges(&self.ram.host_ranges())?;
        Ok(())
    }
}

impl Drop for UffdWpAsyncTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
