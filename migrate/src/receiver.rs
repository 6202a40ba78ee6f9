//! The destination side: reads the stream, checks every record, fills guest RAM and, once all of it
//! has arrived, restores the machine state and acknowledges. A guest whose state arrived incomplete
//! never runs: anything wrong ends the migration with an ERROR reply to the source and an error here.
//!
//! The receiver is a phase plus a step per record (after Cloud Hypervisor's
//! `ReceiveMigrationState`):
//!
//! ```text
//! AwaitHeader --HEADER--> Ram --PAGES/ZERO_PAGES/PASS_END--> Ram
//!                          Ram --VCPU/VM/DEVICE_STATE--> State --...STATE--> State --END--> done
//! ```
//!
//! What stays bounded whatever the peer sends: one record buffer (`MAX_PAYLOAD`), RAM of the size the
//! header declares (capped, and checked against the VM the emulator builds), one state blob per vCPU
//! (`MAX_STATE_BLOB` each), and at most `MAX_DEVICES` device states.

use std::io::BufReader;
use std::sync::Arc;

use crate::bitmap::PageBitmap;
use crate::ram::{RamLayout, PAGE_SIZE};
use crate::stream::{Decoder, Encoder, Frame, Record, RecordType, StreamError, StreamHeader, MAX_VCPUS};
use crate::transport::Connection;
use crate::vm::{MachineState, RestorableVm};

/// Device states one stream may carry.
pub const MAX_DEVICES: usize = 64;
const READ_BUFFER: usize = 256 << 10;

/// Where the receiver was, and what went wrong there.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration, {phase}: {problem}")]
pub struct ReceiveError {
    pub phase: String,
    pub problem: String,
}

/// A successful incoming migration.
pub struct Received<V> {
    pub vm: Arc<V>,
    pub passes: u32,
    pub bytes: u64,
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
            Phase::AwaitHeader => "waiting for the header".into(),
            Phase::Ram(t) => match t.last_pass {
                None => "receiving RAM (pass 0)".into(),
                Some(p) => format!("receiving RAM (after pass {p})"),
            },
            Phase::State(_) => "receiving device state".into(),
        }
    }
}

/// Receives one migration from `conn`. `create` builds the VM once the header says what it must look
/// like (and may refuse: a RAM or vCPU mismatch with what the user asked for).
pub fn receive<V: RestorableVm>(
    conn: Connection,
    create: impl FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
) -> Result<Received<V>, ReceiveError> {
    let start_err = |e: std::io::Error| ReceiveError { phase: "starting".into(), problem: e.to_string() };
    conn.set_read_timeout(Some(crate::transport::STALL_TIMEOUT)).map_err(start_err)?;
    let clone = || conn.try_clone().map_err(start_err);
    let mut rx = Receiver {
        dec: Decoder::new(BufReader::with_capacity(READ_BUFFER, clone()?)),
        replies: Encoder::new(clone()?),
        create: Some(create),
    };
    let mut phase = Phase::AwaitHeader;
    let result = rx.run(&mut phase);
    let enc = &mut rx.replies;
    match result {
        Ok((vm, passes)) => {
            enc.ack().map_err(|e| ReceiveError { phase: "acknowledging".into(), problem: e.to_string() })?;
            let bytes = rx.dec.bytes_read();
            Ok(Received { vm, passes, bytes })
        }
        Err(problem) => {
            let err = ReceiveError { phase: phase.describe(), problem };
            // Best effort: tell the source why, and keep reading until it hangs up, so that it reads
            // our reason rather than a connection reset.
            let _ = enc.error(&err.to_string());
            let _ = enc.flush();
            drain(conn);
            Err(err)
        }
    }
}

struct Receiver<R: std::io::Read, F> {
    dec: Decoder<BufReader<R>>,
    replies: Encoder<Connection>,
    create: Option<F>,
}

