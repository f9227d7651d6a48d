/*
 * clock-reporter: a tiny static Linux program for tsvmm's guest image. It
 * shows what a Linux guest itself sees of time across stops, saves and
 * migrations, so that tests judge tsvmm's kvmclock handling from inside.
 *
 * Every INTERVAL ms (default 100) it prints one line on stdout:
 *
 *   CLOCK n=SEQ rt=NS mono=NS raw=NS boot=NS
 *
 * with CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_MONOTONIC_RAW (the clocksource
 * itself: kvm-clock when Linux picked it, with no NTP slewing) and
 * CLOCK_BOOTTIME in nanoseconds. A reading lower than the one before on the
 * same clock also prints
 *
 *   CLOCK-BACKWARDS clock=NAME prev=NS now=NS
 *
 * and each kernel log record that tells of a watchdog firing (soft or hard
 * lockup, RCU stall, hung task) is copied from /dev/kmsg as
 *
 *   CLOCK-SPLAT <the record's text>
 *
 * After COUNT lines (default 0: forever) it prints `CLOCK-END backwards=N
 * splats=N` and exits with status 0 when both are 0, else 1.
 *
 * Usage: clock-reporter [INTERVAL_MS [COUNT]]
 *
 * It is freestanding (raw system calls, no libc), so it needs no C library
 * in the build and builds byte-identically: see Makefile.
 */

typedef long i64;
typedef unsigned long u64;

struct timespec64 {
  i64 sec;
  i64 nsec;
};

enum {
  SYS_read = 0,
  SYS_write = 1,
  SYS_open = 2,
  SYS_clock_gettime = 228,
  SYS_clock_nanosleep = 230,
  SYS_exit_group = 231,
};

enum {
  CLOCK_REALTIME = 0,
  CLOCK_MONOTONIC = 1,
  CLOCK_MONOTONIC_RAW = 4,
  CLOCK_BOOTTIME = 7,
  TIMER_ABSTIME = 1,
  O_RDONLY = 0,
  O_NONBLOCK = 04000,
  EINTR = 4,
};

static i64 syscall4(i64 nr, i64 a, i64 b, i64 c, i64 d) {
  i64 ret;
  register i64 r10 __asm__("r10") = d;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
                   : "rcx", "r11", "memory");
  return ret;
}

static i64 sys3(i64 nr, i64 a, i64 b, i64 c) { return syscall4(nr, a, b, c, 0); }

static u64 str_len(const char *s) {
  u64 n = 0;
  while (s[n] != 0) n++;
  return n;
}

/* One output line, built in place and written with a single write(2) so
 * that lines from this program never interleave with each other. */
struct line {
  char buf[1024];
  u64 len;
};

static void put_str(struct line *l, const char *s) {
  while (*s != 0 && l->len < sizeof l->buf - 1) l->buf[l->len++] = *s++;
}

static void put_mem(struct line *l, const char *s, u64 n) {
  for (u64 i = 0; i < n && l->len < sizeof l->buf - 1; i++) l->buf[l->len++] = s[i];
}

static void put_dec(struct line *l, i64 v) {
  char tmp[24];
  int n = 0;
  u64 u = v < 0 ? (u64)(-v) : (u64)v;
  if (v < 0) put_str(l, "-");
  do {
    tmp[n++] = (char)('0' + u % 10);
    u /= 10;
  } while (u != 0);
  while (n > 0 && l->len < sizeof l->buf - 1) l->buf[l->len++] = tmp[--n];
}

static void emit(struct line *l) {
  l->buf[l->len++] = '\n';
  u64 off = 0;
  while (off < l->len) {
    i64 n = sys3(SYS_write, 1, (i64)(l->buf + off), (i64)(l->len - off));
    if (n == -EINTR) continue;
    if (n <= 0) break;
    off += (u64)n;
  }
  l->len = 0;
}

static i64 now_ns(int clock) {
  struct timespec64 ts;
  if (sys3(SYS_clock_gettime, clock, (i64)&ts, 0) != 0) return -1;
  return ts.sec * 1000000000L + ts.nsec;
}

static i64 parse_dec(const char *s, i64 fallback) {
  i64 v = 0;
  if (s == 0 || *s == 0) return fallback;
  for (; *s != 0; s++) {
    if (*s < '0' || *s > '9') return fallback;
    v = v * 10 + (*s - '0');
  }
  return v;
}

static int contains(const char *hay, u64 n, const char *needle) {
  u64 m = str_len(needle);
  for (u64 i = 0; i + m <= n; i++) {
    u64 j = 0;
    while (j < m && hay[i + j] == needle[j]) j++;
    if (j == m) return 1;
  }
  return 0;
}

