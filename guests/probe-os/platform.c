/*
 * probe-os: the platform. Finds the CPUs (ACPI MADT, else the MP table),
 * drives the local APIC, the I/O APIC, the 8259 PICs and the PIT.
 */
#include "probe.h"

struct platform plat;

/* ---- ACPI ---- */

static int sum8(u64 p, u32 len)
{
	u8 s = 0;
	for (u32 i = 0; i < len; i++)
		s = (u8)(s + *(volatile u8 *)(p + i));
	return s;
}

static int is_rsdp(u64 p)
{
	return memcmp((const void *)p, "RSD PTR ", 8) == 0 && sum8(p, 20) == 0;
}

static u64 ebda_base(void)
{
	u64 seg = rd16(0x40e);
	u64 base = seg << 4;
	return base >= 0x80000 && base < 0xa0000 ? base : 0;
}

static u64 find_rsdp(u64 hint)
{
	if (hint && hint < 0x100000000ull && is_rsdp(hint))
		return hint;
	u64 ebda = ebda_base();
	if (ebda)
		for (u64 p = ebda; p < ebda + 1024; p += 16)
			if (is_rsdp(p))
				return p;
	for (u64 p = 0xe0000; p < 0x100000; p += 16)
		if (is_rsdp(p))
			return p;
	return 0;
}

static void add_cpu(u32 apic_id, u32 boot_id)
{
	if (apic_id == boot_id)
		return; /* already index 0 */
	for (int i = 0; i < plat.ncpus; i++)
		if (plat.apic_ids[i] == apic_id)
			return;
	if (plat.ncpus < MAX_CPUS)
		plat.apic_ids[plat.ncpus++] = apic_id;
}

static int parse_madt(u64 madt, u32 boot_id)
{
	u32 len = rd32(madt + 4);
	if (len < 44 || sum8(madt, len) != 0)
		return 0;
	plat.lapic_base = rd32(madt + 36);
	for (u64 p = madt + 44; p + 2 <= madt + len;) {
		u8 type = *(volatile u8 *)p, elen = *(volatile u8 *)(p + 1);
		if (elen < 2)
			break;
		if (type == 0 && elen >= 8) { /* processor local APIC */
			u32 flags = rd32(p + 4);
			if (flags & 1) /* enabled */
				add_cpu(*(volatile u8 *)(p + 3), boot_id);
		} else if (type == 1 && elen >= 12 && !plat.ioapic_base) { /* I/O APIC */
			plat.ioapic_base = rd32(p + 4);
			plat.ioapic_gsi_base = rd32(p + 8);
		} else if (type == 2 && elen >= 10) { /* interrupt source override */
			if (*(volatile u8 *)(p + 2) == 0 && *(volatile u8 *)(p + 3) == 4) {
				plat.serial_gsi = rd32(p + 4);
				plat.serial_flags = rd16(p + 8);
			}
		}
		p += elen;
	}
	return 1;
}

static int find_madt(u64 rsdp, u32 boot_id)
{
	u8 rev = *(volatile u8 *)(rsdp + 15);
	u64 xsdt = rev >= 2 ? rd64(rsdp + 24) : 0;
	u64 sdt = xsdt ? xsdt : rd32(rsdp + 16);
	u32 esize = xsdt ? 8 : 4;
	if (!sdt || sdt >= 0x100000000ull)
		return 0;
	u32 len = rd32(sdt + 4);
	for (u64 p = sdt + 36; p + esize <= sdt + len; p += esize) {
		u64 t = esize == 8 ? rd64(p) : rd32(p);
		if (t && t < 0x100000000ull && memcmp((const void *)t, "APIC", 4) == 0)
			return parse_madt(t, boot_id);
	}
	return 0;
}

/* ---- MP table (Intel MultiProcessor Specification 1.4) ---- */

static u64 scan_mp(u64 from, u64 to)
{
	for (u64 p = from; p + 16 <= to; p += 16)
		if (memcmp((const void *)p, "_MP_", 4) == 0 && sum8(p, 16) == 0)
			return p;
	return 0;
}

