//! The guests emu boots and measures with. See `kernel/user.c` for the workloads and `build.rs`
//! for how the images are made.

/// The default guest: the flat Multiboot image, embedded so that `emu` alone boots something.
pub const DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/emu-guest.bin"));

/// Where the build put copies of the images (`target/guest-images`): `emu-guest.bin` (flat,
/// a.out kludge), `emu-guest.elf` (ELF64) and `emu-guest32.elf` (ELF32).
pub const IMAGE_DIR: &str = env!("EMU_GUEST_DIR");
