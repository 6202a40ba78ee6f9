//! The monitor: newline-delimited JSON on a Unix socket, shaped like QEMU's QMP, and the client that
//! `emu qmp` runs.
//!
//! ```text
//! <- {"QMP": {"version": {...}, "capabilities": []}}        greeting on connect
//! -> {"execute": "query-status", "id": 1}
//! <- {"return": {"status": "running", "running": true}, "id": 1}
//! -> {"execute": "nonsense"}
//! <- {"error": {"class": "CommandNotFound", "desc": "..."}}
//! ```
//!
//! `qmp_capabilities` is accepted but not required. Each client has its own thread, up to
//! [`MAX_CLIENTS`] at once; a malformed line (bad JSON, or not UTF-8) gets an error reply and the
//! connection stays open. This module is the protocol only: the commands are a [`Handler`]
//! (`monitor.rs`), so it depends on nothing else in emu.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// A Unix socket address, written `unix:PATH` (the monitor's address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixAddr(pub PathBuf);

impl FromStr for UnixAddr {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(UnixAddr(PathBuf::from(p))),
            _ => Err(format!("'{s}' is not unix:PATH")),
        }
    }
}

/// A line longer than this is refused (and the connection closed): a client cannot make the monitor
/// buffer without bound.
const MAX_LINE: u64 = 1 << 20;

/// At most this many monitor clients at once; the next one gets an error line and is closed. Each
/// client holds a thread (and two descriptors) for as long as it stays connected, so without a cap
/// anything that can reach the socket could make emu create threads until thread or descriptor
/// limits break the VM itself. 128 is far more than scripts, tests and people use at once.
const MAX_CLIENTS: usize = 128;

/// A command's failure, as QMP reports it.
#[derive(Debug)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: "GenericError", desc: desc.into() }
    }

    pub fn not_found(command: &str) -> Self {
        QmpError { class: "CommandNotFound", desc: format!("the command {command} has not been found") }
    }
}

impl<E: std::error::Error + 'static> From<E> for QmpError {
    fn from(e: E) -> Self {
        QmpError::generic(migrate::report(&e))
    }
}

/// What the monitor serves: one call per command. The monitor knows the protocol, not the
/// commands (`monitor.rs` has those).
pub trait Handler: Send + Sync {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
    /// A `quit` was answered: end emu.
    fn quit(&self);
}

/// The reply to one request line, and whether it was a successful `quit`.
fn reply(handler: &dyn Handler, line: &str) -> (Value, bool) {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return (error_reply(QmpError::generic(format!("JSON parse error: {e}")), None), false),
    };
    let id = request.get("id").cloned();
    let Some(name) = request.get("execute").and_then(Value::as_str) else {
        return (error_reply(QmpError::generic("expected an object with \"execute\""), id), false);
    };
    let empty = Map::new();
    let args = match request.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return (error_reply(QmpError::generic("\"arguments\" must be an object"), id), false),
    };
    match handler.execute(name, args) {
        Ok(v) => {
            let mut r = json!({"return": v});
            if let Some(id) = id {
                r["id"] = id;
            }
            (r, name == "quit")
        }
        Err(e) => (error_reply(e, id), false),
    }
}

