//! Precopy without KVM: the sender (`sender::start`) migrates a fake source VM over `unix:` to
//! the real destination (`IncomingServer` + `receiver::receive`) or to a hand-written one that
//! records every pass. The guest is played by a scripted tracker (it writes the pages it reports)
//! and a thread writing through `GuestRam::write` (recorded by the VMM dirty log).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_same_ram, fake_destination, fill, flat_ram, initial, join, machine_state, params, pattern, read_page,
    real_destination, scripted, split_layout, AfterGo, AtEnd, FakeSource, Fill, Initial, Script, SrcEvent, TempDir,
    Writer, WAIT,
};
use migrate::handover::{Decision, DestPhase};
use migrate::progress::{Progress, Status};
use migrate::ram::PAGE_SIZE;
use migrate::sender;
use migrate::tracker::TrackerKind;
use migrate::vm::RestorableVm;

/// The checks every completed migration must pass, whatever its passes were.
fn assert_completed(p: &Progress) {
    assert_eq!(p.status, Status::Completed, "{p:?}");
    assert_eq!(p.error, None);
    assert!(p.downtime.is_some() && p.switchover.is_some() && p.total_time.is_some() && p.setup_time.is_some());
    assert!(p.bytes > 0);
    assert_eq!(p.dirty_pages, 0, "nothing is left dirty once completed");
    for (i, pass) in p.passes.iter().enumerate() {
        assert_eq!(pass.pass as usize, i, "passes are recorded in order: {:?}", p.passes);
    }
}

/// A whole migration: RAM with untouched, zero-written and data pages in two regions; a guest
/// that writes pages (the tracker reports them: some become data, some zero) and, while the guest
/// runs, a device thread that writes through GuestRam::write all along. At the end: RAM equal page
/// for page, the state the source saved is what the destination restored, the source went pause
/// -> completed, and the destination runs the guest only if it ran on the source. (The paused
/// variant keeps the scripted writes: what it adds is that the run state travels.)
///
/// With `channels` > 1 the pages travel on that many connections; with `slow_channels`, those
/// after the first go through a proxy that holds every chunk of bytes back a while, so that the
/// destination applies channel 0's later passes before the other channels' earlier ones.
fn whole_migration(guest_running: bool, channels: u32, slow_channels: bool) {
    whole_migration_with(guest_running, channels, slow_channels, migrate::compress::Codec::None)
}

