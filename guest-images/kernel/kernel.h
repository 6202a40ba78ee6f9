/*
 * Declarations shared by the ring-0 kernel (kernel.c) and the ring-3 workloads (user.c).
 */
#ifndef KERNEL_H
#define KERNEL_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define MAX_RAM_RANGES 8
#define CMDLINE_MAX 2048

struct ram_range {
    u64 base;
    u64 len;
};

/*
 * KVM's paravirtual clock (pvclock_vcpu_time_info, what Linux calls kvmclock), registered with
 * MSR_KVM_SYSTEM_TIME_NEW. KVM rewrites it whenever the clock's base changes (at start, and on a
 * migration's destination after emu's KVM_SET_CLOCK): ns = system_time + scale(TSC - tsc_timestamp).
 * A version that is odd, or changes during a read, means KVM was writing it.
 */
struct pvclock {
    volatile u32 version;
    u32 pad0;
    volatile u64 tsc_timestamp;
    volatile u64 system_time;
    volatile u32 tsc_to_system_mul;
    volatile signed char tsc_shift;
    volatile u8 flags;
    u8 pad[2];
} __attribute__((aligned(32)));

/*
 * Facts the kernel found at boot, readable from ring 3 (all memory is identity-mapped and
 * user-accessible). The last fields are shared state the workloads update with atomics.
 */
struct bootinfo {
    u32 ncpus;
    u32 tsc_khz;
    u64 boot_tsc;
    u64 ram_bytes;
    u32 nram;
    struct ram_range ram[MAX_RAM_RANGES];
    u64 free_base;                  /* first address the kernel does not use */
    char cmdline[CMDLINE_MAX];
    volatile u32 go;                /* set once every CPU is up: workloads start together */
    volatile u32 cpus_running;      /* workloads not finished yet (runtime=) */
    volatile u32 exit_status;       /* worst status of a finished workload */
    volatile u32 output_lock;       /* serialises lines from several CPUs */
    u32 has_kvmclock;               /* KVM offered its clock and the bootstrap CPU registered it */
    struct pvclock kvmclock;        /* the bootstrap CPU's (the TSC is one for all CPUs here) */
};

extern struct bootinfo bootinfo;

/* Saved by exc_common in boot.S, lowest address first. */
struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

void user_main(u64 cpu);
void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);

#endif
