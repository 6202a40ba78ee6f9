//! Postcopy without KVM: the sender migrates a fake source VM over `unix:` to the real destination
//! (`IncomingServer` + `receiver::receive`), switching to postcopy in the middle of a pass. On the
//! destination a thread plays the guest: it reads every page, from the last to the first, while the
//! source pushes them from the first, so that it faults on pages that have not arrived and asks for
//! them. Needs userfaultfd (no KVM). With postcopy-preempt (the default) the requests and the
//! pages asked for travel the urgent connection; without it, channel 0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_same_ram, fill, flat_ram, join, machine_state, params, real_destination, scripted, FakeSource};
use common::{Fill, Script, SrcEvent, TempDir, WAIT};
use migrate::progress::Status;
use migrate::ram::PAGE_SIZE;
use migrate::sender;
use migrate::vm::RestorableVm;

fn postcopy_migration(channels: u32, guest_running: bool, preempt: bool) {
    let dir = TempDir::new("postcopy");
    let uri = dir.uri("dst.sock");
    let pages = 4096; // 16 MiB
    let src_ram = flat_ram(pages);
    fill(&src_ram);
    // The guest writes pages between passes; the final collect (guest paused) dirties more, which
    // then are owed along with those pass 0 never reached.
    let script = Script {
        rounds: vec![vec![(1, Fill::Data), (4000, Fill::Data)], vec![(2, Fill::Data), (3, Fill::Zero)]],
        ..Script::default()
    };
    let (trackers, _log) = scripted(&src_ram, script);
    let state = machine_state(1);
    let src = Arc::new(FakeSource::new(src_ram.clone(), state.clone(), guest_running));
    let destination = real_destination(&uri);
    let params = params(|p| {
        p.channels = channels;
        p.postcopy_preempt = preempt;
        // Slow enough (16 MiB at 32 MiB/s) that the switch comes in the middle of pass 0.
        p.max_bandwidth = 32 << 20;
    });
    let outgoing = sender::start(src.clone(), uri, params, trackers).expect("start the migration");
    std::thread::sleep(Duration::from_millis(150));
    outgoing.postcopy.start();
    let progress_cell = outgoing.progress.clone();
    let arrived = destination.recv_timeout(WAIT).expect("the destination did not finish").expect("destination");
    let pc = arrived.postcopy.clone().expect("a postcopy destination");
    // The guest touches every page, the last first; each read of an owed page waits for it.
    let dst_ram = arrived.vm.ram().clone();
    let toucher = std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in (0..dst_ram.page_count()).rev() {
            dst_ram.read_page(p, &mut buf);
        }
    });
    assert!(pc.wait_complete(WAIT), "postcopy did not complete: {:?}", pc.stats());
    toucher.join().expect("the guest thread");
    let progress = join(outgoing);
    assert_eq!(progress.status, Status::Completed, "{progress:?}");
    assert_eq!(progress.stop_reason, Some("postcopy"));
    assert!(progress.passes[0].pages < pages as u64, "pass 0 was cut short: {:?}", progress.passes);
    let sent = progress.postcopy.clone().expect("postcopy figures");
    assert!(sent.owed_at_switchover > 0, "{sent:?}");
    assert_eq!(sent.pages_requested + sent.pages_pushed, sent.owed_at_switchover, "{sent:?}");
    assert_eq!(sent.owed_left, 0);
    assert!(sent.switchover_to_complete.is_some());
    let got = pc.stats();
    assert_eq!(got.owed_at_switchover, sent.owed_at_switchover);
    assert_eq!(got.owed_left, 0);
    assert!(got.requests > 0, "the guest thread faulted on pages not yet there: {got:?}");
    assert!(got.latency_us.is_some_and(|l| l.samples > 0 && l.p50 <= l.max), "{got:?}");
    if preempt {
        // Every request was answered there: at least the page asked for each time.
        assert!(sent.pages_urgent >= sent.requests && sent.requests > 0, "{sent:?}");
        assert!(got.pages_urgent > 0, "owed pages arrived on the urgent connection: {got:?}");
    } else {
        assert_eq!((sent.pages_urgent, got.pages_urgent), (0, 0), "no urgent connection: {sent:?} {got:?}");
    }
    assert_eq!(progress_cell.snapshot().status, Status::Completed);
    assert_eq!(
        src.events(),
        vec![SrcEvent::Paused { was_running: guest_running }, SrcEvent::Saved, SrcEvent::Completed],
        "paused, then completed: never resumed"
    );
    assert_eq!(arrived.vm.restored(), vec![state]);
    assert_same_ram(&src_ram, arrived.vm.ram());
}

#[test]
fn a_guest_moves_by_postcopy_and_its_pages_follow() {
    postcopy_migration(1, true, false);
}

#[test]
fn postcopy_after_a_pass_over_four_channels() {
    postcopy_migration(4, true, false);
}

/// postcopy-preempt: the requests and the pages asked for travel the urgent connection, the rest
/// channel 0; a page that comes on both is placed once; RAM ends equal.
#[test]
fn requested_pages_travel_the_urgent_connection() {
    postcopy_migration(1, true, true);
}

#[test]
fn the_urgent_connection_with_four_channels() {
    postcopy_migration(4, true, true);
}

/// A page record whose data fails its checksum ends the connection like a broken link and never
/// reaches guest RAM; the same record intact is placed.
#[test]
fn a_corrupt_page_record_is_never_placed() {
    use migrate::postcopy::dest::{IncomingPostcopy, Phase};
    use migrate::postcopy::PostcopyError;
    use migrate::stream::{Decoder, Encoder, PageBatch, StreamError};
    let ram = flat_ram(8);
    let mut owed = migrate::PageBitmap::new(8);
    owed.set(2);
    owed.set(3);
    let pc = IncomingPostcopy::prepare(ram.clone(), owed).expect("userfaultfd");
    let mut record = Vec::new();
    {
        let mut e = Encoder::new(&mut record);
        let mut b = PageBatch::default();
        for p in 2..4u64 {
            b.next_slot(p * PAGE_SIZE as u64).fill(0xab);
            b.commit();
        }
        e.pages(&mut b).expect("encode");
    }
    let mut corrupt = record.clone();
    corrupt[16 + 16 + 100] ^= 1;
    let r = pc.receive(&mut Decoder::new(std::io::Cursor::new(corrupt)));
    assert!(matches!(r, Err(PostcopyError::Link(StreamError::Checksum(_)))), "{r:?}");
    assert_eq!(pc.stats().owed_left, 2, "nothing placed");
    assert!(matches!(pc.phase(), Phase::Paused(_)));
    pc.receive(&mut Decoder::new(std::io::Cursor::new(record))).expect("the intact record");
    assert_eq!(pc.phase(), Phase::Complete);
    assert_eq!(common::read_page(&ram, 2), vec![0xab; PAGE_SIZE]);
    assert_eq!(common::read_page(&ram, 5), vec![0; PAGE_SIZE], "a page never owed reads as zero");
}
