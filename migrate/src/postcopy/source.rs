//! The source's side of postcopy: after GO, send every owed page, those the destination asks for
//! (PAGE_REQUEST) before the rest, until it says COMPLETE.
//!
//! A request moves the background cursor to just after the requested pages, as QEMU does: a guest
//! that faults on one page is likely to touch the next ones soon, and they are then on their way.
//!
//! On one connection, requests are read by a thread of their own and answered by the push at its
//! next record boundary, so the page asked for goes out behind everything already in the socket
//! buffers. With the urgent connection (postcopy-preempt, `stream.rs`) a second thread reads the
//! requests there and answers each at once on it, with the page asked for (even if the push sent
//! it already: it may still be queued on channel 0) and the next [`URGENT_NEIGHBOURS`] owed pages;
//! the push never writes there. The two threads share the owed pages under one lock, and a page
//! is struck from them when it is chosen, so that apart from a resent page asked for, every page
//! goes once.

use std::io::{BufReader, BufWriter, Write};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::PostcopyError;
use crate::bitmap::PageBitmap;
use crate::progress::{PostcopyStats, ProgressCell};
use crate::ram::{is_zero_page, GuestRam, RamLayout, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, PageBatch, Record, MAX_PAGES_PER_RECORD};
use crate::transport::Connection;

/// How long the source waits for COMPLETE once every owed page has gone out.
const COMPLETE_WAIT: Duration = Duration::from_secs(30);
/// Owed pages after the one asked for that go with it on the urgent connection: a vCPU that
/// faults on a page usually touches the next ones soon. 15 (64 KiB in all) keeps an answer
/// within a few tens of microseconds on the wire, so that the next request does not wait long
/// behind it.
pub const URGENT_NEIGHBOURS: usize = 15;

/// What the destination says during postcopy.
enum Heard {
    Request { gpa: u64, count: u64 },
    Complete,
    Refused(String),
    Broken(PostcopyError),
}

/// The owed pages of a postcopy phase, and the figures of sending them.
pub struct OwedPages {
    owed: PageBitmap,
    /// Pages of `owed` still set: kept as they are struck, since counting the bitmap is linear
    /// in guest RAM and the push asks for every record.
    unsent: usize,
    /// The next page the background push looks at.
    cursor: usize,
    pub stats: PostcopyStats,
    started: Instant,
}

impl OwedPages {
    pub fn new(owed: PageBitmap) -> Self {
        let unsent = owed.count();
        let n = unsent as u64;
        OwedPages {
            owed,
            unsent,
            cursor: 0,
            stats: PostcopyStats { owed_at_switchover: n, owed_left: n, ..PostcopyStats::default() },
            started: Instant::now(),
        }
    }

    /// After a reconnection: the destination's word on what it still lacks replaces ours (it may
    /// have lost records in flight when the link broke).
    pub fn replace(&mut self, owed: PageBitmap) {
        self.unsent = owed.count();
        self.stats.owed_left = self.unsent as u64;
        self.owed = owed;
        self.cursor = 0;
    }

    /// Pages not sent yet.
    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Postcopy from the guest's start on the destination until now.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A request for `count` pages at `gpa`: the pages to send for it, struck from the owed ones
    /// (and counted). On channel 0 only the owed ones among them (one sent already is ahead on
    /// the same stream); on the urgent connection all of them, and up to [`URGENT_NEIGHBOURS`]
    /// owed pages after them. The push goes on after them either way.
    fn take_request(
        &mut self,
        layout: &RamLayout,
        gpa: u64,
        count: u64,
        urgent: bool,
    ) -> Result<Vec<usize>, PostcopyError> {
        self.stats.requests += 1;
        let first = layout
            .page_of(gpa)
            .filter(|&f| count > 0 && layout.is_contiguous(f, count as usize))
            .ok_or_else(|| PostcopyError::Protocol(format!("a request for {count} pages at {gpa:#x}")))?;
        let n = count as usize;
        let mut pages: Vec<usize> =
            if urgent { (first..first + n).collect() } else { self.owed.ones_in_range(first, n).collect() };
        if urgent {
            let after = (first + n).min(self.owed.len());
            let window = (self.owed.len() - after).min(URGENT_NEIGHBOURS);
            pages.extend(self.owed.ones_in_range(after, window));
        }
        for &page in &pages {
            if self.owed.get(page) {
                self.owed.clear_bit(page);
                self.unsent -= 1;
                self.stats.pages_requested += 1;
            }
        }
        if urgent {
            self.stats.pages_urgent += pages.len() as u64;
        }
        self.cursor = pages.last().map_or(first + n, |&l| l + 1);
        Ok(pages)
    }

