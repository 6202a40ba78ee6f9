/*
 * emu-guest boot code: Multiboot (v1) header, 32-bit entry, switch to long mode, AP trampoline and
 * interrupt entry stubs.
 *
 * Guest ring 0 is interpreted on the hosts emu targets (about 1-3 us per instruction), so everything
 * that can be computed at build time is: the identity page tables covering the first 64 GiB are
 * static data emitted by the assembler, not a loop run at boot.
 */
#include "layout.h"

    .intel_syntax noprefix

/* ---------------------------------------------------------------------------------------------- */
/* Multiboot header. With AOUT_KLUDGE (the flat-binary image) the header carries the load addresses */
/* (flag bit 16); without it the loader takes them from the ELF program headers.                    */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header         /* header_addr */
    .long __image_start     /* load_addr */
    .long __load_end        /* load_end_addr */
    .long __bss_end         /* bss_end_addr */
    .long _start            /* entry_addr */
#endif

/* ---------------------------------------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    /* Multiboot entry: 32-bit protected mode, paging off, EAX = magic, EBX = info. */
    cli
    mov [boot_magic], eax
    mov [boot_info], ebx
    xor ebp, ebp                    /* ebp = 0: bootstrap processor */
    jmp enter_long_mode

    .globl ap_entry32
ap_entry32:
    /* Application processors arrive here from the real-mode trampoline, in flat 32-bit mode. */
    mov ebp, 1

enter_long_mode:
    mov eax, cr4
    or eax, CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    mov cr4, eax
    mov eax, offset pml4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    and eax, ~CR0_EM
    or eax, CR0_PG | CR0_MP | CR0_WP | CR0_NE
    mov cr0, eax
    lgdt [gdt_ptr]
    ljmp SEL_KCODE, offset start64

    .code64
start64:
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    test ebp, ebp
    jnz 1f
    /* BSP: kmain(magic, info) on cpu 0's kernel stack. */
    lea rsp, [kstacks + KSTACK_SIZE]
    mov edi, [boot_magic]
    mov esi, [boot_info]
    call kmain
    jmp halt_forever
1:  /* AP: the BSP published this AP's index and kernel stack before sending the SIPI. */
    mov rsp, [ap_boot_stack]
    mov edi, [ap_boot_cpu]
    call ap_main
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---------------------------------------------------------------------------------------------- */
/* Real-mode AP trampoline, copied to AP_TRAMPOLINE (SIPI vector AP_TRAMPOLINE >> 12).              */
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    mov ax, cs
    mov ds, ax
    lgdt [tramp_gdt_ptr - ap_trampoline_start]
    mov eax, cr0
    or eax, CR0_PE
    mov cr0, eax
    /* ljmpl 0x08, AP_TRAMPOLINE + (tramp32 - start) */
    .byte 0x66, 0xea
    .long AP_TRAMPOLINE + (tramp32 - ap_trampoline_start)
    .word 0x08
    .code32
tramp32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, offset ap_entry32
    jmp eax
    .align 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
tramp_gdt_ptr:
    .word 3 * 8 - 1
    .long AP_TRAMPOLINE + (tramp_gdt - ap_trampoline_start)
ap_trampoline_end:

/* ---------------------------------------------------------------------------------------------- */
/* Interrupt and exception entry.                                                                   */
    .code64
    .section .text, "ax"

/* Exceptions: push a dummy error code where the CPU pushes none, then the vector number. */
.macro EXC_NOERR n
    .globl exc_\n
exc_\n:
    push 0
    push \n
    jmp exc_common
.endm
.macro EXC_ERR n
    .globl exc_\n
exc_\n:
    push \n
    jmp exc_common
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR   8
EXC_NOERR 9
EXC_ERR   10
EXC_ERR   11
EXC_ERR   12
EXC_ERR   13
EXC_ERR   14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR   17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR   21

/* Saves the general-purpose registers into a struct trap_frame (kernel.h) and calls trap(). */
exc_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    call trap
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16                     /* vector and error code */
    iretq

/* LAPIC timer: it only exists to wake a halted CPU, so it just acknowledges the interrupt. */
    .globl timer_entry
timer_entry:
    push rax
    mov rax, LAPIC_BASE + LAPIC_EOI
    mov dword ptr [rax], 0
    pop rax
    iretq

    .globl spurious_entry
spurious_entry:
    iretq

/* enter_user(rip, rsp, arg): drop to ring 3 at rip with stack rsp, interrupts on, rdi = arg. The
 * function is entered as if called: rsp = 8 mod 16, so compiler-aligned SSE stack slots are aligned. */
    .globl enter_user
enter_user:
    sub rsi, 8
    mov ax, SEL_UDATA
    mov ds, ax
    mov es, ax
    push SEL_UDATA                  /* ss */
    push rsi                        /* rsp */
    push 0x202                      /* rflags: IF */
    push SEL_UCODE                  /* cs */
    push rdi                        /* rip */
    mov rdi, rdx
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor ebp, ebp
    iretq

/* ---------------------------------------------------------------------------------------------- */
    .section .note.GNU-stack, "", @progbits

    .section .data, "aw"
    .align 8
boot_magic: .long 0
boot_info:  .long 0
    .globl ap_boot_stack, ap_boot_cpu
ap_boot_stack: .quad 0
ap_boot_cpu:   .long 0

/* The GDT: kernel and user segments, then one 16-byte TSS descriptor per CPU (filled by kmain). */
    .align 16
    .globl gdt, gdt_ptr
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* SEL_KCODE: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* SEL_KDATA */
    .quad 0x00cff2000000ffff        /* SEL_UDATA: DPL 3 */
    .quad 0x00affa000000ffff        /* SEL_UCODE: 64-bit code, DPL 3 */
    .fill MAX_CPUS * 2, 8, 0        /* SEL_TSS(cpu) */
gdt_end:
    .align 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of the first 64 GiB with 2 MiB pages, user-accessible (the workloads run in ring 3 */
/* on physical addresses). Emitted at build time: 66 pages of data.                                 */
    .section .data.pagetables, "aw"
    .align 4096
    .globl pml4
pml4:
    .quad pdpt + PTE_P + PTE_W + PTE_U
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept IDENTITY_GIB
    .quad pd + i * 4096 + PTE_P + PTE_W + PTE_U
    .set i, i + 1
    .endr
    .fill 512 - IDENTITY_GIB, 8, 0
pd:
    .set i, 0
    .rept IDENTITY_GIB * 512
    .quad (i << 21) + PTE_P + PTE_W + PTE_U + PTE_PS
    .set i, i + 1
    .endr
