/*
 * probe-os: boot, options, SMP bring-up, the per-CPU tick with its
 * soft-lockup watchdog, the memory dirtier and the serial console commands.
 *
 * Build: make -C guests/probe-os (gcc, as, ld; the built probe-os.elf is
 * committed). Entries: the ELF entry (1 MiB) takes the Linux 64-bit boot
 * protocol (long mode, RSI = boot_params); the XEN_ELFNOTE_PHYS32_ENTRY note
 * names the PVH entry, so `qemu-system-x86_64 -kernel probe-os.elf` boots it.
 *
 * Command line (boot_params cmd_line_ptr or hvm_start_info cmdline_paddr):
 *   probe.tick_ms=N        tick period, default 100 (1..60000)
 *   probe.watchdog_ms=N    a tick gap above this is a soft lockup, default 1000
 *   probe.dirty_mb=N       MiB to dirty, from the first 2 MiB boundary above the
 *                          kernel (clamped to usable RAM below 4 GiB), default 0
 *   probe.dirty_rate_mb=N  MiB/s; 0 (default) = one pass at full speed, then stop
 *   probe.clock=tsc|auto   force the TSC clock even where kvmclock exists
 *   probe.timer=lapic|poll lapic (default): periodic LAPIC timer, hlt when idle;
 *                          poll: interrupts stay off and each CPU spins on its
 *                          clock (for hosts whose emulation of interrupt
 *                          delivery or iretq cannot be trusted)
 *   probe.entry=linux64    on a PVH boot, build a boot_params and re-enter via
 *                          the 64-bit entry (tests tsvmm's entry under QEMU)
 * Unknown probe.* words are reported (`ignored option=...`).
 *
 * Lines on COM1 (0x3f8), each ended by "\r\n", never interleaved:
 *   probe cpu=0 boot entry=<pvh|linux64> clock=<kvmclock|tsc>
 *       [tsc_khz=N tsc_cal=<pit|cpuid|lapic|guess>]
 *       cpus=N tables=<acpi|mptable|none> apic_timer_khz=N timer=<lapic|poll>
 *       tick_ms=N watchdog_ms=N dirty_mb=N dirty_rate_mb=N
 *       (watchdog_ms=0: the watchdog is off, as it is when tsc_cal=guess)
 *   probe cpu=<n> ready clock=<kvmclock|tsc> cpus=<N> apic=<id>   (each CPU once)
 *   probe cpu=<n> tick ns=<clock ns>
 *   probe cpu=<n> stopped ns=<ns>        GUEST_STOPPED was set; cleared
 *   probe cpu=<n> forgiven gap_ms=<ms>   ... and the tick gap exceeded the watchdog
 *   probe cpu=<n> softlockup gap_ms=<ms> a tick gap above probe.watchdog_ms
 *   probe cpu=<n> backwards prev=<ns> now=<ns>
 *   probe cpu=<n> clock ns=<ns> tsc=<tsc>  (answer to `clock`, every CPU)
 *   probe cpu=0 dirty base=0x<addr> mb=N rate_mb=N [asked_mb=N] ns=<start ns>
 *   probe cpu=0 dirty pass=<completed passes> ns=<ns>  (the first, then <= 1/s)
 *   probe mem sum=<16 hex digits>        (answer to `sum`)
 *   probe cpu=0 help commands=clock,sum,help
 *   probe cpu=0 unknown command=<text>
 *   probe cpu=<n> exception vector=N rip=0x.. err=0x.. cr2=0x.. rsp=0x..  (then halts)
 *   probe cpu=0 ap-timeout apic=<id> ms=N    (an AP did not start)
 * The clock is kvmclock (each CPU its own pvclock area, MSR 0x4b564d01) when
 * CPUID 0x40000000 says "KVMKVMKVM" and 0x40000001 EAX bit 3
 * (CLOCKSOURCE2) is set, else the TSC, counted from boot, its rate
 * calibrated on PIT channel 2, else taken from CPUID 0x15/0x16 (Intel, valid
 * leaves only), else calibrated on the LAPIC timer taken as 1 GHz (no PIT:
 * QEMU's microvm); each measurement is repeated, its runs read between two
 * TSC readings and rejected when that window is wide, and its median kept
 * only within 100 MHz .. 10 GHz. If all fail, tsc_khz=1000000 is a guess
 * (tsc_cal=guess) and the watchdog is off. The dirty pattern: each 8-byte
 * word = its address XOR the pass number (1, 2, ...); the sum is 64-bit
 * FNV-1a over those words in order.
 * Console commands (a line, then Enter): clock, sum, help.
 */
#include "probe.h"

struct cpu cpus[MAX_CPUS] __attribute__((aligned(4096)));

static struct {
	u64 tick_ms, watchdog_ms, dirty_mb, dirty_rate_mb;
	int clock; /* 0 auto, 1 tsc */
	int poll;  /* probe.timer=poll: no interrupts, the loop watches the clock */
} opt = {100, 1000, 0, 0, 0, 0};

