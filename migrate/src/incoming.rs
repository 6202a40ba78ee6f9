//! The destination's listening address: it takes exactly one migration, and answers resolution
//! connections (RESOLVE) about it until the source knows the outcome.
//!
//! Whatever connects is screened first, each connection in its own short-lived thread with a
//! deadline: a port scan (connect, close), a silent client, garbage or a stream of another
//! version is answered or dropped, and the destination goes on listening. The first connection
//! whose preamble and HEADER are valid is the migration; a later one is refused with ERROR. A
//! connection that opens with CHANNEL joins the migration it names, as one of its page channels
//! (`channel.rs`) or, index 0, as its urgent connection (postcopy-preempt, `stream.rs`); one
//! naming another migration is refused.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::handover::Handover;
use crate::stream::{Decoder, Encoder, Record, StreamError, StreamHeader};
use crate::transport::{Connection, Listener, Uri};

/// How long a new connection has to send its preamble and first record.
pub const SCREEN_DEADLINE: Duration = Duration::from_secs(5);
/// Connections screened at once; more are closed unread (a flood must not cost a thread each).
const MAX_SCREENING: usize = 16;
/// How often the accept loop looks up from waiting (to stop when told).
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// The migration connection, its preamble and HEADER read and checked.
pub struct Accepted {
    pub conn: Connection,
    pub header: StreamHeader,
    /// The decoder, positioned after the header (bytes counted from the start of the stream).
    pub bytes_so_far: u64,
    /// The migration's further channels as they connect: (index, connection after its CHANNEL).
    pub channels: mpsc::Receiver<ChannelJoin>,
}

/// A page channel on its way to its migration: (index, connection after its CHANNEL record);
/// index 0 is the urgent connection.
pub type ChannelJoin = (u32, Connection);

/// Where connections that open with CHANNEL find their migration.
#[derive(Default)]
struct ChannelJoins {
    migration: Mutex<Option<(u64, mpsc::Sender<ChannelJoin>)>>,
    known: Condvar,
}

