//! Hostile and broken migration streams sent to `emu --incoming`: each is refused with a clear error,
//! answered with an ERROR record, and no guest ever runs.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::Emu;
use migrate::ram::RamRegion;
use migrate::stream::{Decoder, Encoder, PageBatch, Record, StreamHeader};

const T: Duration = Duration::from_secs(30);

fn connect(uri: &str) -> TcpStream {
    let addr = uri.strip_prefix("tcp:").unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn header(mem: u64, vcpus: u32) -> StreamHeader {
    StreamHeader { page_size: 4096, vcpu_count: vcpus, regions: vec![RamRegion { gpa: 0, size: mem }] }
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

#[test]
fn garbage_is_refused() {
    require_kvm!();
    refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic");
}

#[test]
fn wrong_version_is_refused() {
    require_kvm!();
    let mut bytes = migrate::stream::MAGIC.to_vec();
    bytes.extend_from_slice(&7u32.to_le_bytes());
    refused(&bytes, "stream version 7");
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
    refused(&stream(|e| e.zero_pages(0, 1).unwrap()), "before the header");
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
            e.end(1, 0).unwrap();
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
            e.end(0, 0).unwrap();
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
            e.end(1, 0).unwrap();
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
            e.end(1, 2).unwrap();
        }),
        "restoring the state",
    );
}

#[test]
fn corrupt_records_are_refused() {
    require_kvm!();
    let mut bytes = stream(|e| e.header(&header(64 << 20, 1)).unwrap());
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    refused(&bytes, "fails its checksum");
    let mut bytes = stream(|e| e.header(&header(64 << 20, 1)).unwrap());
    bytes.extend_from_slice(&[0x02, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    refused(&bytes, "longer than");
    let mut bytes = stream(|e| e.header(&header(64 << 20, 1)).unwrap());
    bytes.extend_from_slice(&[0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    refused(&bytes, "unknown record type 0x55");
}

/// A real migration whose connection is cut after `limit` bytes by a relay between the two: the
/// destination fails without running the guest, the source fails and resumes.
#[test]
fn a_cut_connection_loses_nothing() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "128M", "--append", "wl=verify:16"]);
    src.expect_line("verify: written=", T);
    let (mut dst, dst_uri) = Emu::incoming(&[]);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_uri = format!("tcp:{}", relay.local_addr().unwrap());
    let limit: usize = 8 << 20;
    let relay_thread = std::thread::spawn(move || {
        let (mut from_src, _) = relay.accept().unwrap();
        let mut to_dst = connect(&dst_uri);
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
