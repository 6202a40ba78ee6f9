//! Multiboot (v1) loader: places a kernel image in guest RAM the way QEMU's `-kernel` does, and
//! writes the Multiboot information the kernel starts with.
//!
//! Accepted images: ELF32 or ELF64 (PT_LOAD segments at their physical addresses), or any file whose
//! Multiboot header carries the load addresses (flag bit 16, the "a.out kludge"), which takes
//! precedence, as in QEMU and GRUB.
//!
//! Guest-physical layout the loader uses (below the kernel, which must load at 1 MiB or above):
//! - `MBI_ADDR` (0x6000): the Multiboot information, memory map, loader name and command line,
//!   up to 0x8000 (the guest is free to use 0x8000 for its AP trampoline);
//! - 0x9fc00 and 0xf0000: the MP table (see `mptable`), reported reserved in the memory map.

use migrate::ram::{GuestRam, RamLayout};

pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
pub const MULTIBOOT_BOOT_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie, 4-byte aligned, in the first 8 KiB of the image.
const HEADER_SEARCH: usize = 8192;
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements the loader must meet or refuse the image; these are the ones emu meets
/// (video-mode requests are ignored, as QEMU does: emu has no display).
const SUPPORTED_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

const MBI_ADDR: u64 = 0x6000;
const MBI_LOADER_NAME: u64 = 0x6080;
const MBI_MMAP: u64 = 0x6100;
const MBI_CMDLINE: u64 = 0x6800;
const MBI_END: u64 = 0x8000;
/// Kernels load at or above 1 MiB; everything below belongs to the loader and the guest's firmware-
/// like structures.
const KERNEL_MIN_ADDR: u64 = 0x10_0000;

const MBI_INFO_MEM: u32 = 1 << 0;
const MBI_INFO_CMDLINE: u32 = 1 << 2;
const MBI_INFO_MMAP: u32 = 1 << 6;
const MBI_INFO_LOADER_NAME: u32 = 1 << 9;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a Multiboot image: no Multiboot header in the first 8 KiB")]
    NoHeader,
    #[error("Multiboot header at offset {0:#x} has a bad checksum")]
    BadChecksum(usize),
    #[error("truncated image: {0}")]
    Truncated(String),
    #[error("the kernel requires Multiboot features emu does not provide (flags {0:#x})")]
    UnsupportedFlags(u32),
    #[error("not a usable kernel: {0}")]
    BadImage(String),
    #[error("the kernel does not fit in guest RAM: it loads at {start:#x}..{end:#x}, RAM ends at {ram_end:#x} (raise --mem)")]
    TooBig { start: u64, end: u64, ram_end: u64 },
    #[error("the kernel loads at {0:#x}, below 1 MiB, where emu keeps the boot information")]
    TooLow(u64),
    #[error("the kernel command line is {0} bytes; at most {max} fit", max = MBI_END - MBI_CMDLINE - 1)]
    CmdlineTooLong(usize),
    // The RAM error's text is part of this message, so it is not also the `source()` (which `{:#}`
    // would print again); hence no #[from], and the From impl below.
    #[error("guest RAM: {0}")]
    Ram(migrate::ram::RamError),
}

impl From<migrate::ram::RamError> for LoadError {
    fn from(e: migrate::ram::RamError) -> Self {
        LoadError::Ram(e)
    }
}

/// Where the kernel starts: EIP and the address of the Multiboot information (EBX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub eip: u32,
    pub mbi: u32,
}

/// One piece of the image to copy into RAM: `file[offset..offset+filesz]` at `paddr`, then zeroes up
/// to `memsz`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Finds the Multiboot header; returns its offset and flags.
fn find_header(image: &[u8]) -> Result<(usize, u32), LoadError> {
    let mut bad_checksum = None;
    for off in (0..HEADER_SEARCH.min(image.len())).step_by(4) {
        if u32_at(image, off) != Some(MULTIBOOT_HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(sum)) = (u32_at(image, off + 4), u32_at(image, off + 8)) else {
            return Err(LoadError::Truncated(format!("the Multiboot header at {off:#x} is cut short")));
        };
        if MULTIBOOT_HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0 {
            return Ok((off, flags));
        }
        bad_checksum.get_or_insert(off);
    }
    Err(bad_checksum.map_or(LoadError::NoHeader, LoadError::BadChecksum))
}

