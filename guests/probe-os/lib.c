/* probe-os: memory and string helpers, line building and the UART console. */
#include "probe.h"

void *memset(void *d, int c, size_t n)
{
	void *r = d;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *r = d;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
	return r;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp <= sp || dp >= sp + n)
		return memcpy(d, s, n);
	while (n--)
		dp[n] = sp[n];
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

int str_starts(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* Decimal, or hex with 0x. Stops at the first other character. */
u64 median_u64(u64 *v, int n)
{
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
			u64 t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return n ? v[n / 2] : 0;
}

u64 parse_u64(const char *s, const char **end)
{
	u64 v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			char c = *s;
			int d = c >= '0' && c <= '9' ? c - '0'
				: c >= 'a' && c <= 'f' ? c - 'a' + 10
				: c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
			if (d < 0)
				break;
			v = v * 16 + (u64)d;
		}
	} else {
		while (*s >= '0' && *s <= '9')
			v = v * 10 + (u64)(*s++ - '0');
	}
	if (end)
		*end = s;
	return v;
}

/* ---- lines: "probe cpu=<n> <event> key=value ..." built, then sent whole ---- */

void l_chr(struct line *l, char c)
{
	if (l->n < sizeof l->buf - 2) /* room for "\r\n" */
		l->buf[l->n++] = c;
}

void l_str(struct line *l, const char *s)
{
	while (*s)
		l_chr(l, *s++);
}

void l_u64(struct line *l, u64 v)
{
	char tmp[21];
	int i = 0;
	do {
		tmp[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		l_chr(l, tmp[--i]);
}

void l_hex(struct line *l, u64 v, int digits)
{
	if (!digits) {
		digits = 1;
		for (u64 t = v >> 4; t; t >>= 4)
			digits++;
	}
	for (int i = digits - 1; i >= 0; i--)
		l_chr(l, "0123456789abcdef"[(v >> (4 * i)) & 15]);
}

void l_init(struct line *l, int cpu, const char *event)
{
	l->n = 0;
	l_str(l, "probe cpu=");
	l_u64(l, (u64)cpu);
	l_chr(l, ' ');
	l_str(l, event);
}

void l_kv(struct line *l, const char *key, u64 v)
{
	l_chr(l, ' ');
	l_str(l, key);
	l_chr(l, '=');
	l_u64(l, v);
}

void l_kx(struct line *l, const char *key, u64 v)
{
	l_chr(l, ' ');
	l_str(l, key);
	l_str(l, "=0x");
	l_hex(l, v, 0);
}

/* ---- the 16550 UART at 0x3f8 ---- */

#define COM1 0x3f8
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

static volatile u32 con_lock;
static int uart_fifo = 1; /* 16 bytes per THRE; 1 if the FIFO is absent */

void uart_init(void)
{
	outb(COM1 + UART_IER, 0);
	outb(COM1 + UART_LCR, 0x80); /* DLAB: 115200 baud */
	outb(COM1 + 0, 1);
	outb(COM1 + 1, 0);
	outb(COM1 + UART_LCR, 0x03); /* 8N1 */
	outb(COM1 + UART_FCR, 0x07); /* FIFOs on and cleared, RX trigger 1 byte */
	uart_fifo = (inb(COM1 + UART_FCR) & 0xc0) == 0xc0 ? 16 : 1;
	outb(COM1 + UART_MCR, 0x0b); /* DTR, RTS, OUT2 (the IRQ line gate) */
	outb(COM1 + UART_IER, 0x01); /* received data available */
}

int uart_getc(void)
{
	if (!(inb(COM1 + UART_LSR) & LSR_DR))
		return -1;
	return inb(COM1 + UART_RBR);
}

/* Send bytes: wait for an empty transmitter, then up to a FIFO's worth with
 * one rep outsb (one exit per burst under a VMM, none where the VMM
 * coalesces THR writes), and at the end wait for it to drain. */
static void uart_write(const char *s, unsigned n)
{
	while (n) {
		unsigned burst = n < (unsigned)uart_fifo ? n : (unsigned)uart_fifo;
		for (u32 spins = 0; !(inb(COM1 + UART_LSR) & LSR_THRE) && spins < 1000000; spins++)
			cpu_relax();
		__asm__ volatile("rep outsb" : "+S"(s), "+c"(burst) : "d"((u16)COM1) : "memory");
		n -= n < (unsigned)uart_fifo ? n : (unsigned)uart_fifo;
	}
	/* Wait for the transmitter to drain before the line is given up, as a
	 * console driver does. Under a VMM that queues THR writes without an
	 * exit (coalesced I/O), this read is also what hands it the last burst. */
	for (u32 spins = 0; !(inb(COM1 + UART_LSR) & LSR_TEMT) && spins < 1000000; spins++)
		cpu_relax();
}

static void con_emit(struct line *l, int bounded)
{
	l->buf[l->n++] = '\r';
	l->buf[l->n++] = '\n';
	u64 flags = save_flags_cli();
	u32 spins = 0;
	int locked = 0;
	for (;;) {
		if (__atomic_exchange_n(&con_lock, 1, __ATOMIC_ACQUIRE) == 0) {
			locked = 1;
			break;
		}
		if (bounded && ++spins > 100000000)
			break; /* an exception while the lock is held: print anyway */
		cpu_relax();
	}
	uart_write(l->buf, l->n);
	if (locked)
		__atomic_store_n(&con_lock, 0, __ATOMIC_RELEASE);
	restore_flags(flags);
	l->n -= 2;
}

void l_emit(struct line *l) { con_emit(l, 0); }
void l_emit_raw(struct line *l) { con_emit(l, 1); }
