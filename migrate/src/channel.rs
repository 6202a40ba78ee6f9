//! Channels: how a pass's pages are dealt to several connections, and the source's sending of one
//! channel's share of a pass (each channel in its own thread while a pass is sent).
//!
//! The rule is fixed and known to both sides: guest pages, numbered through the RAM regions, go in
//! runs of [`CHUNK_PAGES`] to channel 0, 1, ..., n - 1, 0, 1, ... A page therefore only ever
//! travels on one channel, in order, whatever pass it belongs to: the destination cannot apply an
//! older copy of a page over a newer one, and the destination's channel threads write disjoint
//! pages (each checks that a record lies in its own share, `owns`). Runs of 1 MiB spread a guest's
//! working set evenly over the channels and keep every PAGES record full.
//!
//! Cloud Hypervisor's `connections` and QEMU's multifd deal pages to whichever channel is free;
//! that balances better when one channel is slower, at the price of a per-pass barrier on the
//! destination (QEMU's multifd sync) to keep passes apart. On one host, with channels that are
//! alike, the fixed rule needs no barrier and no per-page bookkeeping.

use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::progress::ProgressCell;
use crate::ram::{is_zero_page, GuestRam, PAGE_SIZE};
use crate::sender::{Cancel, MigrationError};
use crate::stream::{Encoder, PageBatch, MAX_PAGES_PER_RECORD};
use crate::transport::Connection;

/// Pages in one run of the dealing rule: one full PAGES record.
pub const CHUNK_PAGES: usize = MAX_PAGES_PER_RECORD;

/// The channel that carries page `page` of a migration with `channels` channels.
pub fn owner(page: usize, channels: u32) -> u32 {
    ((page / CHUNK_PAGES) % channels.max(1) as usize) as u32
}

/// Whether pages `first..first + count` are all channel `index`'s (one run, for more than one
/// channel: runs of one channel are never adjacent).
pub fn owns(index: u32, channels: u32, first: usize, count: usize) -> bool {
    if channels <= 1 {
        return index == 0;
    }
    count > 0
        && first.checked_add(count - 1).is_some_and(|last| first / CHUNK_PAGES == last / CHUNK_PAGES)
        && owner(first, channels) == index
}

/// One channel's output: its stream, and the PAGES record and zero run it is gathering.
pub(crate) struct ChannelOut {
    pub enc: Encoder<BufWriter<Connection>>,
    batch: PageBatch,
    /// A run of zero pages not sent yet: (first gpa, count).
    zero_run: Option<(u64, u64)>,
}

impl ChannelOut {
    pub fn new(enc: Encoder<BufWriter<Connection>>) -> Self {
        ChannelOut { enc, batch: PageBatch::default(), zero_run: None }
    }
}

/// What every channel's thread shares while one pass is sent.
pub(crate) struct PassShared<'a> {
    pub ram: &'a GuestRam,
    pub pages: &'a PageBitmap,
    /// Pages known to be zero without reading them (pass 0).
    pub known_zero: Option<&'a PageBitmap>,
    pub channels: u32,
    pub progress: &'a ProgressCell,
    pub cancel: &'a Cancel,
    /// Bytes per second for all channels together; 0: no limit.
    pub max_bandwidth: u64,
    pub started: Instant,
    /// Stream bytes before this pass (all channels), and the throughput of the passes before it:
    /// for the running figures in `query-migrate`.
    pub bytes_before: u64,
    pub earlier: (u64, Duration),
    /// This pass so far, all channels together.
    pub bytes: AtomicU64,
    pub send_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    /// A channel failed: the others stop at their next record.
    pub failed: AtomicBool,
    /// Channels 1..n, to end them when one channel fails.
    pub page_channels: &'a [Connection],
    /// Set when the migration is to switch to postcopy: every channel ends its share at the next
    /// page (after flushing what it has gathered) and notes where in `stopped`.
    pub stop: Option<&'a AtomicBool>,
    /// (channel, first page of its share it did not send), for each channel that stopped early.
    pub stopped: Mutex<Vec<(u32, usize)>>,
}

