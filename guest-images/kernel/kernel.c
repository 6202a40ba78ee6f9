/*
 * emu-guest ring 0: read the Multiboot information, find the CPUs (MP table), set up the GDT, a TSS
 * and a LAPIC timer per CPU, start the application processors, and drop every CPU to ring 3.
 * After that ring 0 only serves system calls (a ring-3 `hlt`, see layout.h) and timer interrupts.
 *
 * Ring 0 is interpreted on the hosts emu targets, so this file does as little as it can: no loops
 * over memory, no polling where a single I/O instruction will do.
 */
#include "kernel.h"

#define MULTIBOOT_BOOT_MAGIC 0x2BADB002
#define MBI_FLAG_MEM (1 << 0)
#define MBI_FLAG_CMDLINE (1 << 2)
#define MBI_FLAG_MMAP (1 << 6)

struct multiboot_info {
    u32 flags;
    u32 mem_lower, mem_upper;
    u32 boot_device;
    u32 cmdline;
    u32 mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
} __attribute__((packed));

struct multiboot_mmap_entry {
    u32 size;                       /* of the rest of the entry */
    u64 addr, len;
    u32 type;
} __attribute__((packed));

struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 offset0;
    u16 selector;
    u8 ist;
    u8 type;
    u16 offset1;
    u32 offset2;
    u32 reserved;
} __attribute__((packed));

struct bootinfo bootinfo;
u8 kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(16)));
static u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(16)));
static struct tss tss[MAX_CPUS];
static struct idt_entry idt[256];
static u8 apic_ids[MAX_CPUS];
static volatile u32 ap_started;

extern u64 gdt[];
extern u64 ap_boot_stack;
extern u32 ap_boot_cpu;
extern char ap_trampoline_start[], ap_trampoline_end[], __kernel_end[];
extern char timer_entry[], spurious_entry[];
extern char exc_0[], exc_1[], exc_2[], exc_3[], exc_4[], exc_5[], exc_6[], exc_7[], exc_8[],
    exc_9[], exc_10[], exc_11[], exc_12[], exc_13[], exc_14[], exc_15[], exc_16[], exc_17[],
    exc_18[], exc_19[], exc_20[], exc_21[];
void enter_user(void (*rip)(u64), u64 rsp, u64 arg) __attribute__((noreturn));
void ap_main(u32 cpu);
void kmain(u32 magic, u32 info);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(u64)(LAPIC_BASE + reg) = v; }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(u64)(LAPIC_BASE + reg); }

/* One string I/O instruction: KVM turns `rep outsb` into a single exit for the whole buffer. */
static void serial_write(const char *s, u64 n)
{
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)PORT_COM1) : "memory");
}

static u64 kstrlen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

static void kputs(const char *s) { serial_write(s, kstrlen(s)); }

