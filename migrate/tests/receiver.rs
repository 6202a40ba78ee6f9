//! The destination without KVM: streams crafted with the Encoder go into an `IncomingServer` on
//! a `unix:` socket and through `receiver::receive` into a fake VM. Every record out of its phase,
//! every range outside RAM, every missing or repeated piece of state is refused with an ERROR that
//! names it; the VM's restore never sees incomplete state and the guest can never be started. The
//! listener answers garbage and other versions and goes on listening for a valid stream.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{lock, machine_state, pattern, read_page, read_replies, within, FakeDest, Reply, TempDir, WAIT};
use migrate::handover::{Decision, DestPhase, Handover, Side};
use migrate::incoming::IncomingServer;
use migrate::ram::{GuestRam, RamLayout, RamRegion, PAGE_SIZE};
use migrate::receiver;
use migrate::stream::{Encoder, PageBatch, Resolution, ResolveAction, StreamHeader, MAGIC};
use migrate::vm::{MachineState, RestorableVm};

const PAGES: usize = 64;
const RAM_END: u64 = (PAGES * PAGE_SIZE) as u64;
const ID: u64 = 0x5eed_0000_0000_0001;
const VCPUS: usize = 2;

fn layout() -> RamLayout {
    RamLayout::new(vec![RamRegion { gpa: 0, size: RAM_END }]).expect("layout")
}

fn header() -> StreamHeader {
    StreamHeader {
        page_size: PAGE_SIZE as u32,
        vcpu_count: VCPUS as u32,
        migration_id: ID,
        channels: 1,
        asks_base: false,
        handover: false,
        preempt: false,
        regions: layout().regions().to_vec(),
    }
}

type Enc = Encoder<Vec<u8>>;

/// Preamble, `header`, then whatever `f` writes.
fn stream_with(header: &StreamHeader, f: impl FnOnce(&mut Enc)) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    e.preamble().expect("encode");
    e.header(header).expect("encode");
    f(&mut e);
    std::mem::take(e.get_mut())
}

fn stream(f: impl FnOnce(&mut Enc)) -> Vec<u8> {
    stream_with(&header(), f)
}

/// PAGES records for consecutive pages from `first_gpa`.
fn pages(e: &mut Enc, first_gpa: u64, contents: &[Vec<u8>]) {
    let mut batch = PageBatch::default();
    for (i, c) in contents.iter().enumerate() {
        let gpa = first_gpa + (i * PAGE_SIZE) as u64;
        if !batch.accepts(gpa) {
            e.pages(&mut batch).expect("encode");
        }
        batch.next_slot(gpa).copy_from_slice(c);
        batch.commit();
    }
    e.pages(&mut batch).expect("encode");
}

/// Pass 0 of the first `data` pages as data (generation 0), the rest zero markers.
fn pass0_partial(e: &mut Enc, data: usize) {
    let contents: Vec<Vec<u8>> = (0..data).map(|p| pattern(p, 0)).collect();
    pages(e, 0, &contents);
    if data < PAGES {
        e.zero_pages((data * PAGE_SIZE) as u64, (PAGES - data) as u64).expect("encode");
    }
}

/// A whole pass 0: pages 0-31 data, 32-63 zero.
fn pass0(e: &mut Enc) {
    pass0_partial(e, 32);
    e.pass_end(0, PAGES as u64).expect("encode");
}

fn state() -> MachineState {
    machine_state(VCPUS)
}

fn vcpus(e: &mut Enc) {
    for (i, b) in state().vcpus.iter().enumerate() {
        e.vcpu_state(i as u32, b).expect("encode");
    }
}

fn vm_state(e: &mut Enc) {
    e.vm_state(&state().vm).expect("encode");
}

fn devices(e: &mut Enc) {
    for (n, b) in &state().devices {
        e.device_state(n, b).expect("encode");
    }
}

fn all_state(e: &mut Enc) {
    vcpus(e);
    vm_state(e);
    devices(e);
}

fn end(e: &mut Enc) {
    let s = state();
    e.end(s.vcpus.len() as u32, s.devices.len() as u32, true).expect("encode");
}

/// A complete, valid stream.
fn valid(e: &mut Enc) {
    pass0(e);
    all_state(e);
    end(e);
}

// ---------------------------------------------------------------------------------------------
// The destination

