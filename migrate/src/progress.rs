//! What a running (or finished) outgoing migration reports: `query-migrate` and the benchmarks
//! read it.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::tracker::TrackerKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Connecting, starting the tracker.
    Setup,
    /// Precopy passes while the guest runs.
    Active,
    /// Guest paused: final pages and device state.
    Device,
    Completed,
    Failed,
    Cancelled,
    /// GO went out but STARTED did not come back: the guest is paused here and may or may not run
    /// on the destination, until the destination answers or the operator decides.
    Unresolved,
    /// Postcopy: the guest runs on the destination, which still lacks some pages; this side sends
    /// them (those it asks for first) and keeps the guest's memory until it has them all.
    PostcopyActive,
    /// Postcopy with the link broken: both sides keep what they have; `migrate {"resume": true}`
    /// reconnects to a destination that listens again (`migrate-recover`).
    PostcopyPaused,
    /// Postcopy reconnecting after a broken link.
    PostcopyRecover,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Unresolved => "unresolved",
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused => "postcopy-paused",
            Status::PostcopyRecover => "postcopy-recover",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The guest runs on the destination but its memory is not all there yet: this side must
    /// not quit (it holds the rest) and the guest must never run here again.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Status::PostcopyActive | Status::PostcopyPaused | Status::PostcopyRecover)
    }
}

/// Where the downtime went, step by step.
#[derive(Clone, Debug, Default)]
pub struct SwitchoverTimes {
    /// Stopping every vCPU.
    pub pause: Duration,
    /// Taking the last dirty set and sending those pages.
    pub last_pass: Duration,
    /// Saving vCPU, VM and device state.
    pub save_state: Duration,
    /// Sending the state, and the destination restoring it until its READY arrives.
    pub send_state_and_ready: Duration,
    /// GO out, STARTED back: the round trip that makes sure only one side runs the guest. The
    /// destination resumes the guest when GO arrives, half-way through it.
    pub go_and_started: Duration,
}

/// One pass of precopy.
#[derive(Clone, Debug)]
pub struct PassRecord {
    pub pass: u32,
    /// Pages sent in the pass (normal and zero).
    pub pages: u64,
    pub bytes: u64,
    pub duration: Duration,
    /// Of `duration`: handing PAGES records to the socket (the link, and the destination taking
    /// them), and sleeping to keep within `max-bandwidth`. The rest is reading the pages and finding
    /// the zero ones: where a pass's time goes, for deciding what to make faster.
    pub send: Duration,
    pub bandwidth_wait: Duration,
    /// Dirty pages found when the pass ended (what the next pass, or the switchover, must send).
    pub dirty_after: u64,
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub status: Status,
    pub tracker: TrackerKind,
    pub started: Instant,
    pub ram_bytes: u64,
    /// The pass being sent (0 = the first, full one).
    pub pass: u32,
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub dirty_pages: u64,
    /// Pages dirtied per second, measured between the last two collections.
    pub dirty_rate: f64,
    /// Stream bytes per second over the passes so far.
    pub throughput: f64,
    pub expected_downtime: Option<Duration>,
    pub setup_time: Option<Duration>,
    pub total_time: Option<Duration>,
    /// From pausing the source to the destination's STARTED (sent as it resumes the guest).
    pub downtime: Option<Duration>,
    /// Why it failed; while unresolved, why and what has been tried.
    pub error: Option<String>,
    /// How an unresolved migration was resolved.
    pub resolution: Option<String>,
    pub passes: Vec<PassRecord>,
    /// Why precopy stopped iterating (once it has): "nothing-left", "converged", "max-passes" or
    /// "stalled".
    pub stop_reason: Option<&'static str>,
    /// Whether what was left fit the downtime limit when precopy stopped.
    pub converged: Option<bool>,
    /// Whether the passes still pay (the dirty set shrinks); `None` before there are enough.
    pub converging: Option<bool>,
    /// Why they stopped paying, once they did.
    pub stall_reason: Option<String>,
    /// Auto-converge: percent of vCPU time taken away now (0: none).
    pub throttle_percent: u8,
    /// Newly dirtied pages per second the tracker holds the guest to now (0: no limit).
    pub dirty_rate_limit: u64,
    /// Compression (`compress`), all channels together, as of the last pass.
    pub compression: Option<(crate::compress::Codec, crate::compress::CompressStats)>,
    pub switchover: Option<SwitchoverTimes>,
    /// Postcopy, once the migration switched to it.
    pub postcopy: Option<PostcopyStats>,
    /// Pages not sent because the destination held them already (its base checkpoint).
    pub base_skipped: u64,
}