fn whole_migration_with(guest_running: bool, channels: u32, slow_channels: bool, codec: migrate::compress::Codec) {
    let dir = TempDir::new("whole");
    let uri = dir.uri("dst.sock");
    let _proxy;
    let source_uri = if slow_channels {
        let proxy = SlowProxy::start(dir.path("proxy.sock"), dir.path("dst.sock"));
        let uri = proxy.uri();
        _proxy = proxy;
        uri
    } else {
        uri.clone()
    };
    let src_ram = common::ram(split_layout());
    let pages = src_ram.page_count();
    assert_eq!(pages, 768);
    fill(&src_ram);
    let last_low = 511; // the last page of the first region; 512 is the first of the second
    let script = Script {
        rounds: vec![
            vec![(1, Fill::Data), (2, Fill::Data), (600, Fill::Data)],
            vec![(2, Fill::Zero), (10, Fill::Data), (512, Fill::Data), (last_low, Fill::Data)],
            vec![(5, Fill::Data), (767, Fill::Data)],
            vec![(1, Fill::Data)],
            vec![(600, Fill::Zero)],
            // The final collect, guest paused: an untouched page gets data, a zeroed one data again.
            vec![(3, Fill::Data), (2, Fill::Data)],
        ],
        ..Script::default()
    };
    let (trackers, tracker_log) = scripted(&src_ram, script);
    let state = machine_state(2);
    let mut src = FakeSource::new(src_ram.clone(), state.clone(), guest_running);
    let mut device_writes = None;
    if guest_running {
        let writer = Writer::start(src_ram.clone(), 300..308);
        device_writes = Some(writer.writes());
        src = src.with_writer(writer);
    }
    let src = Arc::new(src);
    let destination = real_destination(&uri);
    // Never converges by the downtime rule (a limit of 0), so exactly 3 passes follow pass 0.
    let params = params(|p| {
        p.downtime_limit = Duration::ZERO;
        p.max_passes = 3;
        p.channels = channels;
        p.compress = codec;
        if codec != migrate::compress::Codec::None {
            // A link slow enough for compressing to pay (3 MiB of RAM: about 0.1 s).
            p.max_bandwidth = 32 << 20;
        }
    });
    let outgoing = sender::start(src.clone(), source_uri, params, trackers).expect("start the migration");
    let cancel = outgoing.cancel.clone();
    let progress = join(outgoing);
    let arrived = destination.recv_timeout(WAIT).expect("the destination did not finish").expect("destination");

    assert_completed(&progress);
    assert_eq!(progress.tracker, TrackerKind::UffdWp);
    assert_eq!(progress.stop_reason, Some("max-passes"));
    // Pass 0, passes 1-3, the final pass.
    assert_eq!(progress.passes.len(), 5, "{:?}", progress.passes);
    assert_eq!(progress.passes[0].pages, pages as u64, "pass 0 sends every page");
    assert!(progress.normal_pages > 0 && progress.zero_pages > 0);
    assert!(!cancel.cancel(), "a completed migration cannot be cancelled");

    let log = common::lock(&tracker_log).clone();
    assert_eq!(log.built, vec![TrackerKind::UffdWp], "the tracker the parameters ask for");
    assert_eq!((log.starts, log.finals, log.stops), (1, 1, 1), "{log:?}");
    // Collects after passes 0-3, one more after SYNC, and the final one.
    assert_eq!(log.collects, 6, "{log:?}");

    let expect_events = vec![SrcEvent::Paused { was_running: guest_running }, SrcEvent::Saved, SrcEvent::Completed];
    assert_eq!(src.events(), expect_events, "the source is paused, then completed: never failed or resumed");
    assert!(!src.is_running(), "the source stays paused after the migration");
    if let Some(writes) = device_writes {
        assert!(writes.load(std::sync::atomic::Ordering::SeqCst) > 0, "the device thread wrote during precopy");
    }

    assert_eq!(arrived.decision, Decision::Run { guest_was_running: guest_running });
    assert_eq!(arrived.handover.phase(), DestPhase::Taken { by: "GO" });
    assert!(arrived.source_informed, "the source said DONE");
    assert_eq!(arrived.header.vcpu_count, 2);
    assert_eq!(arrived.header.channels, channels);
    assert_eq!(arrived.header.regions, split_layout().regions());
    assert_eq!(arrived.passes, 5, "the destination saw the same passes");
    assert_eq!(arrived.vm.restored(), vec![state], "restored once, with exactly the state the source saved");

    assert_same_ram(&src_ram, arrived.vm.ram());
    if codec != migrate::compress::Codec::None {
        let (c, stats) = progress.compression.expect("compression is reported");
        assert_eq!(c, codec);
        assert!(stats.pages > 0 && stats.compressed_bytes < stats.raw_bytes, "{stats:?}");
    }
    // And the pages the guest changed hold what it wrote last (so the comparison is not of two
    // copies of the first pass).
    let dst = arrived.vm.ram();
    assert_eq!(read_page(dst, 2), pattern(2, 6));
    assert_eq!(read_page(dst, 3), pattern(3, 6));
    assert_eq!(read_page(dst, 600), vec![0u8; PAGE_SIZE]);
    assert_eq!(read_page(dst, 512), pattern(512, 2));
    assert_eq!(read_page(dst, 1), pattern(1, 4));
    assert_eq!(initial(17), Initial::Untouched);
    assert_eq!(read_page(dst, 17), vec![0u8; PAGE_SIZE], "an untouched page arrives as zero");
    assert_eq!(read_page(dst, 4), pattern(4, 0), "a page never rewritten keeps pass 0's contents");
}

#[test]
fn a_running_guest_migrates_whole_and_runs_on_the_destination() {
    whole_migration(true, sender::DEFAULT_CHANNELS, false);
}

#[test]
fn a_paused_guest_migrates_whole_and_stays_paused_on_the_destination() {
    whole_migration(false, 1, false);
}