/// How the destination's VM is built.
#[derive(Clone, Default)]
struct Dest {
    /// The VM's RAM and vCPUs, if not what the header asks for.
    layout: Option<RamLayout>,
    vcpus: Option<usize>,
    /// `create` refuses with this (a --mem or --smp mismatch, say).
    refuse_create: Option<String>,
    /// `restore_state` refuses with this.
    refuse_restore: Option<String>,
}

/// What came of a refused stream.
struct Refused {
    /// Every record the destination sent back.
    replies: Vec<Reply>,
    /// The receiver's error, as text.
    error: String,
    /// The VM, if `create` built one.
    vm: Option<Arc<FakeDest>>,
    handover: Arc<Handover>,
}

/// Sends `bytes` to a destination listening in `dir` (and half-closes: nothing more comes), and
/// reads every reply until it closes.
fn client(path: PathBuf, bytes: Vec<u8>) -> std::thread::JoinHandle<Vec<Reply>> {
    std::thread::spawn(move || {
        let mut s = UnixStream::connect(&path).expect("connect");
        // A destination that refused may have stopped reading; it drains what comes, but a write
        // error here would only mean it closed: its reply is what counts.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        read_replies(&s, Duration::from_secs(10))
    })
}

fn create_for(dest: &Dest, built: &Mutex<Option<Arc<FakeDest>>>, h: &StreamHeader) -> Result<Arc<FakeDest>, String> {
    if let Some(why) = &dest.refuse_create {
        return Err(why.clone());
    }
    let layout = match &dest.layout {
        Some(l) => l.clone(),
        None => RamLayout::new(h.regions.clone()).map_err(|e| migrate::report(&e))?,
    };
    let vcpus = dest.vcpus.unwrap_or(h.vcpu_count as usize);
    let vm = Arc::new(FakeDest::new(common::ram(layout), vcpus, dest.refuse_restore.clone()));
    *lock(built) = Some(vm.clone());
    Ok(vm)
}

/// Runs `bytes` into a fresh destination; the stream must be refused.
fn refused(bytes: Vec<u8>, dest: Dest) -> Refused {
    let dir = TempDir::new("rx");
    let path = dir.path("dst.sock");
    let server = IncomingServer::bind(&migrate::transport::Uri::Unix(path.clone())).expect("bind");
    let handover = server.handover().clone();
    let replies = client(path, bytes);
    let built = Arc::new(Mutex::new(None));
    let (h, b) = (handover.clone(), built.clone());
    let error = within("the receiver did not finish", move || {
        let accepted = server.next_migration().expect("a migration connection");
        assert_eq!(accepted.header.migration_id, ID);
        let result = receiver::receive(accepted, &h, |hd| create_for(&dest, &b, hd));
        // Stopping the listener takes up to its accept tick: not on this test's time.
        std::thread::spawn(move || drop(server));
        match result {
            Ok(_) => panic!("the receiver accepted a stream it must refuse"),
            Err(e) => migrate::report(&e),
        }
    });
    let replies = replies.join().expect("the client panicked");
    let vm = lock(&built).clone();
    Refused { replies, error, vm, handover }
}

/// The stream is refused: one ERROR, naming `problem` (and the receiver's phase `phase`), the
/// guest discarded and impossible to start, and the VM's restore never called.
fn assert_refused(bytes: Vec<u8>, phase: &str, problem: &str) -> Refused {
    let r = refused(bytes, Dest::default());
    check_refusal(&r, phase, problem);
    if let Some(vm) = &r.vm {
        assert_eq!(vm.restored(), Vec::<MachineState>::new(), "restore called with incomplete state");
    }
    r
}

fn check_refusal(r: &Refused, phase: &str, problem: &str) {
    assert_eq!(r.replies, vec![Reply::Error(r.error.clone())], "the source is told exactly why, and nothing else");
    assert!(r.error.contains(problem), "{:?} does not name {problem:?}", r.error);
    assert!(r.error.starts_with(&format!("incoming migration, {phase}: ")), "{:?} is not in phase {phase:?}", r.error);
    assert!(matches!(r.handover.phase(), DestPhase::Discarded(_)), "{:?}", r.handover.phase());
    assert!(r.handover.operator(Side::Destination).is_err(), "a refused guest can never be started");
    assert!(matches!(r.handover.wait_decision(), Decision::Discard(_)));
}

const PASS0: &str = "receiving RAM (pass 0)";
const AFTER0: &str = "receiving RAM (after pass 0)";
const STATE: &str = "receiving device state";
const HEADER: &str = "checking the header";

// ---------------------------------------------------------------------------------------------
// RAM records

