//! `emu`: boots a Multiboot guest under KVM, serves a QMP monitor, and live-migrates.

mod cli;
mod cpu_compat;
mod devices;
mod events;
mod hmp;
mod json_stream;
mod loader;
mod migration;
mod monitor;
mod mptable;
mod qmp;
mod state;
mod vcpu;
mod vm;
mod write_fault;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use crossbeam_channel::{Receiver, Sender};

use cli::{Cli, RunArgs, SerialArg};
use devices::serial::SerialSink;
use events::{Notice, Notifier, VmEvent};
use migrate::handover::Decision;
use migrate::incoming::IncomingServer;
use migrate::tracker::TrackerKind;
use migrate::transport::Uri;
use qmp::EventBus;
use vm::{Vm, VmConfig};

/// Default guest RAM when neither `--mem` nor a migration stream says otherwise.
const DEFAULT_MEM: u64 = 512 << 20;
/// The embedded guest's command line when `emu` runs with no `--guest` and no `--append`.
const DEFAULT_GUEST_CMDLINE: &str = "wl=idle";

fn serial_sink(arg: &SerialArg) -> Result<SerialSink> {
    Ok(match arg {
        SerialArg::Stdio => SerialSink::Stdout,
        SerialArg::None => SerialSink::Null,
        SerialArg::File(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("cannot create serial output file {}", path.display()))?;
            SerialSink::File(std::io::BufWriter::new(f))
        }
    })
}

/// The VM the command line asks for, of `mem_bytes` and `vcpus` (which a boot takes from the
/// command line and a destination from its stream).
fn vm_config(args: &RunArgs, mem_bytes: u64, vcpus: usize, notify: &Notifier) -> Result<VmConfig> {
    Ok(VmConfig {
        mem_bytes,
        vcpus,
        serial: serial_sink(&args.serial)?,
        dirty_ring: args.dirty_tracker == TrackerKind::KvmDirtyRing,
        notify: notify.clone(),
        shared_ram: args.memfd,
    })
}

fn read_image(args: &RunArgs, mem: u64) -> Result<(Vec<u8>, String)> {
    let Some(path) = &args.guest else {
        let cmdline = args.append.clone().unwrap_or_else(|| DEFAULT_GUEST_CMDLINE.to_string());
        return Ok((guest_images::DEFAULT_GUEST.to_vec(), cmdline));
    };
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read guest image {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("guest image {} is not a regular file", path.display());
    }
    if meta.len() > mem {
        anyhow::bail!(
            "guest image {} ({} bytes) is larger than guest RAM ({} bytes); raise --mem",
            path.display(),
            meta.len(),
            mem
        );
    }
    let image = std::fs::read(path).with_context(|| format!("cannot read guest image {}", path.display()))?;
    Ok((image, args.append.clone().unwrap_or_default()))
}

/// How long an ending emu waits for its monitor clients to be written SHUTDOWN.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// The monitor and where its events go: what the booted and the incoming paths share.
struct MonitorSide {
    commands: Arc<monitor::Commands>,
    bus: Arc<EventBus>,
    notify: Notifier,
}

impl MonitorSide {
    fn new(args: &RunArgs, events: Sender<VmEvent>, incoming: Option<Sender<IncomingServer>>) -> Self {
        let bus = Arc::new(EventBus::default());
        let commands = Arc::new(monitor::Commands::new(monitor::Setup {
            events,
            bus: bus.clone(),
            tracker: args.dirty_tracker,
            name: args.name.clone(),
            incoming,
            tls: migrate::transport::TlsCreds {
                cert: args.tls_cert.clone(),
                key: args.tls_key.clone(),
                ca: args.tls_ca.clone(),
                psk: args.tls_psk.clone(),
            },
        }));
        let notify = commands.notifier();
        MonitorSide { commands, bus, notify }
    }

    fn serve(&self, args: &RunArgs) -> Result<Option<qmp::Monitor>> {
        args.monitor.as_ref().map(|addr| qmp::serve(addr, self.commands.clone(), self.bus.clone())).transpose()
    }

    /// SHUTDOWN, as QEMU names its causes, and a moment for the clients to read it.
    fn shutdown(&self, guest: bool, reason: &'static str) {
        self.notify.notify(Notice::Shutdown { guest, reason });
        self.bus.flush(SHUTDOWN_FLUSH);
    }
}