impl<'a> PassShared<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ram: &'a GuestRam,
        pages: &'a PageBitmap,
        known_zero: Option<&'a PageBitmap>,
        channels: u32,
        progress: &'a ProgressCell,
        cancel: &'a Cancel,
        max_bandwidth: u64,
        bytes_before: u64,
        earlier: (u64, Duration),
        page_channels: &'a [Connection],
    ) -> Self {
        PassShared {
            ram,
            pages,
            known_zero,
            channels,
            progress,
            cancel,
            max_bandwidth,
            started: Instant::now(),
            bytes_before,
            earlier,
            bytes: AtomicU64::new(0),
            send_ns: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            page_channels,
            stop: None,
            stopped: Mutex::new(Vec::new()),
        }
    }

    /// The pages of `pages` no channel sent because the pass stopped early for postcopy.
    pub fn unsent(&self) -> PageBitmap {
        let mut left = PageBitmap::new(self.pages.len());
        for &(index, from) in self.stopped.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let rest = self.pages.ones_in_range(from, self.pages.len() - from);
            for page in rest.filter(|&p| self.channels <= 1 || owner(p, self.channels) == index) {
                left.set(page);
            }
        }
        left
    }

    /// Pages of channel `index`'s share, in order.
    fn share(&self, index: u32) -> Box<dyn Iterator<Item = usize> + '_> {
        if self.channels <= 1 {
            return Box::new(self.pages.iter_ones());
        }
        let len = self.pages.len();
        let step = self.channels as usize * CHUNK_PAGES;
        Box::new(
            (index as usize * CHUNK_PAGES..len)
                .step_by(step)
                .flat_map(move |first| self.pages.ones_in_range(first, CHUNK_PAGES.min(len - first))),
        )
    }

    /// Sends channel `index`'s share of pass `pass`, then its PASS_END, and flushes; returns the
    /// pages it sent. `peer` is the connection to watch for a refusal (channel 0's: the
    /// destination speaks on no other).
    pub fn send_share(
        &self,
        index: u32,
        pass: u32,
        out: &mut ChannelOut,
        peer: Option<&Connection>,
    ) -> Result<u64, MigrationError> {
        let r = self.send_share_inner(index, pass, out, peer);
        if r.is_err() && !self.failed.swap(true, Ordering::SeqCst) {
            // The page channels may be blocked in a write to a destination that is gone: end them
            // now rather than after the stall timeout. Channel 0 stays: the source still reads the
            // destination's reason on it, and sends ABORT.
            for c in self.page_channels {
                c.shutdown();
            }
        }
        r
    }

    fn send_share_inner(
        &self,
        index: u32,
        pass: u32,
        out: &mut ChannelOut,
        peer: Option<&Connection>,
    ) -> Result<u64, MigrationError> {
        let layout = self.ram.layout();
        let mut sent = 0u64;
        for page in self.share(index) {
            if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                self.stopped.lock().unwrap_or_else(|e| e.into_inner()).push((index, page));
                break;
            }
            let gpa = layout.gpa_of(page);
            sent += 1;
            if self.known_zero.is_some_and(|z| z.get(page)) {
                self.add_zero(out, gpa)?;
                continue;
            }
            if !out.batch.accepts(gpa) {
                self.flush_batch(out, peer)?;
            }
            let slot = out.batch.next_slot(gpa);
            self.ram.read_page(page, slot);
            if is_zero_page(slot) {
                self.add_zero(out, gpa)?;
            } else {
                out.batch.commit();
                if out.batch.len() == MAX_PAGES_PER_RECORD {
                    self.flush_batch(out, peer)?;
                }
            }
        }
        self.flush_batch(out, peer)?;
        self.flush_zero_run(out)?;
        let before = out.enc.bytes_written();
        out.enc.pass_end(pass, sent)?;
        // Let the destination work on this pass while the next is prepared, not at the switchover.
        out.enc.flush()?;
        self.bytes.fetch_add(out.enc.bytes_written() - before, Ordering::Relaxed);
        Ok(sent)
    }

    fn add_zero(&self, out: &mut ChannelOut, gpa: u64) -> Result<(), MigrationError> {
        match &mut out.zero_run {
            Some((first, count)) if *first + *count * PAGE_SIZE as u64 == gpa => *count += 1,
            _ => {
                self.flush_zero_run(out)?;
                out.zero_run = Some((gpa, 1));
            }
        }
        Ok(())
    }

    /// Sends the pending zero run, and counts it (once per run, not per page: an idle guest's pass
    /// 0 is a million zero pages).
    fn flush_zero_run(&self, out: &mut ChannelOut) -> Result<(), MigrationError> {
        if let Some((gpa, count)) = out.zero_run.take() {
            let before = out.enc.bytes_written();
            out.enc.zero_pages(gpa, count)?;
            self.bytes.fetch_add(out.enc.bytes_written() - before, Ordering::Relaxed);
            self.progress.update(|p| p.zero_pages += count);
        }
        Ok(())
    }

    fn flush_batch(&self, out: &mut ChannelOut, peer: Option<&Connection>) -> Result<(), MigrationError> {
        if out.batch.is_empty() {
            return Ok(());
        }
        self.cancel.check()?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(MigrationError::Send(std::io::Error::other("another channel failed")));
        }
        if let Some(conn) = peer {
            crate::sender::check_peer(conn)?;
        }
        let n = out.batch.len() as u64;
        let sending = Instant::now();
        let before = out.enc.bytes_written();
        out.enc.pages(&mut out.batch)?;
        self.send_ns.fetch_add(sending.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let pass_bytes = self.bytes.fetch_add(out.enc.bytes_written() - before, Ordering::Relaxed)
            + (out.enc.bytes_written() - before);
        // The running estimate includes the pass in flight, so progress shows a rate during pass 0.
        let (bytes, time) = (self.earlier.0 + pass_bytes, self.earlier.1 + self.started.elapsed());
        let rate = if time.is_zero() { 0.0 } else { bytes as f64 / time.as_secs_f64() };
        self.progress.update(|p| {
            p.normal_pages += n;
            p.bytes = self.bytes_before + pass_bytes;
            p.throughput = rate;
        });
        self.throttle_bandwidth(pass_bytes);
        Ok(())
    }

    /// Sleeps as long as this pass is ahead of `max_bandwidth` (all channels together).
    fn throttle_bandwidth(&self, pass_bytes: u64) {
        if self.max_bandwidth == 0 {
            return;
        }
        let due = Duration::from_secs_f64(pass_bytes as f64 / self.max_bandwidth as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
            self.wait_ns.fetch_add((due - elapsed).as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_dealt_in_runs_of_a_record() {
        assert_eq!(owner(0, 1), 0);
        assert_eq!(owner(1 << 20, 1), 0);
        assert_eq!(owner(255, 4), 0);
        assert_eq!(owner(256, 4), 1);
        assert_eq!(owner(3 * 256 + 7, 4), 3);
        assert_eq!(owner(4 * 256, 4), 0);
        assert!(owns(0, 1, 100, 1000), "one channel owns everything");
        assert!(!owns(1, 1, 0, 1));
        assert!(owns(1, 4, 256, 256));
        assert!(!owns(1, 4, 256, 257), "crosses into channel 2's run");
        assert!(!owns(1, 4, 255, 2), "starts in channel 0's run");
        assert!(!owns(2, 4, 256, 1));
        assert!(!owns(1, 4, 256, 0), "empty");
        assert!(!owns(0, 4, usize::MAX - 1, 4), "wraps");
    }
}
