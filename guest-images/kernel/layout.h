/*
 * Constants shared by the assembly and C parts of emu-guest: selectors, control-register bits, the
 * fixed physical addresses the guest uses, and the system-call numbers.
 */
#ifndef LAYOUT_H
#define LAYOUT_H

#define MAX_CPUS 64
#define IDENTITY_GIB 64             /* RAM above this is not mapped (and not used by workloads) */

#define KSTACK_SIZE 8192            /* per-CPU ring-0 stack (interrupts and system calls) */
#define USTACK_SIZE 65536           /* per-CPU ring-3 stack */

#define AP_TRAMPOLINE 0x8000        /* real-mode AP entry; SIPI vector 0x08 */

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA (0x18 | 3)
#define SEL_UCODE (0x20 | 3)
#define SEL_TSS(cpu) (0x28 + 16 * (cpu))

#define CR0_PE (1 << 0)
#define CR0_MP (1 << 1)
#define CR0_EM (1 << 2)
#define CR0_NE (1 << 5)
#define CR0_WP (1 << 16)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define CR4_OSFXSR (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER 0xC0000080
#define EFER_LME (1 << 8)

#define PTE_P 0x1
#define PTE_W 0x2
#define PTE_U 0x4
#define PTE_PS 0x80

#define LAPIC_BASE 0xFEE00000
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3E0

#define VEC_TIMER 0x20
#define VEC_SPURIOUS 0xFF

/* Ports. COM1 is a 16550; the exit device ends the VM with the written value as its status. */
#define PORT_COM1 0x3F8
#define PORT_EXIT 0xF4

/*
 * System calls. Ring 3 cannot reach ring 0 with `syscall` or `int n` on the hosts emu targets, but
 * `hlt` from ring 3 raises #GP, which is delivered to ring 0: a ring-3 `hlt` is the system call,
 * with the number in rax and arguments in rdi, rsi; the result comes back in rax.
 */
#define SYS_WRITE 0                 /* (buf, len): bytes to COM1 */
#define SYS_HALT 1                  /* (): wait for the next interrupt (the ~100 Hz LAPIC timer) */
#define SYS_EXIT 2                  /* (status): end the VM through the exit device */
#define SYS_INB 3                   /* (port): one byte from an I/O port */
#define SYS_PEEK32 4                /* (phys): one 32-bit read done from ring 0 */
#define SYS_KVMCLOCK 5              /* (): register KVM's clock in bootinfo; 1 if KVM offers it */

#endif