impl<R: std::io::Read, F> Receiver<R, F> {
    /// Steps through records until END has been applied; returns the restored VM.
    fn run<V: RestorableVm>(&mut self, phase: &mut Phase<V>) -> Result<(Arc<V>, u32), String>
    where
        F: FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    {
        self.dec.preamble().map_err(|e| e.to_string())?;
        loop {
            let frame = self.dec.next_frame().map_err(|e| match e {
                StreamError::Closed => "the source closed the connection before the end of the stream".to_string(),
                e => e.to_string(),
            })?;
            let current = std::mem::replace(phase, Phase::AwaitHeader);
            match self.step(current, frame) {
                Ok(Step::Next(p)) => *phase = p,
                Ok(Step::Done(vm, passes)) => return Ok((vm, passes)),
                Err((p, problem)) => {
                    *phase = p;
                    return Err(problem);
                }
            }
        }
    }

    fn step<V: RestorableVm>(&mut self, phase: Phase<V>, frame: Frame) -> Result<Step<V>, (Phase<V>, String)>
    where
        F: FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    {
        match (phase, frame.kind) {
            (Phase::AwaitHeader, RecordType::Header) => {
                let header = match self.dec.read_record(&frame) {
                    Ok(Record::Header(h)) => h,
                    Ok(_) => unreachable!("a HEADER frame decodes to a header"),
                    Err(e) => return Err((Phase::AwaitHeader, e.to_string())),
                };
                let create = self.create.take().expect("one header");
                self.accept_header(header, create)
                    .map(|t| Step::Next(Phase::Ram(Box::new(t))))
                    .map_err(|e| (Phase::AwaitHeader, e))
            }
            (Phase::AwaitHeader, kind) => {
                Err((Phase::AwaitHeader, format!("{} record before the header", kind.name())))
            }
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
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.replies.synced().map_err(|e| format!("cannot answer SYNC: {e}")));
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
            (p @ (Phase::Ram(_) | Phase::State(_)), kind) => {
                let why = match (&p, kind) {
                    (Phase::Ram(_), RecordType::End) => "END before any vCPU or device state".to_string(),
                    (Phase::State(_), RecordType::Pages | RecordType::ZeroPages | RecordType::PassEnd) => {
                        format!("{} record after the device state began", kind.name())
                    }
                    _ => format!("unexpected {} record", kind.name()),
                };
                Err((p, why))
            }
        }
    }

    fn accept_header<V: RestorableVm>(&mut self, h: StreamHeader, create: F) -> Result<Target<V>, String>
    where
        F: FnOnce(&StreamHeader) -> Result<Arc<V>, String>,
    {
        if h.page_size != PAGE_SIZE as u32 {
            return Err(format!("page size {} (this emu uses {PAGE_SIZE})", h.page_size));
        }
        if h.vcpu_count == 0 || h.vcpu_count > MAX_VCPUS {
            return Err(format!("{} vCPUs (1 to {MAX_VCPUS} supported)", h.vcpu_count));
        }
        let layout = RamLayout::new(h.regions.clone()).map_err(|e| format!("RAM layout: {e}"))?;
        let vm = create(&h)?;
        if vm.ram().layout() != &layout {
            return Err(format!(
                "RAM layout {:?} does not match this VM's {:?}",
                layout.regions(),
                vm.ram().layout().regions()
            ));
        }
        if vm.vcpu_count() != h.vcpu_count as usize {
            return Err(format!("{} vCPUs in the stream, {} here", h.vcpu_count, vm.vcpu_count()));
        }
        let pages = layout.page_count();
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
    fn page_range(layout: &RamLayout, gpa: u64, count: u64) -> Result<usize, String> {
        let first = layout.page_of(gpa).ok_or_else(|| format!("address {gpa:#x} is not guest RAM"))?;
        if count == 0 || !usize::try_from(count).is_ok_and(|c| layout.is_contiguous(first, c)) {
            return Err(format!("{count} pages at {gpa:#x} run past the end of its RAM region"));
        }
        Ok(first)
    }

    fn read_pages<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), String> {
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
            Ok::<_, String>(unsafe { ram.pages_mut(first, count) })
        });
        let (gpa, count) = r.map_err(|e| e.to_string())??;
        let first = t.layout.page_of(gpa).expect("checked in page_range");
        t.received.set_range(first, count);
        t.nonzero.set_range(first, count);
        Ok(())
    }

    fn read_ram_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), String> {
        match self.dec.read_record(frame).map_err(|e| e.to_string())? {
            Record::ZeroPages { gpa, count } => {
                if gpa % PAGE_SIZE as u64 != 0 {
                    return Err(format!("ZERO_PAGES at unaligned address {gpa:#x}"));
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
                Ok(())
            }
            Record::PassEnd { pass, .. } => {
                let expected = t.last_pass.map_or(0, |p| p + 1);
                if pass != expected {
                    return Err(format!("PASS_END for pass {pass} where pass {expected} was due"));
                }
                t.last_pass = Some(pass);
                Ok(())
            }
            _ => unreachable!("only called for ZERO_PAGES and PASS_END"),
        }
    }

    fn read_state_record<V: RestorableVm>(&mut self, t: &mut Target<V>, frame: &Frame) -> Result<(), String> {
        match self.dec.read_record(frame).map_err(|e| e.to_string())? {
            Record::VcpuState { index, blob } => {
                let slot = t
                    .vcpus
                    .get_mut(index as usize)
                    .ok_or_else(|| format!("state for vCPU {index}, but the VM has {}", t.vm.vcpu_count()))?;
                if slot.is_some() {
                    return Err(format!("second state for vCPU {index}"));
                }
                *slot = Some(blob.to_vec());
            }
            Record::VmState(blob) => {
                if t.vm_state.is_some() {
                    return Err("second VM state".into());
                }
                t.vm_state = Some(blob.to_vec());
            }
            Record::DeviceState { name, blob } => {
                if t.devices.iter().any(|(n, _)| n == name) {
                    return Err(format!("second state for device {name}"));
                }
                if t.devices.len() == MAX_DEVICES {
                    return Err(format!("more than {MAX_DEVICES} device states"));
                }
                t.devices.push((name.to_string(), blob.to_vec()));
            }
            _ => unreachable!("only called for state records"),
        }
        Ok(())
    }

    /// END: everything must be here; then the state goes into the VM.
    fn finish<V: RestorableVm>(&mut self, mut t: Box<Target<V>>, frame: &Frame) -> Result<Step<V>, (Phase<V>, String)> {
        let (vcpu_states, device_states) = match self.dec.read_record(frame) {
            Ok(Record::End { vcpu_states, device_states }) => (vcpu_states, device_states),
            Ok(_) => unreachable!("an END frame decodes to END"),
            Err(e) => return Err((Phase::State(t), e.to_string())),
        };
        let missing_pages = t.layout.page_count() - t.received.count();
        let problem = if missing_pages > 0 {
            Some(format!("END, but {missing_pages} pages never arrived"))
        } else if let Some(i) = t.vcpus.iter().position(Option::is_none) {
            Some(format!("END, but no state for vCPU {i}"))
        } else if t.vm_state.is_none() {
            Some("END, but no VM state".to_string())
        } else if vcpu_states as usize != t.vcpus.len() || device_states as usize != t.devices.len() {
            Some(format!(
                "END counts {vcpu_states} vCPU and {device_states} device states, {} and {} arrived",
                t.vcpus.len(),
                t.devices.len()
            ))
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
            return Err((Phase::State(t), format!("restoring the state: {e}")));
        }
        let passes = t.last_pass.map_or(0, |p| p + 1);
        Ok(Step::Done(t.vm, passes))
    }
}

enum Step<V> {
    Next(Phase<V>),
    Done(Arc<V>, u32),
}

/// Reads and drops what the source still sends, until it closes or 2 s pass. Closing a socket with
/// unread data makes TCP reset the connection, which can destroy our ERROR record in flight.
fn drain(mut conn: Connection) {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(2);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    conn.shutdown();
}
