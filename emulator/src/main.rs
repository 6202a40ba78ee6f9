//! `emu`: boots a Multiboot guest under KVM, serves a QMP-shaped monitor, and live-migrates.

mod cli;
mod devices;
mod loader;
mod migration;
mod mptable;
mod qmp;
mod state;
mod vcpu;
mod vm;
mod write_fault;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use crossbeam_channel::{Receiver, Sender};

use cli::{Cli, RunArgs, SerialArg};
use devices::serial::SerialSink;
use migrate::tracker::TrackerKind;
use vm::{Vm, VmConfig, VmEvent};

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

/// Waits for what ends the VM and turns it into emu's exit status.
fn wait_for_end(vm: &Vm, events: &Receiver<VmEvent>) -> ExitCode {
    let code = match events.recv() {
        Ok(VmEvent::GuestExit(status)) => status,
        Ok(VmEvent::Quit) | Err(_) => 0,
        Ok(VmEvent::Crashed { vcpu, reason }) => {
            eprintln!("emu: vCPU {vcpu}: {reason}");
            1
        }
    };
    vm.flush_serial();
    ExitCode::from(code)
}

/// Monitor, serial input and the wait for the end: what a booted and a migrated-in VM share.
fn serve_vm(vm: Arc<Vm>, args: &RunArgs, events_tx: Sender<VmEvent>, events: Receiver<VmEvent>) -> Result<ExitCode> {
    if matches!(args.serial, SerialArg::Stdio) {
        vm::connect_stdin(&vm);
    }
    let _monitor = match &args.monitor {
        Some(addr) => {
            let migration = Some(Arc::new(migration::MigrationController::new(vm.clone(), args.dirty_tracker)));
            let commands = qmp::Commands { vm: vm.clone(), events: events_tx, migration };
            Some(qmp::serve(addr, Arc::new(commands))?)
        }
        None => None,
    };
    Ok(wait_for_end(&vm, &events))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let (events_tx, events) = crossbeam_channel::unbounded();
    if let Some(uri) = &args.incoming {
        let uri: migrate::transport::Uri = uri.parse()?;
        let serial = serial_sink(&args.serial)?;
        let limits = migration::IncomingLimits { mem: args.mem, vcpus: args.smp.map(usize::from) };
        let dirty_ring = args.dirty_tracker == TrackerKind::KvmDirtyRing;
        let make_config = |mem_bytes, vcpus| VmConfig { mem_bytes, vcpus, serial, dirty_ring };
        let received = migration::receive(&uri, limits, make_config, events_tx.clone())?;
        eprintln!("emu: migration received: {} MiB in {} passes", received.bytes >> 20, received.passes);
        let vm = received.vm;
        vm.finish_incoming(!args.paused)?;
        return serve_vm(vm, &args, events_tx, events);
    }
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let (image, cmdline) = read_image(&args, mem)?;
    let config = VmConfig {
        mem_bytes: mem,
        vcpus: usize::from(args.smp.unwrap_or(1)),
        serial: serial_sink(&args.serial)?,
        dirty_ring: args.dirty_tracker == TrackerKind::KvmDirtyRing,
    };
    let vm: Arc<Vm> = Vm::create(config, events_tx.clone(), Some((&image, &cmdline)))?;
    if !args.paused {
        vm.start()?;
    }
    serve_vm(vm, &args, events_tx, events)
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
