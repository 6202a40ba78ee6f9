//! Whether a vCPU state saved on one host can run on this one, possibly of the other CPU vendor,
//! and the changes that make it fit. Pure functions of the saved state and what this host's KVM
//! offers, so that the rules are tested without either host.
//!
//! CPUID: the guest keeps the CPUID it booted with, vendor string, family and cache leaves
//! included: it read them at boot, and a guest whose CPU changed identity under it is worse off
//! than one told a foreign name (KVM runs an AMD-named guest on Intel and the other way round).
//! What must hold is that every instruction-set feature the guest was offered exists here, or the
//! guest takes #UD on its next use. So the feature words (leaf 1, leaf 7.0, 0x80000001, XSAVE
//! 0xd.1) are compared with the CPUID this host gives a vCPU, read back from one (KVM_GET_CPUID2;
//! under PVM that is the host CPU's own features, SSE3 to AVX2 on this AMD host, which ring 3 sees
//! natively, not the minimal set KVM_GET_SUPPORTED_CPUID reports), except:
//! - bits that describe state, not features (OSXSAVE, OSPKE: they follow CR4; APIC: the APIC
//!   base MSR; the hypervisor bit);
//! - AMD's informational bits of 0x80000001 ECX (legacy CMP and CR8, misaligned SSE mode, OSVW,
//!   IBS, node id, topology extensions, ...): they describe the machine or its MSRs, no
//!   instruction a guest program runs depends on them, and Intel never has them;
//! - AMD's copies of leaf 1's EDX bits in 0x80000001 EDX (FPU, TSC, CMOV, ...), which Intel
//!   leaves clear: they are checked against leaf 1 EDX here instead.
//!
//! MSRs: the state holds the source KVM's list; this host's may differ (each vendor has MSRs the
//! other lacks: AMD's VM_HSAVE_PA, VIRT_SPEC_CTRL, Intel's FEAT_CTL, VMX capability MSRs ...). An
//! MSR this host does not list is dropped when its value is its reset value (0: the guest never
//! set it) or when it is one of [`VENDOR_MSRS`] (nested-virtualisation and vendor speculation
//! controls, which no guest of a host without that vendor's virtualisation can use); any other
//! is refused, named.
//!
//! The guest's clock: see `tests/clock.rs`; the guest TSC cannot be set on this host, so a guest
//! reading the TSC sees the destination host's; KVM's clock (kvmclock) is saved and set, and goes
//! on from the source's value.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

#[derive(Debug, thiserror::Error)]
pub enum CpuCompatError {
    #[error("this host lacks CPU features the guest was given: {}", .0.join(", "))]
    MissingFeatures(Vec<String>),
    #[error("this host's KVM cannot hold MSRs the guest set: {}", .0.join(", "))]
    UnknownMsrs(Vec<String>),
}

/// One feature word: (leaf, subleaf, register, bits not compared).
struct Word {
    leaf: u32,
    sub: u32,
    reg: Reg,
    ignore: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const OSXSAVE: u32 = 1 << 27;
const HYPERVISOR: u32 = 1 << 31;
const APIC: u32 = 1 << 9;
const OSPKE: u32 = 1 << 4;
/// 0x80000001 ECX: CMP_LEGACY 1, EXTAPIC 3, CR8_LEGACY 4, MISALIGNSSE 7, OSVW 9, IBS 10, WDT 13,
/// NODEID 19, TOPOEXT 22, PERFCTR_CORE 23, PERFCTR_NB 24, BPEXT 26, PTSC 27, PERFCTR_LLC 28.
const AMD_INFO_ECX: u32 = (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 7)
    | (1 << 9)
    | (1 << 10)
    | (1 << 13)
    | (1 << 19)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28);
/// 0x80000001 EDX bits that AMD copies from leaf 1 EDX (0-9, 12-17, 23, 24).
const AMD_MIRRORED_EDX: u32 = 0x0183_f3ff;
/// 0x80000001 EDX: AMD's MMX extensions, which are the integer part of SSE (Intel has them with
/// SSE, leaf 1 EDX bit 25, and does not set this bit).
const MMXEXT: u32 = 1 << 22;
const SSE: u32 = 1 << 25;
/// 0x80000001 EDX: FFXSR, a mode of FXSAVE that only speeds it up.
const FFXSR: u32 = 1 << 25;

const WORDS: &[Word] = &[
    Word { leaf: 1, sub: 0, reg: Reg::Ecx, ignore: OSXSAVE | HYPERVISOR },
    Word { leaf: 1, sub: 0, reg: Reg::Edx, ignore: APIC },
    Word { leaf: 7, sub: 0, reg: Reg::Ebx, ignore: 0 },
    Word { leaf: 7, sub: 0, reg: Reg::Ecx, ignore: OSPKE },
    Word { leaf: 7, sub: 0, reg: Reg::Edx, ignore: 0 },
    Word { leaf: 0xd, sub: 1, reg: Reg::Eax, ignore: 0 },
    Word { leaf: 0x8000_0001, sub: 0, reg: Reg::Ecx, ignore: AMD_INFO_ECX },
    Word { leaf: 0x8000_0001, sub: 0, reg: Reg::Edx, ignore: AMD_MIRRORED_EDX | MMXEXT | FFXSR },
];

