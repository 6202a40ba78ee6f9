//! The destination side: reads the stream, checks every record, fills guest RAM and, once all of it
//! has arrived, restores the machine state and says READY. A guest whose state arrived incomplete
//! never runs: anything wrong ends the migration with an ERROR reply to the source and an error here.
//! Whether the restored guest then runs is the handover's to decide (`handover.rs`): only on GO.
//!
//! The receiver is a phase plus a step per record (after Cloud Hypervisor's
//! `ReceiveMigrationState`); the preamble and HEADER were read when the connection was screened
//! (`incoming.rs`):
//!
//! ```text
//! HEADER --> Ram --PAGES/ZERO_PAGES/PASS_END/SYNC--> Ram
//!            Ram --VCPU/VM/DEVICE_STATE--> State --...STATE--> State --END--> restored, READY
//! ```
//!
//! What stays bounded whatever the peer sends: one record buffer (`MAX_PAYLOAD`), RAM of the size the
//! header declares (capped, and checked against the VM the emulator builds), one state blob per vCPU
//! (`MAX_STATE_BLOB` each), and at most `MAX_DEVICES` device states.

use std::io::BufReader;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::bitmap::PageBitmap;
use crate::handover::{self, Handover};
use crate::incoming::Accepted;
use crate::ram::{RamError, RamLayout, RamRegion, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, Frame, Record, RecordType, StreamError, StreamHeader, MAX_VCPUS};
use crate::transport::Connection;
use crate::vm::{MachineState, RestorableVm, VmError};

/// Device states one stream may carry.
pub const MAX_DEVICES: usize = 64;
const READ_BUFFER: usize = 256 << 10;