#[test]
fn pages_outside_ram_are_refused() {
    let one = vec![pattern(0, 0)];
    assert_refused(stream(|e| pages(e, RAM_END, &one)), PASS0, "address 0x40000 is not guest RAM");
    assert_refused(stream(|e| pages(e, 1 << 40, &one)), PASS0, "is not guest RAM");
    let two = vec![pattern(0, 0), pattern(1, 0)];
    let last = RAM_END - PAGE_SIZE as u64;
    assert_refused(stream(|e| pages(e, last, &two)), PASS0, "2 pages at 0x3f000 run past the end of its RAM region");
    assert_refused(
        stream(|e| e.zero_pages(60 * PAGE_SIZE as u64, 10).expect("encode")),
        PASS0,
        "10 pages at 0x3c000 run past the end of its RAM region",
    );
    assert_refused(stream(|e| e.zero_pages(RAM_END, 1).expect("encode")), PASS0, "address 0x40000 is not guest RAM");
    assert_refused(stream(|e| e.zero_pages(0, 0).expect("encode")), PASS0, "0 pages at 0x0");
    assert_refused(stream(|e| e.zero_pages(0x10, 1).expect("encode")), PASS0, "ZERO_PAGES at unaligned address 0x10");
    // A count that overflows any address arithmetic.
    assert_refused(stream(|e| e.zero_pages(0, u64::MAX).expect("encode")), PASS0, "run past the end");
    assert_refused(stream(|e| e.zero_pages(PAGE_SIZE as u64, u64::MAX).expect("encode")), PASS0, "run past the end");
    assert_refused(
        stream(|e| e.zero_pages(PAGE_SIZE as u64, u64::MAX - 1).expect("encode")),
        PASS0,
        "run past the end",
    );
}

#[test]
fn pass_ends_out_of_order_are_refused() {
    assert_refused(stream(|e| e.pass_end(1, 0).expect("encode")), PASS0, "PASS_END for pass 1 where pass 0 was due");
    assert_refused(
        stream(|e| {
            pass0(e);
            e.pass_end(0, 0).expect("encode");
        }),
        AFTER0,
        "PASS_END for pass 0 where pass 1 was due",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            e.pass_end(2, 0).expect("encode");
        }),
        AFTER0,
        "PASS_END for pass 2 where pass 1 was due",
    );
}

#[test]
fn corrupt_and_cut_page_data_is_refused() {
    let mut bytes = stream(pass0);
    // A byte of page 5's data (the stream ends with 32 data pages, ZERO_PAGES and PASS_END).
    let at = bytes.len() - 2 * 32 - 32 * PAGE_SIZE + 5 * PAGE_SIZE + 100;
    bytes[at] ^= 0x01;
    assert_refused(bytes, PASS0, "PAGES record fails its checksum");

    let mut cut = stream(|e| pass0_partial(e, 8));
    // Without the ZERO_PAGES record and the last two pages of the PAGES record before it.
    cut.truncate(cut.len() - 32 - 2 * PAGE_SIZE);
    assert_refused(cut, PASS0, "the connection ended in the middle of a PAGES record");

    assert_refused(stream(pass0), AFTER0, "the source closed the connection before the end of the stream");
}

// ---------------------------------------------------------------------------------------------
// Records out of their phase

#[test]
fn records_out_of_their_phase_are_refused() {
    assert_refused(
        stream(|e| {
            pass0(e);
            end(e);
        }),
        AFTER0,
        "END before any vCPU or device state",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            vcpus(e);
            pages(e, 0, &[pattern(0, 1)]);
        }),
        STATE,
        "PAGES record after the device state began",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            vm_state(e);
            e.zero_pages(0, 1).expect("encode");
        }),
        STATE,
        "ZERO_PAGES record after the device state began",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            devices(e);
            e.pass_end(1, 0).expect("encode");
        }),
        STATE,
        "PASS_END record after the device state began",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            vcpus(e);
            e.sync().expect("encode");
        }),
        STATE,
        "unexpected SYNC record",
    );
    // Records only the other side, or only a later step, may send.
    assert_refused(stream(|e| e.go().expect("encode")), PASS0, "unexpected GO record");
    assert_refused(stream(|e| e.ready().expect("encode")), PASS0, "unexpected READY record");
    assert_refused(stream(|e| e.done().expect("encode")), PASS0, "unexpected DONE record");
    assert_refused(stream(|e| e.resolve(ID, ResolveAction::Go).expect("encode")), PASS0, "unexpected RESOLVE record");
    assert_refused(stream(|e| e.header(&header()).expect("encode")), PASS0, "unexpected HEADER record");
    assert_refused(
        stream(|e| {
            pass0(e);
            all_state(e);
            e.go().expect("encode");
        }),
        STATE,
        "unexpected GO record",
    );
    // The source giving up mid-stream is refused too (and said so).
    assert_refused(stream(|e| e.abort().expect("encode")), PASS0, "the source gave the migration up (ABORT)");
}

