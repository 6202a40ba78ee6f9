//! Hostile and broken migration streams sent to `emu --incoming`: each is refused with a clear error,
//! answered with an ERROR record, and no guest ever runs.

use emu_harness as common;
use emu_harness::require_kvm;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::Emu;
use migrate::ram::RamRegion;
use migrate::stream::{Decoder, Encoder, PageBatch, Record, StreamHeader};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn connect(uri: &str) -> TcpStream {
    let addr = uri.strip_prefix("tcp:").unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn header(mem: u64, vcpus: u32) -> StreamHeader {
    StreamHeader {
        page_size: 4096,
        vcpu_count: vcpus,
        migration_id: 1,
        channels: 1,
        asks_base: false,
        handover: false,
        preempt: false,
        regions: vec![RamRegion { gpa: 0, size: mem }],
    }
}

/// Sends `bytes` to a fresh destination; expects it to fail with `expect` in its error, answer an
/// ERROR record (unless the stream never got as far as the preamble), and run no guest.
fn refused(bytes: &[u8], expect: &str) {
    let (mut dst, uri) = Emu::incoming(&[]);
    let mut s = connect(&uri);
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let code = dst.wait_exit(T);
    assert!(matches!(code, Some(c) if c != 0), "{expect}: destination exit {code:?}");
    let err = dst.stderr();
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(dst.lines().is_empty(), "a guest ran: {}", dst.output());
    let mut dec = Decoder::new(&reply[..]);
    let f = dec.next_frame().unwrap_or_else(|e| panic!("{expect}: no ERROR reply ({e}), got {reply:?}"));
    match dec.read_record(&f).unwrap() {
        Record::Error(why) => assert!(why.contains(expect), "{why}"),
        other => panic!("{other:?}"),
    }
}

fn stream(f: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out);
    e.preamble().unwrap();
    f(&mut e);
    out
}

/// Sends `bytes` on a connection of its own and returns the ERROR reason that came back.
fn error_reply(uri: &str, bytes: &[u8]) -> String {
    let mut s = connect(uri);
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let mut dec = Decoder::new(&reply[..]);
    match dec.next_frame().and_then(|f| dec.read_record(&f).map(|r| format!("{r:?}"))) {
        Ok(r) => r,
        Err(e) => panic!("no ERROR reply ({e}), got {reply:?}"),
    }
}

/// What is not an emu migration stream at all is answered with ERROR, and the destination goes on
/// listening for the real source: a port scan, a stray client or a stream of another version must
/// not take the only slot.
#[test]
fn strangers_are_refused_and_the_destination_keeps_listening() {
    require_kvm!();
    let (mut dst, uri) = Emu::incoming(&[]);
    assert!(error_reply(&uri, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").contains("bad magic"));
    let mut v7 = migrate::stream::MAGIC.to_vec();
    v7.extend_from_slice(&7u32.to_le_bytes());
    assert!(error_reply(&uri, &v7).contains("stream version 7"));
    let v1 = [&migrate::stream::MAGIC[..], &1u32.to_le_bytes()].concat();
    assert!(error_reply(&uri, &v1).contains("stream version 1 cannot keep the one-running-copy promise"));
    assert!(error_reply(&uri, &stream(|e| e.zero_pages(0, 1).unwrap()))
        .contains("must open with HEADER, CHANNEL or RESOLVE"));
    // connect and close, and a silent client holding a connection open
    drop(connect(&uri));
    let _silent = connect(&uri);
    std::thread::sleep(Duration::from_millis(300));
    assert!(dst.is_running(), "the destination gave up: {}", dst.stderr());
    assert!(dst.lines().is_empty(), "a guest ran: {}", dst.output());
    // ... and the real source still gets through (here: a stream it refuses for its RAM size)
    let mut s = connect(&uri);
    s.write_all(&stream(|e| e.header(&header(12345, 1)).unwrap())).unwrap();
    assert!(matches!(dst.wait_exit(T), Some(c) if c != 0));
    assert!(dst.stderr().contains("RAM layout"), "{}", dst.stderr());
}

#[test]
fn truncated_streams_are_refused() {
    require_kvm!();
    refused(&stream(|e| e.header(&header(64 << 20, 1)).unwrap()), "closed the connection before the end");
    let mut cut = stream(|e| {
        e.header(&header(64 << 20, 1)).unwrap();
        let mut b = PageBatch::default();
        b.next_slot(0x100000).fill(7);
        b.commit();
        e.pages(&mut b).unwrap();
    });
    cut.truncate(cut.len() - 100);
    refused(&cut, "ended in the middle of a PAGES record");
}

#[test]
fn bad_headers_are_refused() {
    require_kvm!();
    refused(&stream(|e| e.header(&header(64 << 20, 0)).unwrap()), "0 vCPUs");
    refused(&stream(|e| e.header(&header(64 << 20, 1000)).unwrap()), "1000 vCPUs");
    refused(&stream(|e| e.header(&header((1 << 40) + 4096, 1)).unwrap()), "RAM layout");
    refused(&stream(|e| e.header(&header(12345, 1)).unwrap()), "RAM layout");
    let mut h = header(64 << 20, 1);
    h.page_size = 65536;
    refused(&stream(|e| e.header(&h).unwrap()), "page size 65536");
}

#[test]
fn records_outside_ram_or_out_of_order_are_refused() {
    require_kvm!();
    let h = header(64 << 20, 1);
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            let mut b = PageBatch::default();
            b.next_slot(1 << 30).fill(1);
            b.commit();
            e.pages(&mut b).unwrap();
        }),
        "not guest RAM",
    );
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.zero_pages(0, (64 << 20) / 4096 + 1).unwrap();
        }),
        "run past the end",
    );
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.pass_end(3, 0).unwrap();
        }),
        "pass 0 was due",
    );
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.end(1, 0, true).unwrap();
        }),
        "END before any vCPU or device state",
    );
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.vcpu_state(0, b"not really").unwrap();
            e.zero_pages(0, 1).unwrap();
        }),
        "after the device state began",
    );
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.vcpu_state(5, b"x").unwrap();
        }),
        "state for vCPU 5",
    );
}

