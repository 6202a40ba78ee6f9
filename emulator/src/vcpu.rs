//! vCPUs: one host thread each, running KVM_RUN and dispatching exits to the device bus, and taking
//! requests (pause, resume, save, restore, exit) from the VM.
//!
//! Pausing follows Firecracker and Cloud Hypervisor: the VM queues a request, raises `pending`, and
//! kicks the thread with a real-time signal. The signal handler sets `immediate_exit` in the thread's
//! `kvm_run`, so a kick that lands just before KVM_RUN is not lost: KVM_RUN returns EINTR at once.
//! Before parking, the thread runs KVM_RUN once more with `immediate_exit` set, which completes an I/O
//! exit already handed to userspace, so the saved state never holds half an instruction.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::devices::PioBus;
use crate::events::{Crash, VmEvent};
use crate::loader::{Entry, MULTIBOOT_BOOT_MAGIC};
use crate::state::{StateKind, Versioned};
use migrate::ram::GuestRam;
use migrate::tracker::kvm_ring::DirtyRings;
use migrate::tracker::mprotect::WriteFaultSlot;

use crate::write_fault::{self, FaultHistory};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    // `error`, not `source`: a field named `source` would also be the cause, printed twice by `{:#}`.
    #[error("vCPU {index}: cannot {op}: {error}")]
    Kvm { index: usize, op: &'static str, error: kvm_ioctls::Error },
    #[error("vCPU {index}: MSR {msr:#x} {what}")]
    Msr { index: usize, msr: u32, what: &'static str },
    #[error("vCPU {0}: its thread is gone")]
    Gone(usize),
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Everything KVM holds for one vCPU, saved in Firecracker's order: MP state first, events last.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl Versioned for VcpuState {
    const KIND: StateKind = StateKind::Vcpu;
    const VERSION: u16 = 1;
}

/// A request to a vCPU thread. Replies come back on the channel each one carries.
pub enum VcpuRequest {
    Pause(Sender<()>),
    Resume,
    Save(Sender<Result<VcpuState, VcpuError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VcpuError>>),
    /// The guest pages of the vCPU's event stacks (see `write_fault::event_stack_pages`); answered
    /// between two runs, without pausing.
    EventStackPages(Sender<Result<Vec<usize>, String>>),
    Exit,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's own kvm_run mapping, set while its VcpuFd is alive
            // (cleared before the VcpuFd is dropped); a byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler (once per process, before any vCPU thread starts).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; we fill the handler and flags, and the
    // handler itself only does an async-signal-safe store. No SA_RESTART: KVM_RUN must return EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUID a vCPU gets: what KVM supports, with this vCPU's APIC ID, and the hypervisor timing leaf
/// (0x40000010: TSC and APIC bus frequency in kHz, as VMware and QEMU define it) so that the guest need
/// not calibrate its TSC in interpreted ring-0 code.
pub fn cpuid_for(supported: &CpuId, index: usize, tsc_khz: u32) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let apic_id = index as u32;
    let mut has_timing_leaf = false;
    for e in entries.iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (apic_id << 24),
            0xb | 0x1f => e.edx = apic_id,
            0x4000_0000 => e.eax = e.eax.max(0x4000_0010),
            0x4000_0010 => {
                has_timing_leaf = true;
                e.eax = tsc_khz;
                e.ebx = 1_000_000; // KVM's APIC bus runs at 1 GHz
            }
            _ => {}
        }
    }
    if !has_timing_leaf {
        entries.push(kvm_cpuid_entry2 { function: 0x4000_0010, eax: tsc_khz, ebx: 1_000_000, ..Default::default() });
    }
    entries
}

fn kvm_err(index: usize, op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |error| VcpuError::Kvm { index, op, error }
}

pub fn set_cpuid(vcpu: &VcpuFd, index: usize, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
    let cpuid = CpuId::from_entries(entries).map_err(|_| VcpuError::Kvm {
        index,
        op: "build the CPUID table",
        error: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err(index, "set CPUID"))
}

/// Puts the bootstrap processor where the Multiboot specification says a kernel starts: 32-bit
/// protected mode with flat segments, paging off, interrupts off, EAX = magic, EBX = the info.
pub fn set_multiboot_entry(vcpu: &VcpuFd, entry: Entry) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(0, "get sregs"))?;
    let flat = |type_: u8, selector: u16| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0xb, 0x08);
    for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *seg = flat(0x3, 0x10);
    }
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err(0, "set sregs"))?;
    let regs = kvm_regs {
        rip: u64::from(entry.eip),
        rax: u64::from(MULTIBOOT_BOOT_MAGIC),
        rbx: u64::from(entry.mbi),
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(0, "set regs"))
}