fn error_reply(e: QmpError, id: Option<Value>) -> Value {
    let mut r = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

/// The listening monitor; dropping it removes the socket file.
pub struct Monitor {
    path: PathBuf,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving `commands` on `addr`.
pub fn serve(addr: &UnixAddr, commands: Arc<dyn Handler>) -> Result<Monitor> {
    let path = addr.0.clone();
    if path.exists() {
        // A socket left by an emu that is gone; refuse to take one that something still serves.
        if UnixStream::connect(&path).is_ok() {
            bail!("monitor socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::thread::Builder::new().name("monitor".into()).spawn(move || accept_clients(listener, commands))?;
    Ok(Monitor { path })
}

/// One client's place among the [`MAX_CLIENTS`]; dropping it (the client's thread ends, however it
/// ends, or never starts) frees the place.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    /// A place, if fewer than `MAX_CLIENTS` are taken. Only the accepting thread takes places, so
    /// the count cannot pass the cap between the check and the increment.
    fn take(clients: &Arc<AtomicUsize>) -> Option<ClientSlot> {
        if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            return None;
        }
        clients.fetch_add(1, Ordering::AcqRel);
        Some(ClientSlot(clients.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_clients(listener: UnixListener, commands: Arc<dyn Handler>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: pause instead of spinning on the same error.
                log::warn!("monitor: cannot accept a client: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(slot) = ClientSlot::take(&clients) else {
            refuse_client(conn);
            continue;
        };
        let commands = commands.clone();
        // If the thread cannot start, the closure (and the slot in it) is dropped: the place frees.
        let spawned = std::thread::Builder::new().name("monitor-client".into()).spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_client(conn, &*commands) {
                log::debug!("monitor client: {e}");
            }
        });
        if let Err(e) = spawned {
            log::warn!("monitor: cannot start a client thread: {e}");
        }
    }
}

/// Tells a client over the cap why it is closed. Non-blocking, so a client that never reads cannot
/// hold up the accepting thread (one short line fits a fresh socket's buffer anyway).
fn refuse_client(mut conn: UnixStream) {
    let e = QmpError::generic(format!("too many monitor clients (at most {MAX_CLIENTS})"));
    let _ = conn.set_nonblocking(true);
    let _ = writeln!(conn, "{}", error_reply(e, None));
}

fn serve_client(conn: UnixStream, commands: &dyn Handler) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let greeting =
        json!({"QMP": {"version": {"package": "emu", "emu": env!("CARGO_PKG_VERSION")}, "capabilities": []}});
    writeln!(out, "{greeting}")?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bytes, not `read_line`: that fails on invalid UTF-8 and would end the connection without
        // a word, where a malformed line is promised an error reply.
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            let e = QmpError::generic(format!("request longer than {MAX_LINE} bytes"));
            writeln!(out, "{}", error_reply(e, None))?;
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            writeln!(out, "{}", error_reply(QmpError::generic("request is not UTF-8"), None))?;
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let (reply, quit) = reply(commands, text.trim());
        writeln!(out, "{reply}")?;
        if quit {
            commands.quit();
        }
    }
}

/// A field of a JSON value by dotted path, printed bare (strings without quotes, absent as `-`).
fn field(v: &Value, path: &str) -> String {
    let found = path.split('.').try_fold(v, |v, key| v.get(key));
    match found {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `emu qmp SOCKET COMMAND [ARGS] [--get FIELD]...`: prints the "return" value as JSON (or just the
/// fields asked for); an error reply goes to stderr and the exit status is 1.
pub fn client(socket: &UnixAddr, command: &str, arguments: Option<&str>, get: &[String]) -> Result<ExitCode> {
    let args: Value = match arguments {
        Some(a) => serde_json::from_str(a).with_context(|| format!("arguments are not JSON: {a}"))?,
        None => json!({}),
    };
    if !args.is_object() {
        bail!("arguments must be a JSON object");
    }
    let conn =
        UnixStream::connect(&socket.0).with_context(|| format!("cannot connect to monitor {}", socket.0.display()))?;
    let mut out = conn.try_clone()?;
    let mut lines = BufReader::new(conn).lines();
    let mut next = || -> Result<Value> {
        let line = lines.next().context("the monitor closed the connection")??;
        Ok(serde_json::from_str(&line)?)
    };
    // The greeting, or a refusal (a monitor with all its client places taken).
    let greeting = next()?;
    if let Some(e) = greeting.get("error") {
        let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
        eprintln!("emu qmp: the monitor refused the connection: {desc}");
        return Ok(ExitCode::from(1));
    }
    writeln!(out, "{}", json!({"execute": command, "arguments": args}))?;
    loop {
        let reply = next()?;
        if let Some(r) = reply.get("return") {
            if get.is_empty() {
                println!("{r}");
            } else {
                let fields: Vec<String> = get.iter().map(|f| field(r, f)).collect();
                println!("{}", fields.join(" "));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(e) = reply.get("error") {
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
            eprintln!("emu qmp: {command}: {desc}");
            return Ok(ExitCode::from(1));
        }
        // anything else (an event) is skipped
    }
}
