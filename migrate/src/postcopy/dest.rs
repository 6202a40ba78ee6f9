//! The destination's side of postcopy: guest RAM registered with userfaultfd in missing mode over
//! the pages still owed, a fault thread that asks the source for each page a vCPU (or emu itself)
//! touches, and the placing of the pages that arrive.
//!
//! Who fills what, so that no page is ever filled twice or with the wrong data:
//! - an owed page is filled only by [`IncomingPostcopy::receive`] with the source's copy
//!   (UFFDIO_COPY, which also wakes whatever waits on it), and is struck from `owed` only after;
//! - a page that is not owed but missing was sent as zero during precopy and never touched here:
//!   the fault thread fills it with zeros (UFFDIO_ZEROPAGE) itself;
//! - a fault on a page filled meanwhile finds it present (EEXIST) and only wakes its waiter;
//! - with the urgent connection (postcopy-preempt) a page may come twice, asked for on it and
//!   pushed on channel 0: both are the source's one copy, the first UFFDIO_COPY places it and the
//!   second finds it present (EEXIST) and leaves it alone, so a page the guest has written since
//!   is never overwritten.
//!
//! Each connection has its reader thread; a reader whose connection breaks shuts the other one
//! too, so that both sides pause together and a recovery makes both again.
//!
//! A page record is checked (CRC) in a scratch buffer before it is copied into place, so a corrupt
//! record never reaches guest RAM: it ends the connection like a broken link, and a recovery asks
//! for the page again.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::PostcopyError;
use crate::bitmap::PageBitmap;
use crate::handover::{DestPhase, Handover};
use crate::progress::{Latency, PostcopyStats};
use crate::ram::{GuestRam, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, Record, RecordType, MAX_PAGES_PER_RECORD};
use crate::transport::{Connection, Listener, Uri};
use crate::uffd::{Filled, Uffd, UffdMsg, EVENT_PAGEFAULT};

/// Fault latencies kept for the percentiles (4 MiB); later ones count only in `max`.
const MAX_LATENCY_SAMPLES: usize = 1 << 20;
/// How often the fault thread looks up from an idle userfaultfd to see whether it should end.
const FAULT_POLL_MS: i32 = 100;
/// The urgent connection carries a few pages per request: a small buffer.
const URGENT_READ_BUFFER: usize = 64 << 10;

/// Where the destination's postcopy stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Prepared (pages forgotten, RAM registered), the guest not started yet.
    Prepared,
    /// The guest runs; pages arrive.
    Active,
    /// The link broke (or carried a corrupt record): vCPUs touching owed pages wait, nothing is
    /// lost, `migrate-recover` listens for the source again.
    Paused(String),
    /// Every page is here.
    Complete,
}

struct State {
    owed: PageBitmap,
    left: usize,
    /// Owed pages a fault asked for, and since when.
    waiting: HashMap<usize, Instant>,
    latencies: Vec<u32>,
    max_latency: u64,
    requests: u64,
    /// Owed pages that arrived with a fault waiting on them, and without.
    arrived_asked: u64,
    arrived_unasked: u64,
    /// Where COMPLETE goes, and PAGE_REQUEST without an urgent connection; none while the link
    /// is down.
    link: Option<Encoder<Connection>>,
    /// postcopy-preempt: where PAGE_REQUEST goes (its answers come back on it).
    urgent: Option<Encoder<Connection>>,
    /// Bumped by every recovery: a reader of an older connection that fails late must not pause
    /// the new one.
    generation: u32,
    /// Owed pages that arrived on the urgent connection.
    arrived_urgent: u64,
    /// COMPLETE went out.
    complete_told: bool,
    phase: Phase,
    started: Option<Instant>,
    complete_after: Option<Duration>,
    owed_at_switchover: u64,
    recoveries: u32,
}

/// An incoming guest that runs before all of its memory has arrived.
pub struct IncomingPostcopy {
    ram: Arc<GuestRam>,
    uffd: Uffd,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// An urgent connection was attached once: a page found present when placed is then expected.
    preempt: AtomicBool,
}

/// Which connection a reader thread serves.
#[derive(Clone, Copy)]
struct Lane {
    generation: u32,
    urgent: bool,
}

