//! The source's side of postcopy: after GO, send every owed page, those the destination asks for
//! (PAGE_REQUEST) before the rest, until it says COMPLETE.
//!
//! A request moves the background cursor to just after the requested pages, as QEMU does: a guest
//! that faults on one page is likely to touch the next ones soon, and they are then on their way.
//! Requests are read by a thread of their own, so that one arriving while a background record is
//! being written is served at the next record boundary (one record, 1 MiB at most, later).

use std::io::{BufReader, BufWriter};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::PostcopyError;
use crate::bitmap::PageBitmap;
use crate::progress::{PostcopyStats, ProgressCell};
use crate::ram::{is_zero_page, GuestRam, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, PageBatch, Record, MAX_PAGES_PER_RECORD};
use crate::transport::Connection;

/// How long the source waits for COMPLETE once every owed page has gone out.
const COMPLETE_WAIT: Duration = Duration::from_secs(30);

/// What the destination says during postcopy.
enum Heard {
    Request { gpa: u64, count: u64 },
    Complete,
    Refused(String),
    Broken(PostcopyError),
}

/// The owed pages of a postcopy phase, and the figures of sending them.
pub struct OwedPages {
    pub owed: PageBitmap,
    /// The next page the background push looks at.
    cursor: usize,
    pub stats: PostcopyStats,
    started: Instant,
}

impl OwedPages {
    pub fn new(owed: PageBitmap) -> Self {
        let n = owed.count() as u64;
        OwedPages {
            owed,
            cursor: 0,
            stats: PostcopyStats { owed_at_switchover: n, owed_left: n, ..PostcopyStats::default() },
            started: Instant::now(),
        }
    }

    /// After a reconnection: the destination's word on what it still lacks replaces ours (it may
    /// have lost records in flight when the link broke).
    pub fn replace(&mut self, owed: PageBitmap) {
        self.stats.owed_left = owed.count() as u64;
        self.owed = owed;
        self.cursor = 0;
    }