static char cmdline[1024];
static u64 rsdp_hint;
static struct memrange {
	u64 addr, size;
	u32 type;
} memmap[64];
static int nmem;
static int boot_kind;

static int hypervisor;
static int use_kvmclock;
static u64 tsc_khz, tsc_mult, tsc_base; /* ns = (tsc - tsc_base) * tsc_mult >> 32 */
static u32 timer_count;                 /* LAPIC initial count for one tick */

static struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} idt[256] __attribute__((aligned(16)));
extern char isr_stubs[];

static volatile u32 ap_started;
u8 apic_to_cpu[256]; /* APIC id -> CPU index; 0xff: not ours */
static volatile u64 clock_request;

#define NS_PER_MS 1000000ull

/* ---- the clock: kvmclock when the hypervisor offers it, else the TSC ---- */

static u64 clock_read(struct cpu *c, u8 *flags)
{
	if (!use_kvmclock) {
		*flags = 0;
		u64 d = rdtsc() - tsc_base;
		if ((int64_t)d < 0)
			d = 0;
		return (u64)(((unsigned __int128)d * tsc_mult) >> 32);
	}
	struct pvclock *p = &c->pv;
	u32 v;
	u64 ns;
	u8 f;
	do {
		v = p->version;
		__asm__ volatile("" ::: "memory");
		u64 d = rdtsc() - p->tsc_timestamp;
		if ((int64_t)d < 0)
			d = 0;
		s8 shift = p->tsc_shift;
		if (shift >= 0)
			d <<= shift;
		else
			d >>= -shift;
		ns = p->system_time + (u64)(((unsigned __int128)d * p->tsc_to_system_mul) >> 32);
		f = p->flags;
		__asm__ volatile("" ::: "memory");
	} while ((v & 1) || v != p->version);
	*flags = f;
	return ns;
}

static u64 now_ns(void)
{
	u8 f;
	return clock_read(&cpus[this_cpu()], &f);
}

static void delay_ns(u64 ns)
{
	u64 t0 = now_ns();
	while (now_ns() - t0 < ns)
		cpu_relax();
}

static int detect_kvmclock(void)
{
	u32 r[4];
	cpuid(1, 0, r);
	hypervisor = (r[2] >> 31) & 1;
	if (!hypervisor)
		return 0;
	for (u32 base = 0x40000000; base <= 0x40000100; base += 0x100) {
		cpuid(base, 0, r);
		if (r[1] == 0x4b4d564b && r[2] == 0x564b4d56 && r[3] == 0x4d) {
			if (r[0] && r[0] < base + 1)
				return 0;
			cpuid(base + 1, 0, r);
			return (r[0] >> 3) & 1; /* KVM_FEATURE_CLOCKSOURCE2 */
		}
	}
	return 0;
}

static void kvmclock_enable(struct cpu *c)
{
	wrmsr(0x4b564d01, (u64)&c->pv | 1); /* MSR_KVM_SYSTEM_TIME_NEW */
	for (u32 i = 0; i < 100000000 && c->pv.version == 0; i++)
		cpu_relax();
}

/* ---- boot information: command line, memory map, RSDP ---- */

static void copy_cmdline(u64 p)
{
	if (!p || p >= 0x100000000ull)
		return;
	const volatile char *s = (const volatile char *)p;
	unsigned i;
	for (i = 0; i < sizeof cmdline - 1 && s[i]; i++)
		cmdline[i] = s[i];
	cmdline[i] = 0;
}

static void read_boot_info(int kind, u64 info)
{
	if (kind == BOOT_LINUX64) {
		/* boot_params: cmd_line_ptr 0x228 (+ ext_cmd_line_ptr 0xc8),
		 * acpi_rsdp_addr 0x70, e820_entries 0x1e8, e820_table 0x2d0 */
		copy_cmdline(rd32(info + 0x228) | (u64)rd32(info + 0xc8) << 32);
		rsdp_hint = rd64(info + 0x70);
		u32 n = *(volatile u8 *)(info + 0x1e8);
		for (u32 i = 0; i < n && i < 64 && nmem < 64; i++) {
			u64 e = info + 0x2d0 + 20 * i;
			memmap[nmem++] = (struct memrange){rd64(e), rd64(e + 8), rd32(e + 16)};
		}
	} else {
		/* hvm_start_info: magic 0, version 4, cmdline_paddr 24, rsdp_paddr 32,
		 * memmap_paddr 40, memmap_entries 48 (version 1) */
		if (rd32(info) != 0x336ec578)
			return;
		copy_cmdline(rd64(info + 24));
		rsdp_hint = rd64(info + 32);
		if (rd32(info + 4) >= 1) {
			u64 m = rd64(info + 40);
			u32 n = rd32(info + 48);
			for (u32 i = 0; m && i < n && nmem < 64; i++) {
				u64 e = m + 24 * i;
				memmap[nmem++] = (struct memrange){rd64(e), rd64(e + 8), rd32(e + 16)};
			}
		}
	}
}

