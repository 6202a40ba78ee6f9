/*
 * emu-guest ring 3: the workloads. They run natively on the hosts emu targets (ring 0 is
 * interpreted), keep time with the TSC, and reach ring 0 only to print, sleep and exit.
 *
 *   wl=idle                 `tick N up=S.mmm` once a second, halted in between
 *   wl=dirty:MIB:RATE       fill MIB MiB with non-zero data, then store one 8-byte word into each
 *                           4 KiB page in turn at RATE pages/s (0 = as fast as possible)
 *   wl=verify:MIB[:RATE]    rewrite pages with contents derived from (page, generation) and re-check
 *                           them; any lost write prints VERIFY-FAIL
 *   wl=exit:STATUS          end the VM at once with STATUS (exercises the exit device)
 *   wl=probe                read a port and an address that have no device, print what came back
 *   wl=clock                register KVM's clock (kvmclock) and read it at every timer tick
 *                           (halting in between); once a
 *                           second `clock: s=N ms=M tsc-up=U back=B max-step-ms=X source=kvmclock`:
 *                           M the clock, U the TSC's time since boot, B steps backwards seen so far
  *   runtime=SECS            end every workload after SECS seconds; the VM exits with status 0, or 1
 *                           if verify found a mismatch
 *
 * With several CPUs every CPU runs its own instance on its own part of memory, and its lines start
 * with `cpuN: `.
 */
#include "kernel.h"

#define PAGE 4096ul
#define WORDS_PER_PAGE (PAGE / 8)
#define MIB (1ul << 20)

static long sys(long nr, long a, long b)
{
    __asm__ volatile("hlt" : "+a"(nr) : "D"(a), "S"(b) : "memory");
    return nr;
}

static void __attribute__((noreturn)) sys_exit(u32 status)
{
    sys(SYS_EXIT, status, 0);
    for (;;)
        ;
}

/* ---- output ---------------------------------------------------------------------------------- */

struct line {
    char buf[200];
    u32 n;
};

static void put_char(struct line *l, char c)
{
    if (l->n < sizeof(l->buf) - 1)
        l->buf[l->n++] = c;
}

static void put_str(struct line *l, const char *s)
{
    while (*s)
        put_char(l, *s++);
}

static void put_u64(struct line *l, u64 v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n)
        put_char(l, tmp[--n]);
}

/* v / 10^digits with `digits` decimals: put_fixed(l, 1234, 3) writes 1.234 */
static void put_fixed(struct line *l, u64 v, int digits)
{
    u64 scale = 1;
    for (int i = 0; i < digits; i++)
        scale *= 10;
    put_u64(l, v / scale);
    put_char(l, '.');
    u64 frac = v % scale;
    for (u64 s = scale / 10; s; s /= 10) {
        put_char(l, '0' + frac / s);
        frac %= s;
    }
}