/* The kernel's words for a watchdog that fired, as printed by 6.x kernels. */
static const char *const splat_words[] = {
    "soft lockup", "hard LOCKUP", "rcu_sched detected stall", "rcu_preempt detected stall",
    "detected stalls on CPUs", "self-detected stall", "blocked for more than",
};

/* Copies the watchdog records waiting in /dev/kmsg; returns how many. */
static i64 drain_kmsg(int fd) {
  static char rec[2048];
  i64 splats = 0;
  for (;;) {
    i64 n = sys3(SYS_read, fd, (i64)rec, sizeof rec);
    if (n == -EINTR) continue;
    /* -EAGAIN: nothing more; -EPIPE: records were overwritten, read on. */
    if (n == -32) continue;
    if (n <= 0) return splats;
    /* A record is "prio,seq,usec,flags;text\n" and continuation lines. */
    u64 start = 0;
    while (start < (u64)n && rec[start] != ';') start++;
    start = start < (u64)n ? start + 1 : 0;
    u64 end = start;
    while (end < (u64)n && rec[end] != '\n') end++;
    for (u64 w = 0; w < sizeof splat_words / sizeof splat_words[0]; w++) {
      if (contains(rec + start, end - start, splat_words[w])) {
        struct line l = {.len = 0};
        put_str(&l, "CLOCK-SPLAT ");
        put_mem(&l, rec + start, end - start);
        emit(&l);
        splats++;
        break;
      }
    }
  }
}

struct clock_track {
  const char *name;
  int id;
  i64 last;
};

int main(int argc, char **argv) {
  i64 interval_ms = parse_dec(argc > 1 ? argv[1] : 0, 100);
  i64 count = parse_dec(argc > 2 ? argv[2] : 0, 0);
  if (interval_ms <= 0) interval_ms = 100;
  struct clock_track clocks[] = {
      {"rt", CLOCK_REALTIME, 0},
      {"mono", CLOCK_MONOTONIC, 0},
      {"raw", CLOCK_MONOTONIC_RAW, 0},
      {"boot", CLOCK_BOOTTIME, 0},
  };
  const int nclocks = sizeof clocks / sizeof clocks[0];
  i64 kmsg = sys3(SYS_open, (i64) "/dev/kmsg", O_RDONLY | O_NONBLOCK, 0);
  i64 backwards = 0, splats = 0;
  i64 next = now_ns(CLOCK_MONOTONIC);

  for (i64 seq = 1; count == 0 || seq <= count; seq++) {
    struct line l = {.len = 0};
    i64 values[4];
    for (int i = 0; i < nclocks; i++) values[i] = now_ns(clocks[i].id);
    for (int i = 0; i < nclocks; i++) {
      if (seq > 1 && values[i] < clocks[i].last) {
        struct line b = {.len = 0};
        put_str(&b, "CLOCK-BACKWARDS clock=");
        put_str(&b, clocks[i].name);
        put_str(&b, " prev=");
        put_dec(&b, clocks[i].last);
        put_str(&b, " now=");
        put_dec(&b, values[i]);
        emit(&b);
        backwards++;
      }
      clocks[i].last = values[i];
    }
    put_str(&l, "CLOCK n=");
    put_dec(&l, seq);
    for (int i = 0; i < nclocks; i++) {
      put_str(&l, " ");
      put_str(&l, clocks[i].name);
      put_str(&l, "=");
      put_dec(&l, values[i]);
    }
    emit(&l);
    if (kmsg >= 0) splats += drain_kmsg((int)kmsg);

    /* Sleep to the next multiple of the interval; after a long gap (a
     * stopped VM) start counting again from now rather than catching up. */
    next += interval_ms * 1000000L;
    i64 mono = now_ns(CLOCK_MONOTONIC);
    if (next < mono) next = mono + interval_ms * 1000000L;
    struct timespec64 until = {next / 1000000000L, next % 1000000000L};
    while (syscall4(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, (i64)&until, 0) == -EINTR) {
    }
  }
  struct line l = {.len = 0};
  put_str(&l, "CLOCK-END backwards=");
  put_dec(&l, backwards);
  put_str(&l, " splats=");
  put_dec(&l, splats);
  emit(&l);
  return backwards == 0 && splats == 0 ? 0 : 1;
}

/* The process entry: the kernel leaves argc at the stack pointer and argv
 * just above it. */
__asm__(".globl _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov (%rsp), %rdi\n"
        "  lea 8(%rsp), %rsi\n"
        "  and $-16, %rsp\n"
        "  call main\n"
        "  mov %rax, %rdi\n"
        "  mov $231, %rax\n"
        "  syscall\n"
        "  hlt\n");