/* ---- options: probe.<name>=<value> words of the command line ---- */

static void parse_options(void)
{
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		while (*p && *p != ' ')
			p++;
		if (!str_starts(w, "probe."))
			continue;
		const char *k = w + 6, *eq = k;
		while (eq < p && *eq != '=')
			eq++;
		char key[32];
		unsigned kl = (unsigned)(eq - k);
		if (kl >= sizeof key)
			kl = sizeof key - 1;
		memcpy(key, k, kl);
		key[kl] = 0;
		const char *val = eq < p ? eq + 1 : p;
		const char *end;
		u64 v = parse_u64(val, &end);
		int numeric = end != val && end == p;
		if (str_eq(key, "tick_ms") && numeric)
			opt.tick_ms = v ? v : 1;
		else if (str_eq(key, "watchdog_ms") && numeric)
			opt.watchdog_ms = v ? v : 1;
		else if (str_eq(key, "dirty_mb") && numeric)
			opt.dirty_mb = v;
		else if (str_eq(key, "dirty_rate_mb") && numeric)
			opt.dirty_rate_mb = v;
		else if (str_eq(key, "timer") && p - val == 4 && memcmp(val, "poll", 4) == 0)
			opt.poll = 1;
		else if (str_eq(key, "timer") && p - val == 5 && memcmp(val, "lapic", 5) == 0)
			opt.poll = 0;
		else if (str_eq(key, "entry"))
			; /* handled in kmain */
		else if (str_eq(key, "clock") && p - val == 3 && memcmp(val, "tsc", 3) == 0)
			opt.clock = 1;
		else if (str_eq(key, "clock") && p - val == 4 && memcmp(val, "auto", 4) == 0)
			opt.clock = 0;
		else {
			struct line l;
			l_init(&l, 0, "ignored option=");
			for (const char *q = w; q < p && q < w + 60; q++)
				l_chr(&l, *q > ' ' && *q < 127 ? *q : '?');
			l_emit(&l);
		}
	}
	if (opt.tick_ms > 60000)
		opt.tick_ms = 60000;
}

/* ---- interrupts ---- */

static void idt_init(void)
{
	for (int v = 0; v < 256; v++) {
		u64 a = (u64)isr_stubs + 16 * (u64)v;
		idt[v] = (struct idt_entry){(u16)a, SEL_CODE64, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
	}
}

static void idt_load(void)
{
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} d = {sizeof idt - 1, (u64)idt};
	__asm__ volatile("lidt %0" ::"m"(d));
}

/* Serial input: the interrupt (or the tick's poll) moves bytes into a ring
 * that CPU 0's loop reads with interrupts off. */
static volatile u8 rx_ring[256];
static volatile u32 rx_head, rx_tail;

static void uart_drain(void)
{
	int c;
	for (int i = 0; i < 64 && (c = uart_getc()) >= 0; i++) {
		if (rx_head - rx_tail < sizeof rx_ring) {
			rx_ring[rx_head % sizeof rx_ring] = (u8)c;
			rx_head = rx_head + 1;
		}
	}
}

static void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

void isr_dispatch(struct frame *f)
{
	int n = this_cpu();
	u64 v = f->vector;
	if (v < 32 && v != 2) {
		u64 cr2;
		__asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
		struct line l;
		l_init(&l, n, "exception");
		l_kv(&l, "vector", v);
		l_kx(&l, "rip", f->rip);
		l_kx(&l, "err", f->error);
		l_kx(&l, "cr2", cr2);
		l_kx(&l, "rsp", f->rsp);
		l_emit_raw(&l);
		halt_forever();
	}
	switch (v) {
	case 2: {
		struct line l;
		l_init(&l, n, "nmi");
		l_kx(&l, "rip", f->rip);
		l_emit_raw(&l);
		return;
	}
	case VEC_TIMER:
		cpus[n].tick_pending = 1;
		lapic_eoi();
		return;
	case VEC_WAKE:
		lapic_eoi();
		return;
	case VEC_SERIAL:
		uart_drain();
		lapic_eoi();
		return;
	case VEC_SPURIOUS:
		return; /* no EOI for the spurious vector */
	default:
		if (cpus[n].spurious++ == 0) {
			struct line l;
			l_init(&l, n, "unexpected");
			l_kv(&l, "vector", v);
			l_emit(&l);
		}
		lapic_eoi();
	}
}

/* ---- the tick and its watchdog ---- */

static void print_ns(int n, const char *event, u64 ns)
{
	struct line l;
	l_init(&l, n, event);
	l_kv(&l, "ns", ns);
	l_emit(&l);
}

/* The clock now, reporting (and not keeping) a reading that went backwards. */
static u64 checked_now(int n, u8 *flags)
{
	struct cpu *c = &cpus[n];
	u64 now = clock_read(c, flags);
	if (now < c->last_ns) {
		struct line l;
		l_init(&l, n, "backwards");
		l_kv(&l, "prev", c->last_ns);
		l_kv(&l, "now", now);
		l_emit(&l);
	} else {
		c->last_ns = now;
	}
	return now;
}