impl IncomingPostcopy {
    /// Readies guest RAM for a guest that runs while the pages of `owed` are still on their way:
    /// drops whatever those pages hold (an older copy from precopy), and registers all of RAM for
    /// missing-page faults. Called before READY; the guest has not run.
    pub fn prepare(ram: Arc<GuestRam>, owed: PageBitmap) -> Result<Arc<Self>, PostcopyError> {
        let t0 = Instant::now();
        for (start, len) in ram.host_ranges() {
            // Pages arrive 4 KiB at a time, and a huge page would have to arrive whole.
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(start as *mut libc::c_void, len as usize, libc::MADV_NOHUGEPAGE) };
        }
        for (start, len) in ram.host_runs(&owed) {
            // SAFETY: these pages of our own anonymous mapping are dropped (the guest has not run,
            // nothing else holds them); they read as missing from now on, as userfaultfd needs.
            if unsafe { libc::madvise(start as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) } != 0 {
                return Err(PostcopyError::Ram(std::io::Error::last_os_error()));
            }
        }
        let t1 = Instant::now();
        let uffd = Uffd::open(0)?;
        for (start, len) in ram.host_ranges() {
            uffd.register_missing(start, len)?;
        }
        let left = owed.count();
        // While the guest is paused: its downtime, worth seeing.
        log::info!(
            "postcopy prepared in {:?}: {left} owed pages dropped in {:?}, RAM registered in {:?}",
            t0.elapsed(),
            t1 - t0,
            t1.elapsed()
        );
        let state = State {
            owed,
            left,
            waiting: HashMap::new(),
            latencies: Vec::new(),
            max_latency: 0,
            requests: 0,
            arrived_asked: 0,
            arrived_unasked: 0,
            link: None,
            urgent: None,
            generation: 0,
            arrived_urgent: 0,
            complete_told: false,
            phase: Phase::Prepared,
            started: None,
            complete_after: None,
            owed_at_switchover: left as u64,
            recoveries: 0,
        };
        Ok(Arc::new(IncomingPostcopy {
            ram,
            uffd,
            state: Mutex::new(state),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            preempt: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest is about to run: start serving its faults, asking the source on `link`.
    pub fn start(self: &Arc<Self>, link: Encoder<Connection>) -> std::io::Result<JoinHandle<()>> {
        {
            let mut st = self.lock();
            // A source that missed STARTED may have resumed on a new connection already.
            if st.link.is_none() && st.recoveries == 0 {
                st.link = Some(link);
            }
            if st.phase == Phase::Prepared {
                st.phase = if st.left == 0 { Phase::Complete } else { Phase::Active };
            }
            st.started.get_or_insert_with(Instant::now);
        }
        if self.phase() == Phase::Complete {
            // Everything came before the link did (nothing owed, or the urgent reader was first).
            if let Err(e) = self.complete() {
                log::warn!("postcopy: cannot say COMPLETE: {}", crate::report(&e));
            }
        }
        let me = self.clone();
        std::thread::Builder::new().name("postcopy-faults".into()).spawn(move || me.serve_faults())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    /// Waits until every page is here, or `timeout`; returns whether it is.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |s| s.phase != Phase::Complete)
            .unwrap_or_else(|e| e.into_inner());
        g.phase == Phase::Complete
    }

    pub fn stats(&self) -> PostcopyStats {
        let st = self.lock();
        let mut samples = st.latencies.clone();
        let latency = Latency::of(&mut samples).map(|l| Latency { max: l.max.max(st.max_latency), ..l });
        PostcopyStats {
            owed_at_switchover: st.owed_at_switchover,
            owed_left: st.left as u64,
            requests: st.requests,
            pages_requested: st.arrived_asked,
            pages_pushed: st.arrived_unasked,
            pages_urgent: st.arrived_urgent,
            switchover_to_complete: st.complete_after,
            latency_us: latency,
            recoveries: st.recoveries,
            paused_reason: match &st.phase {
                Phase::Paused(why) => Some(why.clone()),
                _ => None,
            },
        }
    }

    fn serve_faults(&self) {
        let mut msgs = [UffdMsg::default(); 64];
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd { fd: self.uffd_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, FAULT_POLL_MS) } <= 0 {
                continue;
            }
            let n = match self.uffd.read_events(&mut msgs) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("postcopy: {}", crate::report(&e));
                    std::thread::sleep(Duration::from_millis(FAULT_POLL_MS as u64));
                    continue;
                }
            };
            for m in &msgs[..n] {
                if m.event == EVENT_PAGEFAULT {
                    self.fault(m.address);
                }
            }
        }
    }

    fn uffd_fd(&self) -> i32 {
        use std::os::fd::AsFd;
        self.uffd.as_fd().as_raw_fd()
    }

    /// A thread touched a missing page: zero it if it is not owed, else ask the source for it
    /// (once; the thread waits until it arrives).
    fn fault(&self, address: u64) {
        let Some(page) = self.ram.page_of_host(address) else {
            log::error!("postcopy: a fault at {address:#x}, outside guest RAM");
            return;
        };
        let at = address & !(PAGE_SIZE as u64 - 1);
        let mut st = self.lock();
        if !st.owed.get(page) {
            drop(st);
            match self.uffd.zeropage(at, PAGE_SIZE as u64) {
                Ok(Filled::All) => {}
                Ok(Filled::Exists { .. }) => {
                    // Filled since the fault was raised: its waiter may still sleep.
                    if let Err(e) = self.uffd.wake(at, PAGE_SIZE as u64) {
                        log::error!("postcopy: {}", crate::report(&e));
                    }
                }
                Err(e) => log::error!("postcopy: {}", crate::report(&e)),
            }
            return;
        }
        if st.waiting.contains_key(&page) {
            return;
        }
        st.waiting.insert(page, Instant::now());
        st.requests += 1;
        let gpa = self.ram.layout().gpa_of(page);
        let st = &mut *st;
        let (link, urgent) = match (st.urgent.as_mut(), st.link.as_mut()) {
            (Some(u), _) => (u, true),
            (None, Some(l)) => (l, false),
            (None, None) => return,
        };
        if let Err(e) = link.page_request(gpa, 1).and_then(|_| link.flush()) {
            // The reading side notices the broken link too (shut here, in case it is only
            // half-broken); the request goes out again on the next connection (every waiting page
            // is asked for then).
            log::warn!("postcopy: cannot ask for page {gpa:#x}: {e}");
            link.get_mut().shutdown();
            if urgent {
                st.urgent = None;
            } else {
                st.link = None;
            }
        }
    }

    /// Places the pages that arrive on `dec` until none is owed; then says COMPLETE. Returns an
    /// error when the connection breaks or carries something wrong: the guest keeps waiting for
    /// its missing pages, and [`IncomingPostcopy::resume`] goes on over a new connection.
    pub fn receive<R: Read>(&self, dec: &mut Decoder<R>) -> Result<(), PostcopyError> {
        let generation = self.lock().generation;
        self.receive_on(dec, Lane { generation, urgent: false })
    }

    fn receive_on<R: Read>(&self, dec: &mut Decoder<R>, lane: Lane) -> Result<(), PostcopyError> {
        let result = self.receive_inner(dec, lane);
        if let Err(e) = &result {
            let on = if lane.urgent { "the urgent connection: " } else { "" };
            self.lost(&format!("{on}{}", crate::report(e)), lane.generation);
        }
        result
    }

    /// postcopy-preempt: `conn` is the urgent connection, where requests go from now on and the
    /// pages asked for come back, read by a thread of its own.
    pub fn attach_urgent(self: &Arc<Self>, conn: Connection) -> Result<(), PostcopyError> {
        // Quiet for as long as no vCPU faults: no read timeout (channel 0's reader notices a
        // source that is gone, and shuts this one).
        conn.set_read_timeout(None).map_err(PostcopyError::Write)?;
        let reader = conn.try_clone().map_err(PostcopyError::Write)?;
        let lane = {
            let mut st = self.lock();
            st.urgent = Some(Encoder::new(conn));
            Lane { generation: st.generation, urgent: true }
        };
        self.preempt.store(true, Ordering::Relaxed);
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn(move || {
                let mut dec = Decoder::new(std::io::BufReader::with_capacity(URGENT_READ_BUFFER, reader));
                let _ = me.receive_on(&mut dec, lane);
            })
            .map_err(PostcopyError::Write)?;
        Ok(())
    }

    /// The link broke (or carried something wrong): the guest keeps waiting for its missing pages
    /// until [`IncomingPostcopy::resume`].
    pub fn link_lost(&self, why: &str) {
        let generation = self.lock().generation;
        self.lost(why, generation);
    }

    /// One of the connections of recovery `generation` broke: both are shut (the source then
    /// notices on either), and postcopy pauses until a recovery.
    fn lost(&self, why: &str, generation: u32) {
        let mut st = self.lock();
        if st.generation != generation || st.phase == Phase::Complete {
            return;
        }
        for mut link in [st.link.take(), st.urgent.take()].into_iter().flatten() {
            link.get_mut().shutdown();
        }
        // The first reason is the one that says what happened; the other reader's is its echo.
        if !matches!(st.phase, Phase::Paused(_)) {
            log::warn!("postcopy paused: {why}; {} pages still owed", st.left);
            st.phase = Phase::Paused(why.to_string());
        }
        self.changed.notify_all();
    }

    fn receive_inner<R: Read>(&self, dec: &mut Decoder<R>, lane: Lane) -> Result<(), PostcopyError> {
        let layout = self.ram.layout().clone();
        let mut scratch = vec![0u8; MAX_PAGES_PER_RECORD * PAGE_SIZE];
        let range = |gpa: u64, count: u64| {
            layout
                .page_of(gpa)
                .filter(|&first| count > 0 && layout.is_contiguous(first, count as usize))
                .ok_or_else(|| PostcopyError::Protocol(format!("{count} pages at {gpa:#x} are not guest RAM")))
        };
        loop {
            if self.lock().left == 0 {
                return self.complete();
            }
            let frame = dec.next_frame().map_err(PostcopyError::Link)?;
            match frame.kind {
                RecordType::Pages | RecordType::PagesCompressed => {
                    let mut first = 0;
                    let read = dec.read_pages(&frame, |gpa, count| {
                        first = range(gpa, count as u64)?;
                        Ok::<_, PostcopyError>(&mut scratch[..count * PAGE_SIZE])
                    });
                    let (_, count) = read.map_err(PostcopyError::Link)??;
                    self.place(first, count, Some(&scratch), lane.urgent)?;
                }
                RecordType::ZeroPages => {
                    let (gpa, count) = match dec.read_record(&frame).map_err(PostcopyError::Link)? {
                        Record::ZeroPages { gpa, count } => (gpa, count),
                        _ => unreachable!("a ZERO_PAGES frame decodes to one"),
                    };
                    let first = range(gpa, count)?;
                    self.place(first, count as usize, None, lane.urgent)?;
                }
                kind => return Err(PostcopyError::Protocol(format!("unexpected {} in postcopy", kind.name()))),
            }
        }
    }

    /// Fills the owed pages among `first..first + count` with `data` (the record's pages, in
    /// order) or zeros, and strikes them from `owed`. Pages not owed (sent twice: asked for and
    /// pushed) are left alone.
    fn place(&self, first: usize, count: usize, data: Option<&[u8]>, urgent: bool) -> Result<(), PostcopyError> {
        let runs: Vec<(usize, usize)> = {
            let st = self.lock();
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for p in st.owed.ones_in_range(first, count) {
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == p => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
            runs
        };
        for (p, n) in runs {
            let mut done = 0;
            while done < n {
                let page = p + done;
                let at = self.ram.page_host_addr(page) as u64;
                let len = ((n - done) * PAGE_SIZE) as u64;
                let filled = match data {
                    Some(d) => {
                        let src = d[(page - first) * PAGE_SIZE..].as_ptr();
                        // SAFETY: `src` has `len` bytes of the record's pages after it (the run
                        // lies inside the record); `at` is registered guest RAM.
                        unsafe { self.uffd.copy(at, src, len) }?
                    }
                    None => self.uffd.zeropage(at, len)?,
                };
                match filled {
                    Filled::All => done = n,
                    // Present already: placed meanwhile by the other connection's reader (the
                    // same copy), or, with one connection, a bug here. Never overwrite it, say so
                    // if it is a bug, and go on after it.
                    Filled::Exists { filled } => {
                        let skipped = done + filled as usize / PAGE_SIZE;
                        if self.preempt.load(Ordering::Relaxed) {
                            log::debug!("postcopy: owed page {} came on both connections", p + skipped);
                        } else {
                            log::error!("postcopy: owed page {} was present already", p + skipped);
                        }
                        let _ = self.uffd.wake(at, len);
                        done = skipped + 1;
                    }
                }
            }
            self.arrived(p, n, urgent);
        }
        Ok(())
    }

    fn arrived(&self, first: usize, count: usize, urgent: bool) {
        let mut st = self.lock();
        let now = Instant::now();
        for page in first..first + count {
            if !st.owed.get(page) {
                continue;
            }
            st.owed.clear_bit(page);
            st.left -= 1;
            st.arrived_urgent += u64::from(urgent);
            let Some(since) = st.waiting.remove(&page) else {
                st.arrived_unasked += 1;
                continue;
            };
            st.arrived_asked += 1;
            let us = now.duration_since(since).as_micros() as u64;
            st.max_latency = st.max_latency.max(us);
            if st.latencies.len() < MAX_LATENCY_SAMPLES {
                st.latencies.push(us.min(u64::from(u32::MAX)) as u32);
            }
        }
    }

    /// Every page is here: tell the source, and stop catching faults.
    fn complete(&self) -> Result<(), PostcopyError> {
        let told = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.phase != Phase::Complete || st.complete_after.is_none() {
                st.complete_after = st.started.map(|s| s.elapsed());
            }
            st.phase = Phase::Complete;
            // Both readers get here once the last page is in, the urgent one possibly before the
            // guest starts (and channel 0's link is there): COMPLETE goes once, on the first link.
            match (st.link.as_mut(), st.complete_told) {
                (Some(link), false) => {
                    let r = link.complete().and_then(|_| link.flush());
                    st.complete_told = r.is_ok();
                    r
                }
                _ => Ok(()),
            }
        };
        if !self.stop.swap(true, Ordering::AcqRel) {
            for (start, len) in self.ram.host_ranges() {
                if let Err(e) = self.uffd.unregister(start, len) {
                    log::error!("postcopy: {}", crate::report(&e));
                }
            }
        }
        self.changed.notify_all();
        // A source that misses COMPLETE reconnects (RESUME) and hears that nothing is owed.
        told.map_err(PostcopyError::Write)
    }

    /// A source reconnected after a broken link (RESUME read from `conn`): tells it what is still
    /// owed, asks again for every page a fault waits on, and goes on receiving.
    pub fn resume(&self, conn: &Connection) -> Result<(), PostcopyError> {
        let mut link = Encoder::new(conn.try_clone().map_err(PostcopyError::Write)?);
        {
            let mut st = self.lock();
            link.owed(&st.owed).map_err(PostcopyError::Write)?;
            link.resumed(st.left as u64).map_err(PostcopyError::Write)?;
            let layout = self.ram.layout();
            for &page in st.waiting.keys() {
                link.page_request(layout.gpa_of(page), 1).map_err(PostcopyError::Write)?;
            }
            link.flush().map_err(PostcopyError::Write)?;
            // Whatever is left of the old connections goes; their readers' late failures are
            // theirs (an older generation), not the new link's.
            for mut old in [st.link.replace(link), st.urgent.take()].into_iter().flatten() {
                old.get_mut().shutdown();
            }
            st.generation += 1;
            st.recoveries += 1;
            st.started.get_or_insert_with(Instant::now);
            if st.phase != Phase::Complete {
                st.phase = Phase::Active;
            }
        }
        self.changed.notify_all();
        let reader = conn.try_clone().map_err(PostcopyError::Write)?;
        let mut dec = Decoder::new(std::io::BufReader::with_capacity(256 << 10, reader));
        self.receive(&mut dec)
    }
}

