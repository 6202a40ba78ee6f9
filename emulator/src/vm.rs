//! The virtual machine: KVM VM, guest RAM, devices and vCPU threads, and its lifecycle
//! (running, paused, migrating, shut down).
//!
//! Creation order matters to KVM: the irqchip before vCPUs, CPUID before long mode, memory slots
//! before the first run. A VM is created with its vCPUs paused; `boot` or a restore from a
//! migration stream decides what they run, and `start` lets them go.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crossbeam_channel::Sender;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use migrate::ram::{GuestRam, RamLayout};
use migrate::tracker::kvm::KvmSlots;
use migrate::tracker::kvm_ring::DirtyRings;
use migrate::tracker::mprotect::{EventStacks, WriteFaultSlot};
use migrate::tracker::{DirtyTracker, TrackerError, TrackerFactory, TrackerKind, TrackerSources};
use migrate::vm::{MachineState, MigratableVm, RestorableVm, VmError as MigrateVmError};
use serde::{Deserialize, Serialize};

use crate::devices::exit::{ExitDevice, EXIT_PORT};
use crate::devices::serial::{self, IrqTrigger, SerialDevice, SerialSink, COM1_IRQ, COM1_PORT, COM1_PORTS};
use crate::devices::PioBus;
use crate::events::{Notice, Notifier, VmEvent};
use crate::state::{self, StateError, StateKind, Versioned};
use crate::vcpu::{self, VcpuContext, VcpuError, VcpuHandle, VcpuState};
use crate::{loader, mptable};

/// At most this many vCPUs (the guest kernel's limit too).
pub const MAX_VCPUS: usize = 64;
/// Where KVM puts its three-page TSS for real-mode emulation: just below the BIOS area at 4 GiB.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// How long a vCPU may take to stop before the VM calls it stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages are complete on their own: the monitor reports a `VmError` with `{}`, and `main` prints
/// the whole chain with `{:#}`. So a variant either wraps another error transparently or says its
/// cause in its message without also returning it from `source()`; doing both printed it twice.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open it?)")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM lacks {0}, which emu needs")]
    MissingCap(&'static str),
    // `error`, not `source`: thiserror would make a field named `source` the cause as well.
    #[error("cannot {op}: {error}")]
    Kvm { op: &'static str, error: kvm_ioctls::Error },
    #[error(transparent)]
    Ram(#[from] migrate::ram::RamError),
    // No #[from] (it implies #[source]); the From impl below.
    #[error("cannot load the guest: {0}")]
    Load(loader::LoadError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("serial device: {0}")]
    Serial(std::io::Error),
    #[error("vCPU count {0} is outside 1..={MAX_VCPUS}")]
    VcpuCount(usize),
    #[error("vCPU {0} did not pause within {PAUSE_TIMEOUT:?}")]
    PauseTimeout(usize),
    #[error("cannot {action} while the VM is {state}")]
    WrongState { action: &'static str, state: &'static str },
    #[error("the migrated state does not fit this VM: {0}")]
    StateMismatch(String),
    #[error(transparent)]
    Cpu(#[from] crate::cpu_compat::CpuCompatError),
    #[error("the guest migrated away and runs on the destination: this copy must not run or migrate again (cont {{\"force\": true}} if the destination is known to be gone)")]
    MigratedAway,
}

/// The VM's run state, with QMP's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Destination: waiting for, or receiving, a migration.
    InMigrate,
    /// Source: paused for the final pass of a migration.
    FinishMigrate,
    /// Source: the guest now runs on the destination.
    PostMigrate,
    /// Source: GO went out and STARTED did not come back; paused until resolved (`migrate-resolve`).
    Unresolved,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Unresolved => "migrate-unresolved",
        }
    }
}

pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: usize,
    pub serial: SerialSink,
    /// Set up KVM's per-vCPU dirty rings (needed by the kvm-dirty-ring tracker; it must happen
    /// before the vCPUs exist, and rules out KVM's dirty bitmap).
    pub dirty_ring: bool,
    /// Told when the guest stops and resumes (the monitor's STOP and RESUME events).
    pub notify: Notifier,
    /// Guest RAM in memfds (`--memfd`), which a same-host handover passes on instead of copying.
    pub shared_ram: bool,
}