    /// Postcopy from the guest's start on the destination until now.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Sends the owed pages on `enc` (whose connection is `conn`) until the destination says
/// COMPLETE. Figures go to `progress` as they change.
pub fn push(
    ram: &GuestRam,
    enc: &mut Encoder<BufWriter<Connection>>,
    conn: &Connection,
    owed: &mut OwedPages,
    progress: &ProgressCell,
    background_cap: u64,
) -> Result<(), PostcopyError> {
    let (tx, heard) = mpsc::channel();
    let reader = conn.try_clone().map_err(PostcopyError::Write)?;
    // A silent destination is normal here (it asks only when a vCPU faults): no read timeout.
    reader.set_read_timeout(None).map_err(PostcopyError::Write)?;
    std::thread::Builder::new()
        .name("postcopy-requests".into())
        .spawn(move || read_requests(reader, tx))
        .map_err(PostcopyError::Write)?;
    let mut batch = PageBatch::default();
    let mut zero_run: Option<(u64, u64)> = None;
    let mut buf = vec![0u8; PAGE_SIZE];
    let layout = ram.layout().clone();
    let mut last_report = Instant::now();
    // `max-postcopy-bandwidth`: the background push keeps to it; asked-for pages never wait.
    let (paced_from, mut pushed_bytes) = (Instant::now(), 0u64);
    let mut early: Option<Heard> = None;
    loop {
        if background_cap > 0 && early.is_none() {
            let due = Duration::from_secs_f64(pushed_bytes as f64 / background_cap as f64);
            if let Some(wait) = due.checked_sub(paced_from.elapsed()) {
                enc.flush().map_err(PostcopyError::Write)?;
                early = heard.recv_timeout(wait).ok();
            }
        }
        // Requests first, each answered at once.
        loop {
            let h = if let Some(h) = early.take() {
                h
            } else if owed.owed.count() == 0 && owed.stats.owed_left == 0 {
                enc.flush().map_err(PostcopyError::Write)?;
                match heard.recv_timeout(COMPLETE_WAIT) {
                    Ok(h) => h,
                    Err(_) => {
                        return Err(PostcopyError::Protocol(format!(
                            "every page sent, but no COMPLETE within {}s",
                            COMPLETE_WAIT.as_secs()
                        )))
                    }
                }
            } else {
                match heard.try_recv() {
                    Ok(h) => h,
                    Err(_) => break,
                }
            };
            match h {
                Heard::Complete => {
                    owed.stats.switchover_to_complete = Some(owed.elapsed());
                    if owed.owed.count() > 0 {
                        log::warn!("postcopy: COMPLETE with {} pages not sent from here", owed.owed.count());
                    }
                    owed.stats.owed_left = 0;
                    enc.flush().map_err(PostcopyError::Write)?;
                    report(progress, owed);
                    return Ok(());
                }
                Heard::Refused(why) => return Err(PostcopyError::Refused(why)),
                Heard::Broken(e) => return Err(e),
                Heard::Request { gpa, count } => {
                    owed.stats.requests += 1;
                    let first = layout
                        .page_of(gpa)
                        .filter(|&f| count > 0 && layout.is_contiguous(f, count as usize))
                        .ok_or_else(|| {
                        PostcopyError::Protocol(format!("a request for {count} pages at {gpa:#x}"))
                    })?;
                    let n = count as usize;
                    let wanted: Vec<usize> = owed.owed.ones_in_range(first, n).collect();
                    for page in wanted {
                        send_page(ram, enc, &mut batch, &mut zero_run, &mut buf, page)?;
                        owed.owed.clear_bit(page);
                        owed.stats.pages_requested += 1;
                    }
                    flush(enc, &mut batch, &mut zero_run)?;
                    enc.flush().map_err(PostcopyError::Write)?;
                    owed.cursor = first + n;
                }
            }
        }
        // Then one record's worth of the rest.
        let total = owed.owed.len();
        if owed.cursor >= total {
            owed.cursor = 0;
        }
        let next: Vec<usize> = owed
            .owed
            .ones_in_range(owed.cursor, total - owed.cursor)
            .chain(owed.owed.ones_in_range(0, owed.cursor))
            .take(MAX_PAGES_PER_RECORD)
            .collect();
        let before = enc.bytes_written();
        for &page in &next {
            send_page(ram, enc, &mut batch, &mut zero_run, &mut buf, page)?;
            owed.owed.clear_bit(page);
            owed.stats.pages_pushed += 1;
        }
        pushed_bytes += enc.bytes_written() - before;
        if let Some(&last) = next.last() {
            owed.cursor = last + 1;
        }
        if owed.owed.count() == 0 {
            flush(enc, &mut batch, &mut zero_run)?;
            // Sent, not yet known to have arrived: `owed_left` reaches 0 with COMPLETE.
            owed.stats.owed_left = 0;
            enc.flush().map_err(PostcopyError::Write)?;
            continue;
        }
        owed.stats.owed_left = owed.owed.count() as u64;
        if last_report.elapsed() > Duration::from_millis(50) {
            report(progress, owed);
            last_report = Instant::now();
        }
    }
}

fn report(progress: &ProgressCell, owed: &OwedPages) {
    let stats = owed.stats.clone();
    progress.update(|p| p.postcopy = Some(stats));
}

/// Adds page `page` to the record being built (zero pages to a zero run), sending what it
/// completes.
fn send_page(
    ram: &GuestRam,
    enc: &mut Encoder<BufWriter<Connection>>,
    batch: &mut PageBatch,
    zero_run: &mut Option<(u64, u64)>,
    buf: &mut [u8],
    page: usize,
) -> Result<(), PostcopyError> {
    let gpa = ram.layout().gpa_of(page);
    ram.read_page(page, buf);
    if is_zero_page(buf) {
        if !batch.is_empty() {
            enc.pages(batch).map_err(PostcopyError::Write)?;
        }
        match zero_run {
            // A run stays inside one region (two regions may touch in gpa).
            Some((first, n))
                if *first + *n * PAGE_SIZE as u64 == gpa
                    && ram.layout().page_of(*first).is_some_and(|f| ram.layout().is_contiguous(f, *n as usize + 1)) =>
            {
                *n += 1
            }
            _ => {
                if let Some((first, n)) = zero_run.take() {
                    enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
                }
                *zero_run = Some((gpa, 1));
            }
        }
        return Ok(());
    }
    if let Some((first, n)) = zero_run.take() {
        enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
    }
    if !batch.accepts(gpa) {
        enc.pages(batch).map_err(PostcopyError::Write)?;
    }
    batch.next_slot(gpa).copy_from_slice(buf);
    batch.commit();
    if batch.len() == MAX_PAGES_PER_RECORD {
        enc.pages(batch).map_err(PostcopyError::Write)?;
    }
    Ok(())
}

fn flush(
    enc: &mut Encoder<BufWriter<Connection>>,
    batch: &mut PageBatch,
    zero_run: &mut Option<(u64, u64)>,
) -> Result<(), PostcopyError> {
    enc.pages(batch).map_err(PostcopyError::Write)?;
    if let Some((first, n)) = zero_run.take() {
        enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
    }
    Ok(())
}

fn read_requests(conn: Connection, tx: mpsc::Sender<Heard>) {
    let mut dec = Decoder::new(BufReader::new(conn));
    loop {
        let h = match dec.next_record() {
            Ok(Record::PageRequest { gpa, count }) => Heard::Request { gpa, count },
            Ok(Record::Complete) => Heard::Complete,
            Ok(Record::Error(why)) => Heard::Refused(why.to_string()),
            Ok(other) => Heard::Broken(PostcopyError::Protocol(format!("unexpected {other:?} during postcopy"))),
            Err(e) => Heard::Broken(PostcopyError::Link(e)),
        };
        let last = !matches!(h, Heard::Request { .. });
        if tx.send(h).is_err() || last {
            return;
        }
    }
}

/// How the operator steers an outgoing migration's postcopy from another thread:
/// `migrate-start-postcopy`, and `migrate {"resume": true}` after a broken link.
#[derive(Default)]
pub struct PostcopyControl {
    requested: std::sync::atomic::AtomicBool,
    resume: std::sync::Mutex<Option<crate::transport::Uri>>,
    resumed: std::sync::Condvar,
}

impl PostcopyControl {
    /// Switch to postcopy at the next record boundary of the pass in flight.
    pub fn start(&self) {
        self.requested.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The flag the pass's channel threads watch.
    pub(crate) fn flag(&self) -> &std::sync::atomic::AtomicBool {
        &self.requested
    }

    /// Reconnect a paused postcopy to `uri` (where the destination listens again).
    pub fn resume(&self, uri: crate::transport::Uri) {
        *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = Some(uri);
        self.resumed.notify_all();
    }

    /// Waits for [`PostcopyControl::resume`].
    pub(crate) fn wait_resume(&self) -> crate::transport::Uri {
        let mut g = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(uri) = g.take() {
                return uri;
            }
            g = self.resumed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}
