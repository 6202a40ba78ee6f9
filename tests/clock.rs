//! The guest's clock across a migration and a restore. The TSC cannot be set on this host (guest
//! TSC = host TSC), so a guest reading it sees whatever the destination's host says; the guest's
//! time that survives is KVM's clock (kvmclock), which emu saves with the VM and sets on the
//! destination (KVM_GET_CLOCK / KVM_SET_CLOCK). `wl=clock` reads kvmclock at every timer tick and
//! counts steps backwards. Without the restore of the clock a new VM's kvmclock starts near zero:
//! the guest would see its time run backwards, which these tests catch.

use emu_harness as common;
use emu_harness::require_kvm;

use std::time::{Duration, Instant};

use common::{number_after, Emu, ScratchDir};

const T: Duration = Duration::from_secs(60);

/// One `clock:` line: (guest clock ms, TSC ms since boot, steps back so far).
fn clock_line(line: &str) -> (u64, u64, u64) {
    assert!(line.contains("source=kvmclock"), "the guest has no kvmclock: {line}");
    let n = |k| number_after(line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
    (n("ms="), n("tsc-up="), n("back="))
}

/// The next `clock:` line from line `from` on, and when it came.
fn next_clock(emu: &Emu, from: usize) -> (usize, (u64, u64, u64), Instant) {
    emu.wait_line_from(from, |l| l.contains("clock: s="), T)
        .unwrap_or_else(|| panic!("no clock line: {}", emu.output()));
    let lines = emu.lines();
    let i = (from..lines.len()).find(|&i| lines[i].contains("clock: s=")).unwrap();
    (i + 1, clock_line(&lines[i]), Instant::now())
}

#[test]
fn the_guest_clock_goes_on_across_a_migration() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "128M", "--append", "wl=clock"]);
    let (n, _, _) = next_clock(&src, 0);
    let (_, before, at) = next_clock(&src, n);
    let (dst, uri) = Emu::incoming(&[]);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}\n{}", src.stderr());
    let (n, after, got) = next_clock(&dst, 0);
    let (_, later, _) = next_clock(&dst, n);
    // On from where the source stopped, by no more than the time that passed.
    assert_eq!(after.2, 0, "the guest's clock went backwards on the destination: {}", dst.output());
    assert!(after.0 > before.0, "clock {} on the destination after {} on the source", after.0, before.0);
    let passed = got.duration_since(at).as_millis() as u64;
    assert!(after.0 - before.0 <= passed + 1500, "the clock jumped {} ms in {passed} ms", after.0 - before.0);
    assert!(later.0 > after.0 && later.2 == 0, "{}", dst.output());
}

/// A checkpoint restored 3 s later goes on from the checkpoint's clock, not from the host's time:
/// what a destination host with another TSC would do to a guest reading its TSC (which here jumps
/// by those 3 s) does not happen to its kvmclock.
#[test]
fn a_restored_checkpoint_goes_on_from_its_own_clock() {
    require_kvm!();
    let dir = ScratchDir::new();
    let path = dir.path("clock.ckpt");
    let src = Emu::boot(&["--mem", "128M", "--append", "wl=clock"]);
    let (n, _, _) = next_clock(&src, 0);
    let (_, before, _) = next_clock(&src, n);
    let info = common::migrate(&src, &format!("file:{}", path.display()), T);
    assert_eq!(info["status"], "completed", "{info}\n{}", src.stderr());
    drop(src);
    std::thread::sleep(Duration::from_secs(3));
    let dst = Emu::boot(&["--incoming", &format!("file:{}", path.display())]);
    let (_, after, _) = next_clock(&dst, 0);
    assert_eq!(after.2, 0, "the guest's clock went backwards after the restore: {}", dst.output());
    // The clock: on by at most about a second (the next line) from where it was saved.
    assert!(after.0 > before.0 && after.0 - before.0 < 2500, "clock {} -> {}", before.0, after.0);
    // The TSC: the host's, 3 s on.
    assert!(after.1 >= before.1 + 3000, "TSC uptime {} -> {}: the TSC did not go on with the host", before.1, after.1);
}
