//! Checkpoints between real emu processes: `migrate {"uri": "file:PATH"}` writes the guest to a
//! file, `emu --incoming file:PATH` restores and runs it. A suspend checkpoint restores RAM equal
//! page for page; a live one (`background-snapshot`) holds the guest as it was at the command while
//! the guest runs on (the verify guest, restored, finds every page as it expects it at that moment);
//! a damaged, truncated or foreign file is refused and nothing runs.

use emu_harness as common;
use emu_harness::require_kvm;

use std::time::Duration;

use common::{Emu, ScratchDir};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn checkpoint(src: &Emu, path: &std::path::Path) -> serde_json::Value {
    let info = common::migrate(src, &format!("file:{}", path.display()), T);
    assert_eq!(info["status"], "completed", "{info}\n{}", src.stderr());
    info
}

fn set_live(emu: &Emu, on: bool) {
    emu.qmp_ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": on}]}),
    );
}

/// Suspend: the guest is paused, written, stays paused (and may go on); the restored guest's RAM
/// is the source's page for page, and it goes on where it stopped.
#[test]
fn a_suspended_guest_restores_with_ram_equal() {
    require_kvm!();
    let dir = ScratchDir::new();
    let path = dir.path("guest.ckpt");
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=verify:32"]);
    src.expect_line("verify: written=", T);
    checkpoint(&src, &path);
    assert_eq!(src.status(), "paused", "a suspend leaves the guest paused");
    let dst = Emu::boot(&["--incoming", &format!("file:{}", path.display()), "-S"]);
    assert_eq!(dst.status(), "paused");
    let (a, b) = (src.ram_digest(), dst.ram_digest());
    assert_eq!(a["digest"], b["digest"], "RAM differs after restore");
    dst.qmp_ok("cont", json!({}));
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    // The source was only paused: it may run on.
    src.qmp_ok("cont", json!({}));
    assert_eq!(src.status(), "running");
}

/// Live: the guest keeps running (and writing) while the file is written; restored, the verify
/// guest checks every page against what it had written by the moment of the command: a page saved
/// after a later write would fail that check.
#[test]
fn a_live_checkpoint_holds_the_guest_as_it_was_at_the_command() {
    require_kvm!();
    let dir = ScratchDir::new();
    let path = dir.path("live.ckpt");
    let src = Emu::boot(&["--smp", "2", "--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    set_live(&src, true);
    let before = src.line_count();
    let info = checkpoint(&src, &path);
    assert_eq!(src.status(), "running", "a live checkpoint leaves the guest running");
    assert!(info["downtime"].as_u64().is_some(), "{info}");
    src.wait_line_from(before, |l| l.contains("verify: written="), T).expect("the source ran on");
    let dst = Emu::boot(&["--incoming", &format!("file:{}", path.display())]);
    for _ in 0..3 {
        let n = dst.line_count();
        dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    }
    let out = dst.output();
    assert!(!out.contains("VERIFY-FAIL"), "{out}");
    assert!(out.lines().filter(|l| l.contains("written=")).all(|l| l.contains("failures=0")), "{out}");
    assert!(!src.output().contains("VERIFY-FAIL"), "{}", src.output());
}

/// A damaged page, a truncated file, a foreign file and a mismatched --mem: each refused with a
/// clear reason, non-zero status, no guest output.
#[test]
fn a_damaged_truncated_or_foreign_checkpoint_is_refused() {
    require_kvm!();
    let dir = ScratchDir::new();
    let good = dir.path("good.ckpt");
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=verify:8"]);
    src.expect_line("verify: written=", T);
    checkpoint(&src, &good);
    let bytes = std::fs::read(&good).expect("read the checkpoint");
    let refused = |name: &str, data: &[u8], extra: &[&str], why: &str| {
        let p = dir.path(name);
        std::fs::write(&p, data).expect("write");
        let arg = format!("file:{}", p.display());
        let mut args = vec!["--incoming", arg.as_str()];
        args.extend_from_slice(extra);
        let (code, out, err) = common::run_to_exit(&args, T);
        assert!(matches!(code, Some(c) if c != 0), "{name}: exit {code:?}\n{err}");
        assert!(err.contains(why), "{name}: {err}");
        assert!(out.is_empty(), "{name}: a guest ran: {out}");
    };
    // A byte of the first data page flipped: the page's digest catches it.
    let mut damaged = bytes.clone();
    let ram_offset = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let first_data = (0..(64 << 20) / 4096)
        .find(|&p| bytes[ram_offset + p * 4096..ram_offset + (p + 1) * 4096].iter().any(|&b| b != 0))
        .expect("a page with data");
    damaged[ram_offset + first_data * 4096 + 17] ^= 0x40;
    refused("damaged.ckpt", &damaged, &[], &format!("page {first_data} fails its checksum"));
    refused("truncated.ckpt", &bytes[..bytes.len() - 100], &[], "damaged or truncated");
    refused("header.ckpt", &bytes[..2000], &[], "shorter than its header");
    let mut bad_header = bytes.clone();
    bad_header[100] ^= 1;
    refused("badheader.ckpt", &bad_header, &[], "the header fails its checksum");
    let image = std::fs::read(common::guest_image("emu-guest32.elf")).expect("the guest image");
    refused("foreign.ckpt", &image, &[], "not an emu checkpoint");
    refused("mem.ckpt", &bytes, &["--mem", "128M"], "--mem asks for");
}

/// Incremental migration: the destination starts from an older checkpoint of the guest
/// (`--base`), and the source sends only what changed since; RAM ends equal page for page. A base
/// of another guest (another RAM size) or a damaged one is not used, and the migration is a full
/// one, equal all the same.
#[test]
fn a_migration_from_a_base_sends_only_what_changed() {
    require_kvm!();
    let dir = ScratchDir::new();
    let base = dir.path("base.ckpt");
    // 64 MiB of data, rewritten at 2000 pages/s: about an eighth changes per second.
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=verify:64:2000"]);
    src.expect_line("verify: written=", T);
    checkpoint(&src, &base);
    src.qmp_ok("cont", json!({}));
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("verify: written="), T).expect("the guest goes on");
    let arg = base.display().to_string();
    let (dst, uri) = Emu::incoming(&["-S", "--base", &arg]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());
    let skipped = info["ram"]["skipped"].as_u64().unwrap_or(0);
    assert!(skipped > 8192, "most of the 16384 data pages were the base's: {info}");
    assert!(dst.wait_monitor(T));
    assert!(dst.qmp_ok("query-migrate", json!({}))["base"].as_str().is_some_and(|b| b.starts_with("used")));
    let (a, b) = (src.ram_digest(), dst.ram_digest());
    assert_eq!(a["digest"], b["digest"], "RAM differs after an incremental migration");
    dst.qmp_ok("cont", json!({}));
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());

    // A base of another guest, and a damaged one: not used, and the full migration is equal.
    let other = Emu::boot(&["--mem", "128M", "--append", "wl=verify:8"]);
    other.expect_line("verify: written=", T);
    let wrong = dir.path("other.ckpt");
    checkpoint(&other, &wrong);
    let damaged = dir.path("damaged.ckpt");
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&damaged, bytes).unwrap();
    let mut from = dst;
    for (bad, why) in [(&wrong, "RAM layout"), (&damaged, "header fails its checksum")] {
        let arg = bad.display().to_string();
        let (next, uri) = Emu::incoming(&["-S", "--base", &arg]);
        let info = common::migrate(&from, &uri, T);
        assert_eq!(info["status"], "completed", "{info}\n{}", next.stderr());
        assert!(info["ram"]["skipped"].is_null(), "{info}");
        assert!(next.wait_monitor(T));
        let note = next.qmp_ok("query-migrate", json!({}))["base"].as_str().unwrap_or("").to_string();
        assert!(note.starts_with("not used") && note.contains(why), "{note}");
        assert_eq!(from.ram_digest()["digest"], next.ram_digest()["digest"]);
        next.qmp_ok("cont", json!({}));
        from = next;
    }
}