static int parse_mptable(u32 boot_id)
{
	u64 fp = 0, ebda = ebda_base();
	if (ebda)
		fp = scan_mp(ebda, ebda + 1024);
	if (!fp)
		fp = scan_mp(0x9fc00, 0xa0000);
	if (!fp)
		fp = scan_mp(0xf0000, 0x100000);
	if (!fp)
		return 0;
	u64 cfg = rd32(fp + 4);
	if (!cfg || memcmp((const void *)cfg, "PCMP", 4) != 0)
		return 0;
	u16 len = rd16(cfg + 4), count = rd16(cfg + 34);
	if (sum8(cfg, len) != 0)
		return 0;
	plat.lapic_base = rd32(cfg + 36);
	int isa_bus = -1;
	u64 p = cfg + 44;
	for (u16 i = 0; i < count && p < cfg + len; i++) {
		u8 type = *(volatile u8 *)p;
		if (type == 0) { /* processor */
			if (*(volatile u8 *)(p + 3) & 1)
				add_cpu(*(volatile u8 *)(p + 1), boot_id);
			p += 20;
			continue;
		}
		if (type == 1 && memcmp((const void *)(p + 2), "ISA", 3) == 0)
			isa_bus = *(volatile u8 *)(p + 1);
		if (type == 2 && (*(volatile u8 *)(p + 3) & 1) && !plat.ioapic_base)
			plat.ioapic_base = rd32(p + 4);
		if (type == 3 && isa_bus >= 0 && *(volatile u8 *)(p + 1) == 0 &&
		    *(volatile u8 *)(p + 4) == isa_bus && *(volatile u8 *)(p + 5) == 4) {
			plat.serial_gsi = *(volatile u8 *)(p + 7);
			plat.serial_flags = rd16(p + 2);
		}
		p += 8;
	}
	return 1;
}

void platform_find_cpus(u64 rsdp_hint)
{
	plat.lapic_base = rdmsr(0x1b) & 0xffffff000ull;
	u32 boot_id = lapic_id();
	plat.ncpus = 1;
	plat.apic_ids[0] = boot_id;
	plat.serial_gsi = 4;
	plat.source = "none";
	u64 rsdp = find_rsdp(rsdp_hint);
	if (rsdp && find_madt(rsdp, boot_id))
		plat.source = "acpi";
	else if (parse_mptable(boot_id))
		plat.source = "mptable";
	plat.lapic_base = rdmsr(0x1b) & 0xffffff000ull; /* the MSR is what this CPU uses */
}

/* ---- local APIC (xAPIC, MMIO) ---- */

#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0

static u64 lapic(u32 reg)
{
	u64 base = plat.lapic_base ? plat.lapic_base : 0xfee00000;
	return base + reg;
}

u32 lapic_id(void)
{
	if (!plat.lapic_base)
		plat.lapic_base = rdmsr(0x1b) & 0xffffff000ull;
	return mmio_read32(lapic(LAPIC_ID)) >> 24;
}

void lapic_init(void)
{
	u64 base = rdmsr(0x1b);
	if (!(base & (1 << 11)))
		wrmsr(0x1b, base | (1 << 11)); /* globally enabled */
	mmio_write32(lapic(LAPIC_TPR), 0);
	mmio_write32(lapic(LAPIC_LVT_ERROR), 0x10000); /* masked */
	mmio_write32(lapic(LAPIC_LVT_TIMER), 0x10000);
	mmio_write32(lapic(LAPIC_SVR), 0x100 | VEC_SPURIOUS);
}

void lapic_eoi(void) { mmio_write32(lapic(LAPIC_EOI), 0); }

/* Divide by 16 (divide configuration 0b0011). */
void lapic_timer_periodic(u32 count)
{
	mmio_write32(lapic(LAPIC_TIMER_DIV), 0x3);
	mmio_write32(lapic(LAPIC_LVT_TIMER), VEC_TIMER | (1 << 17));
	mmio_write32(lapic(LAPIC_TIMER_INIT), count);
}

void lapic_timer_oneshot(u32 count)
{
	mmio_write32(lapic(LAPIC_TIMER_DIV), 0x3);
	mmio_write32(lapic(LAPIC_LVT_TIMER), VEC_TIMER | 0x10000); /* masked: calibration only */
	mmio_write32(lapic(LAPIC_TIMER_INIT), count);
}

u32 lapic_timer_current(void) { return mmio_read32(lapic(LAPIC_TIMER_CUR)); }

void lapic_timer_stop(void)
{
	mmio_write32(lapic(LAPIC_LVT_TIMER), 0x10000);
	mmio_write32(lapic(LAPIC_TIMER_INIT), 0);
}

