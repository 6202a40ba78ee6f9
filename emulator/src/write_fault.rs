//! For the mprotect tracker: which guest pages a vCPU was writing when KVM_RUN failed with EFAULT.
//!
//! A guest write from ring 3 to a page the emulator has made read-only makes KVM_RUN fail with
//! EFAULT, with no address (on the PVM hosts emu targets). The instruction at RIP has not executed,
//! so decoding it (iced-x86) and translating the addresses it writes (KVM_TRANSLATE) names the pages;
//! making them writable and running again completes the write. Implicit writes are included (a
//! `push` or `call` writes the stack, `rep stos` the page at RDI).
//!
//! A write the instruction cannot explain is event delivery (the CPU pushing an interrupt frame on
//! the ring-0 stack): on a repeated fault at the same RIP the pages just below the TSS's RSP0 and under
//! a ring-0 RSP are added. What still makes no progress is given up on: the tracker makes all of RAM
//! writable and fails the migration (see `migrate/src/tracker/mprotect.rs`).

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use migrate::ram::GuestRam;
use migrate::tracker::mprotect::WriteFaults;

const EFER_LMA: u64 = 1 << 10;
const PAGE: u64 = 4096;
/// How many times one RIP may fault in a row before the tracker gives up.
const MAX_REPEATS: u32 = 4;

/// Faults in a row at one RIP that the pages resolved last time did not end, per vCPU. (A loop
/// storing to page after page faults at one RIP too, each time on a new page: that is progress.)
#[derive(Default)]
pub struct FaultHistory {
    rip: u64,
    pages: Vec<usize>,
    repeats: u32,
}

fn gpa_page(vcpu: &VcpuFd, ram: &GuestRam, linear: u64) -> Option<usize> {
    let t = vcpu.translate_gva(linear & !(PAGE - 1)).ok()?;
    (t.valid != 0).then(|| ram.layout().page_of(t.physical_address)).flatten()
}

/// Up to `len` bytes of guest memory at a linear address, stopping where translation fails.
fn read_linear(vcpu: &VcpuFd, ram: &GuestRam, linear: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut addr = linear;
    while out.len() < len {
        let Ok(t) = vcpu.translate_gva(addr) else { break };
        if t.valid == 0 {
            break;
        }
        let n = ((PAGE - (addr & (PAGE - 1))) as usize).min(len - out.len());
        let mut buf = vec![0u8; n];
        if ram.read(t.physical_address, &mut buf).is_err() {
            break;
        }
        out.extend_from_slice(&buf);
        addr += n as u64;
    }
    out
}

fn register_value(reg: Register, regs: &kvm_regs, sregs: &kvm_sregs, long_mode: bool, next_ip: u64) -> Option<u64> {
    let segment_base = |base: u64| Some(if long_mode { 0 } else { base });
    let full = match reg.full_register() {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RBP => regs.rbp,
        Register::RSP => regs.rsp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => next_ip,
        Register::ES => return segment_base(sregs.es.base),
        Register::CS => return segment_base(sregs.cs.base),
        Register::SS => return segment_base(sregs.ss.base),
        Register::DS => return segment_base(sregs.ds.base),
        Register::FS => return Some(sregs.fs.base),
        Register::GS => return Some(sregs.gs.base),
        _ => return None,
    };
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ if reg == Register::AH || reg == Register::BH || reg == Register::CH || reg == Register::DH => {
            (full >> 8) & 0xff
        }
        _ => full & 0xff,
    })
}