#[test]
fn a_running_guest_migrates_whole_compressed() {
    for codec in [migrate::compress::Codec::Lz4, migrate::compress::Codec::Zstd] {
        whole_migration_with(true, 2, false, codec);
    }
}

// 768 pages are three runs of 256: with four channels one of them carries no page at all and must
// still end each pass.
#[test]
fn a_running_guest_migrates_whole_over_four_channels() {
    whole_migration(true, 4, false);
}

// Channels 1 and 2 lag behind channel 0 by whole passes at the destination; pages rewritten in every
// pass still arrive with their last contents (a page only travels on its own channel).
#[test]
fn slow_channels_never_let_an_older_copy_of_a_page_win() {
    whole_migration(true, 3, true);
}

/// A unix-socket proxy: the first connection through it passes straight, every later one is held
/// back 2 ms per chunk of at most 64 KiB, source to destination.
struct SlowProxy {
    path: std::path::PathBuf,
}

impl SlowProxy {
    fn start(path: std::path::PathBuf, to: std::path::PathBuf) -> SlowProxy {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let listener = UnixListener::bind(&path).expect("bind the proxy");
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(from) = conn else { return };
                let Ok(dst) = UnixStream::connect(&to) else { return };
                let (mut from_r, mut dst_w) = (from.try_clone().expect("clone"), dst.try_clone().expect("clone"));
                let (mut dst_r, mut from_w) = (dst, from);
                let slow = n > 0;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(k) = from_r.read(&mut buf) {
                        if k == 0 || dst_w.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        if slow {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                    let _ = dst_w.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut dst_r, &mut from_w);
                    let _ = from_w.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        SlowProxy { path }
    }

    fn uri(&self) -> migrate::transport::Uri {
        migrate::transport::Uri::Unix(self.path.clone())
    }
}

/// A source on one flat region of `pages`, filled, migrating to a recording fake destination.
struct Run {
    progress: Progress,
    seen: common::Seen,
    log: common::TrackerLog,
    src: Arc<FakeSource>,
}

fn run(pages: usize, script: Script, downtime_limit: Duration, max_passes: u32) -> Run {
    run_with(pages, script, |p| {
        p.downtime_limit = downtime_limit;
        p.max_passes = max_passes;
    })
}

/// [`run`], with the parameters as `set` leaves them.
fn run_with(pages: usize, script: Script, set: impl FnOnce(&mut sender::MigrationParams)) -> Run {
    let dir = TempDir::new("passes");
    let ram = flat_ram(pages);
    fill(&ram);
    let (trackers, log) = scripted(&ram, script);
    let src = Arc::new(FakeSource::new(ram, machine_state(1), true));
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Ready(AfterGo::Started));
    let progress = join(sender::start(src.clone(), uri, params(set), trackers).expect("start the migration"));
    let (seen, _) = fake.join().expect("the fake destination panicked");
    assert_eq!(seen.stopped, None, "the fake destination stopped reading: {seen:?}");
    assert_completed(&progress);
    assert!(seen.got_go && seen.after_end == ["DONE"], "{seen:?}");
    assert_eq!(src.events(), vec![SrcEvent::Paused { was_running: true }, SrcEvent::Saved, SrcEvent::Completed]);
    // What the sender reports of each pass is what went over the wire.
    assert_eq!(progress.passes.len(), seen.passes.len());
    for (p, s) in progress.passes.iter().zip(&seen.passes) {
        assert_eq!((p.pass, p.pages), (s.pass, s.declared));
        assert_eq!(s.declared as usize, s.data.len() + s.zero.len(), "PASS_END counts the pages of its pass");
    }
    let log = common::lock(&log).clone();
    Run { progress, seen, log, src }
}

fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// Data pages of `pages` pages as [`fill`] leaves them.
fn data_pages(pages: usize) -> usize {
    (0..pages).filter(|&p| initial(p) == Initial::Data).count()
}