/// Same-host handover (`--memfd`, `mode` `cpr-transfer`, `unix:`): the destination maps the
/// guest's memory itself; RAM equal page for page, the verify guest goes on there, and hardly a
/// byte of it travels. Without --memfd, or over tcp:, the migration is refused with the reason
/// and the source runs on.
#[test]
fn a_same_host_handover_passes_the_memory_itself() {
    require_kvm!();
    let dir = ScratchDir::new();
    let src = Emu::boot(&["--memfd", "--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    src.qmp_ok("migrate-set-parameters", json!({"mode": "cpr-transfer"}));
    let sock = dir.path("handover.sock");
    let (dst, _) = Emu::incoming_at(&format!("unix:{}", sock.display()), &["-S"]);
    let info = common::migrate(&src, &format!("unix:{}", sock.display()), T);
    assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());
    assert!(info["ram"]["transferred"].as_u64().unwrap() < 1 << 20, "the memory did not travel: {info}");
    assert!(dst.wait_monitor(T));
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(src.ram_digest()["digest"], dst.ram_digest()["digest"]);
    dst.qmp_ok("cont", json!({}));
    for _ in 0..2 {
        let n = dst.line_count();
        dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    }
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());

    // Private RAM, and a tcp: URI: refused, the source runs on.
    let private = Emu::boot(&["--mem", "64M", "--append", "wl=idle"]);
    private.qmp_ok("migrate-set-parameters", json!({"mode": "cpr-transfer"}));
    let info = common::migrate(&private, &format!("unix:{}", dir.path("x.sock").display()), T);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("--memfd"), "{info}");
    assert_eq!(private.status(), "running");
    let shared = Emu::boot(&["--memfd", "--mem", "64M", "--append", "wl=idle"]);
    shared.qmp_ok("migrate-set-parameters", json!({"mode": "cpr-transfer"}));
    let info = common::migrate(&shared, "tcp:127.0.0.1:1", T);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("unix:"), "{info}");
    assert_eq!(shared.status(), "running");
}