// ---------------------------------------------------------------------------------------------
// Missing and repeated state

#[test]
fn end_with_missing_pages_or_state_is_refused() {
    assert_refused(
        stream(|e| {
            // Pages 32-63 never sent.
            pages(e, 0, &(0..32).map(|p| pattern(p, 0)).collect::<Vec<_>>());
            e.pass_end(0, 32).expect("encode");
            all_state(e);
            end(e);
        }),
        STATE,
        "END, but 32 pages never arrived",
    );
    // Missing pages even with no PASS_END at all: state may begin in pass 0.
    assert_refused(
        stream(|e| {
            all_state(e);
            end(e);
        }),
        STATE,
        "END, but 64 pages never arrived",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            e.vcpu_state(0, b"vcpu 0").expect("encode");
            vm_state(e);
            devices(e);
            end(e);
        }),
        STATE,
        "END, but no state for vCPU 1",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            vcpus(e);
            devices(e);
            end(e);
        }),
        STATE,
        "END, but no VM state",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            all_state(e);
            e.end(2, 5, true).expect("encode");
        }),
        STATE,
        "END counts 2 vCPU and 5 device states, 2 and 2 arrived",
    );
}

#[test]
fn repeated_or_excess_state_is_refused() {
    assert_refused(
        stream(|e| {
            pass0(e);
            vcpus(e);
            e.vcpu_state(0, b"again").expect("encode");
        }),
        STATE,
        "second state for vCPU 0",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            vm_state(e);
            vm_state(e);
        }),
        STATE,
        "second state for the VM",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            devices(e);
            e.device_state("serial0", b"again").expect("encode");
        }),
        STATE,
        "second state for device serial0",
    );
    assert_refused(
        stream(|e| {
            pass0(e);
            e.vcpu_state(VCPUS as u32, b"one too many").expect("encode");
        }),
        STATE,
        "state for vCPU 2, but the VM has 2",
    );
    let max = receiver::MAX_DEVICES;
    assert_refused(
        stream(|e| {
            pass0(e);
            for i in 0..=max {
                e.device_state(&format!("dev{i}"), b"d").expect("encode");
            }
        }),
        STATE,
        &format!("more than {max} device states"),
    );
}

/// Everything arrived, and the VM refuses the state: it was offered the whole state once, and
/// the guest is discarded.
#[test]
fn a_restore_the_vm_refuses_is_refused() {
    let dest = Dest { refuse_restore: Some("LAPIC state of another CPU model".into()), ..Dest::default() };
    let r = refused(stream(valid), dest);
    check_refusal(&r, STATE, "cannot restore the machine state: LAPIC state of another CPU model");
    let vm = r.vm.expect("a VM was built");
    assert_eq!(vm.restored(), vec![state()], "offered exactly once, complete");
}

// ---------------------------------------------------------------------------------------------
// The header against the VM

#[test]
fn headers_that_do_not_fit_are_refused() {
    let mut h = header();
    h.page_size = 8192;
    assert_refused(stream_with(&h, valid), HEADER, "page size 8192 (this emu uses 4096)");
    let mut h = header();
    h.vcpu_count = 0;
    assert_refused(stream_with(&h, |_| {}), HEADER, "0 vCPUs (1 to 64 supported)");
    let mut h = header();
    h.vcpu_count = 65;
    assert_refused(stream_with(&h, |_| {}), HEADER, "65 vCPUs (1 to 64 supported)");
    let mut h = header();
    h.regions = vec![RamRegion { gpa: 0, size: 8192 }, RamRegion { gpa: 4096, size: 4096 }];
    assert_refused(stream_with(&h, |_| {}), HEADER, "RAM layout: RAM region 1");

    let r = refused(stream(valid), Dest { refuse_create: Some("--mem asks for 1 GiB".into()), ..Dest::default() });
    check_refusal(&r, HEADER, "--mem asks for 1 GiB");
    assert!(r.vm.is_none());

    let small = RamLayout::new(vec![RamRegion { gpa: 0, size: RAM_END / 2 }]).expect("layout");
    let r = refused(stream(valid), Dest { layout: Some(small), ..Dest::default() });
    check_refusal(&r, HEADER, "does not match this VM's");
    assert_eq!(r.vm.expect("built").restored(), Vec::<MachineState>::new());

    let r = refused(stream(valid), Dest { vcpus: Some(1), ..Dest::default() });
    check_refusal(&r, HEADER, "2 vCPUs in the stream, 1 here");
    assert_eq!(r.vm.expect("built").restored(), Vec::<MachineState>::new());
}

