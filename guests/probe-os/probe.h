/*
 * probe-os: a small freestanding x86-64 guest kernel for tsvmm's tests.
 * Shared definitions of the C files and boot.S.
 */
#ifndef PROBE_H
#define PROBE_H

#define MAX_CPUS 64
#define STACK_SIZE 16384 /* 1 << 14: boot.S shifts by 14 */
#define TRAMP_BASE 0x70000 /* the AP real-mode trampoline (SIPI vector 0x70) */

#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18

#define BOOT_LINUX64 0 /* RSI = boot_params (Linux 64-bit boot protocol) */
#define BOOT_PVH 1     /* EBX = hvm_start_info (x86/HVM direct boot ABI) */

#define VEC_TIMER 0x40
#define VEC_WAKE 0x41
#define VEC_SERIAL 0x44
#define VEC_SPURIOUS 0xff

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t s8;

/* pvclock_vcpu_time_info, as KVM writes it. */
struct pvclock {
	volatile u32 version;
	u32 pad0;
	volatile u64 tsc_timestamp;
	volatile u64 system_time;
	volatile u32 tsc_to_system_mul;
	volatile s8 tsc_shift;
	volatile u8 flags;
	u8 pad[2];
};
#define PVCLOCK_TSC_STABLE 1
#define PVCLOCK_GUEST_STOPPED 2

/* Per-CPU state. The pvclock area comes first and the struct is a multiple
 * of 64 bytes in a page-aligned array, so no area crosses a page. */
struct cpu {
	struct pvclock pv;
	u32 apic_id;
	volatile u32 up;
	volatile u32 tick_pending; /* set by the timer interrupt */
	u32 pad1;
	u64 last_tick_ns;  /* clock at the previous tick */
	u64 last_ns;       /* last clock reading (the backwards check) */
	u64 ticks;
	volatile u64 clock_seen; /* last `clock` request answered */
	u64 spurious;
} __attribute__((aligned(64)));

/* Interrupt frame built by boot.S's isr_common. */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

/* boot.S */
extern char stacks[];
extern u64 gdt_desc[];
extern char tramp_start[], tramp_end[], tramp_cr3[], tramp_cr4[], tramp_efer[];
extern u8 apic_to_cpu[256];
extern u64 isr_table[256];
extern char selftest_bp[];
extern char entry64[];
extern char __bss_start[], __bss_end[], _end[], __image_start[];

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq(const char *a, const char *b);
int str_starts(const char *s, const char *prefix);
u64 parse_u64(const char *s, const char **end);
u64 median_u64(u64 *v, int n); /* sorts v[0..n) in place; 0 if n == 0 */

struct line {
	char buf[200];
	unsigned n;
};
void l_init(struct line *l, int cpu, const char *event);
void l_str(struct line *l, const char *s);
void l_chr(struct line *l, char c);
void l_u64(struct line *l, u64 v);
void l_hex(struct line *l, u64 v, int digits); /* digits 0: as many as needed */
void l_kv(struct line *l, const char *key, u64 v);
void l_kx(struct line *l, const char *key, u64 v); /* key=0x<hex> */
void l_emit(struct line *l);
void l_emit_raw(struct line *l); /* for the rare lines printed from exceptions */
void uart_init(void);
int uart_getc(void); /* -1 when nothing is waiting */

/* cpu helpers */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline u64 save_flags_cli(void)
{
	u64 f;
	__asm__ volatile("pushfq; popq %0; cli" : "=r"(f)::"memory");
	return f;
}
static inline void restore_flags(u64 f)
{
	if (f & 0x200)
		sti();
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }

/* This CPU's index, from the stack it runs on (every CPU has its own). */
static inline int this_cpu(void)
{
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	return (int)((sp - (u64)stacks) / STACK_SIZE);
}

/* platform.c */
struct platform {
	int ncpus;
	u32 apic_ids[MAX_CPUS]; /* index 0 is the boot CPU */
	u64 lapic_base;
	u64 ioapic_base; /* 0: none found */
	u32 ioapic_gsi_base;
	u32 serial_gsi;
	u16 serial_flags; /* MPS INTI flags of an override (polarity, trigger) */
	const char *source; /* "acpi", "mptable" or "none" */
};
extern struct platform plat;
void platform_find_cpus(u64 rsdp_hint);
void lapic_init(void);
u32 lapic_id(void);
void lapic_eoi(void);
void lapic_timer_periodic(u32 count);
void lapic_timer_oneshot(u32 count);
u32 lapic_timer_current(void);
void lapic_timer_stop(void);
int lapic_send_ipi(u32 apic_id, u32 icr_low);
void ioapic_route_serial(u32 dest_apic, u8 vector);
void pic_mask_all(void);
/* A TSC rate outside these is a failed calibration, never a clock to run on. */
#define TSC_KHZ_MIN 100000ull    /* 100 MHz */
#define TSC_KHZ_MAX 10000000ull  /* 10 GHz */
u64 pit_calibrate_tsc_khz(void);

#endif
#endif