    /// The next record's worth of the background push, from the cursor on (wrapping), struck
    /// from the owed pages.
    fn take_next(&mut self) -> Vec<usize> {
        let total = self.owed.len();
        if self.cursor >= total {
            self.cursor = 0;
        }
        let next: Vec<usize> = self
            .owed
            .ones_in_range(self.cursor, total - self.cursor)
            .chain(self.owed.ones_in_range(0, self.cursor))
            .take(MAX_PAGES_PER_RECORD)
            .collect();
        for &page in &next {
            self.owed.clear_bit(page);
        }
        self.unsent -= next.len();
        self.stats.pages_pushed += next.len() as u64;
        if let Some(&last) = next.last() {
            self.cursor = last + 1;
        }
        next
    }
}

/// The urgent connection of a postcopy (postcopy-preempt): requests come in on it and the pages
/// asked for go out on it.
pub struct UrgentLink {
    pub conn: Connection,
    pub enc: Encoder<BufWriter<Connection>>,
}

/// Sends the owed pages on `enc` (whose connection is `conn`) until the destination says
/// COMPLETE, answering requests on `urgent` if there is one. Figures go to `progress` as they
/// change. Whatever happens, `urgent` is shut when this returns: a recovery makes a new one.
pub fn push(
    ram: &GuestRam,
    enc: &mut Encoder<BufWriter<Connection>>,
    conn: &Connection,
    urgent: Option<&mut UrgentLink>,
    owed: &mut OwedPages,
    progress: &ProgressCell,
    background_cap: u64,
) -> Result<(), PostcopyError> {
    let (tx, heard) = mpsc::channel();
    let reader = conn.try_clone().map_err(PostcopyError::Write)?;
    // A silent destination is normal here (it asks only when a vCPU faults): no read timeout.
    reader.set_read_timeout(None).map_err(PostcopyError::Write)?;
    let urgent_reader = match &urgent {
        Some(u) => {
            let r = u.conn.try_clone().map_err(PostcopyError::Write)?;
            r.set_read_timeout(None).map_err(PostcopyError::Write)?;
            Some(r)
        }
        None => None,
    };
    let requests = tx.clone();
    std::thread::Builder::new()
        .name("postcopy-requests".into())
        .spawn(move || read_requests(reader, requests))
        .map_err(PostcopyError::Write)?;
    let owed = Mutex::new(owed);
    std::thread::scope(|s| {
        let shut = match (urgent, urgent_reader) {
            (Some(UrgentLink { conn, enc: urgent_enc }), Some(reader)) => {
                let owed = &owed;
                let spawned = std::thread::Builder::new()
                    .name("postcopy-urgent".into())
                    .spawn_scoped(s, move || serve_urgent(ram, urgent_enc, reader, owed, tx));
                if let Err(e) = spawned {
                    conn.shutdown();
                    return Err(PostcopyError::Write(e));
                }
                Some(&*conn)
            }
            _ => None,
        };
        let result = push_background(ram, enc, &heard, &owed, progress, background_cap);
        // Ends the urgent thread (blocked reading the next request); COMPLETE or a broken link
        // ends this connection's use anyway.
        if let Some(c) = shut {
            c.shutdown();
        }
        result
    })
}

fn lock<'a, 'b>(owed: &'a Mutex<&'b mut OwedPages>) -> MutexGuard<'a, &'b mut OwedPages> {
    owed.lock().unwrap_or_else(|e| e.into_inner())
}

/// The background push on channel 0, and the requests heard there (all of them on one
/// connection; after a recovery, those the destination asks again for).
fn push_background(
    ram: &GuestRam,
    enc: &mut Encoder<BufWriter<Connection>>,
    heard: &mpsc::Receiver<Heard>,
    owed: &Mutex<&mut OwedPages>,
    progress: &ProgressCell,
    background_cap: u64,
) -> Result<(), PostcopyError> {
    let mut out = PageOut::default();
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
            let all_sent = {
                let o = lock(owed);
                o.unsent == 0 && o.stats.owed_left == 0
            };
            let h = if let Some(h) = early.take() {
                h
            } else if all_sent {
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
                    let mut o = lock(owed);
                    o.stats.switchover_to_complete = Some(o.elapsed());
                    if o.unsent > 0 {
                        log::warn!("postcopy: COMPLETE with {} pages not sent from here", o.unsent);
                    }
                    o.stats.owed_left = 0;
                    enc.flush().map_err(PostcopyError::Write)?;
                    report(progress, &o);
                    return Ok(());
                }
                Heard::Refused(why) => return Err(PostcopyError::Refused(why)),
                Heard::Broken(e) => return Err(e),
                Heard::Request { gpa, count } => {
                    let pages = lock(owed).take_request(&layout, gpa, count, false)?;
                    out.send_all(ram, enc, &pages)?;
                }
            }
        }
        // Then one record's worth of the rest.
        let next = lock(owed).take_next();
        let before = enc.bytes_written();
        for &page in &next {
            out.add(ram, enc, page)?;
        }
        pushed_bytes += enc.bytes_written() - before;
        let mut o = lock(owed);
        if o.unsent == 0 {
            drop(o);
            out.finish(enc)?;
            // Sent, not yet known to have arrived: `owed_left` reaches 0 with COMPLETE.
            lock(owed).stats.owed_left = 0;
            enc.flush().map_err(PostcopyError::Write)?;
            continue;
        }
        o.stats.owed_left = o.unsent as u64;
        if last_report.elapsed() > Duration::from_millis(50) {
            report(progress, &o);
            last_report = Instant::now();
        }
    }
}