/// Why a destination refused a stream (sent back to the source as ERROR).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bad stream")]
    Stream(#[from] StreamError),
    #[error("the source closed the connection before the end of the stream")]
    SourceClosed,
    #[error("page size {0} (this emu uses {PAGE_SIZE})")]
    PageSize(u32),
    #[error("{0} vCPUs (1 to {MAX_VCPUS} supported)")]
    VcpuCount(u32),
    #[error("RAM layout")]
    Layout(#[source] RamError),
    /// The emulator would not build the VM the header describes (a mismatch with `--mem`, `--smp`).
    #[error("{0}")]
    Create(String),
    #[error("RAM layout {stream:?} does not match this VM's {vm:?}")]
    LayoutMismatch { stream: Vec<RamRegion>, vm: Vec<RamRegion> },
    #[error("{stream} vCPUs in the stream, {vm} here")]
    VcpuMismatch { stream: u32, vm: usize },
    #[error("address {0:#x} is not guest RAM")]
    NotRam(u64),
    #[error("{count} pages at {gpa:#x} run past the end of its RAM region")]
    PastRegion { gpa: u64, count: u64 },
    #[error("ZERO_PAGES at unaligned address {0:#x}")]
    Unaligned(u64),
    #[error("PASS_END for pass {got} where pass {due} was due")]
    PassOrder { got: u32, due: u32 },
    #[error("state for vCPU {index}, but the VM has {count}")]
    VcpuIndex { index: u32, count: usize },
    #[error("second state for {0}")]
    Duplicate(String),
    #[error("more than {MAX_DEVICES} device states")]
    TooManyDevices,
    #[error("END before any vCPU or device state")]
    EndBeforeState,
    #[error("{0} record after the device state began")]
    RamAfterState(&'static str),
    #[error("unexpected {0} record")]
    Unexpected(&'static str),
    #[error("END, but {0} pages never arrived")]
    MissingPages(usize),
    #[error("END, but no state for vCPU {0}")]
    MissingVcpu(usize),
    #[error("END, but no VM state")]
    MissingVmState,
    #[error("END counts {end_vcpus} vCPU and {end_devices} device states, {vcpus} and {devices} arrived")]
    EndCounts { end_vcpus: u32, end_devices: u32, vcpus: usize, devices: usize },
    #[error(transparent)]
    Restore(VmError),
    #[error("the source gave the migration up (ABORT)")]
    Aborted,
    #[error("the guest was given up here: {0}")]
    Discarded(String),
    #[error("cannot answer the source")]
    Reply(#[source] std::io::Error),
}

/// Where the receiver was, and what went wrong there.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration, {phase}")]
pub struct ReceiveError {
    pub phase: String,
    #[source]
    pub problem: Refusal,
}

/// An incoming migration whose guest is restored and paused, READY sent; the handover decides what
/// happens to it.
pub struct Received<V> {
    pub vm: Arc<V>,
    pub passes: u32,
    pub bytes: u64,
    replies: Encoder<Connection>,
}

impl<V> Received<V> {
    /// Tells the source the guest is the destination's now (best effort: a source that misses it
    /// asks again with RESOLVE).
    pub fn started(&mut self) {
        if let Err(e) = self.replies.started().and_then(|_| self.replies.flush()) {
            log::warn!("incoming migration: cannot send STARTED ({e}); the source will ask");
        }
    }
}

struct Target<V> {
    vm: Arc<V>,
    layout: RamLayout,
    /// Pages that arrived at least once: all of them must have by END.
    received: PageBitmap,
    /// Pages holding data (not known zero): a later zero marker must clear them.
    nonzero: PageBitmap,
    last_pass: Option<u32>,
    vcpus: Vec<Option<Vec<u8>>>,
    vm_state: Option<Vec<u8>>,
    devices: Vec<(String, Vec<u8>)>,
}

enum Phase<V> {
    AwaitHeader,
    Ram(Box<Target<V>>),
    State(Box<Target<V>>),
}

impl<V> Phase<V> {
    fn describe(&self) -> String {
        match self {
            Phase::AwaitHeader => "checking the header".into(),
            Phase::Ram(t) => match t.last_pass {
                None => "receiving RAM (pass 0)".into(),
                Some(p) => format!("receiving RAM (after pass {p})"),
            },
            Phase::State(_) => "receiving device state".into(),
        }
    }
}

/// Receives the migration `accepted` (its header already read). `create` builds the VM once the
/// header says what it must look like (and may refuse: a RAM or vCPU mismatch with what the user
/// asked for). On success the guest is restored, paused, and READY is sent; a thread then follows
/// what the source says on the connection and reports to `handover`.
pub fn receive<V: RestorableVm>(
    accepted: Accepted,
    handover: &Arc<Handover>,
    create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
) -> Result<Received<V>, ReceiveError> {
    let start_err = |e: std::io::Error| ReceiveError { phase: "starting".into(), problem: Refusal::Reply(e) };
    let Accepted { conn, header, bytes_so_far } = accepted;
    handover.begin(header.migration_id, conn.try_clone().ok());
    conn.set_read_timeout(Some(crate::transport::STALL_TIMEOUT)).map_err(start_err)?;
    let clone = || conn.try_clone().map_err(start_err);
    let mut rx = Receiver {
        dec: Decoder::new(BufReader::with_capacity(READ_BUFFER, clone()?)),
        replies: Encoder::new(clone()?),
        handover: handover.clone(),
        bytes_before: bytes_so_far,
    };
    let mut phase = Phase::AwaitHeader;
    let result = rx.run(&mut phase, header, create).and_then(|(vm, passes, guest_running)| {
        // The operator may have given the incoming guest up meanwhile.
        handover.ready(guest_running).map_err(Refusal::Discarded)?;
        rx.replies.ready().and_then(|_| rx.replies.flush()).map_err(Refusal::Reply)?;
        Ok((vm, passes))
    });
    match result {
        Ok((vm, passes)) => {
            let bytes = bytes_so_far + rx.dec.bytes_read();
            let Receiver { dec, replies, .. } = rx;
            let h = handover.clone();
            std::thread::Builder::new()
                .name("incoming-handover".into())
                .spawn(move || handover::read_after_ready(dec, &conn, &h))
                .map_err(start_err)?;
            Ok(Received { vm, passes, bytes, replies })
        }
        Err(problem) => {
            let err = ReceiveError { phase: phase.describe(), problem };
            let why = crate::report(&err);
            // Best effort: tell the source why, and keep reading until it hangs up, so that it reads
            // our reason rather than a connection reset.
            let _ = rx.replies.error(&why);
            let _ = rx.replies.flush();
            crate::transport::drain_and_close(conn);
            // Never to run here, whatever comes later.
            handover.abort(&why);
            Err(err)
        }
    }
}

struct Receiver<R: std::io::Read> {
    dec: Decoder<BufReader<R>>,
    replies: Encoder<Connection>,
    /// Where the counters of what has arrived are kept (`Handover::received`).
    handover: Arc<Handover>,
    /// Stream bytes read before the decoder took over (preamble and header).
    bytes_before: u64,
}

impl<R: std::io::Read> Receiver<R> {
    /// Checks the header, then steps through records until END has been applied; returns the
    /// restored VM, the passes seen, and whether the guest ran on the source.
    fn run<V: RestorableVm>(
        &mut self,
        phase: &mut Phase<V>,
        header: StreamHeader,
        create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    ) -> Result<(Arc<V>, u32, bool), Refusal> {
        *phase = Phase::Ram(Box::new(self.accept_header(header, create)?));
        loop {
            let frame = self.dec.next_frame().map_err(|e| match e {
                StreamError::Closed => Refusal::SourceClosed,
                e => Refusal::Stream(e),
            })?;
            self.handover.received.bytes.store(self.bytes_before + self.dec.bytes_read(), Relaxed);
            let current = std::mem::replace(phase, Phase::AwaitHeader);
            match self.step(current, frame) {
                Ok(Step::Next(p)) => *phase = p,
                Ok(Step::Done(vm, passes, running)) => return Ok((vm, passes, running)),
                Err((p, problem)) => {
                    *phase = p;
                    return Err(problem);
                }
            }
        }
    }

    fn step<V: RestorableVm>(&mut self, phase: Phase<V>, frame: Frame) -> Result<Step<V>, (Phase<V>, Refusal)> {
        match (phase, frame.kind) {
            (Phase::AwaitHeader, _) => unreachable!("the header is checked before the first step"),
            (Phase::Ram(mut t), RecordType::Pages) => match self.read_pages(&mut t, &frame) {
                Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                Err(e) => Err((Phase::Ram(t), e)),
            },
            (Phase::Ram(t), RecordType::Sync) => {
                // Everything before this record is applied: say so (the source then pauses its guest
                // knowing we will not keep it waiting).
                let answered = self
                    .dec
                    .read_record(&frame)
                    .map_err(Refusal::Stream)
                    .and_then(|_| self.replies.synced().map_err(Refusal::Reply));
                match answered {
                    Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                    Err(e) => Err((Phase::Ram(t), e)),
                }
            }
            (Phase::Ram(mut t), RecordType::ZeroPages | RecordType::PassEnd) => {
                match self.read_ram_record(&mut t, &frame) {
                    Ok(()) => Ok(Step::Next(Phase::Ram(t))),
                    Err(e) => Err((Phase::Ram(t), e)),
                }
            }
            (
                Phase::Ram(t) | Phase::State(t),
                RecordType::VcpuState | RecordType::VmState | RecordType::DeviceState,
            ) => {
                let mut t = t;
                match self.read_state_record(&mut t, &frame) {
                    Ok(()) => Ok(Step::Next(Phase::State(t))),
                    Err(e) => Err((Phase::State(t), e)),
                }
            }
            (Phase::State(t), RecordType::End) => self.finish(t, &frame),
            (p @ (Phase::Ram(_) | Phase::State(_)), RecordType::Abort) => Err((p, Refusal::Aborted)),
            (p @ (Phase::Ram(_) | Phase::State(_)), kind) => {
                let why = match (&p, kind) {
                    (Phase::Ram(_), RecordType::End) => Refusal::EndBeforeState,
                    (Phase::State(_), RecordType::Pages | RecordType::ZeroPages | RecordType::PassEnd) => {
                        Refusal::RamAfterState(kind.name())
                    }
                    _ => Refusal::Unexpected(kind.name()),
                };
                Err((p, why))
            }
        }
    }

    fn accept_header<V: RestorableVm>(
        &mut self,
        h: StreamHeader,
        create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    ) -> Result<Target<V>, Refusal> {
        if h.page_size != PAGE_SIZE as u32 {
            return Err(Refusal::PageSize(h.page_size));
        }
        if h.vcpu_count == 0 || h.vcpu_count > MAX_VCPUS {
            return Err(Refusal::VcpuCount(h.vcpu_count));
        }
        let layout = RamLayout::new(h.regions.clone()).map_err(Refusal::Layout)?;
        let vm = create(&h).map_err(Refusal::Create)?;
        if vm.ram().layout() != &layout {
            return Err(Refusal::LayoutMismatch {
                stream: layout.regions().to_vec(),
                vm: vm.ram().layout().regions().to_vec(),
            });
        }
        if vm.vcpu_count() != h.vcpu_count as usize {
            return Err(Refusal::VcpuMismatch { stream: h.vcpu_count, vm: vm.vcpu_count() });
        }
        let pages = layout.page_count();
        self.handover.received.ram_total.store(layout.total_bytes(), Relaxed);
        Ok(Target {
            vm,
            received: PageBitmap::new(pages),
            nonzero: PageBitmap::new(pages),
            layout,
            last_pass: None,
            vcpus: vec![None; h.vcpu_count as usize],
            vm_state: None,
            devices: Vec::new(),
        })
    }

    /// The page range of a record, checked to be RAM and inside one region.
    fn page_range(layout: &RamLayout, gpa: u64, count: u64) -> Result<usize, Refusal> {
        let first = layout.page_of(gpa).ok_or(Refusal::NotRam(gpa))?;
        if count == 0 || !usize::try_from(count).is_ok_and(|c| layout.is_contiguous(first, c)) {
            return Err(Refusal::PastRegion { gpa, count });
        }
        Ok(first)
    }

    fn read_pages<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        let ram = t.vm.ram().clone();
        let layout = &t.layout;
        let nonzero = &t.nonzero;
        let r = self.dec.read_pages(frame, |gpa, count| {
            let first = Self::page_range(layout, gpa, count as u64)?;
            // Pages arriving for the first time are fresh memory: one populate call for the record
            // instead of a page fault per page (failure only costs the faults it would have saved).
            if nonzero.ones_in_range(first, count).count() < count {
                let _ = ram.populate_pages(first, count);
            }
            // SAFETY: the destination's vCPUs have not run and nothing else touches its RAM until the
            // receiver returns; the slice is used only for this record's read.
            Ok::<_, Refusal>(unsafe { ram.pages_mut(first, count) })
        });
        let (gpa, count) = r??;
        let first = t.layout.page_of(gpa).expect("checked in page_range");
        t.received.set_range(first, count);
        t.nonzero.set_range(first, count);
        self.handover.received.normal_pages.fetch_add(count as u64, Relaxed);
        Ok(())
    }

    fn read_ram_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        match self.dec.read_record(frame)? {
            Record::ZeroPages { gpa, count } => {
                if gpa % PAGE_SIZE as u64 != 0 {
                    return Err(Refusal::Unaligned(gpa));
                }
                let first = Self::page_range(&t.layout, gpa, count)?;
                let count = count as usize;
                // Only pages that hold data need clearing; fresh RAM is zero already.
                let ram = t.vm.ram();
                let had_data: Vec<usize> = t.nonzero.ones_in_range(first, count).collect();
                for p in had_data {
                    ram.zero_page(p);
                    t.nonzero.clear_bit(p);
                }
                t.received.set_range(first, count);
                self.handover.received.zero_pages.fetch_add(count as u64, Relaxed);
                Ok(())
            }
            Record::PassEnd { pass, .. } => {
                let expected = t.last_pass.map_or(0, |p| p + 1);
                if pass != expected {
                    return Err(Refusal::PassOrder { got: pass, due: expected });
                }
                t.last_pass = Some(pass);
                self.handover.received.passes.store(u64::from(pass) + 1, Relaxed);
                Ok(())
            }
            _ => unreachable!("only called for ZERO_PAGES and PASS_END"),
        }
    }

    fn read_state_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), Refusal> {
        let count = t.vm.vcpu_count();
        match self.dec.read_record(frame)? {
            Record::VcpuState { index, blob } => {
                let slot = t.vcpus.get_mut(index as usize).ok_or(Refusal::VcpuIndex { index, count })?;
                if slot.is_some() {
                    return Err(Refusal::Duplicate(format!("vCPU {index}")));
                }
                *slot = Some(blob.to_vec());
            }
            Record::VmState(blob) => {
                if t.vm_state.is_some() {
                    return Err(Refusal::Duplicate("the VM".into()));
                }
                t.vm_state = Some(blob.to_vec());
            }
            Record::DeviceState { name, blob } => {
                if t.devices.iter().any(|(n, _)| n == name) {
                    return Err(Refusal::Duplicate(format!("device {name}")));
                }
                if t.devices.len() == MAX_DEVICES {
                    return Err(Refusal::TooManyDevices);
                }
                t.devices.push((name.to_string(), blob.to_vec()));
            }
            _ => unreachable!("only called for state records"),
        }
        Ok(())
    }

    /// END: everything must be here; then the state goes into the VM.
    fn finish<V: RestorableVm>(
        &mut self,
        mut t: Box<Target<V>>,
        frame: &Frame,
    ) -> Result<Step<V>, (Phase<V>, Refusal)> {
        let (vcpu_states, device_states, guest_running) = match self.dec.read_record(frame) {
            Ok(Record::End { vcpu_states, device_states, guest_running }) => {
                (vcpu_states, device_states, guest_running)
            }
            Ok(_) => unreachable!("an END frame decodes to END"),
            Err(e) => return Err((Phase::State(t), e.into())),
        };
        let missing_pages = t.layout.page_count() - t.received.count();
        let problem = if missing_pages > 0 {
            Some(Refusal::MissingPages(missing_pages))
        } else if let Some(i) = t.vcpus.iter().position(Option::is_none) {
            Some(Refusal::MissingVcpu(i))
        } else if t.vm_state.is_none() {
            Some(Refusal::MissingVmState)
        } else if vcpu_states as usize != t.vcpus.len() || device_states as usize != t.devices.len() {
            Some(Refusal::EndCounts {
                end_vcpus: vcpu_states,
                end_devices: device_states,
                vcpus: t.vcpus.len(),
                devices: t.devices.len(),
            })
        } else {
            None
        };
        if let Some(p) = problem {
            return Err((Phase::State(t), p));
        }
        let state = MachineState {
            vcpus: t.vcpus.iter_mut().map(|v| v.take().unwrap_or_default()).collect(),
            vm: t.vm_state.take().unwrap_or_default(),
            devices: std::mem::take(&mut t.devices),
        };
        if let Err(e) = t.vm.restore_state(&state) {
            return Err((Phase::State(t), Refusal::Restore(e)));
        }
        let passes = t.last_pass.map_or(0, |p| p + 1);
        Ok(Step::Done(t.vm, passes, guest_running))
    }
}

enum Step<V> {
    Next(Phase<V>),
    /// Restored: the VM, the passes seen, whether the guest ran on the source.
    Done(Arc<V>, u32, bool),
}