/// The MSRs worth saving: KVM's index list, minus those this vCPU cannot read.
pub fn saveable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm.get_msr_index_list().map_err(kvm_err(0, "list MSRs"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&msr| {
            let entry = kvm_msr_entry { index: msr, ..Default::default() };
            Msrs::from_entries(&[entry]).ok().and_then(|mut m| vcpu.get_msrs(&mut m).ok()) == Some(1)
        })
        .collect())
}

fn save_state(vcpu: &VcpuFd, index: usize, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let e = |op| kvm_err(index, op);
    let mp_state = vcpu.get_mp_state().map_err(e("get MP state"))?;
    let regs = vcpu.get_regs().map_err(e("get regs"))?;
    let sregs = vcpu.get_sregs().map_err(e("get sregs"))?;
    let xsave = vcpu.get_xsave().map_err(e("get xsave"))?;
    let xcrs = vcpu.get_xcrs().map_err(e("get xcrs"))?;
    let debugregs = vcpu.get_debug_regs().map_err(e("get debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(e("get LAPIC"))?;
    let entries: Vec<kvm_msr_entry> =
        msr_indices.iter().map(|&i| kvm_msr_entry { index: i, ..Default::default() }).collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuError::Msr { index, msr: 0, what: "list is too long" })?;
    let read = vcpu.get_msrs(&mut msrs).map_err(e("get MSRs"))?;
    if read < entries.len() {
        return Err(VcpuError::Msr { index, msr: entries[read].index, what: "cannot be read" });
    }
    let events = vcpu.get_vcpu_events().map_err(e("get vCPU events"))?;
    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(e("get CPUID"))?.as_slice().to_vec();
    let tsc_khz = vcpu.get_tsc_khz().map_err(e("get TSC frequency"))?;
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
    })
}