static void do_tick(int n)
{
	struct cpu *c = &cpus[n];
	u8 flags;
	u64 now = checked_now(n, &flags);
	u64 gap = now > c->last_tick_ns ? now - c->last_tick_ns : 0;
	u64 limit = opt.watchdog_ms * NS_PER_MS;
	if (flags & PVCLOCK_GUEST_STOPPED) {
		/* the host stopped us and said so: clear it, as Linux does, and forgive */
		__atomic_fetch_and(&c->pv.flags, (u8)~PVCLOCK_GUEST_STOPPED, __ATOMIC_SEQ_CST);
		print_ns(n, "stopped", now);
		if (limit && gap > limit) {
			struct line l;
			l_init(&l, n, "forgiven");
			l_kv(&l, "gap_ms", gap / NS_PER_MS);
			l_emit(&l);
		}
	} else if (limit && gap > limit) {
		struct line l;
		l_init(&l, n, "softlockup");
		l_kv(&l, "gap_ms", gap / NS_PER_MS);
		l_emit(&l);
	}
	c->ticks++;
	print_ns(n, "tick", now);
	c->last_tick_ns = now;
}

/* probe.timer=poll: the tick is due when the clock passes the next deadline. */
static u64 next_tick_ns[MAX_CPUS];
static u64 next_rx_poll_ns;

static void timer_poll(int n)
{
	u8 f;
	u64 now = clock_read(&cpus[n], &f);
	u64 period = opt.tick_ms * NS_PER_MS;
	if (now < next_tick_ns[n])
		return;
	next_tick_ns[n] += period;
	if (next_tick_ns[n] <= now) /* after a long gap, do not burst */
		next_tick_ns[n] = now + period;
	cpus[n].tick_pending = 1;
}

/* Long loops on CPU 0 call this so that its tick keeps running. */
static void service_tick(void)
{
	int n = this_cpu();
	if (opt.poll)
		timer_poll(n);
	if (cpus[n].tick_pending) {
		cpus[n].tick_pending = 0;
		do_tick(n);
		if (n == 0)
			uart_drain();
	}
}

/* ---- the memory dirtier (CPU 0) ---- */

static struct {
	u64 base, bytes, cursor, pass, passes_done;
	u64 start_ns, written, last_report_ns;
	int active;
} dirt;

static void dirty_init(void)
{
	if (!opt.dirty_mb)
		return;
	u64 base = ((u64)_end + 0x1fffff) & ~0x1fffffull;
	u64 want = opt.dirty_mb << 20, have = want;
	if (nmem) {
		have = 0;
		for (int i = 0; i < nmem; i++) {
			struct memrange *m = &memmap[i];
			if (m->type == 1 && m->addr <= base && base < m->addr + m->size) {
				u64 room = m->addr + m->size - base;
				have = room < want ? room : want;
			}
		}
	}
	if (base + have > 0x100000000ull)
		have = 0x100000000ull - base;
	have &= ~0xfffffull; /* whole MiB */
	dirt.base = base;
	dirt.bytes = have;
	dirt.pass = 1;
	dirt.active = have != 0;
	dirt.start_ns = now_ns();
	struct line l;
	l_init(&l, 0, "dirty");
	l_kx(&l, "base", base);
	l_kv(&l, "mb", have >> 20);
	l_kv(&l, "rate_mb", opt.dirty_rate_mb);
	if (have != want)
		l_kv(&l, "asked_mb", opt.dirty_mb);
	l_kv(&l, "ns", dirt.start_ns);
	l_emit(&l);
}

static int dirty_due(void)
{
	if (!dirt.active)
		return 0;
	if (!opt.dirty_rate_mb)
		return 1; /* one pass as fast as it goes, then stop */
	u64 rate = opt.dirty_rate_mb << 20;
	u64 ms = (now_ns() - dirt.start_ns) / NS_PER_MS;
	u64 allowed = rate / 1000 * ms;
	if (allowed > dirt.written + rate) /* never more than a second of catching up */
		dirt.written = allowed - rate;
	return dirt.written < allowed;
}

/*
 * Each 8-byte word becomes its address XOR the pass number. Unrolled by 8:
 * where the host runs this kernel in its instruction emulator (PVM-backed
 * KVM, which emulates a guest that is not a PVM guest one instruction at a
 * time, about a microsecond each) the rate is set by the instruction count.
 */
