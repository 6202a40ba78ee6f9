//! When precopy stops iterating and switches over. One pure function, tested on made-up inputs.

use std::time::Duration;

/// What the decision is made from.
#[derive(Clone, Copy, Debug)]
pub struct PassOutcome {
    /// Bytes of guest RAM dirty now (pages left to send x page size).
    pub remaining_bytes: u64,
    /// Bytes per second the stream has moved so far (0 if nothing was measured yet).
    pub throughput: f64,
    /// Passes completed after pass 0 (the full one).
    pub passes_done: u32,
    /// Pages the last pass sent (the dirty set it started from): with `remaining_bytes`, how much
    /// that pass shrank the dirty set.
    pub last_pass_pages: u64,
}

impl PassOutcome {
    /// Dirty pages left over pages the last pass sent: below 1 the pass shrank the dirty set.
    fn shrink(&self) -> Option<f64> {
        let left = self.remaining_bytes / crate::ram::PAGE_SIZE as u64;
        (self.last_pass_pages > 0).then(|| left as f64 / self.last_pass_pages as f64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Send another pass.
    Continue,
    /// Stop: nothing is dirty.
    NothingLeft,
    /// Stop: what is left fits in the downtime limit at the measured throughput.
    Converged,
    /// Stop although it does not fit: `max_passes` passes are done.
    MaxPasses,
    /// Stop although it does not fit: passes stopped paying ([`stalled`]) and the stall policy says
    /// to switch over rather than go on.
    Stalled,
}

impl Decision {
    pub fn stops(self) -> bool {
        self != Decision::Continue
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::Continue => "continue",
            Decision::NothingLeft => "nothing-left",
            Decision::Converged => "converged",
            Decision::MaxPasses => "max-passes",
            Decision::Stalled => "stalled",
        }
    }

    /// Whether what is left fit the downtime limit when precopy stopped.
    pub fn converged(self) -> bool {
        matches!(self, Decision::NothingLeft | Decision::Converged)
    }
}

/// A pass "pays" if it leaves at most this share of the dirty pages the previous one left: at 0.9
/// a guest still converges, slowly (22 passes per tenfold shrink); above it, more passes mostly
/// resend what the guest rewrites meanwhile.
pub const PAYING_SHRINK: f64 = 0.9;
/// Passes in a row that did not pay before precopy is called stalled (one can be bad luck: the guest
/// changed phase, or the host took the CPU away).
pub const STALL_PASSES: usize = 2;

/// Whether precopy has stopped paying: the last [`STALL_PASSES`] passes each left more than
/// [`PAYING_SHRINK`] of the dirty pages the pass before them left. `dirty_after[i]` is what was
/// dirty when pass i ended (pass 0, the full one, first). Returns why, in words, if so.
pub fn stalled(dirty_after: &[u64]) -> Option<String> {
    if dirty_after.len() < STALL_PASSES + 1 {
        return None;
    }
    let recent = &dirty_after[dirty_after.len() - STALL_PASSES - 1..];
    let paying = recent.windows(2).any(|w| (w[1] as f64) <= PAYING_SHRINK * w[0] as f64);
    if paying {
        return None;
    }
    let shown: Vec<String> = recent.iter().map(u64::to_string).collect();
    Some(format!(
        "the dirty set stopped shrinking: {} pages left after the last passes (the guest dirties memory about as fast as it is sent)",
        shown.join(" -> ")
    ))
}

/// Once the rest fits the downtime limit, another pass is still sent while the last one left at most
/// this share of what it sent: the pass costs about the expected downtime in total time, and takes
/// at least half of it off the downtime. Past that, a pass costs more total time than it saves
/// downtime, and a guest that rewrites its working set as fast as it is sent leaves about as much
/// behind each time.
pub const POLISH_SHRINK: f64 = 0.5;
/// ... and while the expected downtime is above this share of the limit (1/25: 2 ms of the default
/// 50 ms): below it, the pause is dominated by saving and sending the machine state (about 1 ms
/// here), not by RAM.
pub const POLISH_FLOOR: f64 = 1.0 / 25.0;

/// How long sending `remaining_bytes` would take at `throughput`; None without a measurement.
pub fn expected_downtime(remaining_bytes: u64, throughput: f64) -> Option<Duration> {
    (throughput > 0.0).then(|| Duration::from_secs_f64(remaining_bytes as f64 / throughput))
}

/// Decides whether precopy stops. The criteria, in order:
///
/// 1. Nothing is dirty: stop.
/// 2. `max_passes` passes after pass 0 are done: stop, even though the downtime may exceed the limit (a guest that
///    dirties memory faster than the link moves it never converges by itself).
/// 3. The dirty bytes, at the throughput measured so far, take at most `downtime_limit`: stop, unless
///    passes still pay for themselves: the last one left at most [`POLISH_SHRINK`] of what it sent and
///    the expected downtime is above [`POLISH_FLOOR`] of the limit. Then one more pass makes the pause
///    shorter by more than it makes the migration longer.
/// 4. Otherwise (also when nothing has been measured yet): another pass.
pub fn decide(outcome: PassOutcome, downtime_limit: Duration, max_passes: u32) -> Decision {
    if outcome.remaining_bytes == 0 {
        return Decision::NothingLeft;
    }
    if outcome.passes_done >= max_passes {
        return Decision::MaxPasses;
    }
    match expected_downtime(outcome.remaining_bytes, outcome.throughput) {
        Some(d) if d <= downtime_limit => {
            let paying = outcome.shrink().is_some_and(|r| r <= POLISH_SHRINK);
            if paying && d > downtime_limit.mul_f64(POLISH_FLOOR) {
                Decision::Continue
            } else {
                Decision::Converged
            }
        }
        _ => Decision::Continue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(50);
    const GBPS: f64 = 1e9;

    /// An outcome whose last pass sent as many pages as are left (no shrink: polishing does not apply).
    fn outcome(remaining_bytes: u64, throughput: f64, passes_done: u32) -> PassOutcome {
        PassOutcome { remaining_bytes, throughput, passes_done, last_pass_pages: remaining_bytes / 4096 }
    }

    #[test]
    fn keeps_passing_while_passes_halve_the_dirty_set() {
        let pages = |n: u64| n * 4096;
        // 10000 pages (41 MB, 41 ms at 1 GB/s) fit; the last pass sent 30000: it shrank to a third.
        let o =
            PassOutcome { remaining_bytes: pages(10_000), throughput: GBPS, passes_done: 3, last_pass_pages: 30_000 };
        assert_eq!(decide(o, LIMIT, 30), Decision::Continue);
        // It sent 15000 and 10000 are left: two thirds, the pass did not pay enough.
        assert_eq!(decide(PassOutcome { last_pass_pages: 15_000, ..o }, LIMIT, 30), Decision::Converged);
        // Exactly half still pays.
        assert_eq!(decide(PassOutcome { last_pass_pages: 20_000, ..o }, LIMIT, 30), Decision::Continue);
        // Under the floor (2 ms of 50: 488 pages at 1 GB/s) a pass is not worth it whatever it shrank.
        let small = PassOutcome { remaining_bytes: pages(400), last_pass_pages: 100_000, ..o };
        assert_eq!(decide(small, LIMIT, 30), Decision::Converged);
        // The pass limit still wins.
        assert_eq!(decide(PassOutcome { passes_done: 30, ..o }, LIMIT, 30), Decision::MaxPasses);
        // Pass 0 sent everything; what it left fits and is a small share: polish.
        let after_pass0 =
            PassOutcome { remaining_bytes: pages(6000), throughput: GBPS, passes_done: 0, last_pass_pages: 262_144 };
        assert_eq!(decide(after_pass0, LIMIT, 30), Decision::Continue);
    }

    #[test]
    fn stops_when_nothing_is_dirty() {
        assert_eq!(decide(outcome(0, 0.0, 1), LIMIT, 30), Decision::NothingLeft);
    }

    #[test]
    fn stops_when_remaining_fits_the_limit() {
        // 40 MB at 1 GB/s = 40 ms <= 50 ms
        assert_eq!(decide(outcome(40_000_000, GBPS, 1), LIMIT, 30), Decision::Converged);
        // 60 MB = 60 ms > 50 ms
        assert_eq!(decide(outcome(60_000_000, GBPS, 1), LIMIT, 30), Decision::Continue);
        assert_eq!(expected_downtime(60_000_000, GBPS), Some(Duration::from_millis(60)));
    }

    #[test]
    fn continues_without_a_measurement() {
        assert_eq!(decide(outcome(4096, 0.0, 1), LIMIT, 30), Decision::Continue);
        assert_eq!(expected_downtime(4096, 0.0), None);
    }

    #[test]
    fn a_shrinking_dirty_set_is_not_stalled() {
        assert_eq!(stalled(&[]), None);
        assert_eq!(stalled(&[1000, 1000]), None, "too few passes to tell");
        assert_eq!(stalled(&[1000, 800, 640, 512]), None);
        // One pass that did not pay is not yet a stall.
        assert_eq!(stalled(&[1000, 500, 495]), None);
        // Exactly at the threshold still pays.
        assert_eq!(stalled(&[1000, 900, 810]), None);
    }

    #[test]
    fn a_dirty_set_that_stops_shrinking_is_stalled() {
        let why = stalled(&[5000, 1000, 990, 1010]).expect("stalled");
        assert!(why.contains("1000 -> 990 -> 1010"), "{why}");
        assert!(stalled(&[1000, 2000, 4000]).is_some(), "growing");
        // It recovers as soon as one of the last passes pays again.
        assert_eq!(stalled(&[1000, 990, 1010, 500]), None);
    }

    #[test]
    fn max_passes_forces_the_switchover() {
        assert_eq!(decide(outcome(1 << 40, GBPS, 30), LIMIT, 30), Decision::MaxPasses);
        assert_eq!(decide(outcome(1 << 40, GBPS, 29), LIMIT, 30), Decision::Continue);
        assert!(Decision::MaxPasses.stops() && !Decision::Continue.stops());
    }
}