/* Kernel messages from several CPUs (a panic on each, say) would interleave byte by byte. */
static volatile u32 kmsg_lock;
static void kmsg_begin(void)
{
    while (__atomic_exchange_n(&kmsg_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
}
static void kmsg_end(void) { __atomic_store_n(&kmsg_lock, 0, __ATOMIC_RELEASE); }

static void kputhex(u64 v)
{
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    serial_write(buf, 18);
}

static void __attribute__((noreturn)) vm_exit(u32 status)
{
    outl(PORT_EXIT, status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void __attribute__((noreturn)) panic(const char *why)
{
    kmsg_begin();
    kputs("emu-guest: panic: ");
    kputs(why);
    kputs("\n");
    vm_exit(0x7f);
}

/* ---- boot information ------------------------------------------------------------------------ */

static void add_ram(u64 base, u64 len)
{
    if (len == 0 || bootinfo.nram == MAX_RAM_RANGES)
        return;
    bootinfo.ram[bootinfo.nram].base = base;
    bootinfo.ram[bootinfo.nram].len = len;
    bootinfo.nram++;
    bootinfo.ram_bytes += len;
}

static void read_multiboot(u32 magic, const struct multiboot_info *mbi)
{
    if (magic != MULTIBOOT_BOOT_MAGIC)
        panic("not started by a Multiboot loader");
    if (mbi->flags & MBI_FLAG_CMDLINE) {
        const char *cmdline = (const char *)(u64)mbi->cmdline;
        u64 n = kstrlen(cmdline);
        if (n >= CMDLINE_MAX)
            n = CMDLINE_MAX - 1;
        memcpy(bootinfo.cmdline, cmdline, n);
    }
    if (mbi->flags & MBI_FLAG_MMAP) {
        u64 p = mbi->mmap_addr, end = p + mbi->mmap_length;
        while (p < end) {
            const struct multiboot_mmap_entry *e = (const void *)p;
            if (e->type == 1)
                add_ram(e->addr, e->len);
            p += e->size + 4;
        }
    } else if (mbi->flags & MBI_FLAG_MEM) {
        add_ram(0, (u64)mbi->mem_lower << 10);
        add_ram(1 << 20, (u64)mbi->mem_upper << 10);
    } else {
        panic("the loader gave no memory information");
    }
}

/* TSC frequency: the hypervisor's timing leaf (0x40000010, as VMware and QEMU define it), or failing
 * that 10 ms of PIT channel 2 measured with the TSC. */
static u32 tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (c & (1u << 31)) {
        cpuid(0x40000000, &a, &b, &c, &d);
        if (a >= 0x40000010) {
            cpuid(0x40000010, &a, &b, &c, &d);
            if (a)
                return a;
        }
    }
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);
    outb(0x43, 0xb0);                       /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, 11932 & 0xff);               /* 10 ms at 1.193182 MHz */
    outb(0x42, 11932 >> 8);
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    return (u32)((rdtsc() - t0) / 10);
}

/* The CPUs come from the MP table (Intel MultiProcessor Specification), which emu writes in the last
 * KiB of base memory and SeaBIOS in the BIOS area. Without one the guest runs on the BSP alone. */
static u8 *find_mp_floating(u64 start, u64 end)
{
    for (u64 p = start; p + 16 <= end; p += 16)
        if (*(volatile u32 *)p == 0x5f504d5f)       /* "_MP_" */
            return (u8 *)p;
    return 0;
}

static void find_cpus(void)
{
    u8 bsp = lapic_read(LAPIC_ID) >> 24;
    bootinfo.ncpus = 1;
    apic_ids[0] = bsp;
    u8 *fp = find_mp_floating(0x9fc00, 0xa0000);
    if (!fp)
        fp = find_mp_floating(0xf0000, 0x100000);
    if (!fp || *(u32 *)(fp + 4) == 0)
        return;
    u8 *cfg = (u8 *)(u64) * (u32 *)(fp + 4);
    if (*(u32 *)cfg != 0x504d4350)                  /* "PCMP" */
        return;
    u16 count = *(u16 *)(cfg + 34);
    u8 *e = cfg + 44;
    for (u16 i = 0; i < count; i++) {
        if (e[0] != 0) {                            /* not a processor: 8-byte entry */
            e += 8;
            continue;
        }
        if ((e[3] & 1) && e[1] != bsp) {            /* enabled application processor */
            if (bootinfo.ncpus == MAX_CPUS)
                panic("more CPUs than emu-guest supports (64)");
            apic_ids[bootinfo.ncpus++] = e[1];
        }
        e += 20;
    }
}

/* ---- per-CPU setup --------------------------------------------------------------------------- */

static void set_gate(int vec, void *handler)
{
    u64 a = (u64)handler;
    idt[vec].offset0 = a & 0xffff;
    idt[vec].selector = SEL_KCODE;
    idt[vec].ist = 0;
    idt[vec].type = 0x8e;                           /* present, DPL 0, interrupt gate (IF off) */
    idt[vec].offset1 = (a >> 16) & 0xffff;
    idt[vec].offset2 = a >> 32;
}

static void build_idt(void)
{
    void *exc[] = {exc_0,  exc_1,  exc_2,  exc_3,  exc_4,  exc_5,  exc_6,  exc_7,
                   exc_8,  exc_9,  exc_10, exc_11, exc_12, exc_13, exc_14, exc_15,
                   exc_16, exc_17, exc_18, exc_19, exc_20, exc_21};
    for (int v = 0; v < 256; v++)
        set_gate(v, v < 22 ? exc[v] : v < 32 ? (void *)exc_15 : (void *)timer_entry);
    set_gate(VEC_SPURIOUS, spurious_entry);
}

static void build_tss(u32 cpu)
{
    u64 a = (u64)&tss[cpu];
    tss[cpu].rsp0 = (u64)kstacks[cpu] + KSTACK_SIZE;
    tss[cpu].iomap_base = sizeof(struct tss);       /* no I/O bitmap: ring 3 gets #GP on ports */
    u64 limit = sizeof(struct tss) - 1;
    u64 *d = &gdt[SEL_TSS(cpu) / 8];
    d[0] = (limit & 0xffff) | ((a & 0xffffff) << 16) | (0x89ull << 40) | (((a >> 24) & 0xff) << 56);
    d[1] = a >> 32;
}

static void load_cpu_tables(u32 cpu)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    __asm__ volatile("ltr %0" ::"r"((u16)SEL_TSS(cpu)));
    /* LAPIC on, with a ~100 Hz periodic timer (1 GHz APIC bus under KVM, divided by 16). The timer
     * only wakes CPUs halted in SYS_HALT; workloads keep time with the TSC. */
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER | (1 << 17));
    lapic_write(LAPIC_TIMER_INIT, 625000);
}