static void dirty_chunk(void)
{
	u64 len = 64 * 1024;
	if (len > dirt.bytes - dirt.cursor)
		len = dirt.bytes - dirt.cursor;
	volatile u64 *w = (volatile u64 *)(dirt.base + dirt.cursor);
	u64 a = dirt.base + dirt.cursor, pass = dirt.pass;
	u64 n = len / 8, i = 0;
	for (; i + 8 <= n; i += 8, a += 64) {
		w[i] = a ^ pass;
		w[i + 1] = (a + 8) ^ pass;
		w[i + 2] = (a + 16) ^ pass;
		w[i + 3] = (a + 24) ^ pass;
		w[i + 4] = (a + 32) ^ pass;
		w[i + 5] = (a + 40) ^ pass;
		w[i + 6] = (a + 48) ^ pass;
		w[i + 7] = (a + 56) ^ pass;
	}
	for (; i < n; i++, a += 8)
		w[i] = a ^ pass;
	dirt.cursor += len;
	dirt.written += len;
	if (dirt.cursor < dirt.bytes)
		return;
	dirt.cursor = 0;
	dirt.passes_done = dirt.pass++;
	u64 now = now_ns();
	if (dirt.passes_done == 1 || now - dirt.last_report_ns >= 1000 * NS_PER_MS) {
		dirt.last_report_ns = now;
		struct line l;
		l_init(&l, 0, "dirty");
		l_kv(&l, "pass", dirt.passes_done);
		l_kv(&l, "ns", now);
		l_emit(&l);
	}
	if (!opt.dirty_rate_mb)
		dirt.active = 0;
}

/*
 * 64-bit FNV-1a over the area's 64-bit words, the tick served after every
 * 64 KiB: on a host that emulates this kernel (see dirty_chunk) 1 MiB takes
 * about a second, longer than the watchdog's default threshold.
 */
static void print_sum(void)
{
	const u64 prime = 0x100000001b3ull;
	u64 h = 0xcbf29ce484222325ull;
	for (u64 off = 0; off < dirt.bytes; off += 64 * 1024) {
		u64 len = dirt.bytes - off < 64 * 1024 ? dirt.bytes - off : 64 * 1024;
		const volatile u64 *w = (const volatile u64 *)(dirt.base + off);
		u64 n = len / 8, i = 0;
		for (; i + 8 <= n; i += 8) {
			h = (h ^ w[i]) * prime;
			h = (h ^ w[i + 1]) * prime;
			h = (h ^ w[i + 2]) * prime;
			h = (h ^ w[i + 3]) * prime;
			h = (h ^ w[i + 4]) * prime;
			h = (h ^ w[i + 5]) * prime;
			h = (h ^ w[i + 6]) * prime;
			h = (h ^ w[i + 7]) * prime;
		}
		for (; i < n; i++)
			h = (h ^ w[i]) * prime;
		service_tick();
	}
	struct line l;
	l.n = 0;
	l_str(&l, "probe mem sum=");
	l_hex(&l, h, 16);
	l_emit(&l);
}

/* ---- console commands (CPU 0) ---- */

static char cmd[64];
static unsigned cmd_len;

static void answer_clock(int n)
{
	struct cpu *c = &cpus[n];
	c->clock_seen = clock_request;
	u8 flags;
	u64 ns = checked_now(n, &flags);
	u64 tsc = rdtsc();
	struct line l;
	l_init(&l, n, "clock");
	l_kv(&l, "ns", ns);
	l_kv(&l, "tsc", tsc);
	l_emit(&l);
}

static void run_command(void)
{
	cmd[cmd_len] = 0;
	const char *s = cmd;
	while (*s == ' ')
		s++;
	char *e = cmd + cmd_len;
	while (e > s && e[-1] == ' ')
		*--e = 0;
	if (!*s)
		return;
	if (str_eq(s, "clock")) {
		__atomic_fetch_add(&clock_request, 1, __ATOMIC_SEQ_CST);
		if (plat.ncpus > 1 && !opt.poll)
			lapic_send_ipi(0, 0xc0000 | VEC_WAKE); /* all excluding self */
	} else if (str_eq(s, "sum")) {
		print_sum();
	} else if (str_eq(s, "help")) {
		struct line l;
		l_init(&l, 0, "help commands=clock,sum,help");
		l_emit(&l);
	} else {
		struct line l;
		l_init(&l, 0, "unknown command=");
		for (; *s; s++)
			l_chr(&l, *s > ' ' && *s < 127 ? *s : '?');
		l_emit(&l);
	}
}

static void console_input(void)
{
	for (;;) {
		u64 flags = save_flags_cli();
		if (rx_tail == rx_head) {
			restore_flags(flags);
			return;
		}
		char c = (char)rx_ring[rx_tail % sizeof rx_ring];
		rx_tail = rx_tail + 1;
		restore_flags(flags);
		if (c == '\r' || c == '\n') {
			run_command();
			cmd_len = 0;
		} else if (c == 8 || c == 127) {
			if (cmd_len)
				cmd_len--;
		} else if (cmd_len < sizeof cmd - 1) {
			cmd[cmd_len++] = c;
		}
	}
}

/* ---- per-CPU setup and loop ---- */