// ---------------------------------------------------------------------------------------------
// Valid streams

/// A client that sends `bytes`, then plays the source's side of the handover: reads up to READY
/// (SYNCED answers come first), writes what `after_ready` writes (GO, say), and reads `then_read`
/// more replies. (The destination keeps the connection open while its handover is alive, so the
/// client stops reading when it has what it came for.)
fn source_side(
    path: PathBuf,
    bytes: Vec<u8>,
    after_ready: fn(&mut Encoder<&UnixStream>),
    then_read: usize,
) -> std::thread::JoinHandle<Vec<Reply>> {
    std::thread::spawn(move || {
        let s = UnixStream::connect(&path).expect("connect");
        (&s).write_all(&bytes).expect("send the stream");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut got = Vec::new();
        let mut dec = migrate::stream::Decoder::new(&s);
        loop {
            let r = Reply::from_record(dec.next_record().expect("a reply"));
            got.push(r.clone());
            if r != Reply::Synced {
                break;
            }
        }
        if got.last() != Some(&Reply::Ready) {
            return got;
        }
        after_ready(&mut Encoder::new(&s));
        for _ in 0..then_read {
            got.push(Reply::from_record(dec.next_record().expect("a reply")));
        }
        got
    })
}

/// GO, and DONE right behind it (the destination reads them in order; STARTED comes meanwhile).
fn go_then_done(e: &mut Encoder<&UnixStream>) {
    e.go().expect("send GO");
    e.done().expect("send DONE");
}

struct Accepted {
    vm: Arc<FakeDest>,
    handover: Arc<Handover>,
    passes: u32,
    replies: Vec<Reply>,
}

/// Receives a valid stream in `dir`, and once the handover decides, says STARTED if it runs.
fn accepted(
    dir: &TempDir,
    bytes: Vec<u8>,
    after_ready: fn(&mut Encoder<&UnixStream>),
    then_read: usize,
) -> (Accepted, Decision) {
    let path = dir.path("dst.sock");
    let server = IncomingServer::bind(&migrate::transport::Uri::Unix(path.clone())).expect("bind");
    let handover = server.handover().clone();
    let client = source_side(path, bytes, after_ready, then_read);
    let h = handover.clone();
    let (vm, passes, decision) = within("the receiver did not finish", move || {
        let accepted = server.next_migration().expect("a migration connection");
        let built = Mutex::new(None);
        let mut received =
            receiver::receive(accepted, &h, |hd| create_for(&Dest::default(), &built, hd)).expect("receive");
        let decision = h.wait_decision();
        if matches!(decision, Decision::Run { .. }) {
            received.started();
        }
        std::thread::spawn(move || drop(server));
        (received.vm.clone(), received.passes, decision)
    });
    let replies = client.join().expect("the client panicked");
    (Accepted { vm, handover, passes, replies }, decision)
}

/// Data, zero markers that clear data sent before, a page sent again with new data, SYNC, two
/// passes, state, END: restored once with exactly that state, RAM as the stream left it, and
/// the guest runs on GO.
#[test]
fn a_valid_stream_is_restored_and_runs_on_go() {
    let dir = TempDir::new("valid");
    let bytes = stream(|e| {
        pass0(e);
        e.sync().expect("encode");
        // Pass 1: page 3 zeroed, page 4 new data, page 40 (zero so far) data, page 63 data.
        e.zero_pages(3 * PAGE_SIZE as u64, 1).expect("encode");
        pages(e, 4 * PAGE_SIZE as u64, &[pattern(4, 1)]);
        pages(e, 40 * PAGE_SIZE as u64, &[pattern(40, 1)]);
        pages(e, 63 * PAGE_SIZE as u64, &[pattern(63, 1)]);
        e.pass_end(1, 4).expect("encode");
        all_state(e);
        end(e);
    });
    let (a, decision) = accepted(&dir, bytes, go_then_done, 1);
    assert_eq!(a.replies, vec![Reply::Synced, Reply::Ready, Reply::Started], "SYNCED, READY, then STARTED on GO");
    assert_eq!(decision, Decision::Run { guest_was_running: true });
    assert_eq!(a.handover.phase(), DestPhase::Taken { by: "GO" });
    assert!(a.handover.wait_source_informed(WAIT), "DONE was read");
    assert_eq!(a.passes, 2);
    assert_eq!(a.vm.restored(), vec![state()]);
    let ram: &GuestRam = a.vm.ram();
    for p in 0..PAGES {
        let want = match p {
            3 => vec![0u8; PAGE_SIZE],
            4 | 40 | 63 => pattern(p, 1),
            p if p < 32 => pattern(p, 0),
            _ => vec![0u8; PAGE_SIZE],
        };
        assert!(read_page(ram, p) == want, "page {p}");
    }
}