/// Waits for what ends the VM and turns it into emu's exit status.
fn wait_for_end(vm: &Vm, events: &Receiver<VmEvent>, monitor: &MonitorSide) -> ExitCode {
    let (code, guest, reason) = match events.recv() {
        Ok(VmEvent::GuestExit(status)) => (status, true, "guest-shutdown"),
        Ok(VmEvent::Quit) | Err(_) => (0, false, "host-qmp-quit"),
        Ok(VmEvent::Crashed { vcpu, reason }) => {
            eprintln!("emu: vCPU {vcpu}: {}", migrate::report(&reason));
            // A triple fault is the guest's doing (QEMU resets it: guest-reset); the rest are emu's.
            match reason {
                events::Crash::TripleFault => (1, true, "guest-reset"),
                _ => (1, false, "host-error"),
            }
        }
    };
    vm.flush_serial();
    monitor.shutdown(guest, reason);
    ExitCode::from(code)
}

/// Serial input and the wait for the end: what a booted and a migrated-in VM share. `stdin_free`:
/// stdin is not the migration stream (`--incoming stdio`).
fn serve_vm(vm: &Vm, args: &RunArgs, stdin_free: bool, events: &Receiver<VmEvent>, monitor: &MonitorSide) -> ExitCode {
    if matches!(args.serial, SerialArg::Stdio) && stdin_free {
        vm::connect_stdin(vm);
    }
    wait_for_end(vm, events, monitor)
}

/// `--incoming`: listen (at once, or on the monitor's `migrate-incoming` after `--incoming
/// defer`), receive one guest, and run it only once the source says GO (or the handover is
/// resolved so); the monitor is up from the start.
fn run_incoming(args: RunArgs, uri: &str, events_tx: Sender<VmEvent>, events: Receiver<VmEvent>) -> Result<ExitCode> {
    let (servers_tx, servers) = crossbeam_channel::bounded(1);
    let monitor = MonitorSide::new(&args, events_tx.clone(), Some(servers_tx));
    if uri != "defer" {
        monitor.commands.start_incoming(uri).map_err(|e| anyhow::anyhow!("{}", e.desc))?;
    }
    let _monitor = monitor.serve(&args)?;
    let server: IncomingServer = crossbeam_channel::select! {
        recv(events) -> _ => {
            monitor.shutdown(false, "host-qmp-quit");
            return Ok(ExitCode::SUCCESS); // quit before anything was received
        }
        recv(servers) -> s => s.context("the monitor is gone")?,
    };
    let handover = server.handover().clone();
    let commands = monitor.commands.clone();
    // stdin and stdout are the stream: the transport moved them away and pointed stdout at stderr,
    // so a serial console on stdio lands there (and takes no input).
    let on_stdio = *server.local_uri() == Uri::Stdio;
    if on_stdio && matches!(args.serial, SerialArg::Stdio) {
        eprintln!(
            "emu: --incoming stdio: stdout carries the migration stream, so the serial console goes to \
             stderr (--serial file:PATH or none to send it elsewhere)"
        );
    }
    let notify = monitor.notify.clone();

    let limits = migration::IncomingLimits { mem: args.mem, vcpus: args.smp.map(usize::from) };
    let (config_args, vm_notify) = (args.clone(), notify.clone());
    let make_config = move |mem_bytes, vcpus| -> Result<VmConfig, String> {
        vm_config(&config_args, mem_bytes, vcpus, &vm_notify).map_err(|e| format!("{e:#}"))
    };
    // With --mem the VM is built now, before a source connects, as QEMU's destination is built
    // from its command line: a migration then waits for no VM creation (most of a same-host
    // handover's time otherwise). One vCPU unless --smp says; a guest with more gets a VM built
    // for it when it comes.
    let prebuilt = match args.mem {
        Some(mem) => {
            let vcpus = args.smp.map_or(1, usize::from);
            let config = make_config(mem, vcpus).map_err(anyhow::Error::msg)?;
            Some(Vm::create(config, events_tx.clone(), None)?)
        }
        None => None,
    };
    // Receiving and waiting for GO happen off the main thread, so that `quit` still works meanwhile
    // (the guest never ran here, so nothing is lost by it).
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let (c, h, paused) = (commands.clone(), handover.clone(), args.paused);
    // A base that cannot be read is reported and left out: the migration is then a full one.
    let base = args.base.as_ref().and_then(|p| match migrate::checkpoint::Checkpoint::open(p) {
        Ok(b) => Some(b),
        Err(e) => {
            let why = migrate::report(&e);
            eprintln!("emu: --base not used: {why}");
            *handover.base_note.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("not used: {why}"));
            None
        }
    });
    // The destination's MIGRATION events, with QEMU's statuses: setup and active once the source
    // is in, then completed or failed.
    let status = move |status| notify.notify(Notice::Migration { status });
    std::thread::Builder::new().name("incoming-migration".into()).spawn(move || {
        let received = server.next_migration().map_err(anyhow::Error::from).and_then(|accepted| {
            status("setup");
            status("active");
            migration::receive(accepted, &h, limits, prebuilt, make_config, events_tx, base.as_ref())
        });
        let outcome = received.and_then(|mut r| {
            c.attach(r.vm.clone());
            let decision = h.wait_decision();
            // Decided: STARTED first, then the resume, right here. Once the guest runs it takes a
            // core, and on a small host a reply queued behind it (or behind a hop to another
            // thread) would add milliseconds to what the source measures as downtime.
            if let Decision::Run { guest_was_running } = decision {
                r.started();
                r.vm.finish_incoming(guest_was_running && !paused)?;
            }
            Ok((r, decision))
        });
        status(match &outcome {
            Ok((_, Decision::Run { .. })) => "completed",
            _ => "failed",
        });
        let _ = done_tx.send((outcome, server));
    })?;
    let (outcome, server) = crossbeam_channel::select! {
        recv(events) -> _ => {
            monitor.shutdown(false, "host-qmp-quit");
            return Ok(ExitCode::SUCCESS); // quit before the guest was ours
        }
        recv(done) -> d => d.context("the incoming migration thread ended")?,
    };
    let (received, decision) = outcome?;
    let vm = received.vm.clone();
    match decision {
        Decision::Run { .. } => {
            eprintln!("emu: migration received: {} MiB in {} passes", received.bytes >> 20, received.passes);
            // A source that missed STARTED may still ask; answer until it knows.
            server.close_when_source_informed();
        }
        Decision::Discard(why) => anyhow::bail!("incoming migration: the guest will not run here: {why}"),
    }
    Ok(serve_vm(&vm, &args, !on_stdio, &events, &monitor))
}