/// A postcopy phase, as either side sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyStats {
    /// Pages the destination lacked when the guest moved to it.
    pub owed_at_switchover: u64,
    /// Of them, not yet arrived (destination) or not yet sent (source).
    pub owed_left: u64,
    /// PAGE_REQUEST records: a destination vCPU (or emu itself) touched a page it lacked.
    pub requests: u64,
    /// Pages sent because they were asked for, and in the background (source).
    pub pages_requested: u64,
    pub pages_pushed: u64,
    /// Pages sent (source) or owed pages that arrived (destination) on the urgent connection
    /// (postcopy-preempt); the source counts a page asked for that it sends again.
    pub pages_urgent: u64,
    /// From the guest's start on the destination to the last page's arrival.
    pub switchover_to_complete: Option<Duration>,
    /// Destination: how long a faulting page took to arrive, from the fault being read to the
    /// page in place (microseconds).
    pub latency_us: Option<Latency>,
    /// Times the link broke and was recovered.
    pub recoveries: u32,
    /// Why the link is down, while it is.
    pub paused_reason: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    /// Of samples in any order (sorted here).
    pub fn of(samples: &mut [u32]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| u64::from(samples[((samples.len() - 1) as f64 * q).round() as usize]);
        Some(Latency { samples: samples.len() as u64, p50: at(0.5), p99: at(0.99), max: at(1.0) })
    }
}

impl Progress {
    pub fn new(tracker: TrackerKind, ram_bytes: u64) -> Self {
        Progress {
            status: Status::Setup,
            tracker,
            started: Instant::now(),
            ram_bytes,
            pass: 0,
            bytes: 0,
            normal_pages: 0,
            zero_pages: 0,
            dirty_pages: 0,
            dirty_rate: 0.0,
            throughput: 0.0,
            expected_downtime: None,
            setup_time: None,
            total_time: None,
            downtime: None,
            error: None,
            resolution: None,
            passes: Vec::new(),
            stop_reason: None,
            converged: None,
            converging: None,
            stall_reason: None,
            throttle_percent: 0,
            dirty_rate_limit: 0,
            compression: None,
            switchover: None,
            postcopy: None,
            base_skipped: 0,
        }
    }
}

/// What a destination has received so far, for `query-migrate` there: written by the receiver as
/// records arrive, read by the monitor at any time (relaxed atomics: each is a counter on its own).
#[derive(Debug, Default)]
pub struct IncomingCounters {
    /// Stream bytes read, from the preamble on.
    pub bytes: AtomicU64,
    /// Guest RAM the header declared.
    pub ram_total: AtomicU64,
    /// Pages that arrived with data, and as zero markers (resends counted each time, like the
    /// source's `normal` and `duplicate`).
    pub normal_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    /// Passes the source has ended (PASS_END records).
    pub passes: AtomicU64,
}

/// What an observer of a migration hears: each change of status, and each pass completed (the
/// count so far, which `query-migrate` calls `dirty-sync-count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Status(Status),
    PassesDone(usize),
}

/// Told of [`Change`]s as they happen, in the updating thread (so it must be quick and must not
/// read the progress itself: the lock is held).
pub type Observer = Box<dyn Fn(Change) + Send + Sync>;

/// Progress shared between the migration thread and its readers.
pub struct ProgressCell(Mutex<Progress>, Option<Observer>);

impl ProgressCell {
    pub fn new(p: Progress) -> Self {
        ProgressCell(Mutex::new(p), None)
    }

    /// A cell whose changes `observer` hears about, starting with the status it starts in.
    pub fn observed(p: Progress, observer: Observer) -> Self {
        observer(Change::Status(p.status));
        ProgressCell(Mutex::new(p), Some(observer))
    }

    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (status, passes) = (p.status, p.passes.len());
        f(&mut p);
        if let Some(observe) = &self.1 {
            if p.passes.len() != passes {
                observe(Change::PassesDone(p.passes.len()));
            }
            if p.status != status {
                observe(Change::Status(p.status));
            }
        }
    }

    pub fn snapshot(&self) -> Progress {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_observer_hears_each_status_change_and_each_pass_once() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let cell = ProgressCell::observed(
            Progress::new(TrackerKind::UffdWp, 1 << 20),
            Box::new(move |c| h.lock().unwrap().push(c)),
        );
        let pass = |n| PassRecord {
            pass: n,
            pages: 1,
            bytes: 1,
            duration: Duration::ZERO,
            send: Duration::ZERO,
            bandwidth_wait: Duration::ZERO,
            dirty_after: 0,
        };
        cell.update(|p| p.status = Status::Active);
        cell.update(|p| p.bytes += 10); // neither
        cell.update(|p| p.passes.push(pass(0)));
        cell.update(|p| p.status = Status::Active); // no change
        cell.update(|p| {
            p.passes.push(pass(1));
            p.status = Status::Completed;
        });
        assert_eq!(
            *heard.lock().unwrap(),
            vec![
                Change::Status(Status::Setup),
                Change::Status(Status::Active),
                Change::PassesDone(1),
                Change::PassesDone(2),
                Change::Status(Status::Completed)
            ]
        );
    }
}