static void print_ready(int n)
{
	struct line l;
	l_init(&l, n, "ready");
	l_str(&l, use_kvmclock ? " clock=kvmclock" : " clock=tsc");
	l_kv(&l, "cpus", (u64)plat.ncpus);
	l_kv(&l, "apic", cpus[n].apic_id);
	l_emit(&l);
}

static void cpu_setup(int n)
{
	struct cpu *c = &cpus[n];
	idt_load();
	lapic_init();
	if (use_kvmclock)
		kvmclock_enable(c);
	u8 f;
	c->last_ns = c->last_tick_ns = clock_read(c, &f);
	c->clock_seen = clock_request;
	next_tick_ns[n] = c->last_tick_ns + opt.tick_ms * NS_PER_MS;
	if (!opt.poll)
		lapic_timer_periodic(timer_count);
	c->up = 1;
	print_ready(n);
}

static int has_work(int n)
{
	struct cpu *c = &cpus[n];
	if (c->tick_pending || c->clock_seen != clock_request)
		return 1;
	return n == 0 && (rx_head != rx_tail || dirty_due());
}

static __attribute__((noreturn)) void cpu_loop(int n)
{
	struct cpu *c = &cpus[n];
	for (;;) {
		if (opt.poll) {
			/* interrupts stay off; the serial port is read every 10 ms */
			timer_poll(n);
			if (n == 0) {
				u8 f;
				u64 now = clock_read(c, &f);
				if (now >= next_rx_poll_ns) {
					next_rx_poll_ns = now + 10 * NS_PER_MS;
					uart_drain();
				}
			}
			if (!has_work(n)) {
				cpu_relax();
				continue;
			}
		} else {
			cli();
			if (!has_work(n)) {
				sti_hlt();
				continue;
			}
			sti();
		}
		if (c->tick_pending) {
			c->tick_pending = 0;
			do_tick(n);
			if (n == 0)
				uart_drain(); /* in case COM1's interrupt does not reach us */
		}
		if (c->clock_seen != clock_request)
			answer_clock(n);
		if (n == 0) {
			console_input();
			if (dirty_due())
				dirty_chunk();
		}
	}
}

void ap_main(u64 n)
{
	ap_started = (u32)n;
	cpu_setup((int)n);
	cpu_loop((int)n);
}

static void start_aps(void)
{
	u64 base = TRAMP_BASE;
	memcpy((void *)base, tramp_start, (size_t)(tramp_end - tramp_start));
	u64 cr3;
	__asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
	*(volatile u64 *)(base + (u64)(tramp_cr3 - tramp_start)) = cr3;
	u64 cr4;
	__asm__ volatile("movq %%cr4, %0" : "=r"(cr4));
	*(volatile u32 *)(base + (u64)(tramp_cr4 - tramp_start)) = (u32)(cr4 & 0xb0) | 0x20; /* PSE PAE PGE */
	*(volatile u32 *)(base + (u64)(tramp_efer - tramp_start)) = (u32)(rdmsr(0xc0000080) & 0x800) | 0x100;
	memset(apic_to_cpu, 0xff, sizeof apic_to_cpu);
	for (int i = 0; i < plat.ncpus; i++) {
		cpus[i].apic_id = plat.apic_ids[i];
		if (plat.apic_ids[i] < 256)
			apic_to_cpu[plat.apic_ids[i]] = (u8)i;
	}
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	for (int i = 1; i < plat.ncpus; i++) {
		u32 id = plat.apic_ids[i];
		if (id >= 255)
			continue;
		ap_started = 0;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		lapic_send_ipi(id, 0x4500); /* INIT, level assert */
		if (!hypervisor)
			delay_ns(10 * NS_PER_MS);
		u64 t0 = now_ns();
		for (int sipi = 0; sipi < 2 && ap_started != (u32)i; sipi++) {
			lapic_send_ipi(id, 0x4600 | (TRAMP_BASE >> 12)); /* STARTUP */
			u64 wait = sipi ? 2000 * NS_PER_MS : 1 * NS_PER_MS;
			u64 ts = now_ns();
			while (ap_started != (u32)i && now_ns() - ts < wait)
				cpu_relax();
		}
		if (ap_started != (u32)i) {
			struct line l;
			l_init(&l, 0, "ap-timeout");
			l_kv(&l, "apic", id);
			l_kv(&l, "ms", (now_ns() - t0) / NS_PER_MS);
			l_emit(&l);
		}
	}
}

/* ---- calibration: the TSC's rate (no kvmclock) and the LAPIC timer's ---- */

static u64 tsc_clock(void) { return rdtsc(); }

/*
 * One run of the LAPIC timer (one-shot from 0xffffffff, divide by 16)
 * against a clock: each reading of the timer is bracketed by two readings of
 * the clock, so that a vCPU held up by the host while reading it (the host
 * can stop it at any instruction, for milliseconds when it is loaded) shows
 * as a wide window instead of a wrong rate. The run lasts until the timer
 * has counted min_counts and the clock has advanced min_clk. Returns 0 if the
 * timer does not count down; else 1, with the clock's and the timer's
 * advance and in *err the width of the two windows.
 */
