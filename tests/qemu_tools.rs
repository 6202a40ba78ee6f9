//! QEMU's own QMP tooling against emu, the outside checks that the monitor speaks QMP: `qemu.qmp`
//! (from PyPI, in a virtual environment that `scripts/qmp-venv.sh` makes on first use) drives a
//! migration between two emus and waits for its events (`tests/qmp-tools/qemu_qmp_check.py`), and
//! `qmp-shell` runs commands non-interactively, in QMP and in HMP mode.
//!
//! Without Python or PyPI the tests say why and pass; under `CI=true` they fail, like those that
//! need /dev/kvm.

use emu_harness::{require_kvm, Emu};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv with qemu.qmp, made if missing (once per test process: the tests here share it).
fn venv(test: &str) -> Option<PathBuf> {
    static MADE: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let result = made.get_or_insert_with(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qmp-venv");
        let out = Command::new(repo().join("scripts/qmp-venv.sh")).arg(&dir).stderr(Stdio::piped()).output();
        match out {
            Ok(o) if o.status.success() => Ok(dir),
            Ok(o) => Err(format!("scripts/qmp-venv.sh failed: {}", String::from_utf8_lossy(&o.stderr))),
            Err(e) => Err(format!("cannot run scripts/qmp-venv.sh: {e}")),
        }
    });
    match result {
        Ok(dir) => Some(dir.clone()),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: no qemu.qmp: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: no qemu.qmp venv (python3 -m venv and PyPI are needed): {e}");
            None
        }
    }
}

/// Runs `cmd` with `input` on stdin, failing the test if it takes longer than `T`; its stdout.
fn run(mut cmd: Command, input: &str) -> String {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let deadline = Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not end in {T:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout.into_owned()
}

#[test]
fn qemu_qmp_drives_a_migration_and_waits_for_its_events() {
    require_kvm!();
    let Some(venv) = venv("qemu_qmp_drives_a_migration_and_waits_for_its_events") else { return };
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=dirty:8:1000"]);
    src.expect_line("dirty: rate=", T);
    let dst = Emu::incoming_deferred(&[]);
    let uri = format!("unix:{}", dst.dir.path("migration.sock").display());
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(repo().join("tests/qmp-tools/qemu_qmp_check.py")).arg(src.monitor_path()).arg(dst.monitor_path()).arg(&uri);
    let out = run(cmd, "");
    let seen: Value = serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"));
    let src_events: Vec<&str> = seen["source-events"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!((src_events.first(), src_events.last()), (Some(&"setup"), Some(&"completed")), "{seen}");
    assert!(src_events.contains(&"active") && src_events.contains(&"device"), "{seen}");
    assert_eq!(seen["destination-events"], serde_json::json!(["setup", "active", "completed"]), "{seen}");
    assert_eq!(seen["status-after"], serde_json::json!({"source": "postmigrate", "destination": "running"}));
    assert_eq!(seen["info-migrate-first-line"], "Migration status: completed");
    assert_eq!(dst.qmp_ok("query-migrate-parameters", serde_json::json!({}))["downtime-limit"], 200);
}

#[test]
fn qmp_shell_runs_commands_non_interactively() {
    require_kvm!();
    let Some(venv) = venv("qmp_shell_runs_commands_non_interactively") else { return };
    let emu = Emu::boot(&["--name", "shell-guest", "--append", "wl=idle"]);
    let shell = |args: &[&str], input: &str| {
        let mut cmd = Command::new(venv.join("bin/qmp-shell"));
        // qmp-shell keeps its history in $HOME; not in the user's.
        cmd.args(args).arg(emu.monitor_path()).env("HOME", &emu.dir.0);
        run(cmd, input)
    };
    let out = shell(&["-p"], "query-status\nquery-name\nstop\nquery-status\n");
    assert!(out.contains("Connected to QEMU 0."), "{out}");
    assert!(out.contains("\"status\": \"running\""), "{out}");
    assert!(out.contains("\"name\": \"shell-guest\""), "{out}");
    assert!(out.contains("\"status\": \"paused\""), "{out}");
    let out = shell(&["-H"], "info status\ncont\ninfo status\n");
    assert!(out.contains("VM status: paused\r\n"), "{out:?}");
    assert!(out.contains("VM status: running\r\n"), "{out:?}");
    assert_eq!(emu.status(), "running");
}
