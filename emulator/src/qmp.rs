//! The monitor's protocol: QMP as QEMU's `docs/interop/qmp-spec.rst` specifies it, on a Unix
//! socket, and the client that `emu qmp` runs.
//!
//! ```text
//! <- {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "emu-0.1.0"},
//!             "capabilities": []}}                                  greeting on connect
//! -> {"execute": "query-status"}                                    before negotiation:
//! <- {"error": {"class": "CommandNotFound",                         refused
//!               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
//! -> {"execute": "qmp_capabilities"}
//! <- {"return": {}}                                                 command mode from here on
//! -> {"execute": "query-status", "id": 1}
//! <- {"return": {"status": "running", "running": true}, "id": 1}
//! <- {"event": "STOP", "timestamp": {"seconds": 1767000000, "microseconds": 5}}   at any time
//! ```
//!
//! Input is a stream of JSON values, not lines: a request may arrive in pieces or span lines, and
//! one write may carry several (`json_stream.rs` finds where each ends; one may be at most
//! [`MAX_REQUEST`] bytes). Output is one JSON object per line, ending in CRLF as QEMU's does. Every
//! reply carries the request's `id` (any JSON value) when the request had one and it could be read;
//! errors use QEMU's classes (`GenericError`, `CommandNotFound`, `DeviceNotActive`). Events reach
//! every client that has negotiated, none before (as the spec says), each with the time it
//! happened. No capabilities are offered (no `oob`).
//!
//! Each client has its own thread, up to [`MAX_CLIENTS`] at once, which both answers requests and
//! writes the events queued for it; a client that stops reading holds up only itself, and one that
//! falls [`MAX_QUEUED_EVENTS`] events behind is disconnected rather than buffered without bound.
//! This module is the protocol only: the commands are a [`Handler`] (`monitor.rs`), so it depends on
//! nothing else in emu.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Map, Value};

use crate::json_stream::{Item, Splitter};

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

/// A request longer than this is refused (and skipped to its end): a client cannot make the monitor
/// buffer without bound. The largest real request is a few hundred bytes.
pub const MAX_REQUEST: usize = 1 << 20;

/// At most this many monitor clients at once; the next one gets an error line and is closed. Each
/// client holds a thread (and a few descriptors) for as long as it stays connected, so without a cap
/// anything that can reach the socket could make emu create threads until thread or descriptor
/// limits break the VM itself. 128 is far more than scripts, tests and people use at once.
const MAX_CLIENTS: usize = 128;

/// Events queued for one client beyond what its socket buffer took. A client that does not read
/// for this long (a migration sends a few events per pass) is disconnected: dropping some of its
/// events silently would leave it waiting for one that never comes.
const MAX_QUEUED_EVENTS: usize = 4096;

/// How much one read from a client takes.
const READ_CHUNK: usize = 64 << 10;

const NEGOTIATION: &str = "qmp_capabilities";

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

    /// QEMU's wording, which clients match on.
    pub fn not_found(command: &str) -> Self {
        QmpError::command_not_found(format!("The command {command} has not been found"))
    }

    fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError { class: "CommandNotFound", desc: desc.into() }
    }

    /// The command exists but what it acts on does not (yet): QEMU's class for a device or job
    /// that is not there.
    pub fn not_active(desc: impl Into<String>) -> Self {
        QmpError { class: "DeviceNotActive", desc: desc.into() }
    }
}

impl<E: std::error::Error + 'static> From<E> for QmpError {
    fn from(e: E) -> Self {
        QmpError::generic(migrate::report(&e))
    }
}

/// A command's success: its return value, and whether emu ends once the reply is out (`quit`).
pub struct Success {
    pub value: Value,
    pub then_quit: bool,
}

impl From<Value> for Success {
    fn from(value: Value) -> Self {
        Success { value, then_quit: false }
    }
}

/// What the monitor serves: one call per command. The monitor knows the protocol, not the
/// commands (`monitor.rs` has those).
pub trait Handler: Send + Sync {
    /// Runs command `name`; never called for `qmp_capabilities`, which is the protocol's.
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Success, QmpError>;
    /// A command that asked for it (`then_quit`) was answered: end emu.
    fn quit(&self);
}

/// The version as the greeting and `query-version` give it: QEMU's shape, emu's numbers (a client
/// that compares them with QEMU releases sees 0.x, older than any QEMU it knows).
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": n(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": n(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": n(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("emu-", env!("CARGO_PKG_VERSION")),
    })
}