/// The guest pages the instruction at RIP writes.
fn pages_written_by_instruction(vcpu: &VcpuFd, ram: &GuestRam, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<usize> {
    let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0;
    let bitness = if long_mode {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let rip_linear = if long_mode { regs.rip } else { sregs.cs.base.wrapping_add(regs.rip) };
    let code = read_linear(vcpu, ram, rip_linear, 15);
    let mut decoder = Decoder::with_ip(bitness, &code, regs.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Vec::new();
    }
    let mut factory = InstructionInfoFactory::new();
    let mut pages = Vec::new();
    for m in factory.info(&instr).used_memory() {
        let writes =
            matches!(m.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
        if !writes {
            continue;
        }
        let Some(va) = m.virtual_address(0, |r, _, _| register_value(r, regs, sregs, long_mode, instr.next_ip()))
        else {
            log::debug!("write fault: cannot compute the address of {m:?}");
            continue;
        };
        let size = (m.memory_size().size() as u64).max(1);
        for linear in [va, va.wrapping_add(size - 1)] {
            pages.extend(gpa_page(vcpu, ram, linear));
        }
    }
    pages
}

/// How much of each event stack (below RSP0 and the IST tops) the mprotect tracker never protects.
pub const EVENT_STACK_BYTES: u64 = 16 << 10;

/// The guest pages of this vCPU's event stacks: `EVENT_STACK_BYTES` below the TSS's RSP0 and each
/// non-zero IST entry. PVM writes interrupt frames there itself, and a read-only page there ends the
/// guest rather than faulting to userspace, so the mprotect tracker keeps these pages writable.
pub fn event_stack_pages(vcpu: &VcpuFd, ram: &GuestRam) -> Result<Vec<usize>, String> {
    let sregs = vcpu.get_sregs().map_err(|e| format!("cannot read the TSS location: {e}"))?;
    if sregs.tr.base == 0 && sregs.tr.limit == 0 {
        return Ok(Vec::new()); // no TSS loaded yet (a vCPU that has not started)
    }
    let tss = read_linear(vcpu, ram, sregs.tr.base, 0x68);
    if tss.len() < 0x68 {
        return Err(format!("the TSS at {:#x} is not readable", sregs.tr.base));
    }
    let word = |off: usize| u64::from_le_bytes(tss[off..off + 8].try_into().unwrap_or_default());
    let tops = [word(4)].into_iter().chain((0..7).map(|i| word(0x24 + 8 * i))).filter(|&t| t != 0);
    let mut pages = Vec::new();
    for top in tops {
        let mut linear = top.saturating_sub(EVENT_STACK_BYTES) & !(PAGE - 1);
        while linear < top {
            pages.extend(gpa_page(vcpu, ram, linear));
            linear += PAGE;
        }
    }
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

/// Pages event delivery writes: the event stacks, and the frame under RSP in ring 0.
fn pages_written_by_event_delivery(vcpu: &VcpuFd, ram: &GuestRam, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<usize> {
    let mut pages = event_stack_pages(vcpu, ram).unwrap_or_default();
    if sregs.cs.dpl == 0 {
        pages.extend(gpa_page(vcpu, ram, regs.rsp.wrapping_sub(8)));
        pages.extend(gpa_page(vcpu, ram, regs.rsp.wrapping_sub(64)));
    }
    pages
}

/// Handles one EFAULT from KVM_RUN while the mprotect tracker runs: makes the written pages
/// writable (recording them), or gives up if the fault repeats with nothing left to try.
pub fn resolve(vcpu: &VcpuFd, ram: &GuestRam, faults: &WriteFaults, history: &mut FaultHistory) -> Result<(), String> {
    let regs = vcpu.get_regs().map_err(|e| format!("cannot read registers after a write fault: {e}"))?;
    let sregs = vcpu.get_sregs().map_err(|e| format!("cannot read registers after a write fault: {e}"))?;
    let mut pages = pages_written_by_instruction(vcpu, ram, &regs, &sregs);
    pages.sort_unstable();
    pages.dedup();
    if history.rip == regs.rip && history.pages == pages {
        history.repeats += 1;
    } else {
        *history = FaultHistory { rip: regs.rip, pages: pages.clone(), repeats: 0 };
    }
    if history.repeats >= MAX_REPEATS {
        faults.give_up(&format!(
            "a write fault at RIP {:#x} could not be tied to a guest page after {MAX_REPEATS} tries",
            regs.rip
        ));
        return Ok(()); // all of RAM is writable now: the vCPU runs on
    }
    if history.repeats > 0 {
        pages.extend(pages_written_by_event_delivery(vcpu, ram, &regs, &sregs));
        pages.sort_unstable();
        pages.dedup();
    }
    log::debug!("write fault at rip {:#x} (repeat {}): pages {pages:?}", regs.rip, history.repeats);
    for p in pages {
        faults.resolve(p)?;
    }
    Ok(())
}