/// A guest that keeps dirtying the same 64 pages never fits a downtime limit of 0: the passes stop
/// at `max_passes`, and every pass re-sends all 64 with what they held when it read them.
#[test]
fn max_passes_bounds_a_guest_that_never_converges() {
    let hot: Vec<usize> = (0..64).map(|i| i * 3).collect();
    let script =
        Script { rounds: vec![hot.iter().map(|&p| (p, Fill::Data)).collect()], repeat_last: true, ..Script::default() };
    let r = run(512, script, Duration::ZERO, 4);
    assert_eq!(r.progress.stop_reason, Some("max-passes"));
    // Pass 0, passes 1-4, then the final pass 5.
    assert_eq!(r.seen.passes.iter().map(|p| p.pass).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(r.seen.passes[0].pages(), (0..512).collect::<Vec<_>>());
    // Collect n writes generation n and pass n sends it, before collect n + 1 writes again; the
    // final pass follows collects 5 and 6 (after SYNC) and the final collect 7.
    for (n, pass) in r.seen.passes.iter().enumerate().skip(1) {
        let generation = if n == 5 { 7 } else { n as u32 };
        assert_eq!(pass.pages(), hot, "pass {n} re-sends the hot pages, and only them");
        for &(page, sum) in &pass.data {
            assert_eq!(sum, crc(&pattern(page, generation)), "pass {n} page {page}: not what it held when read");
        }
    }
    assert_eq!(r.seen.syncs, 1);
    assert_eq!((r.log.collects, r.log.finals), (7, 1));
    assert_eq!(r.progress.normal_pages, (data_pages(512) + 5 * 64) as u64);
    assert_eq!(r.progress.zero_pages, (512 - data_pages(512)) as u64);
}

/// Pages reported dirty by collect n are sent in pass n, with their contents at that time; a page
/// that became zero goes as a zero marker.
#[test]
fn pages_dirtied_before_each_pass_are_sent_in_it() {
    let script = Script {
        rounds: vec![
            vec![(1, Fill::Data), (2, Fill::Data), (3, Fill::Data)],
            vec![(100, Fill::Data)],
            vec![(2, Fill::Data), (200, Fill::Data), (201, Fill::Data)],
            vec![],
            vec![(50, Fill::Zero), (2, Fill::Data)],
        ],
        ..Script::default()
    };
    let r = run(256, script, Duration::ZERO, 2);
    assert_eq!(r.progress.stop_reason, Some("max-passes"));
    let passes = &r.seen.passes;
    assert_eq!(passes.len(), 4, "{passes:?}");
    let data = |n: usize| passes[n].data.clone();
    assert_eq!(data(1), vec![(1, crc(&pattern(1, 1))), (2, crc(&pattern(2, 1))), (3, crc(&pattern(3, 1)))]);
    assert_eq!(data(2), vec![(100, crc(&pattern(100, 2)))]);
    // The final pass: collect 3 (after pass 2), collect 4 (after SYNC: nothing), the final collect.
    assert_eq!(data(3), vec![(2, crc(&pattern(2, 5))), (200, crc(&pattern(200, 3))), (201, crc(&pattern(201, 3)))]);
    assert_eq!(passes[3].zero, vec![50], "a page the guest zeroed goes as a zero marker");
    assert!(passes[1].zero.is_empty() && passes[2].zero.is_empty());
}

/// A guest that writes nothing: precopy stops right after pass 0 ("nothing-left"), and the final
/// pass is empty.
#[test]
fn an_idle_guest_stops_after_pass_0() {
    let r = run(256, Script::default(), Duration::from_millis(50), 30);
    assert_eq!(r.progress.stop_reason, Some("nothing-left"));
    assert_eq!(r.seen.passes.len(), 2);
    assert_eq!(r.seen.passes[0].pages(), (0..256).collect::<Vec<_>>());
    assert_eq!((r.seen.passes[1].pass, r.seen.passes[1].declared), (1, 0));
    // One collect after pass 0, one after SYNC, the final one.
    assert_eq!((r.log.collects, r.log.finals), (3, 1));
    assert_eq!(r.seen.syncs, 1);
    // Zero pages go as markers, never as data.
    let zero: Vec<usize> = (0..256).filter(|&p| initial(p) != Initial::Data).collect();
    let mut seen_zero = r.seen.passes[0].zero.clone();
    seen_zero.sort_unstable();
    assert_eq!(seen_zero, zero);
}

/// A few dirty pages fit the downtime limit at the throughput pass 0 measured: precopy stops
/// ("converged") and the switchover sends them.
#[test]
fn a_few_dirty_pages_converge() {
    let script = Script { rounds: vec![vec![(7, Fill::Data)]], ..Script::default() };
    let r = run(256, script, Duration::from_secs(1), 30);
    assert_eq!(r.progress.stop_reason, Some("converged"));
    assert_eq!(r.seen.passes.len(), 2);
    assert_eq!(r.seen.passes[1].data, vec![(7, crc(&pattern(7, 1)))], "the switchover sends what was left");
    assert!(r.src.events().contains(&SrcEvent::Completed));
}

/// A guest that rewrites the same 64 of 512 pages before every collect: its dirty set never
/// shrinks, and a downtime limit of 0 is never met.
fn hot_pages_script() -> Script {
    let hot = (0..64).map(|i| (i * 3, Fill::Data)).collect();
    Script { rounds: vec![hot], repeat_last: true, ..Script::default() }
}

/// Stall policy `switchover`: once two passes in a row have not paid, precopy stops there (over
/// the limit) instead of passing on until max-passes.
#[test]
fn a_stalled_migration_switches_over_when_the_policy_says_so() {
    let r = run_with(512, hot_pages_script(), |p| {
        p.downtime_limit = Duration::ZERO;
        p.max_passes = 30;
        p.stall_policy = sender::StallPolicy::Switchover;
    });
    assert_eq!(r.progress.stop_reason, Some("stalled"));
    assert_eq!((r.progress.converged, r.progress.converging), (Some(false), Some(false)));
    let why = r.progress.stall_reason.clone().unwrap_or_default();
    assert!(why.contains("64 -> 64 -> 64"), "{why}");
    // Passes 0, 1 and 2 (after which the stall shows), then the final one.
    assert_eq!(r.seen.passes.iter().map(|p| p.pass).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert!(r.src.throttles().is_empty(), "no throttling under this policy");
}

/// Stall policy `throttle` (the default): auto-converge in QEMU's steps, one step per two passes
/// that did not pay, until max-passes here (the scripted guest ignores the throttle); the guest
/// runs at full speed again afterwards.
#[test]
fn auto_converge_throttles_in_growing_steps() {
    let r = run_with(512, hot_pages_script(), |p| {
        p.downtime_limit = Duration::ZERO;
        p.max_passes = 8;
    });
    assert_eq!(r.progress.stop_reason, Some("max-passes"));
    assert_eq!(r.src.throttles(), vec![20, 30, 40, 0], "steps after passes 2, 4 and 6, and off at the end");
    assert_eq!(r.progress.throttle_percent, 40);
    assert_eq!(r.progress.converging, Some(false));
}

/// Stall policy `fail`: the migration gives up with the reason, and the guest, never paused, runs
/// on at the source.
#[test]
fn a_stalled_migration_fails_when_the_policy_says_so() {
    let dir = TempDir::new("stall-fail");
    let ram = flat_ram(512);
    fill(&ram);
    let (trackers, _) = scripted(&ram, hot_pages_script());
    let src = Arc::new(FakeSource::new(ram, machine_state(1), true));
    let (uri, fake) = fake_destination(dir.path("dst.sock"), AtEnd::Ready(AfterGo::Started));
    let params = params(|p| {
        p.downtime_limit = Duration::ZERO;
        p.stall_policy = sender::StallPolicy::Fail;
    });
    let progress = join(sender::start(src.clone(), uri, params, trackers).expect("start the migration"));
    assert_eq!(progress.status, Status::Failed, "{progress:?}");
    let why = progress.error.clone().unwrap_or_default();
    assert!(why.contains("not converging") && why.contains("stopped shrinking"), "{why}");
    assert_eq!(progress.passes.len(), 3, "passes 0-2, then the stall");
    assert_eq!(src.events(), vec![SrcEvent::Failed], "never paused");
    assert!(src.is_running());
    let (seen, _) = fake.join().expect("the fake destination panicked");
    assert!(!seen.got_go, "{seen:?}");
}