/// `--incoming file:PATH`: restores a checkpoint (`migrate {"uri": "file:PATH"}`) and runs it
/// (paused with `-S`, or if it was paused when written). A damaged, truncated or foreign file is
/// refused before anything runs.
fn run_restore(args: RunArgs, path: &str, events_tx: Sender<VmEvent>, events: Receiver<VmEvent>) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let ckpt = migrate::checkpoint::Checkpoint::open(std::path::Path::new(path))?;
    let info = ckpt.info.clone();
    let mem: u64 = info.regions.iter().map(|r| r.size).sum();
    let vcpus = info.vcpu_count as usize;
    let limits = migration::IncomingLimits { mem: args.mem, vcpus: args.smp.map(usize::from) };
    limits.check(&format!("{path} holds a guest with"), mem, vcpus).map_err(anyhow::Error::msg)?;
    let monitor = MonitorSide::new(&args, events_tx.clone(), None);
    let config = vm_config(&args, mem, vcpus, &monitor.notify)?;
    let vm: Arc<Vm> = Vm::create(config, events_tx, None)?;
    ckpt.restore_ram(migrate::vm::MigratableVm::ram(&*vm))?;
    vm.restore_machine_state(&ckpt.state)?;
    monitor.commands.attach(vm.clone());
    vm.finish_incoming(info.guest_was_running && !args.paused)?;
    let _monitor = monitor.serve(&args)?;
    eprintln!(
        "emu: restored {path} ({} MiB of data{}) in {:.1} ms",
        (info.data_pages * 4096) >> 20,
        if info.live { ", a live checkpoint" } else { "" },
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(serve_vm(&vm, &args, true, &events, &monitor))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let (events_tx, events) = crossbeam_channel::unbounded();
    if let Some(path) = args.incoming.as_deref().and_then(|u| u.strip_prefix("file:")).map(str::to_string) {
        return run_restore(args, &path, events_tx, events);
    }
    if let Some(uri) = args.incoming.clone() {
        return run_incoming(args, &uri, events_tx, events);
    }
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let (image, cmdline) = read_image(&args, mem)?;
    let monitor = MonitorSide::new(&args, events_tx.clone(), None);
    let config = vm_config(&args, mem, usize::from(args.smp.unwrap_or(1)), &monitor.notify)?;
    let vm: Arc<Vm> = Vm::create(config, events_tx, Some((&image, &cmdline)))?;
    monitor.commands.attach(vm.clone());
    // Started before the monitor listens: a client that connects at once must not hear the boot's
    // RESUME in place of its first reply (QEMU's clients, too, connect to a guest already running).
    if !args.paused {
        vm.start()?;
    }
    let _monitor = monitor.serve(&args)?;
    Ok(serve_vm(&vm, &args, true, &events, &monitor))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(cmd) => cli::run_subcommand(cmd),
        None => run(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("emu: {e:#}");
            ExitCode::from(1)
        }
    }
}