/// Bytes of each vCPU's dirty ring: 4096 entries. A full ring costs its vCPU one exit and a harvest.
const DIRTY_RING_BYTES: usize = 64 << 10;

/// Interrupt controllers, PIT and clock: the VM-wide state KVM keeps.
#[derive(Serialize, Deserialize)]
struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl Versioned for VmState {
    const KIND: StateKind = StateKind::Vm;
    const VERSION: u16 = 1;
}

struct Lifecycle {
    state: RunState,
    /// During a switchover: whether the guest ran when it was paused for it (a failure restores
    /// that, and the destination is told).
    running_at_switchover: bool,
}

pub struct Vm {
    _kvm: Kvm,
    /// The CPUID this host gives a vCPU and the MSRs its KVM saves: what a migrated vCPU state
    /// must fit (`cpu_compat`).
    host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    msr_indices: Arc<Vec<u32>>,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    /// What this VM's dirty trackers are built from (`TrackerSources::build` makes them).
    trackers: Arc<TrackerSources>,
    vcpus: Vec<VcpuHandle>,
    bus: Arc<PioBus>,
    serial: Arc<Mutex<SerialDevice>>,
    lifecycle: Mutex<Lifecycle>,
    /// Auto-converge's thread, while one runs.
    throttle: Mutex<Option<Throttle>>,
    /// This VM, for threads it starts (they must not keep it alive).
    me: Weak<Vm>,
    notify: Notifier,
}

/// Auto-converge as QEMU does it: in every [`THROTTLE_PERIOD`] the vCPUs are paused for `percent`
/// of it. A thread of its own does it, and only while the guest is running: a guest stopped by the
/// user, or paused for the switchover, is left alone (the lifecycle lock is held across each step,
/// so neither can happen in the middle of one).
struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
}

/// QEMU's slice, too: short enough that the guest's timer ticks still come, long enough that a
/// pause and resume (tens of microseconds) are a small part of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

impl Throttle {
    fn start(vm: Weak<Vm>, percent: u8) -> std::io::Result<Throttle> {
        let t = Throttle { percent: Arc::new(AtomicU8::new(percent)), stop: Arc::new(AtomicBool::new(false)) };
        let (pct, stop) = (t.percent.clone(), t.stop.clone());
        std::thread::Builder::new().name("throttle".into()).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Some(vm) = vm.upgrade() else { return };
                let off = THROTTLE_PERIOD * u32::from(pct.load(Ordering::Acquire)) / 100;
                {
                    let l = vm.lifecycle();
                    if l.state == RunState::Running && vm.pause_vcpus().is_ok() {
                        std::thread::sleep(off);
                        if let Err(e) = vm.resume_vcpus() {
                            log::error!("auto-converge: cannot resume the vCPUs: {e}");
                        }
                    }
                }
                drop(vm);
                std::thread::sleep(THROTTLE_PERIOD.saturating_sub(off));
            }
        })?;
        Ok(t)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // The thread sees it within one period; it holds no lock between steps.
        self.stop.store(true, Ordering::Release);
    }
}