/// The urgent connection's thread: each request read there is answered there at once. A broken
/// or wrong connection is told to the push (`tx`), which pauses the postcopy.
fn serve_urgent(
    ram: &GuestRam,
    enc: &mut Encoder<BufWriter<Connection>>,
    reader: Connection,
    owed: &Mutex<&mut OwedPages>,
    tx: mpsc::Sender<Heard>,
) {
    let layout = ram.layout().clone();
    let mut out = PageOut::default();
    let mut dec = Decoder::new(BufReader::new(reader));
    let on = |e: PostcopyError| Heard::Broken(PostcopyError::Urgent(Box::new(e)));
    loop {
        let (gpa, count) = match dec.next_record() {
            Ok(Record::PageRequest { gpa, count }) => (gpa, count),
            Ok(other) => {
                let _ = tx.send(on(PostcopyError::Protocol(format!("unexpected {other:?} on the urgent connection"))));
                return;
            }
            Err(e) => {
                let _ = tx.send(on(PostcopyError::Link(e)));
                return;
            }
        };
        let answered =
            lock(owed).take_request(&layout, gpa, count, true).and_then(|pages| out.send_all(ram, enc, &pages));
        if let Err(e) = answered {
            let _ = tx.send(on(e));
            return;
        }
    }
}

fn report(progress: &ProgressCell, owed: &OwedPages) {
    let stats = owed.stats.clone();
    progress.update(|p| p.postcopy = Some(stats));
}

/// One connection's PAGES record and run of zero pages being gathered.
struct PageOut {
    batch: PageBatch,
    zero_run: Option<(u64, u64)>,
    buf: Vec<u8>,
}

impl Default for PageOut {
    fn default() -> Self {
        PageOut { batch: PageBatch::default(), zero_run: None, buf: vec![0u8; PAGE_SIZE] }
    }
}

impl PageOut {
    /// Sends `pages` and everything gathered, and flushes: an answer to a request.
    fn send_all<W: Write>(
        &mut self,
        ram: &GuestRam,
        enc: &mut Encoder<W>,
        pages: &[usize],
    ) -> Result<(), PostcopyError> {
        for &page in pages {
            self.add(ram, enc, page)?;
        }
        self.finish(enc)?;
        enc.flush().map_err(PostcopyError::Write)
    }

    /// Adds page `page` to the record being built (zero pages to a zero run), sending what it
    /// completes.
    fn add<W: Write>(&mut self, ram: &GuestRam, enc: &mut Encoder<W>, page: usize) -> Result<(), PostcopyError> {
        let gpa = ram.layout().gpa_of(page);
        ram.read_page(page, &mut self.buf);
        if is_zero_page(&self.buf) {
            if !self.batch.is_empty() {
                enc.pages(&mut self.batch).map_err(PostcopyError::Write)?;
            }
            match &mut self.zero_run {
                // A run stays inside one region (two regions may touch in gpa).
                Some((first, n))
                    if *first + *n * PAGE_SIZE as u64 == gpa
                        && ram
                            .layout()
                            .page_of(*first)
                            .is_some_and(|f| ram.layout().is_contiguous(f, *n as usize + 1)) =>
                {
                    *n += 1
                }
                _ => {
                    if let Some((first, n)) = self.zero_run.take() {
                        enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
                    }
                    self.zero_run = Some((gpa, 1));
                }
            }
            return Ok(());
        }
        if let Some((first, n)) = self.zero_run.take() {
            enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
        }
        if !self.batch.accepts(gpa) {
            enc.pages(&mut self.batch).map_err(PostcopyError::Write)?;
        }
        self.batch.next_slot(gpa).copy_from_slice(&self.buf);
        self.batch.commit();
        if self.batch.len() == MAX_PAGES_PER_RECORD {
            enc.pages(&mut self.batch).map_err(PostcopyError::Write)?;
        }
        Ok(())
    }

    /// Sends what is gathered.
    fn finish<W: Write>(&mut self, enc: &mut Encoder<W>) -> Result<(), PostcopyError> {
        enc.pages(&mut self.batch).map_err(PostcopyError::Write)?;
        if let Some((first, n)) = self.zero_run.take() {
            enc.zero_pages(first, n).map_err(PostcopyError::Write)?;
        }
        Ok(())
    }
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