/* Returns 0 when the IPI was accepted (delivery status idle again). */
int lapic_send_ipi(u32 apic_id, u32 icr_low)
{
	u64 flags = save_flags_cli();
	mmio_write32(lapic(LAPIC_ICR_HI), apic_id << 24);
	mmio_write32(lapic(LAPIC_ICR_LO), icr_low);
	int r = -1;
	for (u32 i = 0; i < 1000000; i++) {
		if (!(mmio_read32(lapic(LAPIC_ICR_LO)) & (1 << 12))) {
			r = 0;
			break;
		}
		cpu_relax();
	}
	restore_flags(flags);
	return r;
}

/* ---- I/O APIC: COM1's interrupt to one CPU ---- */

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(plat.ioapic_base, reg);
	mmio_write32(plat.ioapic_base + 0x10, v);
}

void ioapic_route_serial(u32 dest_apic, u8 vector)
{
	if (!plat.ioapic_base || plat.serial_gsi < plat.ioapic_gsi_base)
		return;
	u32 pin = plat.serial_gsi - plat.ioapic_gsi_base;
	u32 lo = vector; /* fixed delivery, physical destination */
	if ((plat.serial_flags & 3) == 3)
		lo |= 1 << 13; /* active low */
	if (((plat.serial_flags >> 2) & 3) == 3)
		lo |= 1 << 15; /* level triggered */
	ioapic_write(0x10 + 2 * pin + 1, dest_apic << 24);
	ioapic_write(0x10 + 2 * pin, lo);
}

/* ---- 8259 PICs: all masked (the firmware may have left them running) ---- */

void pic_mask_all(void)
{
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

/* ---- PIT channel 2: the TSC's rate, when there is no kvmclock ---- */

/*
 * One 20 ms countdown of PIT channel 2 (mode 0), timed by the TSC. Returns
 * the TSC rate in Hz, and in *err the width of the TSC windows in which the
 * countdown started and ended: an emulated CPU can be held up at any point,
 * and a run with wide windows tells nothing. 0 if the PIT never signals.
 */
#define PIT_HZ 1193182ull
#define PIT_LATCH 23864u /* 20 ms */

static u64 pit_run_in_tsc(u64 *err)
{
	u8 v = inb(0x61);
	if (v == 0xff)
		return 0; /* no port 0x61: no PIT */
	outb(0x61, (u8)((v & ~0x02) | 0x01)); /* gate 2 on, speaker off */
	outb(0x43, 0xb0);                     /* channel 2, lobyte/hibyte, mode 0 */
	outb(0x42, PIT_LATCH & 0xff);
	u64 s0 = rdtsc();
	outb(0x42, PIT_LATCH >> 8); /* counting starts here */
	u64 s1 = rdtsc();
	u64 low = s1, a, b;
	for (u32 spins = 0;; spins++) {
		if (spins > 50000000) {
			outb(0x61, v);
			return 0;
		}
		a = rdtsc();
		u8 out = inb(0x61) & 0x20;
		b = rdtsc();
		if (out && spins == 0) {
			outb(0x61, v);
			return 0; /* OUT2 must be low right after programming: no PIT here */
		}
		if (out)
			break;
		low = a; /* still counting at some point after a */
	}
	outb(0x61, v);
	*err = (s1 - s0) + (b - low);
	u64 cycles = (low + b) / 2 - (s0 + s1) / 2;
	return cycles * PIT_HZ / PIT_LATCH;
}

/*
 * The TSC rate in kHz: the median of the first 5 runs whose windows are under
 * 0.1% of the run and whose rate is plausible, out of up to 24 (most runs
 * qualify; a loaded host can hold the vCPU up for several ms at any point).
 * Failing that, the narrowest plausible run if its windows are under 1%.
 * 0 if there is no PIT or no run could be trusted.
 */
u64 pit_calibrate_tsc_khz(void)
{
	u64 good[5], best = 0, best_err = ~0ull;
	int ngood = 0;
	for (int i = 0; i < 24 && ngood < 5; i++) {
		u64 err = 0, hz = pit_run_in_tsc(&err);
		if (!hz)
			break; /* no PIT, or it stopped counting */
		u64 khz = hz / 1000, cycles = hz * PIT_LATCH / PIT_HZ;
		if (khz < TSC_KHZ_MIN || khz > TSC_KHZ_MAX)
			continue;
		if (err * 1000 < cycles)
			good[ngood++] = khz;
		if (err < best_err) {
			best = khz;
			best_err = err;
		}
	}
	if (ngood)
		return median_u64(good, ngood);
	if (best && best_err * 100 < best * 20) /* 1% of 20 ms, in kHz units */
		return best;
	return 0;
}
