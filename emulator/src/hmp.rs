//! The human monitor (QEMU's HMP), as `human-monitor-command` runs it: a command line in, text
//! out, in QEMU's wording where QEMU has one (`info status` says "VM status: running", `info
//! migrate` has the lines of QEMU's `migration-hmp-cmds.c`), so that people and scripts used to
//! QEMU's monitor read emu's the same way. Each command is a QMP command underneath (`monitor.rs`'s
//! table), so the two monitors cannot disagree; this file only parses lines and writes text.
//! Lines end in `\n` here; the monitor turns them into CRLF.

use std::fmt::Write;

use serde_json::{json, Map, Value};

use crate::monitor::Commands;
use crate::qmp::QmpError;

/// `help`: what exists, one command a line (`NAME ARGS -- WHAT`, QEMU's layout, which qmp-shell's
/// completion reads).
const HELP: &[(&str, &str, &str)] = &[
    ("cont|c", "", "resume emulation"),
    ("help|?", "[cmd]", "show the help"),
    ("info", "[subcommand]", "show various information about the system state"),
    (
        "migrate",
        "[-d] uri",
        "migrate to URI (tcp:HOST:PORT or unix:PATH); -d is accepted, it always runs in the background",
    ),
    ("migrate_cancel", "", "cancel the current migration"),
    ("migrate_incoming", "uri", "continue an incoming migration from an -incoming defer"),
    ("migrate_set_parameter", "parameter value", "set a parameter for migration"),
    (
        "migrate_set_capability",
        "capability state",
        "enable or disable a migration capability (events, postcopy-preempt, background-snapshot)",
    ),
    ("quit|q", "", "quit the emulator"),
    ("stop", "", "stop emulation"),
];

const INFO: &[(&str, &str)] = &[
    ("migrate", "show migration status"),
    ("migrate_capabilities", "show current migration capabilities"),
    ("migrate_parameters", "show current migration parameters"),
    ("name", "show the current VM name"),
    ("status", "show the current VM status (running|paused)"),
    ("version", "show the version of emu"),
];

/// Whether `line` is the human monitor's quit.
pub fn is_quit(line: &str) -> bool {
    matches!(line.split_whitespace().next(), Some("quit" | "q"))
}

fn none() -> Map<String, Value> {
    Map::new()
}

fn one(key: &str, value: Value) -> Map<String, Value> {
    Map::from_iter([(key.to_string(), value)])
}

/// A parameter's value as `migrate_set_parameter` takes it: a number (with a K, M, G or T suffix
/// for sizes, as QEMU takes `max-bandwidth 100M`), `on`/`off`, or else the word itself.
fn parameter_value(v: &str) -> Value {
    if let Ok(n) = v.parse::<u64>() {
        return json!(n);
    }
    let shift = match v.chars().last() {
        Some('K' | 'k') => 10,
        Some('M' | 'm') => 20,
        Some('G' | 'g') => 30,
        Some('T' | 't') => 40,
        _ => return json!(v),
    };
    match v[..v.len() - 1].parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift)) {
        Some(n) => json!(n),
        None => json!(v),
    }
}

fn on_off(v: &str) -> Result<bool, QmpError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(QmpError::generic(format!("'{other}' is not on or off"))),
    }
}

