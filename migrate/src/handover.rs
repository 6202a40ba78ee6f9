//! Who owns the guest at the end of a migration: the rule that there is never more than one running
//! copy, on both sides of the switchover.
//!
//! The destination restores the state, says READY and waits; it runs the guest only once the source
//! says GO (or RESOLVE with action GO). The source, once GO may have reached the destination, never
//! resumes by itself. Where neither side can know what the other did (GO, STARTED or the link lost
//! in flight: the two generals), both stay paused, "unresolved", with the reason, until one of:
//! - the source reaches the destination again and asks (RESOLVE): a destination still waiting takes
//!   it as the GO it missed; one that has the guest says so; one that discarded it says so;
//! - an operator decides with `migrate-resolve {"keep": "source"|"destination"}` on either side.
//!
//! This module holds the destination's state machine ([`Handover`]) and the source's client for a
//! resolution connection ([`ask`]). The stream records are in `stream.rs`.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::postcopy::dest::IncomingPostcopy;
use crate::progress::IncomingCounters;
use crate::stream::{Decoder, Encoder, Record, Resolution, ResolveAction, StreamError};
use crate::transport::{self, Connection, Uri};

/// Which copy of the guest survives an unresolved migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl std::str::FromStr for Side {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "source" => Ok(Side::Source),
            "destination" => Ok(Side::Destination),
            other => Err(format!("keep must be \"source\" or \"destination\", not {other:?}")),
        }
    }
}

/// Where the destination is in the handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestPhase {
    /// Waiting for a source, or receiving its stream: the guest is incomplete here.
    Receiving,
    /// State restored, READY sent, guest paused, waiting for GO.
    Ready,
    /// READY sent, but no GO or ABORT came before the link broke or went silent: the source may
    /// have kept the guest, or sent GO that was lost. The guest stays paused here.
    Unresolved(String),
    /// The guest is the destination's (GO, a RESOLVE taken as GO, or the operator).
    Taken { by: &'static str },
    /// The guest was discarded here and will never run (ABORT, or the operator).
    Discarded(String),
}

impl DestPhase {
    /// The run state a monitor reports for it (QEMU's names where QEMU has one).
    pub fn status_name(&self) -> &'static str {
        match self {
            DestPhase::Receiving | DestPhase::Ready => "inmigrate",
            DestPhase::Unresolved(_) => "migrate-unresolved",
            DestPhase::Taken { .. } => "running",
            DestPhase::Discarded(_) => "shutdown",
        }
    }
}

/// What the destination does with the guest once the handover is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the guest; resume it if it was running on the source.
    Run { guest_was_running: bool },
    /// Never run it.
    Discard(String),
}

struct Inner {
    migration_id: Option<u64>,
    guest_was_running: bool,
    phase: DestPhase,
    /// The source knows the outcome (DONE, or a RESOLVE answered with it): nothing is left to
    /// answer, and the listening address may close.
    source_informed: bool,
    /// The migration connection, shut down when the guest is discarded so that a receiver still
    /// reading it stops.
    conn: Option<Connection>,
}

/// The destination's side of the handover, shared by the receiver, the connection screener
/// (RESOLVE), the reader of the migration connection after READY, and the monitor (operator).
pub struct Handover {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// What the receiver has taken in so far (the destination's `query-migrate`).
    pub received: IncomingCounters,
    /// Postcopy: the pages the guest still waits for (`query-migrate`, `migrate-recover`).
    postcopy: std::sync::OnceLock<std::sync::Arc<IncomingPostcopy>>,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            inner: Mutex::new(Inner {
                migration_id: None,
                guest_was_running: false,
                phase: DestPhase::Receiving,
                source_informed: false,
                conn: None,
            }),
            changed: Condvar::new(),
            received: IncomingCounters::default(),
            postcopy: std::sync::OnceLock::new(),
        }
    }
}