#[test]
fn incomplete_state_is_refused() {
    require_kvm!();
    let h = header(64 << 20, 1);
    // Every page, but no vCPU state.
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.zero_pages(0, (64 << 20) / 4096).unwrap();
            e.pass_end(0, 0).unwrap();
            e.vm_state(b"vm").unwrap();
            e.end(0, 0, true).unwrap();
        }),
        "no state for vCPU 0",
    );
    // Pages missing.
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.zero_pages(0, 100).unwrap();
            e.vcpu_state(0, b"cpu").unwrap();
            e.vm_state(b"vm").unwrap();
            e.end(1, 0, true).unwrap();
        }),
        "pages never arrived",
    );
    // Everything present, but the state blobs are not emu state: restore refuses before running.
    refused(
        &stream(|e| {
            e.header(&h).unwrap();
            e.zero_pages(0, (64 << 20) / 4096).unwrap();
            e.vcpu_state(0, b"cpu").unwrap();
            e.vm_state(b"vm").unwrap();
            e.device_state("serial0", b"uart").unwrap();
            e.device_state("exit", b"exit").unwrap();
            e.end(1, 2, true).unwrap();
        }),
        "cannot restore the machine state",
    );
}

#[test]
fn corrupt_records_are_refused() {
    require_kvm!();
    let with_header = |extra: &[u8]| {
        let mut bytes = stream(|e| e.header(&header(64 << 20, 1)).unwrap());
        bytes.extend_from_slice(extra);
        bytes
    };
    // A flipped payload byte in the header: a connection that never opened properly.
    let mut bytes = stream(|e| e.header(&header(64 << 20, 1)).unwrap());
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    let (dst, uri) = Emu::incoming(&[]);
    assert!(error_reply(&uri, &bytes).contains("fails its checksum"));
    drop(dst);
    // After the header: the migration itself is refused.
    let vm_state = stream(|e| e.vm_state(b"vm state").unwrap());
    let mut flipped = vm_state[12..].to_vec();
    let n = flipped.len();
    flipped[n - 1] ^= 0x10;
    refused(&with_header(&flipped), "VM_STATE record fails its checksum");
    // One flipped length byte is caught by the frame checksum at once, not by waiting for bytes.
    let mut inflated = vm_state[12..].to_vec();
    inflated[6] ^= 0x01;
    refused(&with_header(&inflated), "frame fails its checksum");
    refused(&with_header(&migrate::stream::raw_frame(0x02, 0x7fff_ffff, 0)), "longer than");
    refused(&with_header(&migrate::stream::raw_frame(0x05, 300 << 10, 0)), "longer than");
    refused(&with_header(&migrate::stream::raw_frame(0x55, 0, 0)), "unknown record type 0x55");
}

/// A real migration whose connection is cut after `limit` bytes by a relay between the two: the
/// destination fails without running the guest, the source fails and resumes.
#[test]
fn a_cut_connection_loses_nothing() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "128M", "--append", "wl=verify:16"]);
    src.expect_line("verify: written=", T);
    // One connection, so that the relay's cut is the migration's (channels have their own test).
    src.qmp_ok("migrate-set-parameters", json!({"channels": 1}));
    let (mut dst, dst_uri) = Emu::incoming(&[]);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_uri = format!("tcp:{}", relay.local_addr().unwrap());
    let limit: usize = 8 << 20;
    let relay_thread = std::thread::spawn(move || {
        let (mut from_src, _) = relay.accept().unwrap();
        let mut to_dst = connect(&dst_uri);
        // The destination's answers go back untouched (it answers HEADER before any page).
        let (mut back_from, mut back_to) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let mut buf = vec![0u8; 64 << 10];
        let mut moved = 0;
        while moved < limit {
            let n = from_src.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            to_dst.write_all(&buf[..n]).unwrap();
            moved += n;
        }
        // cut both sides
        let _ = from_src.shutdown(std::net::Shutdown::Both);
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
    });
    let info = common::migrate(&src, &relay_uri, T);
    relay_thread.join().unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.status(), "running");
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("verify: written="), T).expect("source goes on");
    assert!(!src.output().contains("VERIFY-FAIL"));
    assert!(matches!(dst.wait_exit(T), Some(c) if c != 0));
    assert!(dst.lines().is_empty(), "destination ran an incomplete guest: {}", dst.output());
    assert!(dst.stderr().contains("incoming migration"), "{}", dst.stderr());
}