impl Drop for IncomingPostcopy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// `migrate-recover`: listens at `uri` for the source of a paused postcopy to come back (RESUME
/// naming this migration), and goes on with it in a thread of its own. Returns the address it
/// listens at. A source that never heard STARTED may come back this way too: RESUME then counts
/// as the GO it sent. A RESUME that says an urgent connection follows (postcopy-preempt) is
/// followed on the same address by one that opens with CHANNEL index 0; without it (not within
/// [`URGENT_WAIT`]) postcopy goes on, requests and pages on the one connection.
pub fn listen_for_resume(handover: Arc<Handover>, uri: &Uri) -> Result<Uri, PostcopyError> {
    let Some(pc) = handover.postcopy().cloned() else {
        return Err(PostcopyError::Protocol("no postcopy here to recover".into()));
    };
    if pc.phase() == Phase::Complete {
        return Err(PostcopyError::Protocol("the postcopy is complete: nothing to recover".into()));
    }
    let listener = Listener::bind(uri).map_err(PostcopyError::Write)?;
    let local = listener.local_uri().map_err(PostcopyError::Write)?;
    std::thread::Builder::new()
        .name("postcopy-recover".into())
        .spawn(move || {
            let Some((conn, urgent)) = accept_screened(&listener, None, |c| screen_resume(c, &handover)) else {
                return;
            };
            // The main connection's reader in a thread of its own: this one may still take the
            // urgent connection.
            let main = pc.clone();
            let spawned = std::thread::Builder::new().name("postcopy-resumed".into()).spawn(move || {
                if let Err(e) = main.resume(&conn) {
                    log::warn!("postcopy recovery: {}", crate::report(&e));
                }
            });
            if let Err(e) = spawned {
                log::error!("postcopy recovery: {e}");
                return;
            }
            if !urgent {
                return;
            }
            let deadline = Some(Instant::now() + URGENT_WAIT);
            match accept_screened(&listener, deadline, |c| screen_urgent(c, &handover)) {
                Some((conn, ())) => {
                    if let Err(e) = pc.attach_urgent(conn) {
                        log::warn!("postcopy recovery: the urgent connection: {}", crate::report(&e));
                    }
                }
                None => log::warn!("postcopy recovery: no urgent connection came; going on without it"),
            }
        })
        .map_err(PostcopyError::Write)?;
    Ok(local)
}