static int lapic_run(u64 (*clk)(void), u64 min_counts, u64 min_clk, u64 *dclk, u64 *dcnt, u64 *err)
{
	lapic_timer_oneshot(0xffffffffu);
	u64 a0 = clk();
	u32 c0 = lapic_timer_current();
	u64 b0 = clk();
	u64 a1, b1;
	u32 c1;
	for (u32 spins = 0;; spins++) {
		if (spins > 20000000) {
			lapic_timer_stop();
			return 0;
		}
		a1 = clk();
		c1 = lapic_timer_current();
		b1 = clk();
		if (c0 - c1 >= min_counts && a1 - b0 >= min_clk)
			break;
	}
	lapic_timer_stop();
	*dclk = (a1 + (b1 - a1) / 2) - (a0 + (b0 - a0) / 2);
	*dcnt = c0 - c1;
	*err = (b0 - a0) + (b1 - a1);
	return 1;
}

/*
 * The median over up to 5 runs whose windows are under 0.1% of the run (out
 * of up to 16 runs) of dclk * scale / dcnt (inverse: dcnt * scale / dclk),
 * keeping only values in [lo, hi]. 0 if fewer than 3 runs qualified.
 */
static u64 lapic_measure(u64 (*clk)(void), u64 min_counts, u64 min_clk, int inverse, u64 scale, u64 lo,
			 u64 hi)
{
	u64 good[5];
	int ngood = 0;
	for (int i = 0; i < 16 && ngood < 5; i++) {
		u64 dclk, dcnt, err;
		if (!lapic_run(clk, min_counts, min_clk, &dclk, &dcnt, &err))
			return 0; /* the timer does not count */
		if (!dclk || !dcnt || err * 1000 >= dclk || dclk >> 40)
			continue; /* (scale < 2^20: the products below fit) */
		u64 v = inverse ? dcnt * scale / dclk : dclk * scale / dcnt;
		if (v >= lo && v <= hi)
			good[ngood++] = v;
	}
	return ngood >= 3 ? median_u64(good, ngood) : 0;
}

/* KVM's and QEMU's APIC bus clock is 1 GHz: the timer, divided by 16,
 * counts this many per millisecond. */
#define LAPIC_1GHZ_PER_MS (1000000ull / 16)

/* With no PIT (QEMU's microvm): the TSC against the LAPIC timer, taking its
 * bus clock to be 1 GHz. Runs of 20 ms of the timer. */
static u64 lapic_calibrate_tsc_khz(void)
{
	return lapic_measure(tsc_clock, 20 * LAPIC_1GHZ_PER_MS, 0, 0, LAPIC_1GHZ_PER_MS, TSC_KHZ_MIN, TSC_KHZ_MAX);
}

/* LAPIC timer counts per millisecond (divide by 16), measured on the clock
 * in runs of 20 ms; 0 if no plausible rate (a bus clock of 1 MHz to 10 GHz). */
static u64 calibrate_lapic(void)
{
	return lapic_measure(now_ns, 0, 20 * NS_PER_MS, 1, NS_PER_MS, 1000 / 16, 10000000 / 16);
}

/*
 * The TSC rate CPUID states, in kHz: leaf 0x15 (TSC/crystal ratio times the
 * crystal's rate), else leaf 0x16 (the base frequency in MHz). Only Intel
 * defines these leaves; each counts only if the CPU has it (above the
 * maximum basic leaf a CPU repeats the last leaf's values), its fields are
 * nonzero, and the rate is plausible. 0 otherwise.
 */
static u64 cpuid_tsc_khz(void)
{
	u32 r[4];
	cpuid(0, 0, r);
	u32 max = r[0];
	if (r[1] != 0x756e6547 || r[3] != 0x49656e69 || r[2] != 0x6c65746e) /* GenuineIntel */
		return 0;
	u64 khz = 0;
	if (max >= 0x15) {
		cpuid(0x15, 0, r); /* EAX denominator, EBX numerator, ECX crystal Hz */
		if (r[0] && r[1] && r[2])
			khz = (u64)r[2] * r[1] / r[0] / 1000;
	}
	if ((khz < TSC_KHZ_MIN || khz > TSC_KHZ_MAX) && max >= 0x16) {
		cpuid(0x16, 0, r); /* EAX[15:0] base MHz */
		khz = (u64)(r[0] & 0xffff) * 1000;
	}
	return khz >= TSC_KHZ_MIN && khz <= TSC_KHZ_MAX ? khz : 0;
}

/*
 * The TSC's rate: PIT channel 2, else what CPUID states, else the LAPIC
 * timer (each measurement repeated, its median taken and bounded to 100 MHz
 * .. 10 GHz). If all fail, 1 GHz is a guess ("guess"), and a clock that may
 * run at any rate cannot tell a lockup: the watchdog is then off.
 */
