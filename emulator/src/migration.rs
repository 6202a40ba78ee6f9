//! Migration as the monitor drives it (`migrate`, `query-migrate`, `migrate-cancel`,
//! `migrate-set-parameters`, `query-migrate-parameters`, `migrate-resolve`) and as `--incoming`
//! receives it. The work itself is in the `migrate` crate; this maps arguments and JSON onto it
//! (the monitor dispatches to the methods here).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use migrate::compress::Codec;
use migrate::handover::{DestPhase, Handover, Side};
use migrate::incoming::Accepted;
use migrate::postcopy::dest::Phase as PostcopyPhase;
use migrate::progress::{Change, Observer, PostcopyStats, Progress, Status};
use migrate::receiver::{self, ReceiveError, Received};
use migrate::sender::{self, MigrationParams, Outgoing, StallPolicy, MAX_THROTTLE};
use migrate::stream::StreamHeader;
use migrate::tracker::{self, TrackerKind};
use migrate::transport::Uri;
use migrate::vm::MigratableVm;
use serde_json::{json, Map, Value};

use crate::events::{Notice, Notifier};
use crate::qmp::QmpError;
use crate::vm::{Vm, VmConfig};

/// The longest downtime limit accepted, as in QEMU (2000 s).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// The longest switchover timeout accepted (the guest is paused all that time).
const MAX_SWITCHOVER_TIMEOUT_MS: u64 = 600_000;
/// How long `migrate-resolve` waits for the migration thread to act on the choice.
const RESOLVE_WAIT: Duration = Duration::from_secs(10);

pub struct MigrationController {
    vm: Arc<Vm>,
    params: Arc<Mutex<MigrationParams>>,
    current: Mutex<Option<Outgoing>>,
    /// Told of each migration's status changes and passes (MIGRATION, MIGRATION_PASS).
    notify: Notifier,
}