/// How long a recovery connection has for its TLS handshake (as for its first records).
const RESUME_SCREEN: Duration = Duration::from_secs(5);
/// How long after RESUME the urgent connection may take to come.
pub const URGENT_WAIT: Duration = Duration::from_secs(10);

/// The next connection at `listener` that `screen` takes (until `deadline`, if any): secured
/// first if the destination has TLS credentials (it recovers over TLS only, as it was migrated);
/// one screened out is told why and closed.
fn accept_screened<T>(
    listener: &Listener,
    deadline: Option<Instant>,
    screen: impl Fn(&Connection) -> Result<T, String>,
) -> Option<(Connection, T)> {
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let conn = match listener.accept_timeout(Duration::from_secs(1)) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                log::error!("postcopy recovery: accepting: {e}");
                return None;
            }
        };
        let conn = match listener.tls() {
            None => conn,
            Some(config) => match crate::transport::secure_incoming(conn, &config, Instant::now() + RESUME_SCREEN) {
                crate::transport::Secured::Tls(c) => c,
                _ => {
                    log::warn!("postcopy recovery: refused a connection that is not TLS");
                    continue;
                }
            },
        };
        match screen(&conn) {
            Ok(t) => return Some((conn, t)),
            Err(why) => {
                log::warn!("postcopy recovery: refused a connection: {why}");
                let _ = Encoder::new(&conn).error(&why);
                conn.shutdown();
            }
        }
    }
}

