//! The MP table (Intel MultiProcessor Specification 1.4): how a guest without ACPI learns how many
//! CPUs it has and their APIC IDs. Same idea as Firecracker's `mptable.rs`.
//!
//! The floating pointer sits in the last KiB of base memory (0x9fc00), the first place a guest scans,
//! so the guest's interpreted ring-0 search ends at once; it points to the configuration table in the
//! BIOS area (0xf0000), which has room for 64 processors.

use migrate::ram::{GuestRam, RamError};

pub const MP_FLOATING_ADDR: u64 = 0x9fc00;
const MP_CONFIG_ADDR: u64 = 0xf0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes an MP table for `cpus` processors with APIC IDs 0..cpus (CPU 0 the bootstrap processor).
pub fn write(ram: &GuestRam, cpus: u8) -> Result<(), RamError> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin of the same number
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"EMU     ");
    config.extend_from_slice(b"EMU-GUEST   ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    config.extend_from_slice(&0u16.to_le_bytes());
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(MP_CONFIG_ADDR as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, features 0
    floating[10] = checksum(&floating);

    ram.write(MP_CONFIG_ADDR, &config)?;
    ram.write(MP_FLOATING_ADDR, &floating)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate::ram::RamLayout;

    #[test]
    fn table_checksums_and_processor_entries() {
        let ram = GuestRam::new(RamLayout::pc(2 << 20).unwrap()).unwrap();
        write(&ram, 4).unwrap();
        let mut fp = [0u8; 16];
        ram.read(MP_FLOATING_ADDR, &mut fp).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let mut hdr = [0u8; 44];
        ram.read(MP_CONFIG_ADDR, &mut hdr).unwrap();
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        ram.read(MP_CONFIG_ADDR, &mut table).unwrap();
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([hdr[34], hdr[35]]), 4 + 1 + 1 + 16 + 2);
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, 3]); // CPU 0: enabled + BSP
        assert_eq!(&table[64..68], &[0, 1, APIC_VERSION, 1]);
    }
}
