//! The monitor's commands: the one dispatcher from a QMP command name to the VM, the migration
//! controller or the incoming handover. No logic of its own beyond picking the right one.

use std::sync::{Arc, OnceLock};

use crossbeam_channel::Sender;
use migrate::handover::{DestPhase, Handover, Side};
use migrate::tracker::TrackerKind;
use serde_json::{json, Map, Value};

use crate::events::VmEvent;
use crate::migration::{self, MigrationController};
use crate::qmp::{Handler, QmpError};
use crate::vm::Vm;

/// What the monitor's commands act on. On a destination the monitor is up before the guest
/// exists: `vm` and `migration` are set once the incoming state is restored.
pub struct Commands {
    vm: OnceLock<Arc<Vm>>,
    migration: OnceLock<MigrationController>,
    /// The destination's handover, on an emu started with `--incoming`.
    incoming: Option<Arc<Handover>>,
    events: Sender<VmEvent>,
}

fn no_guest_yet() -> QmpError {
    QmpError::generic("no guest here yet: an incoming migration is in progress")
}

impl Commands {
    pub fn new(events: Sender<VmEvent>, incoming: Option<Arc<Handover>>) -> Self {
        Commands { vm: OnceLock::new(), migration: OnceLock::new(), incoming, events }
    }

    /// The VM the commands act on from now on; `tracker` is its default dirty tracker.
    pub fn attach(&self, vm: Arc<Vm>, tracker: TrackerKind) {
        let _ = self.migration.set(MigrationController::new(vm.clone(), tracker));
        let _ = self.vm.set(vm);
    }

    fn vm(&self) -> Result<&Arc<Vm>, QmpError> {
        self.vm.get().ok_or_else(no_guest_yet)
    }

    /// The handover, while it is still undecided here (a destination before GO).
    fn pending_incoming(&self) -> Option<&Arc<Handover>> {
        self.incoming.as_ref().filter(|h| !matches!(h.phase(), DestPhase::Taken { .. }))
    }

    fn dispatch(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "qmp_capabilities" => Ok(json!({})),
            "query-status" => {
                if let Some(h) = self.pending_incoming() {
                    return Ok(json!({"status": h.phase().status_name(), "running": false}));
                }
                let state = self.vm()?.run_state();
                Ok(json!({"status": state.name(), "running": state == crate::vm::RunState::Running}))
            }
            "stop" => {
                // Pausing the vCPUs while KVM's dirty rings track them lost writes on this host
                // (a guest stopped and continued during such a migration arrived with pages
                // missing; not yet understood): refused rather than risked.
                if self.migration.get().and_then(MigrationController::tracking_with) == Some(TrackerKind::KvmDirtyRing)
                {
                    return Err(QmpError::generic(
                        "cannot stop the guest while a kvm-dirty-ring migration tracks it (pausing its vCPUs then \
                         can lose dirty-page records on this host); migrate-cancel first, or migrate with another tracker",
                    ));
                }
                self.vm()?.stop()?;
                Ok(json!({}))
            }
            "cont" => {
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
            // The VM ends once the reply is out (see `serve_client`).
            "quit" => Ok(json!({})),
            "query-vcpus" => Ok(Value::Array(
                self.vm()?
                    .vcpus()
                    .iter()
                    .map(|v| json!({"cpu-index": v.index(), "thread-id": v.thread_id()}))
                    .collect(),
            )),
            "query-ram-digest" => self.ram_digest(args),
            "migrate-resolve" => self.resolve(args),
            "query-migrate" => match (self.migration.get(), self.incoming.as_ref()) {
                (Some(m), _) if m.has_outgoing() => Ok(m.query()),
                (_, Some(h)) => Ok(migration::incoming_json(h)),
                (Some(m), None) => Ok(m.query()),
                (None, None) => Err(no_guest_yet()),
            },
            "migrate" => self.migration()?.migrate(args),
            "migrate-cancel" => self.migration()?.cancel(),
            "migrate-set-parameters" => self.migration()?.set_parameters(args),
            "query-migrate-parameters" => Ok(self.migration()?.parameters()),
            "x-dirty-tracking" => self.migration()?.dirty_tracking(args),
            _ => Err(QmpError::not_found(name)),
        }
    }

    fn migration(&self) -> Result<&MigrationController, QmpError> {
        self.migration.get().ok_or_else(no_guest_yet)
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
}

impl Handler for Commands {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        self.dispatch(name, args)
    }

    fn quit(&self) {
        // The main thread ends emu; if it is gone, the process is exiting anyway.
        let _ = self.events.send(VmEvent::Quit);
    }
}