/// The first records of a recovery connection: preamble, then RESUME for this migration.
/// Returns whether an urgent connection follows.
fn screen_resume(conn: &Connection, handover: &Handover) -> Result<bool, String> {
    let (id, urgent) = match first_record(conn)? {
        Record::Resume { migration_id, urgent } => (migration_id, urgent),
        other => return Err(format!("expected RESUME, got {other:?}")),
    };
    if handover.migration_id() != Some(id) {
        return Err(format!("RESUME for migration {id:#x}, which is not the one here"));
    }
    if matches!(handover.phase(), DestPhase::Ready | DestPhase::Unresolved(_)) && !handover.go("RESUME") {
        return Err("the guest was discarded here".into());
    }
    conn.set_read_timeout(Some(crate::transport::STALL_TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(urgent)
}

/// The urgent connection of a recovery: preamble, then CHANNEL index 0 for this migration.
fn screen_urgent(conn: &Connection, handover: &Handover) -> Result<(), String> {
    match first_record(conn)? {
        Record::Channel { migration_id, index: 0 } if handover.migration_id() == Some(migration_id) => Ok(()),
        other => Err(format!("expected this migration's urgent connection (CHANNEL 0), got {other:?}")),
    }
}

/// A recovery connection's preamble and first record, read within [`RESUME_SCREEN`].
fn first_record(conn: &Connection) -> Result<Record<'static>, String> {
    conn.set_read_timeout(Some(RESUME_SCREEN)).map_err(|e| e.to_string())?;
    let mut dec = Decoder::new(conn);
    dec.preamble().map_err(|e| crate::report(&e))?;
    match dec.next_record() {
        Ok(Record::Resume { migration_id, urgent }) => Ok(Record::Resume { migration_id, urgent }),
        Ok(Record::Channel { migration_id, index }) => Ok(Record::Channel { migration_id, index }),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(crate::report(&e)),
    }
}
