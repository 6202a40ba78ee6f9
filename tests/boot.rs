//! Booting: each workload of emu-guest on real KVM, several vCPUs, the three image containers, the
//! exit device, and the refusal of bad images and options.

use emu_harness as common;
use emu_harness::require_kvm;

use std::time::Duration;

use common::{guest_image, number_after, run_to_exit, Emu};

const T: Duration = Duration::from_secs(30);

#[test]
fn idle_ticks_once_a_second() {
    require_kvm!();
    let emu = Emu::boot(&["--append", "wl=idle"]);
    emu.expect_line("emu-guest: 1 cpu", T);
    let first = emu.expect_line("tick 1 up=", T);
    let second = emu.expect_line("tick 2 up=", T);
    let up = |l: &str| l.split("up=").nth(1).unwrap().parse::<f64>().unwrap();
    let gap = up(&second) - up(&first);
    assert!((0.9..1.5).contains(&gap), "ticks {gap} s apart: {first} / {second}");
}

#[test]
fn default_guest_boots_without_arguments() {
    require_kvm!();
    let emu = Emu::boot(&[]);
    emu.expect_line("wl=idle", T);
    emu.expect_line("tick 1 ", T);
}

#[test]
fn dirty_reports_rate_and_store_cost() {
    require_kvm!();
    let emu = Emu::boot(&["--mem", "128M", "--append", "wl=dirty:16:0"]);
    emu.expect_line("dirty: filled 16 MiB", T);
    let line = emu.expect_line("dirty: rate=", T);
    let rate = number_after(&line, "rate=").unwrap();
    let total = number_after(&line, "total=").unwrap();
    assert!(rate > 1_000_000, "{line}");
    assert!(total >= rate, "{line}");
    assert!(line.contains("ns/page="), "{line}");
}

#[test]
fn dirty_holds_its_rate() {
    require_kvm!();
    let emu = Emu::boot(&["--mem", "128M", "--append", "wl=dirty:16:20000"]);
    emu.expect_line("dirty: rate=", T);
    // The second report onwards: the pacing holds the rate within a few percent (the first one
    // covers the start). No second report fails the test with what the guest said.
    let first = emu.lines().iter().position(|l| l.contains("dirty: rate=")).expect("the first report is there");
    let second = emu.wait_line_from(first + 1, |l| l.contains("dirty: rate="), T).unwrap_or_else(|| {
        panic!("no second dirty report in {T:?}; serial:\n{}\nstderr:\n{}", emu.output(), emu.stderr())
    });
    let rate = number_after(&second, "rate=").unwrap();
    assert!((18_000..=22_000).contains(&rate), "{second}");
}

#[test]
fn verify_writes_and_checks_without_failures() {
    require_kvm!();
    let mut emu = Emu::boot(&["--mem", "128M", "--append", "wl=verify:8 runtime=3"]);
    emu.expect_line("verify: 2046 pages", T);
    let line = emu.expect_line("verify: written=", T);
    assert!(line.contains("failures=0"), "{line}");
    assert_eq!(emu.wait_exit(T), Some(0), "{}", emu.output());
    assert!(!emu.output().contains("VERIFY-FAIL"));
}

#[test]
fn every_vcpu_runs_its_own_workload() {
    require_kvm!();
    for smp in ["2", "4"] {
        let emu = Emu::boot(&["--smp", smp, "--append", "wl=idle"]);
        let n: usize = smp.parse().unwrap();
        emu.expect_line(&format!("emu-guest: {n} cpus"), T);
        for cpu in 0..n {
            emu.expect_line(&format!("cpu{cpu}: tick 1 "), T);
        }
        let vcpus = emu.qmp_ok("query-vcpus", serde_json::json!({}));
        assert_eq!(vcpus.as_array().unwrap().len(), n);
    }
}

#[test]
fn smp_workloads_use_separate_memory() {
    require_kvm!();
    let emu = Emu::boot(&["--smp", "2", "--mem", "128M", "--append", "wl=dirty:8:0"]);
    let a = emu.expect_line("cpu0: dirty: filled 8 MiB at", T);
    let b = emu.expect_line("cpu1: dirty: filled 8 MiB at", T);
    assert_ne!(a.split(" at ").nth(1), b.split(" at ").nth(1), "{a} / {b}");
    emu.expect_line("cpu1: dirty: rate=", T);
}

#[test]
fn exit_device_status_becomes_exit_code() {
    require_kvm!();
    let (code, out, _) = run_to_exit(&["--append", "wl=exit:42"], T);
    assert_eq!(code, Some(42), "{out}");
    let (code, out, _) = run_to_exit(&["--append", "wl=idle runtime=1"], T);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tick 1 "), "{out}");
}

#[test]
fn ports_and_addresses_without_devices_read_all_ones() {
    require_kvm!();
    let (code, out, err) = run_to_exit(&["--append", "wl=probe"], T);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("probe: port 0x80=0xff mmio 0xe0000000=0xffffffff"), "{out}");
}

#[test]
fn boots_flat_elf64_and_elf32_images() {
    require_kvm!();
    for image in ["emu-guest.bin", "emu-guest.elf", "emu-guest32.elf"] {
        let path = guest_image(image);
        let path = path.to_str().unwrap();
        let (code, out, err) = run_to_exit(&["--guest", path, "--append", "wl=idle runtime=1"], T);
        assert_eq!(code, Some(0), "{image}: {out}\n{err}");
        assert!(out.contains("tick 1 "), "{image}: {out}");
    }
}