impl Handover {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, inner: &mut Inner, phase: DestPhase) {
        log::info!("incoming migration: {:?} -> {phase:?}", inner.phase);
        match phase {
            DestPhase::Discarded(_) => {
                if let Some(c) = inner.conn.take() {
                    c.shutdown();
                }
            }
            // Decided: nothing will need to stop the receiver any more; let the socket close when
            // its other users are done with it.
            DestPhase::Taken { .. } => inner.conn = None,
            _ => {}
        }
        inner.phase = phase;
        self.changed.notify_all();
    }

    pub fn set_postcopy(&self, pc: std::sync::Arc<IncomingPostcopy>) {
        let _ = self.postcopy.set(pc);
    }

    pub fn postcopy(&self) -> Option<&std::sync::Arc<IncomingPostcopy>> {
        self.postcopy.get()
    }

    pub fn phase(&self) -> DestPhase {
        self.lock().phase.clone()
    }

    pub fn migration_id(&self) -> Option<u64> {
        self.lock().migration_id
    }

    /// A migration's stream was accepted: RESOLVE must name `id` from now on.
    pub fn begin(&self, id: u64, conn: Option<Connection>) {
        let mut i = self.lock();
        i.migration_id = Some(id);
        i.conn = conn;
    }

    /// The state is restored and READY is about to be sent.
    pub fn ready(&self, guest_was_running: bool) -> Result<(), String> {
        let mut i = self.lock();
        match &i.phase {
            DestPhase::Receiving => {
                i.guest_was_running = guest_was_running;
                self.set(&mut i, DestPhase::Ready);
                Ok(())
            }
            DestPhase::Discarded(why) => Err(why.clone()),
            other => Err(format!("READY in phase {other:?}")),
        }
    }

    /// GO (or its equivalent): the guest is the destination's. False if it was discarded already.
    pub fn go(&self, by: &'static str) -> bool {
        let mut i = self.lock();
        match i.phase {
            DestPhase::Ready | DestPhase::Unresolved(_) => {
                self.set(&mut i, DestPhase::Taken { by });
                true
            }
            DestPhase::Taken { .. } => true,
            DestPhase::Receiving | DestPhase::Discarded(_) => false,
        }
    }

    /// ABORT (or its equivalent): the source keeps the guest. False if the guest is the
    /// destination's already (it cannot be taken back).
    pub fn abort(&self, why: &str) -> bool {
        let mut i = self.lock();
        match i.phase {
            DestPhase::Receiving | DestPhase::Ready | DestPhase::Unresolved(_) => {
                self.set(&mut i, DestPhase::Discarded(why.to_string()));
                true
            }
            DestPhase::Discarded(_) => true,
            DestPhase::Taken { .. } => false,
        }
    }

    /// The migration connection broke or went silent after READY.
    pub fn link_lost(&self, why: &str) {
        let mut i = self.lock();
        if i.phase == DestPhase::Ready {
            self.set(&mut i, DestPhase::Unresolved(why.to_string()));
        }
    }

    /// The source said DONE: it knows the destination has the guest.
    pub fn source_informed(&self) {
        let mut i = self.lock();
        i.source_informed = true;
        self.changed.notify_all();
    }

    pub fn is_source_informed(&self) -> bool {
        self.lock().source_informed
    }

    /// Answers a RESOLVE from a source.
    pub fn resolve(&self, id: u64, action: ResolveAction) -> Resolution {
        if self.migration_id() != Some(id) {
            return Resolution::UnknownMigration;
        }
        let answer = match action {
            // A source asking GO got READY, so the guest is complete here; while still receiving,
            // the question makes no sense and changes nothing.
            ResolveAction::Go if self.phase() == DestPhase::Receiving => return Resolution::UnknownMigration,
            ResolveAction::Go if self.go("RESOLVE") => Resolution::DestinationHasGuest,
            ResolveAction::Go => Resolution::DestinationDiscarded,
            ResolveAction::Abort if self.abort("the source kept the guest (RESOLVE abort)") => {
                Resolution::DestinationDiscarded
            }
            ResolveAction::Abort => Resolution::DestinationHasGuest,
        };
        self.source_informed();
        answer
    }

    /// The operator's word (`migrate-resolve`).
    pub fn operator(&self, keep: Side) -> Result<(), String> {
        let phase = self.phase();
        match (keep, &phase) {
            (Side::Destination, DestPhase::Ready | DestPhase::Unresolved(_)) => {
                self.go("the operator");
                Ok(())
            }
            (Side::Destination, DestPhase::Receiving) => {
                Err("the guest's state has not all arrived here: it cannot run on the destination".into())
            }
            (Side::Source, DestPhase::Receiving | DestPhase::Ready | DestPhase::Unresolved(_)) => {
                self.abort("the operator kept the guest on the source");
                Ok(())
            }
            (_, DestPhase::Taken { by }) => Err(format!("already resolved: the destination has the guest (by {by})")),
            (_, DestPhase::Discarded(why)) => Err(format!("already resolved: the guest was discarded here ({why})")),
        }
    }

    /// Blocks until the guest is taken or discarded.
    pub fn wait_decision(&self) -> Decision {
        let mut i = self.lock();
        loop {
            match &i.phase {
                DestPhase::Taken { .. } => return Decision::Run { guest_was_running: i.guest_was_running },
                DestPhase::Discarded(why) => return Decision::Discard(why.clone()),
                _ => i = self.changed.wait(i).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Waits up to `timeout` for the source to be informed.
    pub fn wait_source_informed(&self, timeout: Duration) -> bool {
        let i = self.lock();
        let (i, _) =
            self.changed.wait_timeout_while(i, timeout, |i| !i.source_informed).unwrap_or_else(|e| e.into_inner());
        i.source_informed
    }
}

/// How long the destination waits for GO after READY before calling the handover unresolved (it
/// keeps listening for GO after that; only its status changes).
pub const GO_WAIT: Duration = Duration::from_secs(5);

/// The destination, after READY: reads what the source says on the migration connection until it
/// is done. GO and ABORT decide; a broken or silent link makes the handover unresolved; DONE
/// informs. Runs in its own thread; returns when the connection has nothing more to say.
///
/// Returns the decoder after DONE (in postcopy, the owed pages follow on it).
pub fn read_after_ready<R: std::io::Read>(
    mut dec: Decoder<R>,
    conn: &Connection,
    handover: &Handover,
) -> Option<Decoder<R>> {
    let _ = conn.set_read_timeout(Some(GO_WAIT));
    loop {
        let record = dec.next_record().map(|r| match r {
            Record::Go => Ok(true),
            Record::Abort => Ok(false),
            Record::Done => Err(None),
            other => Err(Some(format!("unexpected {other:?} from the source after READY"))),
        });
        match record {
            Ok(Ok(true)) => {
                if !handover.go("GO") {
                    // Discarded meanwhile (the operator chose the source): say so, so that a source
                    // waiting for STARTED knows it may resume.
                    let mut e = Encoder::new(conn);
                    let _ = e.error("the destination discarded the guest before GO arrived");
                }
            }
            Ok(Ok(false)) => {
                if !handover.abort("the source kept the guest (ABORT)") {
                    log::error!("ABORT after the guest was taken here: ignored");
                }
                return None;
            }
            Ok(Err(None)) => {
                handover.source_informed();
                let _ = conn.set_read_timeout(Some(transport::STALL_TIMEOUT));
                return Some(dec);
            }
            Ok(Err(Some(why))) => {
                handover.link_lost(&why);
                return None;
            }
            Err(StreamError::Stalled) => {
                handover.link_lost(&format!("no GO or ABORT from the source within {}s of READY", GO_WAIT.as_secs()));
                // A late GO still counts: keep reading, with no deadline now.
                let _ = conn.set_read_timeout(None);
            }
            Err(e) => {
                handover.link_lost(&format!("the connection to the source after READY: {}", crate::report(&e)));
                return None;
            }
        }
    }
}

/// How long a resolution connection may take, from connect to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The source's side of a resolution connection: connects to the destination at `uri` again and
/// asks it to act on the migration `id`.
pub fn ask(uri: &Uri, id: u64, action: ResolveAction) -> Result<Resolution, String> {
    let conn = transport::connect(uri).map_err(|e| format!("cannot reach the destination at {uri}: {e}"))?;
    conn.set_read_timeout(Some(ASK_TIMEOUT)).map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(ASK_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut enc = Encoder::new(&conn);
    enc.preamble().and_then(|_| enc.resolve(id, action)).map_err(|e| format!("asking the destination: {e}"))?;
    let mut dec = Decoder::new(&conn);
    let answer = match dec.next_record() {
        Ok(Record::Resolved(r)) => Ok(r),
        Ok(Record::Error(why)) => Err(format!("the destination answered: {why}")),
        Ok(other) => Err(format!("the destination answered {other:?}")),
        Err(e) => Err(format!("no answer from the destination: {}", crate::report(&e))),
    };
    conn.shutdown();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(h: &Handover) {
        h.begin(42, None);
        h.ready(true).unwrap();
    }

    #[test]
    fn go_decides_for_the_destination_once() {
        let h = Handover::default();
        ready(&h);
        assert!(h.go("GO"));
        assert!(!h.abort("late abort"), "a taken guest cannot be discarded");
        assert_eq!(h.wait_decision(), Decision::Run { guest_was_running: true });
        assert_eq!(h.resolve(42, ResolveAction::Go), Resolution::DestinationHasGuest);
        assert_eq!(h.resolve(42, ResolveAction::Abort), Resolution::DestinationHasGuest);
        assert!(h.operator(Side::Source).is_err());
    }

    #[test]
    fn abort_discards_and_go_cannot_revive() {
        let h = Handover::default();
        ready(&h);
        assert!(h.abort("ABORT"));
        assert!(!h.go("GO"));
        assert_eq!(h.wait_decision(), Decision::Discard("ABORT".into()));
        assert_eq!(h.resolve(42, ResolveAction::Go), Resolution::DestinationDiscarded);
    }

    #[test]
    fn a_lost_link_leaves_it_unresolved_until_someone_decides() {
        let h = Handover::default();
        ready(&h);
        h.link_lost("cut");
        assert_eq!(h.phase(), DestPhase::Unresolved("cut".into()));
        assert_eq!(h.phase().status_name(), "migrate-unresolved");
        // Another migration's source, or a stranger, changes nothing.
        assert_eq!(h.resolve(7, ResolveAction::Go), Resolution::UnknownMigration);
        assert!(matches!(h.phase(), DestPhase::Unresolved(_)));
        // The source that sent GO asks again: taken as GO.
        assert_eq!(h.resolve(42, ResolveAction::Go), Resolution::DestinationHasGuest);
        assert!(h.is_source_informed());
        assert_eq!(h.wait_decision(), Decision::Run { guest_was_running: true });
    }

    #[test]
    fn the_operator_decides_either_way_but_only_once() {
        let h = Handover::default();
        assert!(h.operator(Side::Destination).is_err(), "incomplete state must not run");
        ready(&h);
        h.link_lost("cut");
        h.operator(Side::Source).unwrap();
        assert!(matches!(h.wait_decision(), Decision::Discard(_)));
        assert!(h.operator(Side::Destination).is_err());

        let h = Handover::default();
        ready(&h);
        h.operator(Side::Destination).unwrap();
        assert_eq!(h.phase(), DestPhase::Taken { by: "the operator" });
    }

    #[test]
    fn resolve_go_while_receiving_changes_nothing() {
        let h = Handover::default();
        h.begin(42, None);
        assert_eq!(h.resolve(42, ResolveAction::Go), Resolution::UnknownMigration);
        assert_eq!(h.phase(), DestPhase::Receiving);
        assert_eq!(h.resolve(42, ResolveAction::Abort), Resolution::DestinationDiscarded);
        assert!(h.ready(true).is_err(), "a discarded migration never becomes ready");
    }

    type Says = fn(&mut Encoder<&mut std::os::unix::net::UnixStream>);
    type Expect = fn(&DestPhase) -> bool;

    #[test]
    fn read_after_ready_follows_the_source() {
        use std::os::unix::net::UnixStream;
        let cases: [(Says, Expect); 3] = [
            (|e| e.go().unwrap(), |p| matches!(p, DestPhase::Taken { by: "GO" })),
            (|e| e.abort().unwrap(), |p| matches!(p, DestPhase::Discarded(_))),
            (|_| {}, |p| matches!(p, DestPhase::Unresolved(_))),
        ];
        for (send, expect) in cases {
            let (a, mut b) = UnixStream::pair().unwrap();
            let h = Handover::default();
            ready(&h);
            send(&mut Encoder::new(&mut b));
            drop(b); // then the source goes away
            let conn = Connection::Unix(a);
            read_after_ready(Decoder::new(conn.try_clone().unwrap()), &conn, &h);
            assert!(expect(&h.phase()), "{:?}", h.phase());
        }
    }
}