/// Segments from the header's address fields (the a.out kludge).
fn kludge_segments(image: &[u8], hdr: usize) -> Result<(Vec<Segment>, u64), LoadError> {
    let field = |i: usize| {
        u32_at(image, hdr + 12 + 4 * i)
            .map(u64::from)
            .ok_or_else(|| LoadError::Truncated("the Multiboot header's address fields are cut short".into()))
    };
    let (header_addr, load_addr, load_end, bss_end, entry) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    if load_addr > header_addr {
        return Err(LoadError::BadImage(format!("load_addr {load_addr:#x} is above header_addr {header_addr:#x}")));
    }
    let file_start = (hdr as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or_else(|| LoadError::BadImage("header_addr - load_addr points before the start of the file".into()))?
        as usize;
    let filesz = if load_end == 0 {
        image.len() - file_start
    } else {
        if load_end < load_addr {
            return Err(LoadError::BadImage(format!("load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")));
        }
        (load_end - load_addr) as usize
    };
    if file_start + filesz > image.len() {
        return Err(LoadError::Truncated(format!(
            "the header asks for {filesz} bytes from offset {file_start:#x}, the file has {}",
            image.len()
        )));
    }
    let memsz = if bss_end == 0 { filesz as u64 } else { bss_end.saturating_sub(load_addr).max(filesz as u64) };
    Ok((vec![Segment { paddr: load_addr, offset: file_start, filesz, memsz }], entry))
}

/// Segments from an ELF32 or ELF64 file's PT_LOAD program headers.
fn elf_segments(image: &[u8]) -> Result<(Vec<Segment>, u64), LoadError> {
    if image.get(0..4) != Some(b"\x7fELF") {
        return Err(LoadError::BadImage("neither ELF nor a Multiboot header with load addresses (flag bit 16)".into()));
    }
    let bad = |what: &str| LoadError::BadImage(format!("ELF: {what}"));
    let cut = |what: &str| LoadError::Truncated(format!("ELF {what} is cut short"));
    let class64 = match image.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(bad("unknown class")),
    };
    if image.get(5) != Some(&1) {
        return Err(bad("not little-endian"));
    }
    let machine = u16_at(image, 18).ok_or_else(|| cut("header"))?;
    if machine != 3 && machine != 62 {
        return Err(bad(&format!("machine {machine} is not x86")));
    }
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(image, 24).ok_or_else(|| cut("header"))?,
            u64_at(image, 32).ok_or_else(|| cut("header"))? as usize,
            u16_at(image, 54).ok_or_else(|| cut("header"))? as usize,
            u16_at(image, 56).ok_or_else(|| cut("header"))? as usize,
        )
    } else {
        (
            u64::from(u32_at(image, 24).ok_or_else(|| cut("header"))?),
            u32_at(image, 28).ok_or_else(|| cut("header"))? as usize,
            u16_at(image, 42).ok_or_else(|| cut("header"))? as usize,
            u16_at(image, 44).ok_or_else(|| cut("header"))? as usize,
        )
    };
    let min_phent = if class64 { 56 } else { 32 };
    if phnum == 0 || phentsize < min_phent {
        return Err(bad("no program headers"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or_else(|| cut("program header table"))?;
        if image.len() < ph + min_phent {
            return Err(cut("program header table"));
        }
        let ptype = u32_at(image, ph).ok_or_else(|| cut("program header"))?;
        if ptype != 1 {
            continue; // only PT_LOAD matters
        }
        let field = |o32: usize, o64: usize| -> u64 {
            if class64 {
                u64_at(image, ph + o64).unwrap_or(0)
            } else {
                u64::from(u32_at(image, ph + o32).unwrap_or(0))
            }
        };
        let (offset, paddr, filesz, memsz) =
            (field(4, 8) as usize, field(12, 24), field(16, 32) as usize, field(20, 40));
        if offset.checked_add(filesz).is_none_or(|end| end > image.len()) {
            return Err(LoadError::Truncated(format!(
                "segment {i} needs bytes {offset:#x}..{:#x}, the file has {:#x}",
                offset.saturating_add(filesz),
                image.len()
            )));
        }
        if memsz < filesz as u64 {
            return Err(bad(&format!("segment {i} is smaller in memory than in the file")));
        }
        if memsz > 0 {
            segments.push(Segment { paddr, offset, filesz, memsz });
        }
    }
    if segments.is_empty() {
        return Err(bad("no loadable segments"));
    }
    Ok((segments, entry))
}

/// Loads `image` into `ram`, writes the Multiboot information with `cmdline`, and returns the entry.
pub fn load(ram: &GuestRam, image: &[u8], cmdline: &str) -> Result<Entry, LoadError> {
    let (hdr, flags) = find_header(image)?;
    let unsupported = flags & 0xffff & !SUPPORTED_REQUIRED;
    if unsupported != 0 {
        return Err(LoadError::UnsupportedFlags(unsupported));
    }
    let (segments, entry) =
        if flags & FLAG_AOUT_KLUDGE != 0 { kludge_segments(image, hdr)? } else { elf_segments(image)? };
    let entry =
        u32::try_from(entry).map_err(|_| LoadError::BadImage(format!("entry point {entry:#x} is above 4 GiB")))?;

    // The low region holds the kernel: check every segment before writing any.
    let low = ram.layout().regions()[0];
    for s in &segments {
        if s.paddr < KERNEL_MIN_ADDR {
            return Err(LoadError::TooLow(s.paddr));
        }
        let end = s.paddr.saturating_add(s.memsz);
        if end > low.end() {
            return Err(LoadError::TooBig { start: s.paddr, end, ram_end: low.end() });
        }
    }
    for s in &segments {
        ram.write(s.paddr, &image[s.offset..s.offset + s.filesz])?;
        let bss = (s.memsz - s.filesz as u64) as usize;
        if bss > 0 {
            // Fresh guest RAM is already zero, but a loader does not rely on that.
            ram.write(s.paddr + s.filesz as u64, &vec![0u8; bss])?;
        }
    }
    write_boot_information(ram, cmdline)?;
    Ok(Entry { eip: entry, mbi: MBI_ADDR as u32 })
}

/// The Multiboot information structure, memory map, loader name and command line.
fn write_boot_information(ram: &GuestRam, cmdline: &str) -> Result<(), LoadError> {
    if cmdline.len() as u64 >= MBI_END - MBI_CMDLINE {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let layout = ram.layout();
    let mmap = memory_map(layout);
    let mut mmap_bytes = Vec::new();
    for (addr, len, kind) in &mmap {
        mmap_bytes.extend_from_slice(&20u32.to_le_bytes());
        mmap_bytes.extend_from_slice(&addr.to_le_bytes());
        mmap_bytes.extend_from_slice(&len.to_le_bytes());
        mmap_bytes.extend_from_slice(&kind.to_le_bytes());
    }
    let low_end = layout.regions()[0].end();
    let mem_upper_kib = (low_end.saturating_sub(KERNEL_MIN_ADDR) >> 10) as u32;

    let mut mbi = [0u8; 0x74];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, MBI_INFO_MEM | MBI_INFO_CMDLINE | MBI_INFO_MMAP | MBI_INFO_LOADER_NAME);
    put(4, 639); // mem_lower, KiB
    put(8, mem_upper_kib);
    put(16, MBI_CMDLINE as u32);
    put(44, mmap_bytes.len() as u32);
    put(48, MBI_MMAP as u32);
    put(64, MBI_LOADER_NAME as u32);
    ram.write(MBI_ADDR, &mbi)?;
    ram.write(MBI_LOADER_NAME, b"emu\0")?;
    ram.write(MBI_MMAP, &mmap_bytes)?;
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(MBI_CMDLINE, &c)?;
    Ok(())
}

/// The BIOS-style memory map: (address, length, type) with type 1 = RAM, 2 = reserved.
fn memory_map(layout: &RamLayout) -> Vec<(u64, u64, u32)> {
    let low_end = layout.regions()[0].end();
    let mut map = vec![
        (0, crate::mptable::MP_FLOATING_ADDR, 1),
        (crate::mptable::MP_FLOATING_ADDR, 0xa0000 - crate::mptable::MP_FLOATING_ADDR, 2),
        (0xf0000, 0x10000, 2),
    ];
    if low_end > KERNEL_MIN_ADDR {
        map.push((KERNEL_MIN_ADDR, low_end - KERNEL_MIN_ADDR, 1));
    }
    for r in &layout.regions()[1..] {
        map.push((r.gpa, r.size, 1));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(mib: u64) -> GuestRam {
        GuestRam::new(RamLayout::pc(mib << 20).unwrap()).unwrap()
    }

    /// A minimal a.out-kludge image: header at 0, loaded at 1 MiB, `body` after the header.
    fn kludge_image(flags_extra: u32, load_end_delta: i64, body: &[u8]) -> Vec<u8> {
        let flags = FLAG_AOUT_KLUDGE | FLAG_MEMORY_INFO | flags_extra;
        let base = 0x10_0000u32;
        let len = 32 + body.len() as u32;
        let fields = [
            MULTIBOOT_HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
            base,
            base,
            (base as i64 + len as i64 + load_end_delta) as u32,
            base + len + 4096,
            base + 32,
        ];
        let mut img: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
        img.extend_from_slice(body);
        img
    }

    #[test]
    fn loads_kludge_image_and_writes_boot_info() {
        let r = ram(8);
        let img = kludge_image(0, 0, b"\xf4\xf4kernel");
        let e = load(&r, &img, "wl=idle").unwrap();
        assert_eq!(e, Entry { eip: 0x10_0020, mbi: MBI_ADDR as u32 });
        let mut buf = [0u8; 8];
        r.read(0x10_0020, &mut buf).unwrap();
        assert_eq!(&buf, b"\xf4\xf4kernel");
        let mut cmd = [0u8; 8];
        r.read(MBI_CMDLINE, &mut cmd).unwrap();
        assert_eq!(&cmd, b"wl=idle\0");
        let mut flags = [0u8; 4];
        r.read(MBI_ADDR, &mut flags).unwrap();
        assert_eq!(u32::from_le_bytes(flags) & MBI_INFO_MMAP, MBI_INFO_MMAP);
    }

    #[test]
    fn refuses_non_multiboot_truncated_and_oversized() {
        let r = ram(2);
        assert!(matches!(load(&r, b"hello world", ""), Err(LoadError::NoHeader)));
        let img = kludge_image(0, 100, b"abc");
        assert!(matches!(load(&r, &img, ""), Err(LoadError::Truncated(_))));
        let mut bad = kludge_image(0, 0, b"abc");
        bad[8] ^= 1;
        assert!(matches!(load(&r, &bad, ""), Err(LoadError::BadChecksum(0))));
        let big = kludge_image(0, 0, &vec![1u8; 2 << 20]);
        assert!(matches!(load(&r, &big, ""), Err(LoadError::TooBig { .. })));
        let unsupported = kludge_image(1 << 3, 0, b"abc");
        assert!(matches!(load(&r, &unsupported, ""), Err(LoadError::UnsupportedFlags(8))));
        let long = "x".repeat(8000);
        assert!(matches!(load(&ram(8), &kludge_image(0, 0, b"a"), &long), Err(LoadError::CmdlineTooLong(_))));
    }

    #[test]
    fn elf_without_kludge_needs_valid_elf() {
        let flags = FLAG_MEMORY_INFO;
        let mut img: Vec<u8> = [MULTIBOOT_HEADER_MAGIC, flags, 0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC + flags)]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        img.extend_from_slice(&[0; 64]);
        assert!(matches!(load(&ram(8), &img, ""), Err(LoadError::BadImage(_))));
    }
}