/// Names for the bits worth a name in an error; others are told by leaf and bit.
const NAMES: &[(u32, Reg, u32, &str)] = &[
    (1, Reg::Ecx, 0, "sse3"),
    (1, Reg::Ecx, 9, "ssse3"),
    (1, Reg::Ecx, 19, "sse4.1"),
    (1, Reg::Ecx, 20, "sse4.2"),
    (1, Reg::Ecx, 23, "popcnt"),
    (1, Reg::Ecx, 25, "aes"),
    (1, Reg::Ecx, 26, "xsave"),
    (1, Reg::Ecx, 28, "avx"),
    (1, Reg::Ecx, 30, "rdrand"),
    (1, Reg::Edx, 25, "sse"),
    (1, Reg::Edx, 26, "sse2"),
    (7, Reg::Ebx, 5, "avx2"),
    (7, Reg::Ebx, 8, "bmi2"),
    (7, Reg::Ebx, 16, "avx512f"),
    (7, Reg::Ebx, 18, "rdseed"),
    (7, Reg::Ebx, 29, "sha"),
    (0x8000_0001, Reg::Ecx, 2, "svm"),
    (0x8000_0001, Reg::Ecx, 5, "abm"),
    (0x8000_0001, Reg::Ecx, 6, "sse4a"),
    (0x8000_0001, Reg::Ecx, 11, "xop"),
    (0x8000_0001, Reg::Ecx, 16, "fma4"),
    (0x8000_0001, Reg::Ecx, 21, "tbm"),
    (0x8000_0001, Reg::Edx, 27, "rdtscp"),
    (0x8000_0001, Reg::Edx, 26, "pdpe1gb"),
    (0x8000_0001, Reg::Edx, 31, "3dnow"),
];

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn find(t: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
    // Leaves without subleaves match any index (KVM leaves it 0).
    t.iter().find(|e| {
        e.function == leaf && (e.index == sub || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

fn word(t: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: Reg) -> u32 {
    find(t, leaf, sub).map(|e| reg(e, r)).unwrap_or(0)
}

fn name(leaf: u32, r: Reg, bit: u32) -> String {
    match NAMES.iter().find(|n| n.0 == leaf && n.1 == r && n.2 == bit) {
        Some(n) => n.3.to_string(),
        None => {
            let r = ["eax", "ebx", "ecx", "edx"][r as usize];
            format!("CPUID {leaf:#x} {r} bit {bit}")
        }
    }
}

/// The instruction-set features of `saved` (a guest's CPUID) that `host` (this host's KVM
/// supported CPUID) lacks; empty if the guest can run here.
pub fn missing_features(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for w in WORDS {
        let lacking = word(saved, w.leaf, w.sub, w.reg) & !word(host, w.leaf, w.sub, w.reg) & !w.ignore;
        missing.extend((0..32).filter(|b| lacking & (1 << b) != 0).map(|b| name(w.leaf, w.reg, b)));
    }
    // AMD's copies of leaf 1 EDX: what they name must exist here, wherever this host says so.
    let mirrored = word(saved, 0x8000_0001, 0, Reg::Edx) & AMD_MIRRORED_EDX & !APIC;
    let lacking = mirrored & !word(host, 1, 0, Reg::Edx) & !word(host, 0x8000_0001, 0, Reg::Edx);
    missing.extend((0..32).filter(|b| lacking & (1 << b) != 0).map(|b| name(0x8000_0001, Reg::Edx, b)));
    let mmxext = word(saved, 0x8000_0001, 0, Reg::Edx) & MMXEXT != 0;
    if mmxext && word(host, 0x8000_0001, 0, Reg::Edx) & MMXEXT == 0 && word(host, 1, 0, Reg::Edx) & SSE == 0 {
        missing.push("mmxext".to_string());
    }
    missing
}

/// MSRs of one vendor (or of nested virtualisation) that a guest of this emulator cannot depend
/// on elsewhere: dropped, with a note, when this host's KVM does not hold them.
pub const VENDOR_MSRS: &[(u32, &str)] = &[
    (0x3a, "IA32_FEAT_CTL (Intel: VMX enable lock)"),
    (0xc001_0117, "VM_HSAVE_PA (AMD: nested SVM host save area)"),
    (0xc001_011f, "VIRT_SPEC_CTRL (AMD: virtual SSBD)"),
    (0xc001_0015, "HWCR (AMD: hardware configuration)"),
    (0xc000_0104, "TSC_RATIO (AMD: nested TSC scaling)"),
];

/// What [`fit_msrs`] did.
#[derive(Debug, Default, PartialEq)]
pub struct MsrFit {
    /// Dropped at their reset value, 0.
    pub dropped_unset: Vec<u32>,
    /// Dropped from [`VENDOR_MSRS`] with a value.
    pub dropped_vendor: Vec<(u32, u64)>,
}

/// Keeps the saved MSRs this host's KVM lists (`here`), drops those it may (see the module
/// comment), refuses the rest.
pub fn fit_msrs(saved: &mut Vec<kvm_msr_entry>, here: &[u32]) -> Result<MsrFit, CpuCompatError> {
    let mut fit = MsrFit::default();
    let mut refused = Vec::new();
    saved.retain(|m| {
        if here.contains(&m.index) {
            return true;
        }
        if m.data == 0 {
            fit.dropped_unset.push(m.index);
        } else if VENDOR_MSRS.iter().any(|v| v.0 == m.index) {
            fit.dropped_vendor.push((m.index, m.data));
        } else {
            refused.push(format!("{:#x} = {:#x}", m.index, m.data));
        }
        false
    });
    if !refused.is_empty() {
        return Err(CpuCompatError::UnknownMsrs(refused));
    }
    Ok(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        let flags = if function == 7 || function == 0xd { kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX } else { 0 };
        kvm_cpuid_entry2 { function, index, flags, eax, ebx, ecx, edx, ..Default::default() }
    }

    /// This project's AMD host under PVM (KVM_GET_SUPPORTED_CPUID, 2026-12-03), as the guest got it.
    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0, 0xa00f11, 0x0102_0800, 0x8120_2000, 0x078b_fbff),
            leaf(7, 0, 0, 0x0180_0002, 0x4, 0x2000_0000),
            leaf(0xd, 1, 0, 0, 0, 0),
            leaf(0x8000_0001, 0, 0xa00f11, 0x4000_0000, 0x0040_0393, 0x23d3_fbff),
        ]
    }

    /// An Intel host of the same era as KVM reports it: no AMD copies in 0x80000001 EDX, none of
    /// AMD's informational bits, its own extra features.
    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0, 0x50654, 0, 0xf7fa_3223, 0x0f8b_fbff),
            leaf(7, 0, 0, 0xd19f_4fbb, 0x0000_000c, 0xbc00_0400 | 0x2000_0000),
            leaf(0xd, 1, 0xf, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, 0x0000_0121, 0x2c10_0800),
        ]
    }

    #[test]
    fn an_amd_guest_fits_an_intel_host_and_the_other_way_round_only_by_its_features() {
        // AMD -> Intel: the informational bits and AMD's copies of leaf 1 are no obstacle.
        assert_eq!(missing_features(&amd(), &intel()), Vec::<String>::new());
        // Intel -> AMD (this minimal PVM one): the Intel guest was given what this host lacks.
        let missing = missing_features(&intel(), &amd());
        for f in ["sse3", "ssse3", "sse4.2", "avx", "avx2", "rdrand"] {
            assert!(missing.contains(&f.to_string()), "{f} not in {missing:?}");
        }
        // The same host: nothing missing, whatever the dynamic bits say.
        let mut booted = amd();
        booted[0].ecx &= !OSXSAVE;
        booted[0].ecx |= HYPERVISOR;
        assert!(missing_features(&booted, &amd()).is_empty());
        // An AMD-only instruction set (SSE4a) given to the guest: refused on Intel, by name.
        let mut sse4a = amd();
        sse4a[3].ecx |= 1 << 6;
        assert_eq!(missing_features(&sse4a, &intel()), vec!["sse4a".to_string()]);
        // AMD's copy of a leaf-1 feature this Intel host lacks is caught through leaf 1.
        let mut no_pse36 = intel();
        no_pse36[0].edx &= !(1 << 17);
        let both = ["CPUID 0x1 edx bit 17", "CPUID 0x80000001 edx bit 17"].map(String::from).to_vec();
        assert_eq!(missing_features(&amd(), &no_pse36), both);
    }

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry { index, data, ..Default::default() }
    }

    #[test]
    fn msrs_of_the_other_vendor_are_dropped_when_harmless_and_others_refused() {
        // This host's list (AMD), and an Intel one: the first without 0xc0010117/0xc001011f, with 0x3a.
        let intel_list = [0x10, 0x174, 0x175, 0x176, 0x3a, 0x48, 0x4b56_4d01, 0xc000_0080, 0xc001_0015];
        let mut saved = vec![
            msr(0x10, 12345),
            msr(0x4b56_4d01, 0x1000 | 1),
            msr(0xc001_0117, 0),
            msr(0xc001_011f, 0x400),
            msr(0xc001_0015, 0x100),
        ];
        let fit = fit_msrs(&mut saved, &intel_list).unwrap();
        assert_eq!(fit.dropped_unset, vec![0xc001_0117]);
        assert_eq!(fit.dropped_vendor, vec![(0xc001_011f, 0x400)]);
        let kept: Vec<u32> = saved.iter().map(|m| m.index).collect();
        assert_eq!(kept, vec![0x10, 0x4b56_4d01, 0xc001_0015]);
        // An MSR this host cannot hold, set to something, and not one of the vendor ones: refused.
        let mut saved = vec![msr(0x10, 1), msr(0x1d9, 0x1), msr(0x6e0, 0)];
        let e = fit_msrs(&mut saved, &intel_list).unwrap_err().to_string();
        assert_eq!(e, "this host's KVM cannot hold MSRs the guest set: 0x1d9 = 0x1");
    }
}