impl ChannelJoins {
    fn register(&self, id: u64) -> mpsc::Receiver<ChannelJoin> {
        let (tx, rx) = mpsc::channel();
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, tx));
        self.known.notify_all();
        rx
    }

    /// Hands a channel to migration `id`, waiting until `until` for it to be known (its channel 0
    /// may still be in screening); gives the connection back if no such migration is here.
    fn join(&self, id: u64, index: u32, conn: Connection, until: Instant) -> Result<(), Connection> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((known, tx)) = m.as_ref() {
                return if *known == id { tx.send((index, conn)).map_err(|e| e.0 .1) } else { Err(conn) };
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(conn);
            }
            m = self.known.wait_timeout(m, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// A listening destination. Dropping it stops listening.
pub struct IncomingServer {
    local: Uri,
    handover: Arc<Handover>,
    migrations: mpsc::Receiver<Accepted>,
    stop: Arc<AtomicBool>,
    /// Stop listening once the source knows the outcome (set by `close_when_source_informed`).
    until_informed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IncomingServer {
    pub fn bind(uri: &Uri) -> io::Result<IncomingServer> {
        let listener = Listener::bind(uri)?;
        let local = listener.local_uri()?;
        let handover = Arc::new(Handover::default());
        let stop = Arc::new(AtomicBool::new(false));
        let until_informed = Arc::new(AtomicBool::new(false));
        let (tx, migrations) = mpsc::channel();
        let (h, s, u) = (handover.clone(), stop.clone(), until_informed.clone());
        let thread =
            std::thread::Builder::new().name("incoming".into()).spawn(move || accept_loop(listener, &h, &s, &u, tx))?;
        Ok(IncomingServer { local, handover, migrations, stop, until_informed, thread: Some(thread) })
    }

    /// The address actually listened on (a port the kernel chose, for `tcp:HOST:0`).
    pub fn local_uri(&self) -> &Uri {
        &self.local
    }

    pub fn handover(&self) -> &Arc<Handover> {
        &self.handover
    }

    /// Waits for the migration connection (the first valid one).
    pub fn next_migration(&self) -> io::Result<Accepted> {
        self.migrations.recv().map_err(|_| match self.local {
            Uri::Stdio => io::Error::other("no migration came on stdin"),
            _ => io::Error::other("the incoming listener stopped"),
        })
    }

    /// Goes on listening in the background until the source knows the outcome: until then a
    /// source that missed STARTED can still ask.
    pub fn close_when_source_informed(mut self) {
        self.until_informed.store(true, Ordering::SeqCst);
        // The accept loop ends by itself now; dropping `self` must not stop it first.
        self.thread = None;
    }
}

impl Drop for IncomingServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: Listener,
    handover: &Arc<Handover>,
    stop: &AtomicBool,
    until_informed: &AtomicBool,
    tx: mpsc::Sender<Accepted>,
) {
    let screening = Arc::new(AtomicUsize::new(0));
    let taken = Arc::new(AtomicBool::new(false));
    let joins = Arc::new(ChannelJoins::default());
    let single = matches!(listener, Listener::Stdio(_));
    let tls = listener.tls();
    let done =
        || stop.load(Ordering::SeqCst) || (until_informed.load(Ordering::SeqCst) && handover.is_source_informed());
    while !done() {
        // stdio has one connection: once it is screened (the migration, or refused) nothing more
        // can come, and a destination whose stream was refused must end instead of waiting. The
        // migration goes on without this loop (no RESOLVE can reach a pipe: an unresolved
        // handover waits for the operator's migrate-resolve).
        if listener.exhausted() && screening.load(Ordering::SeqCst) == 0 {
            break;
        }
        let conn = match listener.accept_timeout(ACCEPT_TICK) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("incoming: accept: {e}");
                std::thread::sleep(ACCEPT_TICK);
                continue;
            }
        };
        if screening.fetch_add(1, Ordering::SeqCst) >= MAX_SCREENING {
            screening.fetch_sub(1, Ordering::SeqCst);
            log::warn!("incoming: {MAX_SCREENING} connections are being screened already; one more closed");
            continue;
        }
        let (h, n, t, tx, j) = (handover.clone(), screening.clone(), taken.clone(), tx.clone(), joins.clone());
        let tls = tls.clone();
        let spawned = std::thread::Builder::new().name("incoming-screen".into()).spawn(move || {
            let conn = match tls {
                None => Some(conn),
                Some(config) => secure(conn, &config),
            };
            if let Some(conn) = conn {
                screen(conn, &h, &t, &j, &tx, single);
            }
            n.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            screening.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A destination with TLS credentials takes TLS only: the handshake first, within the screening
/// deadline. A plain emu stream is told so, plainly (its source then says why, instead of seeing a
/// broken stream), and nothing else happens: the destination goes on listening.
fn secure(conn: Connection, config: &crate::transport::TlsConfig) -> Option<Connection> {
    use crate::transport::{secure_incoming, Secured};
    match secure_incoming(conn, config, Instant::now() + SCREEN_DEADLINE) {
        Secured::Tls(c) => Some(c),
        Secured::Plain(c) => {
            eprintln!("emu: incoming: refused a plain (not TLS) migration stream; still listening");
            refuse(
                c,
                "this destination takes TLS only (it has tls-cert, tls-key and tls-ca): a plain stream is refused",
            );
            None
        }
        Secured::Failed(e) => {
            eprintln!("emu: incoming: refused a connection: {e}; still listening");
            None
        }
    }
}

/// Reads from a connection until a deadline, whatever the peer does.
struct Deadline<'a> {
    conn: &'a Connection,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.conn.set_read_timeout(Some(left))?;
        let mut c = self.conn;
        c.read(buf)
    }
}

/// What the first bytes of a connection were.
enum Opening {
    Migration(StreamHeader, u64),
    Resolve { id: u64, action: crate::stream::ResolveAction },
    Channel { id: u64, index: u32 },
}

fn opening(conn: &Connection) -> Result<Opening, StreamError> {
    let mut dec = Decoder::new(Deadline { conn, until: Instant::now() + SCREEN_DEADLINE });
    dec.preamble()?;
    let frame = dec.next_frame()?;
    let bytes = dec.bytes_read() + frame.len() as u64;
    match dec.read_record(&frame)? {
        Record::Header(h) => Ok(Opening::Migration(h, bytes)),
        Record::Resolve { migration_id, action } => Ok(Opening::Resolve { id: migration_id, action }),
        Record::Channel { migration_id, index } => Ok(Opening::Channel { id: migration_id, index }),
        other => Err(StreamError::Malformed {
            kind: "first record",
            why: format!("a connection must open with HEADER, CHANNEL or RESOLVE, not {other:?}"),
        }),
    }
}

fn refuse(conn: Connection, why: &str) {
    let mut e = Encoder::new(&conn);
    let _ = e.error(why);
    crate::transport::drain_and_close(conn);
}

fn screen(
    conn: Connection,
    handover: &Handover,
    taken: &AtomicBool,
    joins: &ChannelJoins,
    tx: &mpsc::Sender<Accepted>,
    single: bool,
) {
    match opening(&conn) {
        Ok(Opening::Migration(header, bytes_so_far)) => {
            if taken.swap(true, Ordering::SeqCst) {
                log::warn!("incoming: a second migration refused");
                refuse(conn, "this destination has taken a migration already");
                return;
            }
            let channels = joins.register(header.migration_id);
            let _ = tx.send(Accepted { conn, header, bytes_so_far, channels });
        }
        Ok(Opening::Channel { id, index }) => {
            if let Err(conn) = joins.join(id, index, conn, Instant::now() + SCREEN_DEADLINE) {
                log::warn!("incoming: channel {index} of unknown migration {id:#x} refused");
                refuse(conn, &format!("no migration {id:#x} here for channel {index} to join"));
            }
        }
        Ok(Opening::Resolve { id, action }) => {
            let answer = handover.resolve(id, action);
            log::info!("incoming: RESOLVE {action:?} for {id:#x}: {answer:?}");
            let mut e = Encoder::new(&conn);
            let _ = e.resolved(answer);
            conn.shutdown();
        }
        // Connect-and-close: a port scan, or a peer checking that we listen.
        Err(StreamError::Closed) => log::debug!("incoming: a connection closed before saying anything"),
        Err(e) if e.is_link_failure() => log::info!("incoming: a connection dropped: {}", crate::report(&e)),
        Err(e) => {
            let why = crate::report(&e);
            eprintln!("emu: incoming: refused a connection: {why}{}", if single { "" } else { "; still listening" });
            refuse(conn, &why);
        }
    }
}