/// The parameters every migration from this emu starts with, `tracker` (`--dirty-tracker`) as the
/// dirty tracker. They exist before the guest does: a destination takes them before its incoming
/// migration, for the guest's next migration from there.
pub fn new_params(tracker: TrackerKind, tls: migrate::transport::TlsCreds) -> Arc<Mutex<MigrationParams>> {
    Arc::new(Mutex::new(MigrationParams { tracker, tls, ..MigrationParams::default() }))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl MigrationController {
    pub fn new(vm: Arc<Vm>, params: Arc<Mutex<MigrationParams>>, notify: Notifier) -> Self {
        MigrationController { vm, params, current: Mutex::new(None), notify }
    }

    /// What the sender tells about a migration, as notices for the monitor's events.
    fn observer(&self) -> Observer {
        let notify = self.notify.clone();
        Box::new(move |change| match change {
            Change::Status(s) => notify.notify(Notice::Migration { status: s.name() }),
            Change::PassesDone(n) => notify.notify(Notice::MigrationPass { pass: n as u64 }),
        })
    }

    /// `x-migration-plot {"filename"}`: draws the last outgoing migration's passes (dirty pages
    /// left after each, and the rate each was sent at) as an SVG.
    pub fn plot(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let path = args
            .get("filename")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("x-migration-plot needs \"filename\" (where the SVG goes)"))?;
        let p = self
            .current()
            .as_ref()
            .map(|o| o.progress.snapshot())
            .filter(|p| !p.passes.is_empty())
            .ok_or_else(|| QmpError::not_active("no migration with a completed pass to draw"))?;
        let passes: Vec<emu_plot::Pass> = p
            .passes
            .iter()
            .map(|r| emu_plot::Pass { dirty_after: r.dirty_after, bytes: r.bytes, seconds: r.duration.as_secs_f64() })
            .collect();
        let title = format!("{} ({})", p.status.name(), p.tracker.name());
        emu_plot::migration_passes(std::path::Path::new(path), &title, &passes)?;
        Ok(json!({"filename": path, "passes": passes.len()}))
    }

    fn current(&self) -> MutexGuard<'_, Option<Outgoing>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an outgoing migration was started from this emu.
    pub fn has_outgoing(&self) -> bool {
        self.current().is_some()
    }

    /// The tracker of the outgoing migration in progress (passes still running), if any.
    pub fn tracking_with(&self) -> Option<TrackerKind> {
        let current = self.current();
        let p = current.as_ref()?.progress.snapshot();
        matches!(p.status, Status::Setup | Status::Active).then_some(p.tracker)
    }

    /// `migrate-start-postcopy`: the migration in precopy switches to postcopy at the next page
    /// (the guest moves at once; its remaining pages follow). emu needs no `postcopy-ram`
    /// capability for it: any destination of this version takes postcopy.
    pub fn start_postcopy(&self) -> Result<Value, QmpError> {
        let current = self.current();
        let status = current.as_ref().map(|o| o.progress.snapshot().status);
        match (current.as_ref(), status) {
            (Some(o), Some(Status::Setup | Status::Active)) => {
                o.postcopy.start();
                Ok(json!({}))
            }
            (Some(_), Some(s)) if s.is_postcopy() => Ok(json!({})),
            (_, s) => Err(QmpError::generic(format!(
                "no migration in precopy to switch to postcopy (status {})",
                s.map_or("none", Status::name)
            ))),
        }
    }

    /// Whether an outgoing postcopy still holds pages the destination's guest needs: this emu must
    /// not end then (`quit` is refused).
    pub fn holds_postcopy_pages(&self) -> bool {
        self.current().as_ref().is_some_and(|o| o.progress.snapshot().status.is_postcopy())
    }

    /// `migrate-resolve` on the source: hands the operator's choice to the migration thread and
    /// waits for it to act.
    pub fn resolve(&self, keep: Side) -> Result<Value, QmpError> {
        let current = self.current();
        let Some(o) = current.as_ref().filter(|o| o.progress.snapshot().status == Status::Unresolved) else {
            return Err(QmpError::generic("no unresolved migration here"));
        };
        o.resolve.choose(keep);
        let deadline = std::time::Instant::now() + RESOLVE_WAIT;
        loop {
            let p = o.progress.snapshot();
            if p.status != Status::Unresolved {
                return Ok(json!({"status": p.status.name(), "resolution": p.resolution}));
            }
            if std::time::Instant::now() > deadline {
                return Err(QmpError::generic("the migration thread did not act on the choice in time"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `query-migrate`: the last outgoing migration (`{}` if none).
    pub fn query(&self) -> Value {
        self.current().as_ref().map_or(json!({}), |o| progress_json(&o.progress.snapshot()))
    }

    /// `migrate-cancel`: refused once GO has gone out.
    pub fn cancel(&self) -> Result<Value, QmpError> {
        if let Some(o) = self.current().as_ref() {
            if !o.progress.snapshot().status.is_finished() && !o.cancel.cancel() {
                return Err(QmpError::generic(
                    "too late to cancel: GO has gone out and the destination may be running the guest",
                ));
            }
        }
        Ok(json!({}))
    }

    /// `migrate {"uri"}`: starts an outgoing migration in the background.
    pub fn migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri = args.get("uri").and_then(Value::as_str).ok_or_else(|| QmpError::generic("migrate needs \"uri\""))?;
        if let Some(path) = uri.strip_prefix("file:") {
            return self.checkpoint(path);
        }
        let tls = self.params.lock().unwrap_or_else(|e| e.into_inner()).tls.clone();
        let uri: Uri = uri.parse()?;
        let uri = with_tls(uri, &tls)?;
        if uri == Uri::Stdio {
            return Err(QmpError::generic(
                "stdio is where a destination reads its stream (emu --incoming stdio); migrate to it with exec: or ssh:",
            ));
        }
        if let Some(warning) = uri.plaintext_warning() {
            // On stderr either way: the log's if it shows warnings, else a line of its own.
            if log::log_enabled!(log::Level::Warn) {
                log::warn!("{warning}");
            } else {
                eprintln!("emu: warning: {warning}");
            }
        }
        let mut current = self.current();
        if args.get("resume").and_then(Value::as_bool) == Some(true) {
            // QEMU's way back into a postcopy whose link broke: the destination listens again
            // (`migrate-recover`), and this reconnects to it.
            return match current.as_ref() {
                Some(o) if o.progress.snapshot().status == Status::PostcopyPaused => {
                    o.postcopy.resume(uri);
                    Ok(json!({}))
                }
                _ => Err(QmpError::generic("resume: no paused postcopy here")),
            };
        }
        match current.as_ref().map(|o| o.progress.snapshot().status) {
            Some(Status::Unresolved) => {
                return Err(QmpError::generic("the last migration is unresolved: migrate-resolve decides it first"))
            }
            Some(s) if !s.is_finished() => return Err(QmpError::generic("a migration is already running")),
            _ => {}
        }
        if let Some(old) = current.take() {
            old.join();
        }
        self.vm.begin_outgoing_migration()?;
        let vm: Arc<dyn MigratableVm> = self.vm.clone();
        let outgoing = sender::start_observed(vm, uri, self.params.clone(), self.vm.trackers(), Some(self.observer()))?;
        *current = Some(outgoing);
        Ok(json!({}))
    }

    /// `migrate {"uri": "file:PATH"}`: writes a checkpoint of the guest to PATH in the background
    /// (`query-migrate` follows it); live (the guest runs on) with the `background-snapshot`
    /// capability, else the guest is paused, written, and stays paused.
    fn checkpoint(&self, path: &str) -> Result<Value, QmpError> {
        if path.is_empty() {
            return Err(QmpError::generic("file: needs a path"));
        }
        let mut current = self.current();
        if let Some(s) = current.as_ref().map(|o| o.progress.snapshot().status).filter(|s| !s.is_finished()) {
            return Err(QmpError::generic(format!("a migration is already running (status {})", s.name())));
        }
        if let Some(old) = current.take() {
            old.join();
        }
        self.vm.begin_outgoing_migration()?;
        let live = self.params.lock().unwrap_or_else(|e| e.into_inner()).background_snapshot;
        let vm: Arc<dyn MigratableVm> = self.vm.clone();
        let outgoing = migrate::checkpoint::start(vm, path.into(), live, Some(self.observer()))?;
        *current = Some(outgoing);
        Ok(json!({}))
    }

    /// `x-dirty-tracking {"tracker"?, "duration-ms"?, "interval-ms"?}`: runs a tracker on the live
    /// guest without migrating, collecting at an interval, and reports what each step cost. For the
    /// tracker benchmark; it answers when done.
    pub fn dirty_tracking(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let current = self.current();
        if current.as_ref().is_some_and(|o| !o.progress.snapshot().status.is_finished()) {
            return Err(QmpError::generic("a migration is running"));
        }
        let ms_arg = |key: &str, default: u64, max: u64| match args.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| (1..=max).contains(&n))
                .ok_or_else(|| QmpError::generic(format!("{key} must be 1 to {max}"))),
        };
        let duration = Duration::from_millis(ms_arg("duration-ms", 3000, 60_000)?);
        let interval = Duration::from_millis(ms_arg("interval-ms", 100, 10_000)?);
        let kind = match args.get("tracker").map(|v| v.as_str().map(str::parse::<TrackerKind>)) {
            None => self.params.lock().unwrap_or_else(|e| e.into_inner()).tracker,
            Some(Some(Ok(k))) => k,
            Some(Some(Err(e))) => return Err(QmpError::generic(e)),
            Some(None) => return Err(QmpError::generic("tracker must be a string")),
        };
        let ram = MigratableVm::ram(&*self.vm).clone();
        let sample = tracker::exercise(self.vm.tracker(kind)?, ram, duration, interval)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let n = sample.collects.len().max(1) as f64;
        Ok(json!({
            "tracker": kind.name(),
            "start-us": us(sample.start),
            "stop-us": us(sample.stop),
            "collects": sample.collects.len(),
            "collect-us-mean": sample.collects.iter().map(|c| us(c.time)).sum::<f64>() / n,
            "collect-us-max": sample.collects.iter().map(|c| us(c.time)).fold(0.0, f64::max),
            "pages-total": sample.collects.iter().map(|c| c.pages).sum::<usize>(),
        }))
    }
}

/// `uri` with the TLS the parameters ask for (`tcp:` only: the others stay on this host or are
/// encrypted already).
pub fn with_tls(uri: Uri, tls: &migrate::transport::TlsCreds) -> Result<Uri, QmpError> {
    if !matches!(uri, Uri::Tcp { .. }) || !tls.is_set() {
        return Ok(uri);
    }
    let config = tls.load().map_err(|e| QmpError::generic(migrate::report(&e)))?;
    Ok(uri.with_tls(config))
}

/// `query-migrate-parameters`.
pub fn parameters(params: &Mutex<MigrationParams>) -> Value {
    params_json(&params.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `migrate-set-parameters`: checks every argument before changing any.
pub fn set_parameters(params: &Mutex<MigrationParams>, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut p = params.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (key, value) in args {
        let number =
            || value.as_u64().ok_or_else(|| QmpError::generic(format!("{key} must be a non-negative integer")));
        match key.as_str() {
            "downtime-limit" => {
                let v = number()?;
                if v > MAX_DOWNTIME_LIMIT_MS {
                    return Err(QmpError::generic(format!("downtime-limit is at most {MAX_DOWNTIME_LIMIT_MS} ms")));
                }
                p.downtime_limit = Duration::from_millis(v);
            }
            "max-bandwidth" => p.max_bandwidth = number()?,
            // QEMU's name for the same thing (there it also needs the multifd capability).
            "channels" | "multifd-channels" => {
                let max = migrate::stream::MAX_CHANNELS;
                p.channels = u32::try_from(number()?)
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| QmpError::generic(format!("{key} is 1 to {max}")))?;
            }
            "compress" | "multifd-compression" => {
                let s = value.as_str().ok_or_else(|| QmpError::generic(format!("{key} must be a string")))?;
                p.compress = s.parse::<Codec>().map_err(QmpError::generic)?;
            }
            "compress-level" | "multifd-zstd-level" => {
                let levels = migrate::compress::ZSTD_LEVELS;
                p.compress_level = i32::try_from(number()?)
                    .ok()
                    .filter(|l| levels.contains(l))
                    .ok_or_else(|| QmpError::generic(format!("{key} is {} to {}", levels.start(), levels.end())))?;
            }
            "dirty-rate-limit" => p.dirty_rate_limit = number()?,
            "switchover-timeout" => {
                let v = number()?;
                if !(1..=MAX_SWITCHOVER_TIMEOUT_MS).contains(&v) {
                    return Err(QmpError::generic(format!(
                        "switchover-timeout is 1 to {MAX_SWITCHOVER_TIMEOUT_MS} ms"
                    )));
                }
                p.switchover_timeout = Duration::from_millis(v);
            }
            "max-passes" => {
                p.max_passes = u32::try_from(number()?).map_err(|_| QmpError::generic("max-passes is too large"))?
            }
            "max-postcopy-bandwidth" => p.max_postcopy_bandwidth = number()?,
            "mode" => {
                p.handover = match value.as_str() {
                    Some("normal") => false,
                    // QEMU's name for handing memory over by file descriptor on one host.
                    Some("cpr-transfer") => true,
                    _ => return Err(QmpError::generic("mode is \"normal\" or \"cpr-transfer\"")),
                }
            }
            "postcopy-after-passes" => {
                p.postcopy_after_passes =
                    u32::try_from(number()?).map_err(|_| QmpError::generic("postcopy-after-passes is too large"))?
            }
            "x-drop-final-pages" => {
                p.drop_final_pages =
                    u32::try_from(number()?).map_err(|_| QmpError::generic("x-drop-final-pages is too large"))?
            }
            "dirty-tracker" => {
                let s = value.as_str().ok_or_else(|| QmpError::generic("dirty-tracker must be a string"))?;
                p.tracker = s.parse::<TrackerKind>().map_err(QmpError::generic)?;
            }
            "stall-policy" => {
                let s = value.as_str().ok_or_else(|| QmpError::generic("stall-policy must be a string"))?;
                p.stall_policy = s.parse::<StallPolicy>().map_err(QmpError::generic)?;
            }
            "cpu-throttle-initial" | "cpu-throttle-increment" => {
                let v = number()?;
                let v = u8::try_from(v)
                    .ok()
                    .filter(|v| (1..=MAX_THROTTLE).contains(v))
                    .ok_or_else(|| QmpError::generic(format!("{key} is 1 to {MAX_THROTTLE} (percent)")))?;
                if key == "cpu-throttle-initial" {
                    p.throttle_initial = v;
                } else {
                    p.throttle_increment = v;
                }
            }
            // As QEMU's tls-creds: "" turns it off.
            "tls-cert" | "tls-key" | "tls-ca" | "tls-psk" => {
                let s = value.as_str().ok_or_else(|| QmpError::generic(format!("{key} must be a string (a path)")))?;
                let path = (!s.is_empty()).then(|| std::path::PathBuf::from(s));
                match key.as_str() {
                    "tls-cert" => p.tls.cert = path,
                    "tls-key" => p.tls.key = path,
                    "tls-ca" => p.tls.ca = path,
                    _ => p.tls.psk = path,
                }
            }
            other => return Err(QmpError::generic(format!("unknown migration parameter {other}"))),
        }
    }
    // Checked once all three are there (they may come one per command), so that a bad file is
    // told now rather than at the migration; a key file at once.
    if p.tls.psk.is_some() || (p.tls.cert.is_some() && p.tls.key.is_some() && p.tls.ca.is_some()) {
        p.tls.load().map_err(|e| QmpError::generic(migrate::report(&e)))?;
    }
    *params.lock().unwrap_or_else(|e| e.into_inner()) = p;
    Ok(json!({}))
}

fn params_json(p: &MigrationParams) -> Value {
    json!({
        "downtime-limit": ms(p.downtime_limit),
        "max-bandwidth": p.max_bandwidth,
        "max-passes": p.max_passes,
        "postcopy-after-passes": p.postcopy_after_passes,
        "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
        "mode": if p.handover { "cpr-transfer" } else { "normal" },
        "channels": p.channels,
        "compress": p.compress.name(),
        "compress-level": p.compress_level,
        "dirty-tracker": p.tracker.name(),
        "switchover-timeout": ms(p.switchover_timeout),
        "stall-policy": p.stall_policy.name(),
        "dirty-rate-limit": p.dirty_rate_limit,
        "cpu-throttle-initial": p.throttle_initial,
        "cpu-throttle-increment": p.throttle_increment,
        "tls-cert": tls_path(&p.tls.cert),
        "tls-key": tls_path(&p.tls.key),
        "tls-ca": tls_path(&p.tls.ca),
        "tls-psk": tls_path(&p.tls.psk),
    })
}

fn tls_path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

/// `query-migrate`: QEMU's field names where QEMU has one, plus the pass history.
pub fn progress_json(p: &Progress) -> Value {
    let total_ms = p.total_time.unwrap_or_else(|| p.started.elapsed());
    let mut v = json!({
        "status": p.status.name(),
        "dirty-tracker": p.tracker.name(),
        "pass": p.pass,
        "total-time": ms(total_ms),
        "ram": {
            "total": p.ram_bytes,
            "transferred": p.bytes,
            "remaining": p.dirty_pages * 4096,
            "dirty-pages": p.dirty_pages,
            "normal": p.normal_pages,
            "normal-bytes": p.normal_pages * 4096,
            "duplicate": p.zero_pages,
            "dirty-pages-rate": p.dirty_rate.round() as u64,
            "throughput": p.throughput.round() as u64,
            "mbps": p.throughput * 8.0 / 1e6,
            "dirty-sync-count": p.passes.len(),
        },
        "passes": p.passes.iter().map(|r| json!({
            "pass": r.pass, "pages": r.pages, "bytes": r.bytes,
            "time-us": r.duration.as_micros() as u64, "dirty-after": r.dirty_after,
            "send-us": r.send.as_micros() as u64, "bandwidth-wait-us": r.bandwidth_wait.as_micros() as u64,
            "read-us": r.duration.saturating_sub(r.send + r.bandwidth_wait).as_micros() as u64,
        })).collect::<Vec<_>>(),
    });
    if let Some(d) = p.setup_time {
        v["setup-time"] = json!(ms(d));
    }
    if let Some(d) = p.expected_downtime {
        v["expected-downtime"] = json!(ms(d));
    }
    if let Some(d) = p.downtime {
        v["downtime"] = json!(ms(d));
        v["downtime-us"] = json!(d.as_micros() as u64);
    }
    if let Some(e) = &p.error {
        v["error-desc"] = json!(e);
    }
    if let Some(r) = &p.resolution {
        v["resolution"] = json!(r);
    }
    if let Some(t) = &p.switchover {
        let us = |d: Duration| d.as_micros() as u64;
        v["downtime-breakdown-us"] = json!({
            "pause": us(t.pause), "last-pass": us(t.last_pass),
            "save-state": us(t.save_state), "send-state-and-ready": us(t.send_state_and_ready),
            "go-and-started": us(t.go_and_started),
        });
    }
    if let Some(r) = p.stop_reason {
        v["stop-reason"] = json!(r);
    }
    if let Some(c) = p.converged {
        v["converged"] = json!(c);
    }
    if let Some(c) = p.converging {
        v["converging"] = json!(c);
    }
    if let Some(r) = &p.stall_reason {
        v["stall-reason"] = json!(r);
    }
    if let Some((codec, c)) = &p.compression {
        v["compression"] = json!({
            "codec": codec.name(),
            "pages": c.pages,
            "bytes-in": c.raw_bytes,
            "bytes-out": c.compressed_bytes,
            "ratio": if c.compressed_bytes > 0 { c.raw_bytes as f64 / c.compressed_bytes as f64 } else { 0.0 },
            "attempts": c.records,
            "attempts-not-paying": c.misses,
        });
    }
    if p.dirty_rate_limit > 0 {
        v["dirty-rate-limit"] = json!(p.dirty_rate_limit);
    }
    if p.base_skipped > 0 {
        // Pages the destination held already (its base checkpoint, `--base`).
        v["ram"]["skipped"] = json!(p.base_skipped);
    }
    if let Some(pc) = &p.postcopy {
        v["ram"]["postcopy-requests"] = json!(pc.requests);
        v["postcopy"] = postcopy_json(pc);
    }
    // QEMU's name; present, as in QEMU, once auto-converge has throttled.
    if p.throttle_percent > 0 || p.stall_reason.is_some() {
        v["cpu-throttle-percentage"] = json!(p.throttle_percent);
    }
    v
}

/// A postcopy's figures, either side's.
fn postcopy_json(s: &PostcopyStats) -> Value {
    let mut v = json!({
        "owed-at-switchover": s.owed_at_switchover,
        "owed-left": s.owed_left,
        "requests": s.requests,
        "pages-requested": s.pages_requested,
        "pages-pushed": s.pages_pushed,
        "pages-urgent": s.pages_urgent,
        "recoveries": s.recoveries,
    });
    if let Some(d) = s.switchover_to_complete {
        v["switchover-to-complete-ms"] = json!(d.as_secs_f64() * 1e3);
    }
    if let Some(l) = s.latency_us {
        v["fault-latency-us"] = json!({"samples": l.samples, "p50": l.p50, "p99": l.p99, "max": l.max});
    }
    if let Some(why) = &s.paused_reason {
        v["paused-reason"] = json!(why);
    }
    v
}

/// What the user said the destination VM must look like (`--mem`, `--smp`): checked against the
/// stream's header, so a mismatch is refused before anything is received.
pub struct IncomingLimits {
    pub mem: Option<u64>,
    pub vcpus: Option<usize>,
}

impl IncomingLimits {
    /// Whether a guest of `mem` bytes and `vcpus` vCPUs is what was asked for; `holder` names
    /// where it comes from ("the source has", "PATH holds a guest with").
    pub fn check(&self, holder: &str, mem: u64, vcpus: usize) -> Result<(), String> {
        if let Some(m) = self.mem.filter(|&m| m != mem) {
            return Err(format!("{holder} {mem} bytes of RAM, --mem asks for {m}"));
        }
        if let Some(n) = self.vcpus.filter(|&n| n != vcpus) {
            return Err(format!("{holder} {vcpus} vCPUs, --smp asks for {n}"));
        }
        Ok(())
    }
}

/// `query-migrate` on a destination: where the incoming migration stands, and what has arrived
/// (QEMU's `ram` names; `transferred` counts stream bytes, `dirty-sync-count` the passes the source
/// ended).
pub fn incoming_json(h: &Handover) -> Value {
    let (mut status, mut reason) = match h.phase() {
        DestPhase::Receiving => ("active", None),
        DestPhase::Ready => ("ready", None),
        DestPhase::Unresolved(why) => ("unresolved", Some(why)),
        DestPhase::Taken { by } => ("completed", Some(format!("the guest is this emu's (by {by})"))),
        DestPhase::Discarded(why) => ("failed", Some(why)),
    };
    let postcopy = h.postcopy().filter(|_| status == "completed");
    match postcopy.map(|pc| pc.phase()) {
        Some(PostcopyPhase::Active | PostcopyPhase::Prepared) => status = "postcopy-active",
        Some(PostcopyPhase::Paused(why)) => {
            status = "postcopy-paused";
            let s = h.postcopy().map(|pc| pc.stats()).unwrap_or_default();
            reason = Some(format!(
                "{why}; {} of {} owed pages still missing: the guest waits for them and cannot go on without \
                 its source (migrate-recover listens for it again)",
                s.owed_left, s.owed_at_switchover
            ));
        }
        _ => {}
    }
    let r = &h.received;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let normal = get(&r.normal_pages);
    let mut v = json!({
        "status": status,
        "incoming": true,
        "ram": {
            "total": get(&r.ram_total),
            "transferred": get(&r.bytes),
            "normal": normal,
            "normal-bytes": normal * 4096,
            "duplicate": get(&r.zero_pages),
            "dirty-sync-count": get(&r.passes),
            "page-size": 4096,
        },
    });
    if let Some(r) = reason {
        v["error-desc"] = json!(r);
    }
    if let Some(note) = h.base_note.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        v["base"] = json!(note);
    }
    if let Some(pc) = h.postcopy() {
        let stats = pc.stats();
        v["ram"]["postcopy-requests"] = json!(stats.requests);
        v["postcopy"] = postcopy_json(&stats);
    }
    v
}

/// Receives the guest of the migration `accepted`: returns a VM whose state is complete, restored
/// and paused, READY sent; the handover decides whether it runs.
pub fn receive(
    accepted: Accepted,
    handover: &Arc<Handover>,
    limits: IncomingLimits,
    prebuilt: Option<Arc<Vm>>,
    make_config: impl FnOnce(u64, usize) -> Result<VmConfig, String>,
    events: crossbeam_channel::Sender<crate::events::VmEvent>,
    base: Option<&migrate::checkpoint::Checkpoint>,
) -> anyhow::Result<Received<Vm>> {
    let create = |h: &StreamHeader| -> Result<Arc<Vm>, String> {
        let mem: u64 = h.regions.iter().map(|r| r.size).sum();
        let vcpus = h.vcpu_count as usize;
        limits.check("the source has", mem, vcpus)?;
        if let Some(vm) = prebuilt {
            if vm.ram().layout().total_bytes() == mem && vm.vcpu_count() == vcpus {
                return Ok(vm);
            }
            log::info!("the source's guest has {vcpus} vCPUs: the VM built for {} is replaced", vm.vcpu_count());
        }
        Vm::create(make_config(mem, vcpus)?, events, None).map_err(|e| format!("cannot create the VM: {e}"))
    };
    receiver::receive_with_base(accepted, handover, create, base).map_err(|e: ReceiveError| anyhow::anyhow!(e))
}