/// Runs one command line; its text, or why not.
pub fn run(c: &Commands, line: &str) -> Result<String, QmpError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&command, rest)) = words.split_first() else {
        return Ok(String::new());
    };
    let need = |n: usize, usage: &str| {
        if rest.len() == n {
            Ok(())
        } else {
            Err(QmpError::generic(format!("usage: {usage}")))
        }
    };
    let done = |r: Result<Value, QmpError>| r.map(|_| String::new());
    match command {
        "info" => match rest {
            [] => Ok(INFO.iter().map(|(n, what)| format!("info {n}  -- {what}\n")).collect()),
            [what] => info(c, what),
            _ => Err(QmpError::generic("usage: info [subcommand]")),
        },
        "help" | "?" => Ok(HELP.iter().map(|(n, args, what)| format!("{n} {args} -- {what}\n")).collect()),
        "stop" => done(c.run("stop", &none())),
        "cont" | "c" => done(c.run("cont", &none())),
        "quit" | "q" => done(c.run("quit", &none())),
        "migrate" => {
            let uri = match rest {
                [uri] | ["-d", uri] => *uri,
                _ => return Err(QmpError::generic("usage: migrate [-d] uri")),
            };
            done(c.run("migrate", &one("uri", json!(uri))))
        }
        "migrate_cancel" => done(c.run("migrate-cancel", &none())),
        "migrate_incoming" => {
            need(1, "migrate_incoming uri")?;
            done(c.run("migrate-incoming", &one("uri", json!(rest[0]))))
        }
        "migrate_set_parameter" => {
            need(2, "migrate_set_parameter parameter value")?;
            // QEMU's HMP takes its parameter names with dashes or underscores.
            let name = rest[0].replace('_', "-");
            done(c.run("migrate-set-parameters", &one(&name, parameter_value(rest[1]))))
        }
        "migrate_set_capability" => {
            need(2, "migrate_set_capability capability state")?;
            let cap = json!([{"capability": rest[0].replace('_', "-"), "state": on_off(rest[1])?}]);
            done(c.run("migrate-set-capabilities", &one("capabilities", cap)))
        }
        other => Err(QmpError::generic(format!("unknown command: '{other}'"))),
    }
}

fn info(c: &Commands, what: &str) -> Result<String, QmpError> {
    match what {
        "status" => Ok(status_text(&c.run("query-status", &none())?)),
        "migrate" => Ok(migrate_text(&c.run("query-migrate", &none())?)),
        "migrate_parameters" => Ok(parameters_text(&c.run("query-migrate-parameters", &none())?)),
        "migrate_capabilities" => {
            let caps = c.run("query-migrate-capabilities", &none())?;
            let mut t = String::new();
            for cap in caps.as_array().into_iter().flatten() {
                let on = if cap["state"] == true { "on" } else { "off" };
                let _ = writeln!(t, "{}: {on}", cap["capability"].as_str().unwrap_or("?"));
            }
            Ok(t)
        }
        "version" => {
            let v = c.run("query-version", &none())?;
            let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
            Ok(format!("{}.{}.{} ({})\n", n("major"), n("minor"), n("micro"), v["package"].as_str().unwrap_or("")))
        }
        "name" => Ok(c.run("query-name", &none())?["name"].as_str().map(|n| format!("{n}\n")).unwrap_or_default()),
        other => Err(QmpError::generic(format!("unknown info subcommand: '{other}' (try: info)"))),
    }
}

/// `info status`, as QEMU writes it: "VM status: running", or "paused", with the run state in
/// parentheses when it is more than a plain pause.
pub fn status_text(status: &Value) -> String {
    let running = status["running"] == true;
    let state = status["status"].as_str().unwrap_or("");
    let mut t = format!("VM status: {}", if running { "running" } else { "paused" });
    if !running && state != "paused" {
        let _ = write!(t, " ({state})");
    }
    t.push('\n');
    t
}

/// `info migrate`: QEMU's lines for what `query-migrate` has (none at all before any migration).
pub fn migrate_text(m: &Value) -> String {
    let mut t = String::new();
    let Some(status) = m["status"].as_str() else {
        return t;
    };
    let _ = write!(t, "Migration status: {status}");
    match m["error-desc"].as_str() {
        Some(e) if status == "failed" => {
            let _ = writeln!(t, " ({e})");
        }
        _ => t.push('\n'),
    }
    let u = |v: &Value| v.as_u64();
    if let Some(ms) = u(&m["total-time"]) {
        let _ = writeln!(t, "total time: {ms} ms");
    }
    for (key, label) in [("expected-downtime", "expected downtime"), ("downtime", "downtime"), ("setup-time", "setup")]
    {
        if let Some(ms) = u(&m[key]) {
            let _ = writeln!(t, "{label}: {ms} ms");
        }
    }
    let ram = &m["ram"];
    if ram.is_object() {
        let kb = |k: &str| u(&ram[k]).unwrap_or(0) >> 10;
        let n = |k: &str| u(&ram[k]).unwrap_or(0);
        let _ = writeln!(t, "transferred ram: {} kbytes", kb("transferred"));
        if let Some(mbps) = ram["mbps"].as_f64() {
            let _ = writeln!(t, "throughput: {mbps:.2} mbps");
        }
        if ram["remaining"].is_u64() {
            let _ = writeln!(t, "remaining ram: {} kbytes", kb("remaining"));
        }
        let _ = writeln!(t, "total ram: {} kbytes", kb("total"));
        let _ = writeln!(t, "duplicate: {} pages", n("duplicate"));
        let _ = writeln!(t, "normal: {} pages", n("normal"));
        let _ = writeln!(t, "normal bytes: {} kbytes", kb("normal-bytes"));
        let _ = writeln!(t, "dirty sync count: {}", n("dirty-sync-count"));
        let _ = writeln!(t, "page size: 4 kbytes");
        if n("dirty-pages-rate") > 0 {
            let _ = writeln!(t, "dirty pages rate: {} pages", n("dirty-pages-rate"));
        }
    }
    if let Some(p) = u(&m["cpu-throttle-percentage"]) {
        let _ = writeln!(t, "cpu throttle percentage: {p}");
    }
    t
}