static void put_hex(struct line *l, u64 v)
{
    put_str(l, "0x");
    int shift = 60;
    while (shift > 0 && ((v >> shift) & 0xf) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        put_char(l, "0123456789abcdef"[(v >> shift) & 0xf]);
}

static void start_line(struct line *l, u64 cpu)
{
    l->n = 0;
    if (bootinfo.ncpus > 1) {
        put_str(l, "cpu");
        put_u64(l, cpu);
        put_str(l, ": ");
    }
}

/* Lines from several CPUs are serialised with a ring-3 spinlock (spinning is native here). */
static void emit(struct line *l)
{
    put_char(l, '\n');
    while (__atomic_exchange_n(&bootinfo.output_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    sys(SYS_WRITE, (long)l->buf, l->n);
    __atomic_store_n(&bootinfo.output_lock, 0, __ATOMIC_RELEASE);
}

/* ---- time ------------------------------------------------------------------------------------ */

static u64 tsc_hz(void) { return (u64)bootinfo.tsc_khz * 1000; }
static u64 uptime_ms(u64 tsc) { return (tsc - bootinfo.boot_tsc) / bootinfo.tsc_khz; }
static u64 cycles_to_ns(u64 c) { return c * 1000000 / bootinfo.tsc_khz; }

/*
 * Nanoseconds of KVM's clock when the kernel registered it, else of the TSC since boot. KVM's clock
 * is the VM's: emu saves it with the VM and sets it on a migration's destination (KVM_GET_CLOCK,
 * KVM_SET_CLOCK), so it goes on from the source's value on whatever host; the TSC is the host's
 * own here (a guest cannot be given another) and jumps at a migration between hosts.
 */
static u64 clock_ns(void)
{
    if (!bootinfo.has_kvmclock)
        return cycles_to_ns(rdtsc() - bootinfo.boot_tsc);
    volatile struct pvclock *p = &bootinfo.kvmclock;
    u32 v;
    u64 ns;
    do {
        v = p->version;
        __asm__ volatile("lfence" ::: "memory");
        u64 tsc = rdtsc(), stamp = p->tsc_timestamp;
        u64 delta = tsc > stamp ? tsc - stamp : 0;
        signed char shift = p->tsc_shift;
        delta = shift < 0 ? delta >> -shift : delta << shift;
        ns = p->system_time + (u64)(((unsigned __int128)delta * p->tsc_to_system_mul) >> 32);
        __asm__ volatile("lfence" ::: "memory");
    } while ((v & 1) || v != p->version);
    return ns;
}

/* Ends this CPU's workload; the last CPU to finish ends the VM with the worst status. */
static void __attribute__((noreturn)) finish(u32 status)
{
    __atomic_fetch_or(&bootinfo.exit_status, status, __ATOMIC_SEQ_CST);
    if (__atomic_sub_fetch(&bootinfo.cpus_running, 1, __ATOMIC_SEQ_CST) == 0)
        sys_exit(bootinfo.exit_status);
    for (;;)
        sys(SYS_HALT, 0, 0);
}

/* Once a second: the caller's report is due when this returns true. */
struct ticker {
    u64 next;
    u64 seconds;
    u64 runtime;                    /* 0: forever */
};

static void ticker_init(struct ticker *t, u64 runtime)
{
    t->next = rdtsc() + tsc_hz();
    t->seconds = 0;
    t->runtime = runtime;
}

static int ticker_due(struct ticker *t, u64 now)
{
    if (now < t->next)
        return 0;
    t->seconds++;
    t->next += tsc_hz();
    if (t->next <= now)             /* fell behind (e.g. a paused VM): no burst of catch-up lines */
        t->next = now + tsc_hz();
    return 1;
}

static int ticker_done(const struct ticker *t) { return t->runtime && t->seconds >= t->runtime; }

/* ---- command line ---------------------------------------------------------------------------- */

/* Finds `key=` in the command line; returns the value (up to the next space) or 0. */
static const char *cmdline_value(const char *key)
{
    const char *p = bootinfo.cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *k = key;
        const char *q = p;
        while (*k && *q == *k) {
            q++;
            k++;
        }
        if (!*k && *q == '=')
            return q + 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Parses a decimal number; advances *p past it and one ':' separator. */
static u64 parse_u64(const char **p, int *ok)
{
    u64 v = 0;
    int digits = 0;
    while (**p >= '0' && **p <= '9') {
        v = v * 10 + (u64)(**p - '0');
        (*p)++;
        digits++;
    }
    if (!digits)
        *ok = 0;
    if (**p == ':')
        (*p)++;
    return v;
}

static int word_is(const char *p, const char *w)
{
    while (*w && *p == *w) {
        p++;
        w++;
    }
    return !*w && (*p == 0 || *p == ' ' || *p == ':');
}

/* ---- memory ---------------------------------------------------------------------------------- */

/* Each CPU's workload memory: the cpu-th slot of `bytes` (2 MiB aligned) in RAM above the kernel.
 * Every CPU computes the same layout on its own. Returns 0 if RAM is too small. */
static u64 workload_base(u64 cpu, u64 bytes)
{
    u64 step = (bytes + 2 * MIB - 1) & ~(2 * MIB - 1);
    u64 slot = 0;
    u64 limit = (u64)IDENTITY_GIB << 30;
    for (u32 i = 0; i < bootinfo.nram; i++) {
        u64 start = bootinfo.ram[i].base, end = start + bootinfo.ram[i].len;
        if (start < bootinfo.free_base)
            start = bootinfo.free_base;
        start = (start + 2 * MIB - 1) & ~(2 * MIB - 1);
        if (end > limit)
            end = limit;
        for (; start < end && end - start >= bytes; start += step, slot++)
            if (slot == cpu)
                return start;
    }
    return 0;
}

static u64 *require_memory(u64 cpu, u64 bytes, const char *what)
{
    u64 base = bytes ? workload_base(cpu, bytes) : 0;
    if (!base) {
        struct line l;
        start_line(&l, cpu);
        put_str(&l, what);
        put_str(&l, ": not enough guest RAM for ");
        put_u64(&l, bytes / MIB);
        put_str(&l, " MiB per CPU");
        emit(&l);
        finish(2);
    }
    return (u64 *)base;
}

/* Holds `done` pages to `rate` per second since *start. Behind by more than 100 ms of pages (the VM
 * was paused, or slowed), the schedule moves on instead: no burst at full speed to catch up, which
 * would write far more than `rate` right after a pause. */
static void pace(u64 *start, u64 done, u64 rate)
{
    if (!rate)
        return;
    u64 cycles_per_page = tsc_hz() / rate;
    if (!cycles_per_page)
        cycles_per_page = 1;
    u64 now = rdtsc(), due = *start + done * cycles_per_page;
    if (now > due + tsc_hz() / 10)
        *start += now - due;
    while ((rdtsc() - *start) / cycles_per_page < done)
        sys(SYS_HALT, 0, 0);
}

/* ---- workloads ------------------------------------------------------------------------------- */

static void __attribute__((noreturn)) idle(u64 cpu, u64 runtime)
{
    struct ticker t;
    ticker_init(&t, runtime);
    for (;;) {
        u64 now = rdtsc();
        if (!ticker_due(&t, now)) {
            sys(SYS_HALT, 0, 0);
            continue;
        }
        struct line l;
        start_line(&l, cpu);
        put_str(&l, "tick ");
        put_u64(&l, t.seconds);
        put_str(&l, " up=");
        put_fixed(&l, uptime_ms(now), 3);
        emit(&l);
        if (ticker_done(&t))
            finish(0);
    }
}

static void __attribute__((noreturn)) dirty(u64 cpu, u64 mib, u64 rate, u64 runtime)
{
    u64 pages = mib * 256;
    u64 *mem = require_memory(cpu, mib * MIB, "dirty");
    u64 t0 = rdtsc();
    for (u64 p = 0; p < pages; p++)
        for (u64 w = 0; w < WORDS_PER_PAGE; w++)
            mem[p * WORDS_PER_PAGE + w] = (1ul << 63) | (cpu << 48) | (p << 9) | w;
    struct line l;
    start_line(&l, cpu);
    put_str(&l, "dirty: filled ");
    put_u64(&l, mib);
    put_str(&l, " MiB at ");
    put_hex(&l, (u64)mem);
    put_str(&l, " in ");
    put_u64(&l, cycles_to_ns(rdtsc() - t0) / 1000000);
    put_str(&l, " ms");
    emit(&l);

    /* Page p of round r gets word (r % 512) set: every page is written once per round. */
    u64 total = 0, page = 0, round = 0;
    u64 second_pages = 0, second_cycles = 0;
    u64 start = rdtsc();
    struct ticker t;
    ticker_init(&t, runtime);
    for (;;) {
        u64 batch = 256;
        u64 b0 = rdtsc();
        for (u64 i = 0; i < batch; i++) {
            ((volatile u64 *)mem)[page * WORDS_PER_PAGE + (round & (WORDS_PER_PAGE - 1))] =
                (1ul << 63) | ++total;
            if (++page == pages) {
                page = 0;
                round++;
            }
        }
        u64 b1 = rdtsc();
        second_pages += batch;
        second_cycles += b1 - b0;
        pace(&start, total, rate);
        u64 now = rdtsc();
        if (ticker_due(&t, now)) {
            start_line(&l, cpu);
            put_str(&l, "dirty: rate=");
            put_u64(&l, second_pages);
            put_str(&l, " pages/s total=");
            put_u64(&l, total);
            put_str(&l, " ns/page=");
            put_fixed(&l, second_cycles * 100000000 / bootinfo.tsc_khz / second_pages, 2);
            emit(&l);
            second_pages = second_cycles = 0;
            if (ticker_done(&t))
                finish(0);
        }
    }
}

/* Contents of word w of page p at generation g: cheap to compute, different for every (p, g, w). */
static u64 pattern(u64 p, u64 g, u64 w)
{
    u64 x = (p << 24) ^ g;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdul;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ul;
    x ^= x >> 33;
    return x + w * 0x9e3779b97f4a7c15ul;
}

struct verify {
    u64 cpu;
    u32 *gen;                       /* generation of each data page, kept in guest memory */
    u64 *data;
    u64 pages;
    u64 write_cursor, round;        /* pages < write_cursor are at generation round + 1 */
    u64 check_cursor;
    u64 written, checked, failures;
    u32 reported;                   /* VERIFY-FAIL lines this second (capped) */
};

static void verify_fail(struct verify *v, u64 page, u64 word, u64 expected, u64 found)
{
    v->failures++;
    if (v->reported++ >= 8)
        return;
    struct line l;
    start_line(&l, v->cpu);
    put_str(&l, "VERIFY-FAIL page=");
    put_u64(&l, page);
    put_str(&l, " word=");
    put_u64(&l, word);
    put_str(&l, " expected=");
    put_hex(&l, expected);
    put_str(&l, " found=");
    put_hex(&l, found);
    emit(&l);
}

static void verify_write(struct verify *v)
{
    u64 p = v->write_cursor;
    u64 g = v->round + 1;
    volatile u64 *page = v->data + p * WORDS_PER_PAGE;
    for (u64 w = 0; w < WORDS_PER_PAGE; w++)
        page[w] = pattern(p, g, w);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    ((volatile u32 *)v->gen)[p] = (u32)g;
    v->written++;
    if (++v->write_cursor == v->pages) {
        v->write_cursor = 0;
        v->round++;
    }
}

/* The generation a page must have is known from the write cursor, so a page whose write was lost
 * together with its generation's is caught too, not only a page that disagrees with its generation. */
static void verify_check(struct verify *v)
{
    u64 p = v->check_cursor;
    u64 g = p < v->write_cursor ? v->round + 1 : v->round;
    u32 stored = ((volatile u32 *)v->gen)[p];
    if (stored != (u32)g) {
        verify_fail(v, p, (u64)-1, g, stored);
    } else {
        volatile u64 *page = v->data + p * WORDS_PER_PAGE;
        for (u64 w = 0; w < WORDS_PER_PAGE; w++) {
            u64 want = pattern(p, g, w);
            u64 got = page[w];
            if (got != want) {
                verify_fail(v, p, w, want, got);
                break;
            }
        }
    }
    v->checked++;
    if (++v->check_cursor == v->pages)
        v->check_cursor = 0;
}

static void __attribute__((noreturn)) verify(u64 cpu, u64 mib, u64 rate, u64 runtime)
{
    u64 bytes = mib * MIB;
    u64 *mem = require_memory(cpu, bytes, "verify");
    u64 total_pages = bytes / PAGE;
    u64 gen_pages = (total_pages * 4 + PAGE - 1) / PAGE;
    struct verify v = {.cpu = cpu, .gen = (u32 *)mem, .data = mem + gen_pages * WORDS_PER_PAGE};
    v.pages = total_pages > gen_pages ? total_pages - gen_pages : 0;
    if (!v.pages)
        require_memory(cpu, 0, "verify");
    /* Round 0 writes every page at generation 1 and leaves the cursor at 0 of round 1. */
    for (u64 p = 0; p < v.pages; p++)
        verify_write(&v);
    struct line l;
    start_line(&l, cpu);
    put_str(&l, "verify: ");
    put_u64(&l, v.pages);
    put_str(&l, " pages at ");
    put_hex(&l, (u64)v.data);
    emit(&l);

    u64 start = rdtsc(), steps = 0;
    struct ticker t;
    ticker_init(&t, runtime);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            verify_write(&v);
            verify_check(&v);
        }
        steps += 64;
        pace(&start, steps, rate);
        u64 now = rdtsc();
        if (ticker_due(&t, now)) {
            start_line(&l, cpu);
            put_str(&l, "verify: written=");
            put_u64(&l, v.written);
            put_str(&l, " checked=");
            put_u64(&l, v.checked);
            put_str(&l, " failures=");
            put_u64(&l, v.failures);
            emit(&l);
            v.reported = 0;
            if (ticker_done(&t))
                finish(v.failures ? 1 : 0);
        }
    }
}

static void __attribute__((noreturn)) probe(u64 cpu)
{
    struct line l;
    start_line(&l, cpu);
    put_str(&l, "probe: port 0x80=");
    put_hex(&l, (u64)sys(SYS_INB, 0x80, 0) & 0xff);
    put_str(&l, " mmio 0xe0000000=");
    put_hex(&l, (u64)sys(SYS_PEEK32, 0xe0000000l, 0) & 0xffffffff);
    emit(&l);
    finish(0);
}

/* Watches the clock (clock_ns) for steps backwards and large steps forwards: what a migration
 * must not do to a guest's time. */
static void __attribute__((noreturn)) clock_watch(u64 cpu, u64 runtime)
{
    if (cpu == 0)
        sys(SYS_KVMCLOCK, 0, 0);
    else
        while (!bootinfo.has_kvmclock && rdtsc() - bootinfo.boot_tsc < tsc_hz())
            cpu_relax();
    u64 last = clock_ns(), next = last + 1000000000ull, seconds = 0, back = 0, max_step = 0;
    for (;;) {
        sys(SYS_HALT, 0, 0);
        u64 now = clock_ns();
        if (now < last) {
            back++;
        } else if (now - last > max_step) {
            max_step = now - last;
        }
        last = now;
        if (now < next)
            continue;
        seconds++;
        next = now + 1000000000ull;
        struct line l;
        start_line(&l, cpu);
        put_str(&l, "clock: s=");
        put_u64(&l, seconds);
        put_str(&l, " ms=");
        put_u64(&l, now / 1000000);
        put_str(&l, " tsc-up=");
        put_u64(&l, uptime_ms(rdtsc()));
        put_str(&l, " back=");
        put_u64(&l, back);
        put_str(&l, " max-step-ms=");
        put_u64(&l, max_step / 1000000);
        put_str(&l, bootinfo.has_kvmclock ? " source=kvmclock" : " source=tsc");
        emit(&l);
        max_step = 0;
        if (runtime && seconds >= runtime)
            finish(back ? 1 : 0);
    }
}

static void __attribute__((noreturn)) bad_workload(u64 cpu, const char *wl)
{
    struct line l;
    start_line(&l, cpu);
    put_str(&l, "emu-guest: bad workload '");
    while (*wl && *wl != ' ')
        put_char(&l, *wl++);
    put_str(&l, "' (idle, dirty:MIB:RATE, verify:MIB[:RATE], exit:STATUS, probe, clock)");
    emit(&l);
    finish(2);
}

static void banner(const char *wl)
{
    struct line l;
    start_line(&l, 0);
    put_str(&l, "emu-guest: ");
    put_u64(&l, bootinfo.ncpus);
    put_str(&l, bootinfo.ncpus == 1 ? " cpu, " : " cpus, ");
    put_u64(&l, bootinfo.ram_bytes / MIB);
    put_str(&l, " MiB RAM, tsc ");
    put_u64(&l, bootinfo.tsc_khz / 1000);
    put_str(&l, " MHz, wl=");
    while (*wl && *wl != ' ')
        put_char(&l, *wl++);
    emit(&l);
}

void user_main(u64 cpu)
{
    while (!bootinfo.go)
        cpu_relax();
    const char *wl = cmdline_value("wl");
    if (!wl)
        wl = "idle";
    const char *rt = cmdline_value("runtime");
    int ok = 1;
    u64 runtime = rt ? parse_u64(&rt, &ok) : 0;
    if (cpu == 0)
        banner(wl);

    const char *args = wl;
    while (*args && *args != ':' && *args != ' ')
        args++;
    if (*args == ':')
        args++;
    if (word_is(wl, "idle"))
        idle(cpu, runtime);
    if (word_is(wl, "dirty")) {
        u64 mib = parse_u64(&args, &ok);
        u64 rate = parse_u64(&args, &ok);
        if (ok && mib)
            dirty(cpu, mib, rate, runtime);
    }
    if (word_is(wl, "verify")) {
        u64 mib = parse_u64(&args, &ok);
        u64 rate = (*args >= '0' && *args <= '9') ? parse_u64(&args, &ok) : 0;
        if (ok && mib)
            verify(cpu, mib, rate, runtime);
    }
    if (word_is(wl, "exit")) {
        u64 status = parse_u64(&args, &ok);
        if (ok && cpu == 0)
            sys_exit((u32)status);
        if (ok)
            finish(0);
    }
    if (word_is(wl, "clock"))
        clock_watch(cpu, runtime);
    if (word_is(wl, "probe")) {
        if (cpu == 0)
            probe(cpu);
        finish(0);
    }
    bad_workload(cpu, wl);
}
