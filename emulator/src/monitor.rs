//! The monitor's commands: the one table from a QMP command name to the VM, the migration
//! controller or the incoming handover, the human monitor (`human-monitor-command`, QEMU's HMP
//! text) on top of the same commands, and the events the monitor sends. No logic of its own
//! beyond picking the right one and writing its answer down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::Sender;
use migrate::handover::{DestPhase, Handover, Side};
use migrate::incoming::IncomingServer;
use migrate::sender::MigrationParams;
use migrate::tracker::TrackerKind;
use migrate::transport::Uri;
use serde_json::{json, Map, Value};

use crate::events::{Notice, Notifier, VmEvent};
use crate::migration::{self, MigrationController};
use crate::qmp::{self, EventBus, Handler, QmpError, Success};
use crate::vm::{RunState, Vm};

/// What `Commands` is built from.
pub struct Setup {
    /// Where `quit` goes (the main thread).
    pub events: Sender<VmEvent>,
    /// Where the monitor's events go.
    pub bus: Arc<EventBus>,
    /// The default dirty tracker (`--dirty-tracker`).
    pub tracker: TrackerKind,
    /// `--name`, for `query-name`.
    pub name: Option<String>,
    /// On an emu started with `--incoming`: where `migrate-incoming` hands the listener it opened
    /// (the main thread receives the migration on it).
    pub incoming: Option<Sender<IncomingServer>>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`: the TLS parameters to start with.
    pub tls: migrate::transport::TlsCreds,
}

/// What the monitor's commands act on. On a destination the monitor is up before the guest
/// exists: `vm` and `migration` are set once the incoming state is restored.
pub struct Commands {
    vm: OnceLock<Arc<Vm>>,
    migration: OnceLock<MigrationController>,
    /// On an emu started with `--incoming`.
    incoming: Option<Incoming>,
    params: Arc<Mutex<MigrationParams>>,
    events: Sender<VmEvent>,
    bus: Arc<EventBus>,
    name: Option<String>,
    /// The migration capability `events`: whether MIGRATION and MIGRATION_PASS are sent. QEMU's
    /// default is off (libvirt turns it on); emu's is on, so that a client waiting for a migration
    /// to end needs nothing more than negotiation. Shared with the notifier.
    migration_events: Arc<AtomicBool>,
}

/// A destination's listener: started by `--incoming URI` at once, or by `migrate-incoming` after
/// `--incoming defer`.
struct Incoming {
    handover: OnceLock<Arc<Handover>>,
    /// Taken by the first `migrate-incoming`.
    start: Mutex<Option<Sender<IncomingServer>>>,
}

/// One command: what it is called, and what runs it.
struct Command {
    name: &'static str,
    run: fn(&Commands, &Map<String, Value>) -> Result<Value, QmpError>,
}

/// Every command, for dispatch and for `query-commands` alike (`qmp_capabilities`, the
/// protocol's own, is added there). QEMU's spellings with underscores for dashes find the same
/// commands (`migrate_cancel`), as do those of `human-monitor-command`.
const COMMANDS: &[Command] = &[
    Command { name: "query-status", run: |c, _| c.query_status() },
    Command { name: "query-version", run: |_, _| Ok(qmp::version()) },
    Command { name: "query-commands", run: |_, _| Ok(query_commands()) },
    Command { name: "query-name", run: |c, _| Ok(c.name.as_ref().map_or(json!({}), |n| json!({"name": n}))) },
    Command { name: "stop", run: |c, _| c.stop() },
    Command { name: "cont", run: Commands::cont },
    Command { name: "quit", run: |c, _| c.may_quit() },
    Command { name: "human-monitor-command", run: Commands::human_monitor_command },
    Command { name: "query-vcpus", run: |c, _| c.query_vcpus() },
    Command { name: "query-ram-digest", run: Commands::ram_digest },
    Command { name: "migrate", run: |c, a| c.migration()?.migrate(a) },
    Command { name: "migrate-incoming", run: Commands::migrate_incoming },
    Command { name: "migrate-cancel", run: |c, _| c.migration()?.cancel() },
    Command { name: "migrate-start-postcopy", run: |c, _| c.migration()?.start_postcopy() },
    Command { name: "migrate-recover", run: Commands::recover },
    Command { name: "migrate-resolve", run: Commands::resolve },
    Command { name: "query-migrate", run: |c, _| c.query_migrate() },
    Command { name: "migrate-set-parameters", run: |c, a| migration::set_parameters(&c.params, a) },
    Command { name: "query-migrate-parameters", run: |c, _| Ok(migration::parameters(&c.params)) },
    Command { name: "migrate-set-capabilities", run: Commands::set_capabilities },
    Command { name: "query-migrate-capabilities", run: |c, _| Ok(c.capabilities()) },
    Command { name: "x-dirty-tracking", run: |c, a| c.migration()?.dirty_tracking(a) },
    Command { name: "x-migration-plot", run: |c, a| c.migration()?.plot(a) },
];

fn find(name: &str) -> Option<&'static Command> {
    let by = |n: &str| COMMANDS.iter().find(|c| c.name == n);
    by(name).or_else(|| by(&name.replace('_', "-")))
}

fn query_commands() -> Value {
    let names = std::iter::once("qmp_capabilities").chain(COMMANDS.iter().map(|c| c.name));
    Value::Array(names.map(|n| json!({"name": n})).collect())
}

fn no_guest_yet() -> QmpError {
    QmpError::not_active("no guest here yet: an incoming migration is in progress")
}

impl Commands {
    pub fn new(s: Setup) -> Self {
        let incoming = s.incoming.map(|tx| Incoming { handover: OnceLock::new(), start: Mutex::new(Some(tx)) });
        Commands {
            vm: OnceLock::new(),
            migration: OnceLock::new(),
            incoming,
            params: migration::new_params(s.tracker, s.tls),
            events: s.events,
            bus: s.bus,
            name: s.name,
            migration_events: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Where the VM and the migrations report what monitor clients hear as events.
    pub fn notifier(&self) -> Notifier {
        let (bus, migration_events) = (self.bus.clone(), self.migration_events.clone());
        Notifier::new(move |n| {
            let (name, data) = match n {
                Notice::Stop => ("STOP", None),
                Notice::Resume => ("RESUME", None),
                Notice::Shutdown { guest, reason } => ("SHUTDOWN", Some(json!({"guest": guest, "reason": reason}))),
                Notice::Migration { .. } | Notice::MigrationPass { .. }
                    if !migration_events.load(Ordering::Relaxed) =>
                {
                    return
                }
                Notice::Migration { status } => ("MIGRATION", Some(json!({"status": status}))),
                Notice::MigrationPass { pass } => ("MIGRATION_PASS", Some(json!({"pass": pass}))),
            };
            bus.emit(name, data);
        })
    }

    /// The VM the commands act on from now on.
    pub fn attach(&self, vm: Arc<Vm>) {
        let _ = self.migration.set(MigrationController::new(vm.clone(), self.params.clone(), self.notifier()));
        let _ = self.vm.set(vm);
    }

    fn vm(&self) -> Result<&Arc<Vm>, QmpError> {
        self.vm.get().ok_or_else(no_guest_yet)
    }

    fn migration(&self) -> Result<&MigrationController, QmpError> {
        self.migration.get().ok_or_else(no_guest_yet)
    }

    fn handover(&self) -> Option<&Arc<Handover>> {
        self.incoming.as_ref().and_then(|i| i.handover.get())
    }

    /// The handover, while it is still undecided here (a destination before GO).
    fn pending_incoming(&self) -> Option<&Arc<Handover>> {
        self.handover().filter(|h| !matches!(h.phase(), DestPhase::Taken { .. }))
    }

    /// A destination whose listener has not been started yet (`--incoming defer`).
    fn deferred(&self) -> bool {
        self.incoming.as_ref().is_some_and(|i| i.handover.get().is_none())
    }

    /// `migrate-incoming {"uri"}` (and `--incoming URI`): listens on `uri` and hands the listener
    /// to the main thread, which receives the migration on it. Once only, as in QEMU.
    pub fn start_incoming(&self, uri: &str) -> Result<(), QmpError> {
        let Some(incoming) = &self.incoming else {
            return Err(QmpError::generic("'-incoming' was not specified on the command line"));
        };
        let mut start = incoming.start.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = start.as_ref() else {
            return Err(QmpError::generic("The incoming migration has already been started"));
        };
        let uri: Uri = uri.parse()?;
        let tls = self.params.lock().unwrap_or_else(|e| e.into_inner()).tls.clone();
        let uri = migration::with_tls(uri, &tls)?;
        let server = IncomingServer::bind(&uri)
            .map_err(|e| QmpError::generic(format!("cannot listen on {uri}: {}", migrate::report(&e))))?;
        // Scripts and tests wait for this line to learn the port a tcp:HOST:0 got.
        let how = if matches!(uri, Uri::Tls { .. }) { "TLS: " } else { "" };
        eprintln!("emu: {how}waiting for an incoming migration on {}", server.local_uri());
        let _ = incoming.handover.set(server.handover().clone());
        tx.send(server).map_err(|_| QmpError::generic("emu is shutting down"))?;
        *start = None;
        Ok(())
    }

    /// `quit`, refused on the source of a postcopy that is not complete: the rest of the guest's
    /// memory is here, and its running copy on the destination needs it.
    fn may_quit(&self) -> Result<Value, QmpError> {
        if self.migration.get().is_some_and(|m| m.holds_postcopy_pages()) {
            return Err(QmpError::generic(
                "a postcopy migration is not complete: the guest running on the destination still needs memory only \
                 this emu has; quitting would lose the guest (wait for it, or resume it if paused)",
            ));
        }
        Ok(json!({}))
    }

    /// `migrate-recover {"uri"}` on the destination of a paused postcopy: listen there for the
    /// source to come back (`migrate {"uri", "resume": true}` on the source).
    fn recover(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri =
            args.get("uri").and_then(Value::as_str).ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
        let uri: migrate::transport::Uri = uri.parse()?;
        // Over TLS if the migration was: the source resumes with its tls-* parameters.
        let tls = self.params.lock().unwrap_or_else(|e| e.into_inner()).tls.clone();
        let uri = migration::with_tls(uri, &tls)?;
        let h = self.handover().ok_or_else(|| QmpError::generic("no incoming migration here"))?;
        let local = migrate::postcopy::dest::listen_for_resume(h.clone(), &uri)
            .map_err(|e| QmpError::generic(migrate::report(&e)))?;
        Ok(json!({"uri": local.to_string()}))
    }

    fn migrate_incoming(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri =
            args.get("uri").and_then(Value::as_str).ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
        self.start_incoming(uri)?;
        Ok(json!({}))
    }

    fn query_status(&self) -> Result<Value, QmpError> {
        if self.deferred() {
            return Ok(json!({"status": RunState::InMigrate.name(), "running": false}));
        }
        if let Some(h) = self.pending_incoming() {
            return Ok(json!({"status": h.phase().status_name(), "running": false}));
        }
        let state = self.vm()?.run_state();
        Ok(json!({"status": state.name(), "running": state == RunState::Running}))
    }

    fn stop(&self) -> Result<Value, QmpError> {
        // Pausing the vCPUs while KVM's dirty rings track them lost writes on this host (a guest
        // stopped and continued during such a migration arrived with pages missing; not yet
        // understood): refused rather than risked.
        if self.migration.get().and_then(MigrationController::tracking_with) == Some(TrackerKind::KvmDirtyRing) {
            return Err(QmpError::generic(
                "cannot stop the guest while a kvm-dirty-ring migration tracks it (pausing its vCPUs then \
                 can lose dirty-page records on this host); migrate-cancel first, or migrate with another tracker",
            ));
        }
        self.vm()?.stop()?;
        Ok(json!({}))
    }

    fn cont(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(h) = self.pending_incoming() {
            return Err(QmpError::generic(format!(
                "the incoming guest is not this emu's yet ({}): it runs once the source says GO, or after migrate-resolve",
                h.phase().status_name()
            )));
        }
        let force = match args.get("force") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| QmpError::generic("force must be true or false"))?,
        };
        self.vm()?.cont(force)?;
        Ok(json!({}))
    }

    fn query_vcpus(&self) -> Result<Value, QmpError> {
        let vcpus = self.vm()?.vcpus().iter().map(|v| json!({"cpu-index": v.index(), "thread-id": v.thread_id()}));
        Ok(Value::Array(vcpus.collect()))
    }

    fn query_migrate(&self) -> Result<Value, QmpError> {
        match (self.migration.get(), self.handover()) {
            (Some(m), _) if m.has_outgoing() => Ok(m.query()),
            (_, Some(h)) => Ok(migration::incoming_json(h)),
            (Some(m), None) => Ok(m.query()),
            // `--incoming defer` before migrate-incoming: nothing yet, as QEMU answers.
            (None, None) if self.deferred() => Ok(json!({})),
            (None, None) => Err(no_guest_yet()),
        }
    }

    fn capabilities(&self) -> Value {
        let (snapshot, preempt) = {
            let p = self.params.lock().unwrap_or_else(|e| e.into_inner());
            (p.background_snapshot, p.postcopy_preempt)
        };
        json!([
            {"capability": "events", "state": self.migration_events.load(Ordering::Relaxed)},
            {"capability": "postcopy-ram", "state": true},
            {"capability": "postcopy-preempt", "state": preempt},
            {"capability": "background-snapshot", "state": snapshot},
        ])
    }

    /// `migrate-set-capabilities {"capabilities": [{"capability", "state"}]}`: `events`,
    /// `background-snapshot`, `postcopy-preempt` (and `postcopy-ram`, accepted on):
    /// everything is checked before anything changes.
    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let list = args
            .get("capabilities")
            .and_then(Value::as_array)
            .ok_or_else(|| QmpError::generic("Parameter 'capabilities' is missing or not an array"))?;
        let (mut events, mut snapshot, mut preempt) = (None, None, None);
        for cap in list {
            let (name, state) =
                (cap.get("capability").and_then(Value::as_str), cap.get("state").and_then(Value::as_bool));
            match (name, state) {
                (Some("events"), Some(s)) => events = Some(s),
                (Some("background-snapshot"), Some(s)) => snapshot = Some(s),
                (Some("postcopy-preempt"), Some(s)) => preempt = Some(s),
                // Postcopy needs no capability here (every emu destination takes it); accepted
                // on, as QEMU's clients set it before migrate-start-postcopy.
                (Some("postcopy-ram"), Some(true)) => {}
                (Some(other), Some(_)) => {
                    return Err(QmpError::generic(format!("migration capability '{other}' is not supported by emu")))
                }
                _ => return Err(QmpError::generic("each capability is {\"capability\": NAME, \"state\": true|false}")),
            }
        }
        if let Some(s) = events {
            self.migration_events.store(s, Ordering::Relaxed);
        }
        let mut p = self.params.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = snapshot {
            p.background_snapshot = s;
        }
        if let Some(s) = preempt {
            p.postcopy_preempt = s;
        }
        Ok(json!({}))
    }

    /// `migrate-resolve {"keep": "source"|"destination"}`: decides an unresolved migration, on
    /// whichever side this emu is.
    fn resolve(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let keep: Side = args
            .get("keep")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("migrate-resolve needs \"keep\": \"source\" or \"destination\""))?
            .parse()
            .map_err(QmpError::generic)?;
        if let Some(m) = self.migration.get().filter(|m| m.has_outgoing()) {
            return m.resolve(keep);
        }
        match self.pending_incoming() {
            Some(h) => {
                h.operator(keep).map_err(QmpError::generic)?;
                Ok(json!({"status": h.phase().status_name()}))
            }
            None => Err(QmpError::generic("no migration to resolve here")),
        }
    }

    /// A CRC-32 of every page and one over all of them, to compare two guests' RAM page for page
    /// (with `{"pages": true}` the per-page list too). Meaningful while the guest is paused.
    fn ram_digest(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        use migrate::vm::MigratableVm;
        let digests = self.vm()?.ram().page_digests();
        let all = migrate::ram::combined_digest(&digests);
        let mut out = json!({"page-count": digests.len(), "digest": format!("{all:08x}")});
        if args.get("pages").and_then(Value::as_bool) == Some(true) {
            out["pages"] = Value::Array(digests.iter().map(|d| json!(d)).collect());
        }
        Ok(out)
    }

    /// `human-monitor-command {"command-line"}`: QEMU's human monitor over QMP. Its answer is text,
    /// and so are its failures ("Error: ..."), as in QEMU: only a missing command line is a QMP error.
    fn human_monitor_command(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let line = args
            .get("command-line")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'command-line' is missing"))?;
        let text = match crate::hmp::run(self, line) {
            Ok(text) => text,
            Err(e) => format!("Error: {}\n", e.desc),
        };
        // The human monitor's lines end in CRLF (QEMU's monitor writes them so; qmp-shell splits on it).
        Ok(json!(text.replace('\n', "\r\n")))
    }

    /// Runs a command by name for the human monitor (the same table, the same checks).
    pub fn run(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let c = find(name).ok_or_else(|| QmpError::not_found(name))?;
        (c.run)(self, args)
    }
}

/// Whether a command (or a human-monitor line) ends emu once answered.
fn quits(name: &str, args: &Map<String, Value>) -> bool {
    match find(name).map(|c| c.name) {
        Some("quit") => true,
        Some("human-monitor-command") => {
            args.get("command-line").and_then(Value::as_str).is_some_and(crate::hmp::is_quit)
        }
        _ => false,
    }
}

impl Handler for Commands {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Success, QmpError> {
        let value = self.run(name, args)?;
        Ok(Success { value, then_quit: quits(name, args) })
    }

    fn quit(&self) {
        // The main thread ends emu (and sends SHUTDOWN); if it is gone, the process is exiting anyway.
        let _ = self.events.send(VmEvent::Quit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_listed_once_and_qemus_spellings_find_them() {
        let listed = query_commands();
        let names: Vec<&str> = listed.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names.contains(&"qmp_capabilities") && names.contains(&"query-version"));
        assert_eq!(find("migrate_cancel").map(|c| c.name), Some("migrate-cancel"));
        assert_eq!(find("migrate_set_parameters").map(|c| c.name), Some("migrate-set-parameters"));
        assert_eq!(find("query_status").map(|c| c.name), Some("query-status"));
        assert!(find("no-such").is_none());
        let hmp = |l: &str| Map::from_iter([("command-line".to_string(), json!(l))]);
        assert!(quits("quit", &Map::new()) && quits("human-monitor-command", &hmp(" q ")));
        assert!(!quits("human-monitor-command", &hmp("info status")) && !quits("stop", &Map::new()));
    }
}