impl From<loader::LoadError> for VmError {
    fn from(e: loader::LoadError) -> Self {
        VmError::Load(e)
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |error| VmError::Kvm { op, error }
}

/// Enables per-vCPU dirty rings (acquire/release flavour where KVM has it).
fn enable_dirty_ring(kvm: &Kvm, fd: &VmFd) -> Result<(), VmError> {
    let cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find(|&c| kvm.check_extension_raw(c.into()) >= DIRTY_RING_BYTES as i32)
        .ok_or(VmError::MissingCap("a dirty ring of 64 KiB (KVM_CAP_DIRTY_LOG_RING)"))?;
    let enable = kvm_enable_cap { cap, args: [DIRTY_RING_BYTES as u64, 0, 0, 0], ..Default::default() };
    fd.enable_cap(&enable).map_err(kvm_err("enable the dirty ring"))
}

impl Vm {
    /// Creates the VM. With `boot = Some((image, cmdline))` the kernel is loaded and the VM starts
    /// paused in `Paused`, ready for `start`; with `None` it waits in `InMigrate` for a restore.
    pub fn create(config: VmConfig, events: Sender<VmEvent>, boot: Option<(&[u8], &str)>) -> Result<Arc<Vm>, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::Pit2, "an in-kernel PIT"),
            (Cap::Xsave, "XSAVE state"),
            (Cap::Xcrs, "XCRs"),
            (Cap::ImmediateExit, "immediate_exit"),
            (Cap::UserMemory, "user memory slots"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        fd.set_tss_address(KVM_TSS_ADDR).map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("create the irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        // Reading KVM's dirty bitmap without re-protecting, then re-protecting in chunks, is what
        // the kvm-dirty-log tracker wants; it changes nothing until logging is switched on. Not with
        // dirty rings: INITIALLY_SET makes KVM skip write-protecting pages when logging starts, which
        // the bitmap makes up for and a ring cannot (no page would ever be logged).
        let manual_protect = !config.dirty_ring
            && kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) > 0
            && fd
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET), 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        if config.dirty_ring {
            enable_dirty_ring(&kvm, &fd)?;
        }

        let layout = RamLayout::pc(config.mem_bytes)?;
        let ram = Arc::new(if config.shared_ram { GuestRam::new_shared(layout)? } else { GuestRam::new(layout)? });
        for (slot, (region, host, len)) in ram.host_regions().enumerate() {
            let mem = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.gpa,
                memory_size: len as u64,
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which this VM keeps (Arc) for as
            // long as `fd` exists, so KVM never sees a dangling address.
            unsafe { fd.set_user_memory_region(mem) }.map_err(kvm_err("add a memory slot"))?;
        }

        let trigger = IrqTrigger::new().map_err(VmError::Serial)?;
        fd.register_irqfd(trigger.event_fd(), COM1_IRQ).map_err(kvm_err("route the serial IRQ"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(trigger, config.serial)));
        let exit = Arc::new(Mutex::new(ExitDevice::new(events.clone())));
        let mut bus = PioBus::default();
        bus.insert(COM1_PORT, COM1_PORTS, serial.clone());
        bus.insert(EXIT_PORT, 1, exit);
        let bus = Arc::new(bus);

        let entry = match boot {
            Some((image, cmdline)) => {
                let entry = loader::load(&ram, image, cmdline)?;
                mptable::write(&ram, config.vcpus as u8)?;
                Some(entry)
            }
            None => None,
        };

