//! Builds emu-guest from `kernel/` with the system C compiler (through the `cc` crate) and binutils'
//! `objcopy`, into three Multiboot images that differ only in container:
//!
//! - `emu-guest.bin`: flat binary, load addresses in the Multiboot header (the "a.out kludge");
//!   this is the default guest embedded in `emu`.
//! - `emu-guest.elf`: ELF64, load addresses from the program headers.
//! - `emu-guest32.elf`: the same as ELF32, the container QEMU's `-kernel` wants.
//!
//! Copies land in `OUT_DIR` (for `include_bytes!`) and in `target/guest-images/` for people and scripts.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMMON_FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-nostdlib",
    "-mcmodel=small",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn compile(sources: &[&str], extra: &[&str], defines: &[&str], tag: &str) -> Vec<PathBuf> {
    let mut build = cc::Build::new();
    build.pic(false).warnings(false).extra_warnings(false).cargo_metadata(false).include("kernel");
    for f in COMMON_FLAGS.iter().chain(extra) {
        build.flag(f);
    }
    for d in defines {
        build.define(d, None);
    }
    for s in sources {
        build.file(Path::new("kernel").join(s));
    }
    build.out_dir(Path::new(&env::var("OUT_DIR").unwrap()).join(tag));
    build.compile_intermediates()
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn link(objects: &[PathBuf], out: &Path) {
    let compiler = cc::Build::new().get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args([
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
        "-Tkernel/link.ld",
        "-o",
    ])
    .arg(out)
    .args(objects);
    run(&mut cmd);
}

fn main() {
    for f in ["boot.S", "kernel.c", "user.c", "lib.c", "kernel.h", "layout.h", "link.ld"] {
        println!("cargo:rerun-if-changed=kernel/{f}");
    }
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    // Ring 0 must not use the red zone (interrupts arrive on the same stack) nor SSE registers
    // (the kernel does not save them); ring 3 may use both.
    let kernel = compile(&["kernel.c", "lib.c"], &["-mno-red-zone", "-mgeneral-regs-only"], &[], "k");
    let user = compile(&["user.c"], &[], &[], "u");
    let boot_elf = compile(&["boot.S"], &[], &[], "boot-elf");
    let boot_flat = compile(&["boot.S"], &[], &["AOUT_KLUDGE"], "boot-flat");

    let elf = out.join("emu-guest.elf");
    let elf_kludge = out.join("emu-guest-kludge.elf");
    let flat = out.join("emu-guest.bin");
    let elf32 = out.join("emu-guest32.elf");
    link(&[boot_elf, kernel.clone(), user.clone()].concat(), &elf);
    link(&[boot_flat, kernel, user].concat(), &elf_kludge);
    run(Command::new("objcopy").args(["-O", "binary"]).arg(&elf_kludge).arg(&flat));
    run(Command::new("objcopy").args(["-O", "elf32-i386"]).arg(&elf).arg(&elf32));

    // target/<profile>/build/guest-images-<hash>/out -> target/guest-images
    let target = out.ancestors().nth(4).expect("OUT_DIR is inside the target directory");
    let dir = target.join("guest-images");
    std::fs::create_dir_all(&dir).expect("create target/guest-images");
    for f in [&flat, &elf, &elf32] {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).expect("copy guest image");
    }
    println!("cargo:rustc-env=EMU_GUEST_DIR={}", dir.display());
}