#[test]
fn serial_to_file_and_none() {
    require_kvm!();
    let dir = common::ScratchDir::new();
    let file = dir.path("serial.txt");
    let sink = format!("file:{}", file.display());
    let (code, out, _) = run_to_exit(&["--serial", &sink, "--append", "wl=idle runtime=1"], T);
    assert_eq!(code, Some(0));
    assert!(out.is_empty(), "stdout should be quiet: {out}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("tick 1 "), "{text}");
    let (code, out, _) = run_to_exit(&["--serial", "none", "--append", "wl=exit:3"], T);
    assert_eq!((code, out.as_str()), (Some(3), ""));
}

/// A failing start: non-zero exit and one line on stderr that says what is wrong.
fn refused(args: &[&str], expect: &str) {
    let (code, out, err) = run_to_exit(args, T);
    assert!(matches!(code, Some(c) if c != 0), "{args:?} should fail: {code:?} {out} {err}");
    assert!(err.contains(expect), "{args:?}: expected {expect:?} in stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line expected: {err}");
    assert!(!out.contains("emu-guest"), "{args:?}: a guest ran: {out}");
}

#[test]
fn bad_images_are_refused_clearly() {
    let dir = common::ScratchDir::new();
    let text = dir.path("text.img");
    std::fs::write(&text, "this is not a kernel\n".repeat(100)).unwrap();
    let flat = std::fs::read(guest_image("emu-guest.bin")).unwrap();
    let truncated = dir.path("truncated.img");
    std::fs::write(&truncated, &flat[..flat.len() / 2]).unwrap();
    let elf = std::fs::read(guest_image("emu-guest.elf")).unwrap();
    let truncated_elf = dir.path("truncated.elf");
    std::fs::write(&truncated_elf, &elf[..8192]).unwrap();
    let p = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let image = p(&guest_image("emu-guest.bin"));

    refused(&["--guest", &p(&text)], "not a Multiboot image");
    refused(&["--guest", &p(&truncated)], "truncated image");
    refused(&["--guest", &p(&truncated_elf)], "truncated image");
    refused(&["--guest", "/nonexistent/kernel"], "cannot read guest image");
    refused(&["--guest", dir.0.to_str().unwrap()], "not a regular file");
    refused(&["--guest", &image, "--mem", "4M"], "does not fit in guest RAM");
    refused(&["--guest", &image, "--mem", "64K"], "larger than guest RAM");
}

/// A refusal whose reason is both in an error's message and its `source()` is printed twice by
/// `{:#}` (the whole chain): each of these says `reason` exactly once, on one line.
#[test]
fn refusals_say_their_reason_once() {
    require_kvm!();
    let dir = common::ScratchDir::new();
    let text = dir.path("text.img");
    std::fs::write(&text, "this is not a kernel\n".repeat(100)).unwrap();
    let elf = std::fs::read(guest_image("emu-guest.elf")).unwrap();
    let truncated_elf = dir.path("truncated.elf");
    std::fs::write(&truncated_elf, &elf[..8192]).unwrap();
    let p = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let once = |err: &str, reason: &str, what: &str| {
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line expected: {err}");
        assert_eq!(err.matches(reason).count(), 1, "{what}: {reason:?} once expected: {err}");
    };
    for (args, reason) in [
        (vec!["--guest", &p(&text)], "no Multiboot header in the first 8 KiB"),
        (vec!["--guest", &p(&truncated_elf)], "truncated image: "),
        (vec!["--guest", &p(&truncated_elf)], "the file has 0x2000"),
        // RAM the layout refuses (more than emu supports)
        (vec!["--mem", "2T"], "is more than the"),
    ] {
        let (code, out, err) = run_to_exit(&args, T);
        assert!(matches!(code, Some(c) if c != 0), "{args:?} should fail: {code:?} {out} {err}");
        once(&err, reason, &format!("{args:?}"));
    }
    // RAM that cannot be mapped: 2 GiB of guest RAM under a 1 GB address-space limit.
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -v 1000000 && exec \"$0\" --mem 2G --serial none --append wl=exit:0"])
        .arg(common::emu_bin())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run emu under sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "emu mapped 2 GiB under a 1 GB limit: {err}");
    assert!(err.contains("cannot map 2147483648 bytes of guest RAM"), "{err}");
    once(&err, "Cannot allocate memory", "--mem 2G under ulimit -v");
}

#[test]
fn bad_options_are_refused_clearly() {
    for (args, expect) in [
        (vec!["--mem", "12X"], "not a size"),
        (vec!["--mem", "0"], "positive multiple"),
        (vec!["--smp", "0"], "--smp"),
        (vec!["--smp", "65"], "--smp"),
        (vec!["--serial", "tcp:1"], "stdio, file:PATH or none"),
        (vec!["--monitor", "/tmp/x"], "unix:PATH"),
        (vec!["--incoming", "udp:1:2"], "not a migration URI"),
    ] {
        let (code, _, err) = run_to_exit(&args, T);
        assert!(matches!(code, Some(c) if c != 0), "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