static void __attribute__((noreturn)) run_user(u32 cpu)
{
    enter_user(user_main, (u64)ustacks[cpu] + USTACK_SIZE, cpu);
}

static void start_aps(void)
{
    for (u32 cpu = 1; cpu < bootinfo.ncpus; cpu++) {
        build_tss(cpu);
        ap_boot_cpu = cpu;
        ap_boot_stack = (u64)kstacks[cpu] + KSTACK_SIZE;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        u32 dest = (u32)apic_ids[cpu] << 24;
        lapic_write(LAPIC_ICR_HI, dest);
        lapic_write(LAPIC_ICR_LO, 0x4500);                              /* INIT */
        for (int attempt = 0; attempt < 2 && ap_started != cpu; attempt++) {
            lapic_write(LAPIC_ICR_HI, dest);
            lapic_write(LAPIC_ICR_LO, 0x4600 | (AP_TRAMPOLINE >> 12));  /* STARTUP */
            u64 deadline = rdtsc() + (u64)bootinfo.tsc_khz * 1000;      /* 1 s */
            while (ap_started != cpu && rdtsc() < deadline)
                cpu_relax();
        }
        if (ap_started != cpu) {
            kmsg_begin();
            kputs("emu-guest: an application processor did not start, apic id ");
            kputhex(apic_ids[cpu]);
            kputs("\n");
            vm_exit(0x7e);
        }
    }
}

void ap_main(u32 cpu)
{
    load_cpu_tables(cpu);
    __atomic_store_n(&ap_started, cpu, __ATOMIC_SEQ_CST);
    run_user(cpu);
}

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* Registers KVM's clock if KVM offers it: time that survives a migration between hosts (the TSC
 * here is the host's and cannot be set; KVM's clock is the VM's, saved and restored with it). Only
 * on request (wl=clock): KVM then writes its page in guest RAM on each host, with that host's
 * figures, so the page differs between source and destination, and the other workloads' RAM is
 * compared page for page across migrations. */
static void kvmclock_init(void)
{
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d)       /* "KVMKVMKVM\0\0\0" */
        return;
    cpuid(0x40000001, &a, &b, &c, &d);
    if (!(a & KVM_FEATURE_CLOCKSOURCE2))
        return;
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&bootinfo.kvmclock | 1);  /* identity-mapped: virt = phys */
    bootinfo.has_kvmclock = 1;
}

void kmain(u32 magic, u32 info)
{
    read_multiboot(magic, (const struct multiboot_info *)(u64)info);
    bootinfo.free_base = ((u64)__kernel_end + (2 << 20) - 1) & ~((2ull << 20) - 1);
    bootinfo.tsc_khz = tsc_khz();
    outb(0x21, 0xff);                               /* mask the 8259s: LAPIC timer only */
    outb(0xa1, 0xff);
    build_idt();
    build_tss(0);
    load_cpu_tables(0);
    find_cpus();
    memcpy((void *)AP_TRAMPOLINE, ap_trampoline_start, ap_trampoline_end - ap_trampoline_start);
    start_aps();
    bootinfo.boot_tsc = rdtsc();
    bootinfo.cpus_running = bootinfo.ncpus;
    bootinfo.go = 1;
    run_user(0);
}

/* ---- system calls and exceptions ------------------------------------------------------------- */

static u64 syscall(u64 nr, u64 a, u64 b)
{
    switch (nr) {
    case SYS_WRITE:
        serial_write((const char *)a, b);
        return b;
    case SYS_HALT:
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        return 0;
    case SYS_EXIT:
        vm_exit((u32)a);
    case SYS_INB:
        return inb((u16)a);
    case SYS_PEEK32:
        return *(volatile u32 *)a;
    case SYS_KVMCLOCK:
        kvmclock_init();
        return bootinfo.has_kvmclock;
    default:
        return (u64)-1;
    }
}

void trap(struct trap_frame *f)
{
    if (f->vector == 13 && (f->cs & 3) == 3 && *(volatile u8 *)f->rip == 0xf4) {
        f->rip += 1;
        f->rax = syscall(f->rax, f->rdi, f->rsi);
        return;
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kmsg_begin();
    kputs("emu-guest: unexpected exception ");
    kputhex(f->vector);
    kputs(" at rip=");
    kputhex(f->rip);
    kputs(" error=");
    kputhex(f->error);
    kputs(" cr2=");
    kputhex(cr2);
    kputs("\n");
    vm_exit(0x7f);
}