        vcpu::install_kick_handler().map_err(VmError::Serial)?;
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
        let mut vcpu_fds = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let vcpu = fd.create_vcpu(index as u64).map_err(kvm_err("create a vCPU"))?;
            let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("get the TSC frequency"))?;
            vcpu::set_cpuid(&vcpu, index, &vcpu::cpuid_for(&supported, index, tsc_khz))?;
            if let (0, Some(entry)) = (index, entry) {
                vcpu::set_multiboot_entry(&vcpu, entry)?;
            }
            vcpu_fds.push(vcpu);
        }
        let msr_indices = Arc::new(vcpu::saveable_msrs(&kvm, &vcpu_fds[0])?);
        // What a guest gets here, read back: under PVM that is the host CPU's own feature set
        // (ring 3 runs natively), not the smaller one KVM_GET_SUPPORTED_CPUID lists.
        let host_cpuid =
            vcpu_fds[0].get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get CPUID"))?.as_slice().to_vec();
        let kvm_slots = Arc::new(KvmSlots::new(fd.clone(), &ram, manual_protect));
        let dirty_rings = if config.dirty_ring {
            let raw: Vec<_> = vcpu_fds.iter().map(|v| v.as_raw_fd()).collect();
            let rings = DirtyRings::new(kvm_slots.clone(), &raw, DIRTY_RING_BYTES, ram.page_count())
                .map_err(|e| VmError::Kvm { op: "map the dirty rings", error: e.into() })?;
            Some(Arc::new(rings))
        } else {
            None
        };
        let write_faults = Arc::new(WriteFaultSlot::default());
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for (index, vcpu) in vcpu_fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                index,
                bus: bus.clone(),
                events: events.clone(),
                msr_indices: msr_indices.clone(),
                dirty_rings: dirty_rings.clone(),
                ram: ram.clone(),
                write_faults: write_faults.clone(),
            };
            vcpus.push(VcpuHandle::spawn(vcpu, ctx)?);
        }
        let state = if boot.is_some() { RunState::Paused } else { RunState::InMigrate };
        Ok(Arc::new_cyclic(|me: &Weak<Vm>| {
            let me_for_vm = me.clone();
            // Weak: the tracker must not keep the VM alive.
            let me = me.clone();
            let event_stacks: Arc<EventStacks> = Arc::new(move || {
                let vm = me.upgrade().ok_or("the VM is gone")?;
                let mut pages = Vec::new();
                for v in vm.vcpus() {
                    pages.extend(v.event_stack_pages()?);
                }
                Ok(pages)
            });
            let trackers = Arc::new(TrackerSources {
                ram: ram.clone(),
                kvm_slots: Some(kvm_slots),
                dirty_rings,
                mprotect: Some((write_faults, event_stacks)),
            });
            Vm {
                _kvm: kvm,
                host_cpuid,
                msr_indices,
                fd,
                ram,
                trackers,
                vcpus,
                bus,
                serial,
                lifecycle: Mutex::new(Lifecycle { state, running_at_switchover: false }),
                throttle: Mutex::new(None),
                me: me_for_vm,
                notify: config.notify,
            }
        }))
    }

    /// What migrations from this VM build their trackers from.
    pub fn trackers(&self) -> Arc<dyn TrackerFactory> {
        self.trackers.clone()
    }

    /// Builds a dirty tracker of `kind` for this VM.
    pub fn tracker(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, TrackerError> {
        self.trackers.build(kind)
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run_state(&self) -> RunState {
        self.lifecycle().state
    }

    /// Every change of run state goes through here, so that leaving or entering `Running` is
    /// always reported (STOP, RESUME), whatever caused it.
    fn set_state(&self, l: &mut Lifecycle, state: RunState) {
        let was_running = l.state == RunState::Running;
        l.state = state;
        match (was_running, state == RunState::Running) {
            (true, false) => self.notify.notify(Notice::Stop),
            (false, true) => self.notify.notify(Notice::Resume),
            _ => {}
        }
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    pub fn flush_serial(&self) {
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).flush_output();
    }

    fn pause_vcpus(&self) -> Result<(), VmError> {
        let acks = self.vcpus.iter().map(|v| v.request_pause()).collect::<Result<Vec<_>, _>>()?;
        for (v, ack) in self.vcpus.iter().zip(acks) {
            ack.recv_timeout(PAUSE_TIMEOUT).map_err(|_| VmError::PauseTimeout(v.index()))?;
        }
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.resume()?;
        }
        Ok(())
    }

    /// Lets the vCPUs run (a booted or restored VM).
    pub fn start(&self) -> Result<(), VmError> {
        let mut l = self.lifecycle();
        self.resume_vcpus()?;
        self.set_state(&mut l, RunState::Running);
        Ok(())
    }

    /// `stop`: pauses a running guest.
    pub fn stop(&self) -> Result<(), VmError> {
        let mut l = self.lifecycle();
        match l.state {
            RunState::Running => {
                self.pause_vcpus()?;
                self.set_state(&mut l, RunState::Paused);
                Ok(())
            }
            RunState::Paused | RunState::PostMigrate | RunState::Unresolved => Ok(()),
            s => Err(VmError::WrongState { action: "stop", state: s.name() }),
        }
    }

    /// `cont`: resumes a paused guest. A guest that migrated away (postmigrate) runs on the
    /// destination: resuming it here too would make two copies, so that takes `force` (for an
    /// operator who knows the destination is gone). An unresolved migration is resolved with
    /// `migrate-resolve`, never with `cont`.
    pub fn cont(&self, force: bool) -> Result<(), VmError> {
        let mut l = self.lifecycle();
        match l.state {
            RunState::Paused => {}
            RunState::PostMigrate if force => log::warn!("cont with force on a guest that migrated away"),
            RunState::PostMigrate => return Err(VmError::MigratedAway),
            RunState::Running => return Ok(()),
            s => return Err(VmError::WrongState { action: "continue", state: s.name() }),
        }
        self.resume_vcpus()?;
        self.set_state(&mut l, RunState::Running);
        Ok(())
    }

    /// Marks the start of an outgoing migration; refuses one while another is in its final phase,
    /// and from a guest that migrated away already (its copy there would be a second one).
    pub fn begin_outgoing_migration(&self) -> Result<(), VmError> {
        let l = self.lifecycle();
        match l.state {
            RunState::Running | RunState::Paused => Ok(()),
            RunState::PostMigrate => Err(VmError::MigratedAway),
            s => Err(VmError::WrongState { action: "migrate", state: s.name() }),
        }
    }

    fn save_vm_state(&self) -> Result<Vec<u8>, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(kvm_err("get the irqchip state"))?;
            Ok(c)
        };
        let s = VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("get the PIT state"))?,
            clock: self.fd.get_clock().map_err(kvm_err("get the KVM clock"))?,
        };
        Ok(state::encode(&s)?)
    }

    /// Saves all non-RAM state; the vCPUs must be paused.
    pub fn save_machine_state(&self) -> Result<MachineState, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(state::encode(&v.save()?)?);
        }
        let mut devices = Vec::new();
        for d in self.bus.devices() {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            devices.push((d.name().to_string(), d.save_state()?));
        }
        Ok(MachineState { vcpus, vm: self.save_vm_state()?, devices })
    }

    /// Restores all non-RAM state into a VM that has not run. Every blob is decoded and checked
    /// before any is applied, so a bad stream changes nothing.
    pub fn restore_machine_state(&self, st: &MachineState) -> Result<(), VmError> {
        if st.vcpus.len() != self.vcpus.len() {
            return Err(VmError::StateMismatch(format!(
                "{} vCPU states for {} vCPUs",
                st.vcpus.len(),
                self.vcpus.len()
            )));
        }
        let mut vcpu_states = st.vcpus.iter().map(|b| state::decode::<VcpuState>(b)).collect::<Result<Vec<_>, _>>()?;
        for (i, s) in vcpu_states.iter_mut().enumerate() {
            self.fit_vcpu(i, s)?;
        }
        let vm_state: VmState = state::decode(&st.vm)?;
        let names: Vec<&'static str> =
            self.bus.devices().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).name()).collect();
        for name in &names {
            if !st.devices.iter().any(|(n, _)| n == name) {
                return Err(VmError::StateMismatch(format!("no state for device {name}")));
            }
        }
        if let Some((n, _)) = st.devices.iter().find(|(n, _)| !names.contains(&n.as_str())) {
            return Err(VmError::StateMismatch(format!("state for unknown device {n}")));
        }
        for d in self.bus.devices() {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, blob)) = st.devices.iter().find(|(n, _)| n == d.name()) {
                d.check_state(blob)?;
            }
        }

        for (id, chip) in [
            (KVM_IRQCHIP_PIC_MASTER, &vm_state.pic_master),
            (KVM_IRQCHIP_PIC_SLAVE, &vm_state.pic_slave),
            (KVM_IRQCHIP_IOAPIC, &vm_state.ioapic),
        ] {
            if chip.chip_id != id {
                return Err(VmError::StateMismatch(format!("irqchip {} where {id} was expected", chip.chip_id)));
            }
            self.fd.set_irqchip(chip).map_err(kvm_err("set the irqchip state"))?;
        }
        self.fd.set_pit2(&vm_state.pit).map_err(kvm_err("set the PIT state"))?;
        let mut clock = vm_state.clock;
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(kvm_err("set the KVM clock"))?;
        for d in self.bus.devices() {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            let blob = st.devices.iter().find(|(n, _)| n == d.name()).map(|(_, b)| b);
            if let Some(blob) = blob {
                d.restore_state(blob)?;
            }
        }
        for (v, s) in self.vcpus.iter().zip(vcpu_states) {
            v.restore(s)?;
        }
        Ok(())
    }

    /// Makes a vCPU state from another host fit this one, or says why it cannot (`cpu_compat`).
    fn fit_vcpu(&self, index: usize, s: &mut VcpuState) -> Result<(), VmError> {
        let missing = crate::cpu_compat::missing_features(&s.cpuid, &self.host_cpuid);
        if !missing.is_empty() {
            return Err(crate::cpu_compat::CpuCompatError::MissingFeatures(missing).into());
        }
        let fit = crate::cpu_compat::fit_msrs(&mut s.msrs, &self.msr_indices)?;
        if !fit.dropped_unset.is_empty() && index == 0 {
            log::info!("MSRs this host's KVM does not hold, never set by the guest, dropped: {:x?}", fit.dropped_unset);
        }
        for (msr, value) in &fit.dropped_vendor {
            log::warn!("vCPU {index}: MSR {msr:#x} = {value:#x} of the source's CPU vendor dropped (this host's KVM does not hold it)");
        }
        Ok(())
    }

    /// After a completed incoming migration: paused (`-S`) or running.
    pub fn finish_incoming(&self, run: bool) -> Result<(), VmError> {
        if run {
            self.start()
        } else {
            let mut l = self.lifecycle();
            self.set_state(&mut l, RunState::Paused);
            Ok(())
        }
    }
}