/// `info migrate_parameters`: one `name: value` line each, with QEMU's units.
pub fn parameters_text(p: &Value) -> String {
    let mut t = String::new();
    for (name, v) in p.as_object().into_iter().flatten() {
        let unit = match name.as_str() {
            "downtime-limit" | "switchover-timeout" => " ms",
            "max-bandwidth" => " bytes/second",
            "dirty-rate-limit" => " pages/second",
            _ => "",
        };
        let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        let _ = writeln!(t, "{name}: {v}{unit}");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_as_qemus() {
        assert_eq!(status_text(&json!({"status": "running", "running": true})), "VM status: running\n");
        assert_eq!(status_text(&json!({"status": "paused", "running": false})), "VM status: paused\n");
        assert_eq!(status_text(&json!({"status": "inmigrate", "running": false})), "VM status: paused (inmigrate)\n");
        assert_eq!(
            status_text(&json!({"status": "postmigrate", "running": false})),
            "VM status: paused (postmigrate)\n"
        );
    }

    #[test]
    fn migrate_reads_as_qemus() {
        assert_eq!(migrate_text(&json!({})), "");
        let m = json!({
            "status": "completed", "total-time": 812, "downtime": 3, "setup-time": 1,
            "ram": {"transferred": 10 << 20, "mbps": 1234.5678, "remaining": 0, "total": 512 << 20,
                    "duplicate": 120000, "normal": 11000, "normal-bytes": 11000 * 4096, "dirty-sync-count": 4,
                    "dirty-pages-rate": 0},
        });
        let expected = "Migration status: completed\ntotal time: 812 ms\ndowntime: 3 ms\nsetup: 1 ms\n\
            transferred ram: 10240 kbytes\nthroughput: 1234.57 mbps\nremaining ram: 0 kbytes\n\
            total ram: 524288 kbytes\nduplicate: 120000 pages\nnormal: 11000 pages\nnormal bytes: 44000 kbytes\n\
            dirty sync count: 4\npage size: 4 kbytes\n";
        assert_eq!(migrate_text(&m), expected);
        let failed = migrate_text(&json!({"status": "failed", "error-desc": "link lost"}));
        assert_eq!(failed, "Migration status: failed (link lost)\n");
    }

    #[test]
    fn parameters_and_their_values() {
        let t = parameters_text(&json!({"downtime-limit": 50, "dirty-tracker": "uffd-wp", "max-bandwidth": 0}));
        assert_eq!(t, "dirty-tracker: uffd-wp\ndowntime-limit: 50 ms\nmax-bandwidth: 0 bytes/second\n");
        assert_eq!(parameter_value("300"), json!(300));
        assert_eq!(parameter_value("100M"), json!(100u64 << 20));
        assert_eq!(parameter_value("uffd-wp"), json!("uffd-wp"));
        assert_eq!(parameter_value("99999999999999T"), json!("99999999999999T"), "an overflow stays a word");
        assert!(is_quit("quit") && is_quit(" q") && !is_quit("quitx") && !is_quit(""));
    }
}