static const char *calibrate_tsc(void)
{
	tsc_khz = pit_calibrate_tsc_khz();
	if (tsc_khz)
		return "pit";
	tsc_khz = cpuid_tsc_khz();
	if (tsc_khz)
		return "cpuid";
	for (int i = 0; i < 3 && !tsc_khz; i++)
		tsc_khz = lapic_calibrate_tsc_khz();
	if (tsc_khz)
		return "lapic";
	tsc_khz = 1000000;
	return "guess";
}

/*
 * probe.entry=linux64 on a PVH boot: build a Linux boot_params from what the
 * PVH start info said and enter again through entry64, so that QEMU can
 * exercise the entry tsvmm uses. entry64 zeroes .bss and starts over.
 */
static int wants_linux64_entry(void)
{
	for (const char *p = cmdline; *p; p++)
		if ((p == cmdline || p[-1] == ' ') && str_starts(p, "probe.entry=linux64") &&
		    (p[19] == ' ' || p[19] == 0))
			return 1;
	return 0;
}

static __attribute__((noreturn)) void reenter_linux64(void)
{
	u8 *bp = (u8 *)selftest_bp;
	memset(bp, 0, 2 * 4096);
	memcpy(bp + 4096, cmdline, strlen(cmdline) + 1);
	u64 cl = (u64)(bp + 4096);
	*(u32 *)(bp + 0x228) = (u32)cl;
	*(u32 *)(bp + 0xc8) = (u32)(cl >> 32);
	*(u64 *)(bp + 0x70) = rsdp_hint;
	*(u16 *)(bp + 0x1fe) = 0xaa55;
	*(u32 *)(bp + 0x202) = 0x53726448; /* "HdrS" */
	bp[0x1e8] = (u8)nmem;
	for (int i = 0; i < nmem; i++) {
		u8 *e = bp + 0x2d0 + 20 * i;
		*(u64 *)e = memmap[i].addr;
		*(u64 *)(e + 8) = memmap[i].size;
		*(u32 *)(e + 16) = memmap[i].type;
	}
	__asm__ volatile("jmp *%0" ::"r"(entry64), "S"(bp) : "memory");
	__builtin_unreachable();
}

void kmain(int kind, u64 info)
{
	pic_mask_all();
	boot_kind = kind;
	read_boot_info(kind, info); /* before anything is written below 1 MiB */
	if (kind == BOOT_PVH && wants_linux64_entry())
		reenter_linux64();
	uart_init();
	parse_options();
	idt_init();
	idt_load();

	platform_find_cpus(rsdp_hint);
	cpus[0].apic_id = plat.apic_ids[0];
	lapic_init();
	use_kvmclock = detect_kvmclock() && opt.clock == 0;
	const char *tsc_cal = 0;
	if (!use_kvmclock) {
		tsc_cal = calibrate_tsc();
		if (str_eq(tsc_cal, "guess"))
			opt.watchdog_ms = 0; /* off: see calibrate_tsc */
		tsc_mult = (NS_PER_MS << 32) / tsc_khz;
		tsc_base = rdtsc();
	}
	if (use_kvmclock)
		kvmclock_enable(&cpus[0]);

	u64 per_ms = calibrate_lapic();
	if (!per_ms)
		per_ms = LAPIC_1GHZ_PER_MS;
	u64 count = per_ms * opt.tick_ms;
	timer_count = count > 0xffffffffull ? 0xffffffffu : (u32)count;

	struct line l;
	l_init(&l, 0, "boot");
	l_str(&l, kind == BOOT_PVH ? " entry=pvh" : " entry=linux64");
	l_str(&l, use_kvmclock ? " clock=kvmclock" : " clock=tsc");
	if (!use_kvmclock) {
		l_kv(&l, "tsc_khz", tsc_khz);
		l_str(&l, " tsc_cal=");
		l_str(&l, tsc_cal);
	}
	l_kv(&l, "cpus", (u64)plat.ncpus);
	l_str(&l, " tables=");
	l_str(&l, plat.source);
	l_kv(&l, "apic_timer_khz", per_ms * 16);
	l_str(&l, opt.poll ? " timer=poll" : " timer=lapic");
	l_kv(&l, "tick_ms", opt.tick_ms);
	l_kv(&l, "watchdog_ms", opt.watchdog_ms);
	l_kv(&l, "dirty_mb", opt.dirty_mb);
	l_kv(&l, "dirty_rate_mb", opt.dirty_rate_mb);
	l_emit(&l);

	cpu_setup(0);
	dirty_init();
	if (!opt.poll)
		ioapic_route_serial(cpus[0].apic_id, VEC_SERIAL);
	start_aps();
	u8 f;
	cpus[0].last_tick_ns = clock_read(&cpus[0], &f); /* bring-up is not a lockup */
	next_tick_ns[0] = cpus[0].last_tick_ns + opt.tick_ms * NS_PER_MS;
	cpus[0].tick_pending = 0;
	cpu_loop(0);
}