impl MigratableVm for Vm {
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn pause_for_switchover(&self) -> Result<bool, MigrateVmError> {
        self.set_throttle(0);
        let mut l = self.lifecycle();
        let running = l.state == RunState::Running;
        if running {
            self.pause_vcpus().map_err(|e| MigrateVmError::Pause(e.into()))?;
        }
        l.running_at_switchover = running;
        self.set_state(&mut l, RunState::FinishMigrate);
        Ok(running)
    }

    fn save_state(&self) -> Result<MachineState, MigrateVmError> {
        self.save_machine_state().map_err(|e| MigrateVmError::Save(e.into()))
    }

    fn migration_completed(&self) {
        let mut l = self.lifecycle();
        self.set_state(&mut l, RunState::PostMigrate);
    }

    fn set_throttle(&self, percent: u8) {
        let mut t = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        match (&*t, percent) {
            (_, 0) => *t = None,
            (Some(running), _) => running.percent.store(percent, Ordering::Release),
            (None, _) => match Throttle::start(self.me.clone(), percent) {
                Ok(started) => *t = Some(started),
                Err(e) => log::error!("auto-converge: cannot start its thread: {e}"),
            },
        }
    }

    fn migration_unresolved(&self) {
        let mut l = self.lifecycle();
        self.set_state(&mut l, RunState::Unresolved);
    }