fn with_id(mut reply: Value, id: Option<Value>) -> Value {
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

fn error_reply(e: QmpError, id: Option<Value>) -> Value {
    with_id(json!({"error": {"class": e.class, "desc": e.desc}}), id)
}

/// One client's protocol state: capabilities negotiation, then command mode.
struct Session<'a> {
    handler: &'a dyn Handler,
    negotiated: bool,
}

/// What one request came to.
struct Answer {
    reply: Value,
    then_quit: bool,
    /// This request completed the negotiation: events flow from now on.
    negotiated: bool,
}

impl Answer {
    fn error(e: QmpError, id: Option<Value>) -> Self {
        Answer { reply: error_reply(e, id), then_quit: false, negotiated: false }
    }
}

impl Session<'_> {
    /// The answer to one item of the input stream.
    fn answer(&mut self, item: Item) -> Answer {
        let bytes = match item {
            Item::Value(bytes) => bytes,
            Item::TooLarge => {
                return Answer::error(QmpError::generic(format!("request longer than {MAX_REQUEST} bytes")), None)
            }
            Item::LexicalError(b) => {
                return Answer::error(
                    QmpError::generic(format!("JSON parse error, stray byte {b:#04x}; parser reset")),
                    None,
                )
            }
        };
        if std::str::from_utf8(&bytes).is_err() {
            return Answer::error(QmpError::generic("request is not UTF-8"), None);
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(request) => self.request(request),
            Err(e) => Answer::error(QmpError::generic(format!("JSON parse error, {e}")), None),
        }
    }

    /// Checks a request's shape as QEMU's dispatcher does (same checks, same wording), then runs it.
    fn request(&mut self, request: Value) -> Answer {
        let Value::Object(request) = request else {
            return Answer::error(QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = request.get("id").cloned();
        let fail = |e: QmpError| Answer::error(e, id.clone());
        if let Some(key) = request.keys().find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id")) {
            // exec-oob included: it needs the `oob` capability, which emu does not offer.
            return fail(QmpError::generic(format!("QMP input member '{key}' is unexpected")));
        }
        let name = match request.get("execute") {
            None => return fail(QmpError::generic("QMP input lacks member 'execute'")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return fail(QmpError::generic("QMP input member 'execute' must be a string")),
        };
        let empty = Map::new();
        let args = match request.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return fail(QmpError::generic("QMP input member 'arguments' must be an object")),
        };
        match (self.negotiated, name == NEGOTIATION) {
            (false, false) => {
                fail(QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'"))
            }
            (false, true) => match negotiate(args) {
                Ok(()) => {
                    self.negotiated = true;
                    Answer { reply: with_id(json!({"return": {}}), id), then_quit: false, negotiated: true }
                }
                Err(e) => fail(e),
            },
            (true, true) => {
                fail(QmpError::command_not_found("Capabilities negotiation is already complete, command ignored"))
            }
            (true, false) => match self.handler.execute(name, args) {
                Ok(s) => {
                    Answer { reply: with_id(json!({"return": s.value}), id), then_quit: s.then_quit, negotiated: false }
                }
                Err(e) => fail(e),
            },
        }
    }
}

/// `qmp_capabilities {"enable"?: [...]}`: there is nothing to enable, so any capability named is
/// refused, as QEMU refuses one it did not offer.
fn negotiate(args: &Map<String, Value>) -> Result<(), QmpError> {
    for (key, value) in args {
        if key != "enable" {
            return Err(QmpError::generic(format!("Parameter '{key}' is unexpected")));
        }
        let Some(caps) = value.as_array() else {
            return Err(QmpError::generic("Invalid parameter type for 'enable', expected: array"));
        };
        if let Some(cap) = caps.first() {
            let name = cap.as_str().map_or_else(|| cap.to_string(), str::to_string);
            return Err(QmpError::generic(format!("Capability '{name}' not available")));
        }
    }
    Ok(())
}

/// The events of one client: queued by whoever emits, written by the client's own thread, which a
/// byte on `wake` rouses from its wait.
struct Subscriber {
    queue: Mutex<Queue>,
    wake: UnixStream,
    /// The client's connection, shut down if it falls too far behind.
    conn: UnixStream,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Arc<str>>,
    /// Queued and not yet written to the socket (taken lines count until written).
    unwritten: usize,
    dropped: bool,
}

impl Subscriber {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &Arc<str>) {
        let mut q = self.queue();
        if q.dropped {
            return;
        }
        if q.lines.len() >= MAX_QUEUED_EVENTS {
            log::warn!("monitor: a client fell {MAX_QUEUED_EVENTS} events behind; disconnecting it");
            q.dropped = true;
            q.lines.clear();
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        q.lines.push_back(line.clone());
        q.unwritten += 1;
        drop(q);
        // Non-blocking: a full wake pipe means the thread has a wake-up pending already.
        let _ = (&self.wake).write(&[1]);
    }

    fn take(&self) -> Vec<Arc<str>> {
        self.queue().lines.drain(..).collect()
    }

    fn wrote(&self, n: usize) {
        let mut q = self.queue();
        q.unwritten = q.unwritten.saturating_sub(n);
    }

    fn settled(&self) -> bool {
        let q = self.queue();
        q.dropped || q.unwritten == 0
    }
}

/// Where events go: every negotiated client of the monitor. Emitting never blocks on a client.
#[derive(Default)]
pub struct EventBus {
    clients: Mutex<Vec<Weak<Subscriber>>>,
}

impl EventBus {
    /// Sends event `name` (with `data`, if any) to every negotiated client, stamped with the time
    /// now (seconds and microseconds since the Unix epoch; -1 and -1 if the clock is before it, as
    /// the spec says).
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let (seconds, microseconds) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(t) => (t.as_secs() as i64, i64::from(t.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let mut event = json!({"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}});
        if let Some(data) = data {
            event["data"] = data;
        }
        log::debug!("monitor event: {event}");
        let line: Arc<str> = format!("{event}\r\n").into();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|c| match c.upgrade() {
            Some(s) => {
                s.push(&line);
                true
            }
            None => false,
        });
    }

    /// Waits (up to `timeout`) until every client has been written the events emitted so far: emu
    /// ending says SHUTDOWN, and its clients should get to read it.
    pub fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let clients: Vec<_> =
                self.clients.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
            if clients.iter().all(|c| c.settled()) || std::time::Instant::now() > deadline {
                return;
            }
            drop(clients);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn subscribe(&self, s: &Arc<Subscriber>) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(s));
    }
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

/// Starts serving `commands` on `addr`, with the events of `events`.
pub fn serve(addr: &UnixAddr, commands: Arc<dyn Handler>, events: Arc<EventBus>) -> Result<Monitor> {
    let path = addr.0.clone();
    if path.exists() {
        // A socket left by an emu that is gone; refuse to take one that something still serves.
        if UnixStream::connect(&path).is_ok() {
            bail!("monitor socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::thread::Builder::new().name("monitor".into()).spawn(move || accept_clients(listener, commands, events))?;
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

fn accept_clients(listener: UnixListener, commands: Arc<dyn Handler>, events: Arc<EventBus>) {
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
        let (commands, events) = (commands.clone(), events.clone());
        // If the thread cannot start, the closure (and the slot in it) is dropped: the place frees.
        let spawned = std::thread::Builder::new().name("monitor-client".into()).spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_client(conn, &*commands, &events) {
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
    let _ = write_message(&mut conn, &error_reply(e, None));
}

/// One message on the wire: compact JSON, then CRLF (the spec: every server message ends so).
fn write_message(out: &mut impl Write, message: &Value) -> std::io::Result<()> {
    out.write_all(format!("{message}\r\n").as_bytes())
}

/// Waits until the client sent something (or hung up) and/or events were queued for it.
fn wait(conn: &UnixStream, wake: &UnixStream) -> std::io::Result<(bool, bool)> {
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Hang-up and errors count as readable: the read that follows reports them.
    let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
    Ok((ready(&fds[0]), ready(&fds[1])))
}

fn serve_client(conn: UnixStream, commands: &dyn Handler, events: &EventBus) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    write_message(&mut out, &json!({"QMP": {"version": version(), "capabilities": []}}))?;
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    let subscriber = Arc::new(Subscriber { queue: Mutex::default(), wake: wake_tx, conn: conn.try_clone()? });
    let mut session = Session { handler: commands, negotiated: false };
    let mut splitter = Splitter::new(MAX_REQUEST);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut items = Vec::new();
    loop {
        let (readable, woken) = wait(&conn, &wake_rx)?;
        if woken {
            let mut sink = [0u8; 64];
            while matches!((&wake_rx).read(&mut sink), Ok(n) if n > 0) {}
            let lines = subscriber.take();
            for line in &lines {
                out.write_all(line.as_bytes())?;
            }
            subscriber.wrote(lines.len());
        }
        if !readable {
            continue;
        }
        let n = match (&conn).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        splitter.feed(&buf[..n], &mut items);
        for item in items.drain(..) {
            let answer = session.answer(item);
            write_message(&mut out, &answer.reply)?;
            if answer.negotiated {
                events.subscribe(&subscriber);
            }
            if answer.then_quit {
                commands.quit();
            }
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

/// A negotiated connection to a monitor, for `emu qmp`.
struct Connection {
    out: UnixStream,
    lines: std::io::Lines<BufReader<UnixStream>>,
    next_id: u64,
}

impl Connection {
    /// Connects, reads the greeting and negotiates. `Ok(Err(desc))`: the monitor refused the
    /// connection (all its client places taken).
    fn open(socket: &UnixAddr) -> Result<std::result::Result<Connection, String>> {
        let conn = UnixStream::connect(&socket.0)
            .with_context(|| format!("cannot connect to monitor {}", socket.0.display()))?;
        let out = conn.try_clone()?;
        let mut c = Connection { out, lines: BufReader::new(conn).lines(), next_id: 0 };
        let greeting = c.message()?;
        if let Some(e) = greeting.get("error") {
            return Ok(Err(e.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_string()));
        }
        if let Err(e) = c.call(NEGOTIATION, &json!({}))? {
            bail!("capabilities negotiation failed: {e}");
        }
        Ok(Ok(c))
    }

    fn message(&mut self) -> Result<Value> {
        let line = self.lines.next().context("the monitor closed the connection")??;
        serde_json::from_str(&line).with_context(|| format!("the monitor sent what is not JSON: {line}"))
    }

    /// Runs one command: its return value, or its error's description.
    fn call(&mut self, command: &str, args: &Value) -> Result<std::result::Result<Value, String>> {
        self.next_id += 1;
        let id = json!(format!("emu-qmp-{}", self.next_id));
        write_message(&mut self.out, &json!({"execute": command, "arguments": args, "id": id}))?;
        loop {
            let reply = self.message()?;
            // Events, and anything not ours, are skipped.
            if reply.get("id") != Some(&id) {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(Ok(r.clone()));
            }
            let desc = reply.pointer("/error/desc").and_then(Value::as_str).unwrap_or("unknown error");
            return Ok(Err(desc.to_string()));
        }
    }
}

/// `emu qmp SOCKET COMMAND [ARGS] [--get FIELD]...`: prints the "return" value as JSON (or just the
/// fields asked for; a text return as text); an error reply goes to stderr and the exit status is 1.
pub fn client(socket: &UnixAddr, command: &str, arguments: Option<&str>, get: &[String]) -> Result<ExitCode> {
    let args: Value = match arguments {
        Some(a) => serde_json::from_str(a).with_context(|| format!("arguments are not JSON: {a}"))?,
        None => json!({}),
    };
    if !args.is_object() {
        bail!("arguments must be a JSON object");
    }
    let mut conn = match Connection::open(socket)? {
        Ok(c) => c,
        Err(desc) => {
            eprintln!("emu qmp: the monitor refused the connection: {desc}");
            return Ok(ExitCode::from(1));
        }
    };
    match conn.call(command, &args)? {
        // Text (human-monitor-command's) as it is, with its lines as a terminal wants them.
        Ok(Value::String(text)) if get.is_empty() => print!("{}", text.replace("\r\n", "\n")),
        Ok(r) if get.is_empty() => println!("{r}"),
        Ok(r) => println!("{}", get.iter().map(|f| field(&r, f)).collect::<Vec<_>>().join(" ")),
        Err(desc) => {
            eprintln!("emu qmp: {command}: {desc}");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Success, QmpError> {
            match name {
                "echo" => Ok(Value::Object(args.clone()).into()),
                "quit" => Ok(Success { value: json!({}), then_quit: true }),
                _ => Err(QmpError::not_found(name)),
            }
        }
        fn quit(&self) {}
    }

    fn answer(s: &mut Session, text: &str) -> Value {
        s.answer(Item::Value(text.as_bytes().to_vec())).reply
    }

    #[test]
    fn negotiation_mode_then_command_mode() {
        let mut s = Session { handler: &Echo, negotiated: false };
        let refused = json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1});
        assert_eq!(answer(&mut s, r#"{"execute": "echo", "id": 1}"#), refused);
        assert_eq!(
            answer(&mut s, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
            json!({"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}})
        );
        assert!(!s.negotiated);
        let a = s.answer(Item::Value(br#"{"execute": "qmp_capabilities", "id": "n"}"#.to_vec()));
        assert_eq!((a.reply, a.negotiated), (json!({"return": {}, "id": "n"}), true));
        assert_eq!(
            answer(&mut s, r#"{"execute": "echo", "arguments": {"x": 1}, "id": [2]}"#),
            json!({"return": {"x": 1}, "id": [2]})
        );
        assert_eq!(
            answer(&mut s, r#"{"execute": "qmp_capabilities"}"#)["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored"
        );
        assert_eq!(
            answer(&mut s, r#"{"execute": "nope", "id": null}"#),
            json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": null})
        );
        assert!(s.answer(Item::Value(br#"{"execute": "quit"}"#.to_vec())).then_quit);
    }

    #[test]
    fn malformed_requests_get_qemus_errors_with_the_id_when_there_is_one() {
        let mut s = Session { handler: &Echo, negotiated: true };
        let desc = |s: &mut Session, t: &str| answer(s, t)["error"]["desc"].as_str().unwrap_or("").to_string();
        assert_eq!(desc(&mut s, "[1]"), "QMP input must be a JSON object");
        assert_eq!(desc(&mut s, r#"{"id": 4}"#), "QMP input lacks member 'execute'");
        assert_eq!(answer(&mut s, r#"{"id": 4}"#)["id"], 4);
        assert_eq!(desc(&mut s, r#"{"execute": 5}"#), "QMP input member 'execute' must be a string");
        assert_eq!(
            desc(&mut s, r#"{"execute": "echo", "arguments": 3}"#),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(desc(&mut s, r#"{"exec-oob": "echo", "id": 9}"#), "QMP input member 'exec-oob' is unexpected");
        assert!(desc(&mut s, "{\"execute\": }").starts_with("JSON parse error, "));
        assert_eq!(s.answer(Item::Value(b"\"\xc3\x28\"".to_vec())).reply["error"]["desc"], "request is not UTF-8");
        assert_eq!(s.answer(Item::TooLarge).reply["error"]["desc"], format!("request longer than {MAX_REQUEST} bytes"));
        assert!(s.answer(Item::LexicalError(0)).reply["error"]["desc"].as_str().unwrap().contains("parser reset"));
    }

    #[test]
    fn greeting_has_qemus_shape() {
        let v = version();
        for k in ["major", "minor", "micro"] {
            assert!(v["qemu"][k].is_u64(), "{v}");
        }
        assert_eq!(v["package"], concat!("emu-", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn events_reach_subscribers_only_and_a_client_too_far_behind_is_dropped() {
        let bus = EventBus::default();
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let (wake_rx, wake_tx) = UnixStream::pair().unwrap();
        wake_tx.set_nonblocking(true).unwrap();
        let s = Arc::new(Subscriber { queue: Mutex::default(), wake: wake_tx, conn: server_end });
        bus.emit("BEFORE", None);
        bus.subscribe(&s);
        bus.emit("STOP", None);
        bus.emit("MIGRATION", Some(json!({"status": "active"})));
        let lines = s.take();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["event"], "STOP");
        assert!(first.get("data").is_none() && first["timestamp"]["microseconds"].is_i64(), "{first}");
        assert!(lines[0].ends_with("\r\n"));
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["data"], json!({"status": "active"}));
        let mut b = [0u8; 1];
        assert_eq!((&wake_rx).read(&mut b).unwrap(), 1, "the client's thread was woken");
        for _ in 0..=MAX_QUEUED_EVENTS {
            bus.emit("RESUME", None);
        }
        assert!(s.take().is_empty());
        client_end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!((&client_end).read(&mut b).unwrap(), 0, "the connection was shut down");
        // a gone client is forgotten
        drop(s);
        bus.emit("STOP", None);
        assert!(bus.clients.lock().unwrap().is_empty());
    }
}