fn restore_state(vcpu: &VcpuFd, index: usize, s: &VcpuState) -> Result<(), VcpuError> {
    let e = |op| kvm_err(index, op);
    set_cpuid(vcpu, index, &s.cpuid)?;
    let local_khz = vcpu.get_tsc_khz().map_err(e("get TSC frequency"))?;
    if local_khz != s.tsc_khz {
        // KVM here cannot scale the guest TSC (no TSC_CONTROL): the guest's clock will run at this
        // host's rate. Worth a warning, not a refusal.
        log::warn!("vCPU {index}: TSC runs at {local_khz} kHz here, {} kHz on the source", s.tsc_khz);
    }
    vcpu.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    vcpu.set_regs(&s.regs).map_err(e("set regs"))?;
    vcpu.set_sregs(&s.sregs).map_err(e("set sregs"))?;
    // SAFETY: `s.xsave` is a complete kvm_xsave (4 KiB region), which is what KVM_SET_XSAVE reads
    // when KVM_CAP_XSAVE2 reports 4096 bytes, as it does on the hosts emu supports (checked at start).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(e("set xsave"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("set xcrs"))?;
    vcpu.set_debug_regs(&s.debugregs).map_err(e("set debug registers"))?;
    vcpu.set_lapic(&s.lapic).map_err(e("set LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::Msr { index, msr: 0, what: "list is too long" })?;
    let written = vcpu.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if written < s.msrs.len() {
        return Err(VcpuError::Msr { index, msr: s.msrs[written].index, what: "was refused by KVM" });
    }
    vcpu.set_vcpu_events(&s.events).map_err(e("set vCPU events"))?;
    Ok(())
}

/// What a vCPU thread needs besides its VcpuFd.
pub struct VcpuContext {
    pub index: usize,
    pub bus: Arc<PioBus>,
    pub events: Sender<VmEvent>,
    pub msr_indices: Arc<Vec<u32>>,
    /// KVM's dirty rings, when the VM has them: a full ring is harvested by its vCPU.
    pub dirty_rings: Option<Arc<DirtyRings>>,
    pub ram: Arc<GuestRam>,
    /// The mprotect tracker, while one runs: it explains EFAULTs from KVM_RUN.
    pub write_faults: Arc<WriteFaultSlot>,
}

/// EFAULTs in a row that no tracker explains before the vCPU gives up: one can be stale (the
/// tracker stopped between the fault and our look), a real one repeats.
const MAX_UNEXPLAINED_EFAULTS: u32 = 3;

/// KVM_EXIT_DIRTY_RING_FULL, which kvm-ioctls reports as an unsupported exit.
const EXIT_DIRTY_RING_FULL: u32 = 31;

/// The VM's side of a vCPU thread.
pub struct VcpuHandle {
    index: usize,
    requests: Sender<VcpuRequest>,
    pending: Arc<AtomicBool>,
    tid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`. It starts paused: the VM resumes it once it is set up.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let (requests, rx) = crossbeam_channel::unbounded();
        let pending = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let index = ctx.index;
        let (p, t) = (pending.clone(), tid.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let thread = VcpuThread {
                    vcpu,
                    ctx,
                    requests: rx,
                    pending: p,
                    paused: true,
                    fault_history: FaultHistory::default(),
                    unexplained_efaults: 0,
                };
                thread.run(t)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { index, requests, pending, tid, thread: Some(thread) })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The host thread id (as `gettid` returns it), 0 until the thread has started.
    pub fn thread_id(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.requests.send(req).map_err(|_| VcpuError::Gone(self.index))?;
        self.pending.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t belongs to a thread we own and have not joined; pthread_kill
            // on a thread that already finished its function is still valid until join.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        Ok(())
    }

    /// Asks the thread to pause; the returned channel answers once it has.
    pub fn request_pause(&self) -> Result<Receiver<()>, VcpuError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(VcpuRequest::Pause(tx))?;
        Ok(rx)
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Resume)
    }

    /// Saves the vCPU's state; the vCPU must be paused.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(VcpuRequest::Save(tx))?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index))?
    }

    /// The guest pages of this vCPU's event stacks.
    pub fn event_stack_pages(&self) -> Result<Vec<usize>, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(VcpuRequest::EventStackPages(tx)).map_err(|e| e.to_string())?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index).to_string())?
    }

    /// Restores the vCPU's state; the vCPU must be paused.
    pub fn restore(&self, state: VcpuState) -> Result<(), VcpuError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(VcpuRequest::Restore(Box::new(state), tx))?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index))?
    }
}

/// How long dropping a vCPU waits for its thread to end. A thread stuck in the kernel (a KVM_RUN
/// that ignores the kick) must not hang emu's exit; it is left behind instead, which is safe: it owns
/// its vCPU fd and holds its own references to RAM and the bus.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.send(VcpuRequest::Exit);
        let Some(t) = self.thread.take() else { return };
        let deadline = std::time::Instant::now() + JOIN_TIMEOUT;
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::error!("vCPU {}: its thread did not stop within {JOIN_TIMEOUT:?}; leaving it", self.index);
        }
    }
}

enum Flow {
    Run,
    Exit,
}

struct VcpuThread {
    vcpu: VcpuFd,
    ctx: VcpuContext,
    requests: Receiver<VcpuRequest>,
    pending: Arc<AtomicBool>,
    paused: bool,
    fault_history: FaultHistory,
    unexplained_efaults: u32,
}

impl VcpuThread {
    fn run(mut self, tid: Arc<AtomicI32>) {
        // SAFETY: gettid has no preconditions.
        tid.store(unsafe { libc::gettid() }, Ordering::Release);
        let run: *mut kvm_run = self.vcpu.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        loop {
            // Clear a kick first, then look for requests: a kick after this point either finds
            // `pending` set below or makes the next KVM_RUN return at once.
            self.vcpu.set_kvm_immediate_exit(0);
            if self.paused || self.pending.swap(false, Ordering::AcqRel) {
                match self.handle_requests() {
                    Flow::Run => continue,
                    Flow::Exit => break,
                }
            }
            match self.vcpu.run() {
                Ok(exit) => {
                    self.unexplained_efaults = 0;
                    if let Err(reason) = handle_exit(&self.ctx, run, exit) {
                        let _ = self.ctx.events.send(VmEvent::Crashed { vcpu: self.ctx.index, reason });
                        self.paused = true;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) if e.errno() == libc::EFAULT => {
                    if let Err(reason) = self.write_fault() {
                        let _ = self.ctx.events.send(VmEvent::Crashed { vcpu: self.ctx.index, reason });
                        self.paused = true;
                    }
                }
                Err(e) => {
                    let _ = self.ctx.events.send(VmEvent::Crashed { vcpu: self.ctx.index, reason: Crash::Run(e) });
                    self.paused = true;
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn handle_requests(&mut self) -> Flow {
        loop {
            let req = if self.paused {
                match self.requests.recv() {
                    Ok(r) => r,
                    Err(_) => return Flow::Exit,
                }
            } else {
                match self.requests.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => return Flow::Run,
                    Err(TryRecvError::Disconnected) => return Flow::Exit,
                }
            };
            let index = self.ctx.index;
            match req {
                VcpuRequest::Pause(ack) => {
                    if !self.paused {
                        self.complete_pending_io();
                        self.paused = true;
                    }
                    let _ = ack.send(());
                }
                VcpuRequest::Resume => self.paused = false,
                VcpuRequest::Save(reply) => {
                    let _ = reply.send(save_state(&self.vcpu, index, &self.ctx.msr_indices));
                }
                VcpuRequest::Restore(state, reply) => {
                    let _ = reply.send(restore_state(&self.vcpu, index, &state));
                }
                VcpuRequest::EventStackPages(reply) => {
                    let _ = reply.send(write_fault::event_stack_pages(&self.vcpu, &self.ctx.ram));
                }
                VcpuRequest::Exit => return Flow::Exit,
            }
        }
    }

    /// KVM_RUN failed with EFAULT: a guest write to a page the mprotect tracker protects.
    fn write_fault(&mut self) -> Result<(), Crash> {
        match self.ctx.write_faults.get() {
            Some(faults) => write_fault::resolve(&self.vcpu, &self.ctx.ram, &faults, &mut self.fault_history)
                .map_err(Crash::WriteFault),
            None => {
                self.unexplained_efaults += 1;
                if self.unexplained_efaults > MAX_UNEXPLAINED_EFAULTS {
                    return Err(Crash::Run(kvm_ioctls::Error::new(libc::EFAULT)));
                }
                Ok(())
            }
        }
    }

    /// One KVM_RUN with `immediate_exit` set: KVM finishes an I/O exit already handed to us and
    /// returns EINTR without entering the guest.
    fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let run: *mut kvm_run = self.vcpu.get_kvm_run();
        for _ in 0..16 {
            match self.vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    log::warn!("vCPU {}: completing I/O before pause: {e}", self.ctx.index);
                    break;
                }
                Ok(exit) => {
                    if let Err(reason) = handle_exit(&self.ctx, run, exit) {
                        let _ = self.ctx.events.send(VmEvent::Crashed { vcpu: self.ctx.index, reason });
                        break;
                    }
                }
            }
        }
        self.vcpu.set_kvm_immediate_exit(0);
    }
}

/// Handles one exit; an error ends the guest (it is reported as a crash of the VM).
fn handle_exit(ctx: &VcpuContext, run: *mut kvm_run, exit: VcpuExit) -> Result<(), Crash> {
    // SAFETY: on an I/O exit KVM has filled the `io` member of the exit union; `run` is this
    // vCPU's kvm_run, alive as long as its VcpuFd. Only read for IoIn/IoOut below.
    let io_size = || unsafe { (*run).__bindgen_anon_1.io.size as usize };
    match exit {
        VcpuExit::IoIn(port, data) => {
            let size = io_size();
            ctx.bus.read(port, size, data);
        }
        VcpuExit::IoOut(port, data) => {
            let size = io_size();
            ctx.bus.write(port, size, data);
        }
        // A ring-0 store to a page the mprotect tracker keeps read-only reaches us as MMIO: perform
        // it (the RAM's write gate makes the page writable and records it).
        VcpuExit::MmioWrite(addr, data) if ctx.ram.layout().page_of(addr).is_some() => {
            ctx.ram.write(addr, data).map_err(|source| Crash::Ram { op: "store to", addr, source })?;
        }
        VcpuExit::MmioRead(addr, data) if ctx.ram.layout().page_of(addr).is_some() => {
            ctx.ram.read(addr, data).map_err(|source| Crash::Ram { op: "load from", addr, source })?;
        }
        VcpuExit::MmioRead(addr, data) => {
            log::debug!("vCPU {}: read of {} bytes at {addr:#x}, where no device is", ctx.index, data.len());
            data.fill(0xff);
        }
        VcpuExit::MmioWrite(addr, data) => {
            log::debug!("vCPU {}: write of {data:02x?} at {addr:#x}, where no device is", ctx.index);
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) => match &ctx.dirty_rings {
            // The harvested pages go to the tracker's set; the vCPU runs on with room in its ring.
            Some(rings) => rings.harvest().map_err(Crash::Harvest)?,
            None => return Err(Crash::NoDirtyRings),
        },
        VcpuExit::Shutdown => return Err(Crash::TripleFault),
        VcpuExit::FailEntry(reason, cpu) => return Err(Crash::FailEntry { reason, cpu }),
        VcpuExit::InternalError => return Err(Crash::Internal),
        other => return Err(Crash::UnexpectedExit(format!("{other:?}"))),
    }
    Ok(())
}