    fn suspended(&self) {
        let mut l = self.lifecycle();
        self.set_state(&mut l, RunState::Paused);
    }

    fn migration_failed(&self) {
        let mut l = self.lifecycle();
        if !matches!(l.state, RunState::FinishMigrate | RunState::Unresolved) {
            return; // never paused: nothing to undo
        }
        if l.running_at_switchover {
            match self.resume_vcpus() {
                Ok(()) => self.set_state(&mut l, RunState::Running),
                Err(e) => {
                    log::error!("cannot resume the guest after a failed migration: {e}");
                    self.set_state(&mut l, RunState::Paused);
                }
            }
        } else {
            self.set_state(&mut l, RunState::Paused);
        }
    }
}

impl RestorableVm for Vm {
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn restore_state(&self, state: &MachineState) -> Result<(), MigrateVmError> {
        self.restore_machine_state(state).map_err(|e| MigrateVmError::Restore(e.into()))
    }
}

/// Starts feeding stdin to the guest's UART.
pub fn connect_stdin(vm: &Vm) {
    serial::spawn_stdin_reader(vm.serial().clone());
}

impl Drop for Vm {
    fn drop(&mut self) {
        // vCPU threads hold the bus; stop them before the VM fd and RAM go away.
        self.vcpus.clear();
    }
}