/// After READY only GO starts the guest: ABORT discards it, anything else leaves it unresolved
/// (paused) for RESOLVE or the operator.
#[test]
fn after_ready_only_go_starts_the_guest() {
    let dir = TempDir::new("abort");
    let (a, decision) = accepted(&dir, stream(valid), |e| e.abort().expect("send ABORT"), 0);
    assert_eq!(a.replies, vec![Reply::Ready], "no STARTED");
    assert_eq!(decision, Decision::Discard("the source kept the guest (ABORT)".into()));
    assert_eq!(a.vm.restored(), vec![state()]);

    // A record that has no place after READY: the guest is not taken, the link counts as lost.
    let dir = TempDir::new("stray");
    let path = dir.path("dst.sock");
    let server = IncomingServer::bind(&migrate::transport::Uri::Unix(path.clone())).expect("bind");
    let handover = server.handover().clone();
    let client = source_side(path, stream(valid), |e| e.pass_end(1, 0).expect("send PASS_END"), 0);
    let h = handover.clone();
    let received = within("the receiver did not finish", move || {
        let accepted = server.next_migration().expect("a migration connection");
        let built = Mutex::new(None);
        let r = receiver::receive(accepted, &h, |hd| create_for(&Dest::default(), &built, hd)).expect("receive");
        (r, server)
    });
    let until = Instant::now() + WAIT;
    while handover.phase() == DestPhase::Ready {
        assert!(Instant::now() < until, "the handover never left Ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    match handover.phase() {
        DestPhase::Unresolved(why) => assert!(why.contains("unexpected PassEnd"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.join().expect("client"), vec![Reply::Ready]);
    // Still undecided: a RESOLVE from this migration's source would decide it.
    assert_eq!(handover.resolve(ID + 1, ResolveAction::Go), Resolution::UnknownMigration);
    assert!(matches!(handover.phase(), DestPhase::Unresolved(_)));
    drop(received);
}

// ---------------------------------------------------------------------------------------------
// The listener

/// Sends `bytes` on a new connection and returns every reply until the destination closes.
fn poke(path: &Path, bytes: &[u8]) -> Vec<Reply> {
    let mut s = UnixStream::connect(path).expect("connect");
    s.write_all(bytes).expect("send");
    let _ = s.shutdown(std::net::Shutdown::Write);
    read_replies(&s, Duration::from_secs(10))
}

fn error_reply(replies: &[Reply]) -> String {
    match replies {
        [Reply::Error(why)] => why.clone(),
        other => panic!("one ERROR expected, got {other:?}"),
    }
}

#[test]
fn the_listener_answers_strangers_and_keeps_listening_for_the_migration() {
    let dir = TempDir::new("listen");
    let path = dir.path("dst.sock");
    let server = IncomingServer::bind(&migrate::transport::Uri::Unix(path.clone())).expect("bind");
    let handover = server.handover().clone();

    // Garbage, another version, a stream that does not open with HEADER, a port scan.
    let why = error_reply(&poke(&path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(why.contains("bad magic"), "{why}");
    for (v, says) in [
        (1u32, "stream version 1 cannot keep the one-running-copy promise"),
        (3, "stream version 3; this emu reads version 2"),
    ] {
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&v.to_le_bytes());
        let why = error_reply(&poke(&path, &other));
        assert!(why.contains(says), "{why}");
    }
    let mut e = Encoder::new(Vec::new());
    e.preamble().expect("encode");
    e.zero_pages(0, 1).expect("encode");
    let why = error_reply(&poke(&path, e.get_mut()));
    assert!(why.contains("must open with HEADER, CHANNEL or RESOLVE"), "{why}");
    drop(UnixStream::connect(&path).expect("connect"));
    // A RESOLVE before any migration: nothing to resolve.
    let mut e = Encoder::new(Vec::new());
    e.preamble().expect("encode");
    e.resolve(ID, ResolveAction::Go).expect("encode");
    assert_eq!(poke(&path, e.get_mut()), vec![Reply::Resolved(Resolution::UnknownMigration)]);
    assert_eq!(handover.phase(), DestPhase::Receiving);

    // Then the migration: the first valid stream is the one handed over.
    let client = source_side(path.clone(), stream(valid), go_then_done, 1);
    let h = handover.clone();
    let (header_id, decision, server) = within("the receiver did not finish", move || {
        let accepted = server.next_migration().expect("a migration connection");
        let id = accepted.header.migration_id;
        let built = Mutex::new(None);
        let mut r = receiver::receive(accepted, &h, |hd| create_for(&Dest::default(), &built, hd)).expect("receive");
        let d = h.wait_decision();
        r.started();
        (id, d, server)
    });
    assert_eq!(header_id, ID);
    assert_eq!(decision, Decision::Run { guest_was_running: true });
    assert_eq!(client.join().expect("client"), vec![Reply::Ready, Reply::Started]);

    // A second migration is refused; a RESOLVE for this one is answered (the guest is here).
    let why = error_reply(&poke(&path, &stream(valid)));
    assert!(why.contains("has taken a migration already"), "{why}");
    let mut e = Encoder::new(Vec::new());
    e.preamble().expect("encode");
    e.resolve(ID, ResolveAction::Abort).expect("encode");
    assert_eq!(poke(&path, e.get_mut()), vec![Reply::Resolved(Resolution::DestinationHasGuest)]);
    std::thread::spawn(move || drop(server));
}

// ---------------------------------------------------------------------------------------------
// Channels

/// 512 pages: two runs of 256, so with two channels each has one (`migrate::channel`).
const CH_PAGES: usize = 512;

fn channels_header(channels: u32) -> StreamHeader {
    StreamHeader { regions: vec![RamRegion { gpa: 0, size: (CH_PAGES * PAGE_SIZE) as u64 }], channels, ..header() }
}

/// The opening of page channel `index` of migration `id`, then whatever `f` writes.
fn channel_stream(id: u64, index: u32, f: impl FnOnce(&mut Enc)) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    e.preamble().expect("encode");
    e.channel(id, index).expect("encode");
    f(&mut e);
    std::mem::take(e.get_mut())
}

/// Runs channel 0's `main` and the page channels' `others` (in order, 50 ms apart) into a fresh
/// destination; the migration must be refused. Returns the
/// refusal and every page channel's replies.
fn refused_with_channels(main: Vec<u8>, others: Vec<Vec<u8>>) -> (Refused, Vec<Vec<Reply>>) {
    let dir = TempDir::new("rx-ch");
    let path = dir.path("dst.sock");
    let server = IncomingServer::bind(&migrate::transport::Uri::Unix(path.clone())).expect("bind");
    let handover = server.handover().clone();
    let main_replies = client(path.clone(), main);
    let built = Arc::new(Mutex::new(None));
    let (h, b) = (handover.clone(), built.clone());
    let receiving = std::thread::spawn(move || {
        let accepted = server.next_migration().expect("a migration connection");
        let result = receiver::receive(accepted, &h, |hd| create_for(&Dest::default(), &b, hd));
        std::thread::spawn(move || drop(server));
        match result {
            Ok(_) => panic!("the receiver accepted a stream it must refuse"),
            Err(e) => migrate::report(&e),
        }
    });
    let mut clients = Vec::new();
    for bytes in others {
        std::thread::sleep(Duration::from_millis(50));
        clients.push(client(path.clone(), bytes));
    }
    let channel_replies = clients.into_iter().map(|c| c.join().expect("a channel client panicked")).collect();
    let error = within("the receiver did not finish", move || receiving.join().expect("the receiver panicked"));
    let replies = main_replies.join().expect("the client panicked");
    let vm = lock(&built).clone();
    (Refused { replies, error, vm, handover }, channel_replies)
}

/// Channel 0's pass 0 for two channels: its own run as zero pages, then PASS_END.
fn ch0_pass0(e: &mut Enc) {
    e.zero_pages(0, 256).expect("encode");
    e.pass_end(0, 256).expect("encode");
}

// A source that deals pages to whichever channel is free could send a later pass's copy of a page
// on one channel and an older copy on another, and the older one could land last. The destination
// takes a page only on the channel the dealing rule gives it, so such a stream is refused, on
// either side of the rule.
#[test]
fn a_page_on_the_wrong_channel_is_refused() {
    // Channel 0 sends a page of channel 1's run.
    let main = stream_with(&channels_header(2), |e| pages(e, 256 * PAGE_SIZE as u64, &[pattern(256, 0)]));
    let ch1 = channel_stream(ID, 1, |_| {});
    let (r, _) = refused_with_channels(main, vec![ch1]);
    check_refusal(&r, PASS0, "1 pages at 0x100000 are not all channel 0's (of 2)");

    // Channel 1 sends (in pass 1, after a proper pass 0) a copy of a page of channel 0's run.
    let main = stream_with(&channels_header(2), |e| {
        ch0_pass0(e);
        e.pass_end(1, 0).expect("encode");
        all_state(e);
        end(e);
    });
    let ch1 = channel_stream(ID, 1, |e| {
        e.zero_pages(256 * PAGE_SIZE as u64, 256).expect("encode");
        e.pass_end(0, 256).expect("encode");
        pages(e, 0, &[pattern(0, 1)]);
        e.pass_end(1, 1).expect("encode");
    });
    let (r, _) = refused_with_channels(main, vec![ch1]);
    check_refusal(&r, STATE, "channel 1: 1 pages at 0x0 are not all channel 1's (of 2)");
    assert_eq!(r.vm.expect("built").restored(), Vec::<MachineState>::new());

    // A record that runs from one channel's pages into the next one's.
    let main = stream_with(&channels_header(2), |e| e.zero_pages(0, 257).expect("encode"));
    let (r, _) = refused_with_channels(main, vec![channel_stream(ID, 1, |_| {})]);
    check_refusal(&r, PASS0, "257 pages at 0x0 are not all channel 0's (of 2)");
}

#[test]
fn channels_must_all_finish_the_last_pass() {
    // Channel 1 stops after pass 0 while channel 0 went on to pass 1: END is refused.
    let main = stream_with(&channels_header(2), |e| {
        ch0_pass0(e);
        e.pass_end(1, 0).expect("encode");
        all_state(e);
        end(e);
    });
    let ch1 = channel_stream(ID, 1, |e| {
        e.zero_pages(256 * PAGE_SIZE as u64, 256).expect("encode");
        e.pass_end(0, 256).expect("encode");
    });
    let (r, _) = refused_with_channels(main, vec![ch1]);
    check_refusal(&r, STATE, "channel 1: ended after pass Some(0), channel 0 after pass Some(1)");

    // A channel closed in the middle of a pass (its PASS_END never came).
    let main = stream_with(&channels_header(2), |e| {
        ch0_pass0(e);
        all_state(e);
        end(e);
    });
    let ch1 = channel_stream(ID, 1, |e| e.zero_pages(256 * PAGE_SIZE as u64, 256).expect("encode"));
    let (r, _) = refused_with_channels(main, vec![ch1]);
    check_refusal(&r, STATE, "channel 1: the source closed the connection before the end of the stream");

    // Pages of channel 1 never sent at all: it only said its pass ended.
    let main = stream_with(&channels_header(2), |e| {
        ch0_pass0(e);
        all_state(e);
        end(e);
    });
    let ch1 = channel_stream(ID, 1, |e| e.pass_end(0, 0).expect("encode"));
    let (r, _) = refused_with_channels(main, vec![ch1]);
    check_refusal(&r, STATE, "END, but 256 pages never arrived");
}

#[test]
fn a_channel_of_another_migration_or_twice_is_refused() {
    let main = stream_with(&channels_header(3), |e| {
        ch0_pass0(e);
        all_state(e);
        end(e);
    });
    let stranger = channel_stream(ID + 1, 1, |_| {});
    let twice = channel_stream(ID, 1, |e| e.pass_end(0, 0).expect("encode"));
    let (r, others) = refused_with_channels(main, vec![stranger, twice.clone(), twice]);
    match &others[0][..] {
        [Reply::Error(why)] => assert!(why.contains("no migration 0x5eed000000000002 here for channel 1"), "{why}"),
        other => panic!("a channel of another migration got {other:?}"),
    }
    check_refusal(&r, HEADER, "channel 1 connected twice");
    // A channel index the header does not have.
    let main = stream_with(&channels_header(2), ch0_pass0);
    let (r, _) = refused_with_channels(main, vec![channel_stream(ID, 5, |_| {})]);
    check_refusal(&r, HEADER, "channel 5: no such channel: the migration has 2");
}
