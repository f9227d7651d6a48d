/**
 * The only module that calls into native code: libc bindings through koffi.
 *
 * Every function here is a thin, typed wrapper around one libc call and
 * returns what libc returns (-1, MAP_FAILED...). Reading errno is left to
 * the caller through {@link lastErrno}, which must be called right after
 * the failed call, before any other native call on the same thread. The
 * typed KVM handles (system.ts, vm.ts, vcpu.ts) and GuestMemory turn those
 * results into exceptions.
 *
 * koffi works on worker threads as well: a vCPU worker imports this module
 * and gets its own bindings.
 */
import koffi from 'koffi';

const libc = koffi.load('libc.so.6');

// Fixed prototypes only: koffi checks argument types against them, and a
// Buffer given as `void *` is passed by address without a copy.
const c = {
  open: libc.func('int open(const char *path, int flags, int mode)'),
  close: libc.func('int close(int fd)'),
  ioctlPtr: libc.func('ioctl', 'int', ['int', 'unsigned long', 'void *']),
  ioctlInt: libc.func('ioctl', 'int', ['int', 'unsigned long', 'unsigned long']),
  mmap: libc.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)'),
  munmap: libc.func('int munmap(void *addr, size_t len)'),
  madvise: libc.func('int madvise(void *addr, size_t len, int advice)'),
  gettid: libc.func('int gettid(void)'),
  getpid: libc.func('int getpid(void)'),
  tgkill: libc.func('int tgkill(int tgid, int tid, int sig)'),
  pthreadSigmask: libc.func('int pthread_sigmask(int how, const void *set, void *oldset)'),
  sigtimedwait: libc.func('int sigtimedwait(const void *set, void *info, const void *timeout)'),
  signal: libc.func('signal', 'uintptr_t', ['int', 'uintptr_t']),
  exit: libc.func('void _exit(int status)'),
  clockGettime: libc.func('int clock_gettime(int clockid, void *ts)'),
  memcpyTo: libc.func('void *memcpy(uintptr_t dst, const void *src, size_t n)'),
  memsetAt: libc.func('void *memset(uintptr_t dst, int c, size_t n)'),
  memcmpAt: libc.func('int memcmp(uintptr_t a, const void *b, size_t n)'),
} as const;

/** open(2) flags. */
export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_CLOEXEC = 0o2000000;

/** mmap(2) protections and flags (x86_64 values). */
export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
/** What mmap returns on failure: (void *)-1 as an unsigned 64-bit value. */
export const MAP_FAILED = 0xffffffffffffffffn;

/** madvise(2) advice values. */
export const MADV_DONTNEED = 4;
export const MADV_DONTFORK = 10;
export const MADV_MERGEABLE = 12;
export const MADV_HUGEPAGE = 14;
/** Linux 5.14+: fault every page of the range in, writable. */
export const MADV_POPULATE_WRITE = 23;

/** pthread_sigmask(3) `how` values. */
export const SIG_BLOCK = 0;
export const SIG_UNBLOCK = 1;
export const SIG_SETMASK = 2;

/** Signal numbers a monitor uses for kicks and shutdown. */
export const SIGINT = 2;
export const SIGUSR1 = 10;
export const SIGUSR2 = 12;
export const SIGTERM = 15;
export const SIGRTMIN_KERNEL = 32;

/** Size of glibc's sigset_t (1024 signals), what pthread_sigmask reads. */
export const SIGSET_BYTES = 128;
/** Size of the kernel's sigset on x86_64 (64 signals), what KVM_SET_SIGNAL_MASK wants. */
export const KERNEL_SIGSET_BYTES = 8;

/**
 * The largest native view koffi can make: one byte more aborts the whole
 * process (not an exception), so {@link viewNative} refuses it first.
 */
export const MAX_NATIVE_VIEW_BYTES = 2 ** 32;

/** errno as left by the last native call made through koffi on this thread. */
export function lastErrno(): number {
  return koffi.errno();
}

/** open(2). Returns the fd, or -1 (see {@link lastErrno}). */
export function sysOpen(path: string, flags: number, mode = 0): number {
  return c.open(path, flags, mode) as number;
}

/** close(2). Returns 0 or -1. */
export function sysClose(fd: number): number {
  return c.close(fd) as number;
}

/**
 * ioctl(2) whose argument is a pointer to `arg` (or NULL). The kernel reads
 * and writes the Buffer's own memory.
 */
export function ioctlPtr(fd: number, request: number, arg: Uint8Array | null): number {
  return c.ioctlPtr(fd, request, arg) as number;
}

/** ioctl(2) whose argument is an integer passed by value (KVM_CREATE_VCPU, KVM_RUN...). */
export function ioctlInt(fd: number, request: number, arg: number | bigint = 0): number {
  return c.ioctlInt(fd, request, arg) as number;
}

/**
 * mmap(2). Returns the address as a bigint, or {@link MAP_FAILED}.
 * `addr` null lets the kernel choose.
 */
export function sysMmap(
  addr: bigint | null,
  length: number | bigint,
  prot: number,
  flags: number,
  fd: number,
  offset: number | bigint = 0,
): bigint {
  const result: any = c.mmap(addr, length, prot, flags, fd, offset);
  return toAddress(result);
}

/** munmap(2). Returns 0 or -1. */
export function sysMunmap(addr: bigint, length: number | bigint): number {
  return c.munmap(addr, length) as number;
}

/** madvise(2). Returns 0 or -1. */
export function sysMadvise(addr: bigint, length: number | bigint, advice: number): number {
  return c.madvise(addr, length, advice) as number;
}

/** gettid(2): the kernel id of the calling thread (what tgkill needs). */
export function gettid(): number {
  return c.gettid() as number;
}

/** getpid(2). */
export function getpid(): number {
  return c.getpid() as number;
}

/** clock_gettime(2) clock ids. */
export const CLOCK_REALTIME = 0;
export const CLOCK_MONOTONIC = 1;

const timespec = Buffer.alloc(16);

/**
 * clock_gettime(2) of `clockId` in ns (struct timespec on x86-64: two
 * 64-bit fields). CLOCK_REALTIME here is the clock KVM_CLOCK_REALTIME
 * speaks, which Node offers only in milliseconds.
 */
export function clockGettimeNs(clockId: number): bigint {
  if ((c.clockGettime(clockId, timespec) as number) !== 0) {
    throw new Error(`clock_gettime(${clockId}) failed, errno ${lastErrno()}`);
  }
  return timespec.readBigInt64LE(0) * 1_000_000_000n + timespec.readBigInt64LE(8);
}

/** tgkill(2): send `sig` to thread `tid` of process `tgid`. Returns 0 or -1. */
export function tgkill(tgid: number, tid: number, sig: number): number {
  return c.tgkill(tgid, tid, sig) as number;
}

/**
 * _exit(2): ends the whole process now, every thread included, without
 * running exit handlers. The kernel takes each thread out of KVM_RUN
 * itself, so this cannot hang where process.exit() would (a worker inside
 * KVM_RUN). For the forced exit only: nothing is flushed or cleaned up.
 */
export function exitImmediately(status: number): never {
  c.exit(status);
  throw new Error('_exit returned');
}

/**
 * pthread_sigmask(3) for the calling thread. `set` and `oldSet` are
 * {@link SIGSET_BYTES}-byte sigsets (or null). Unlike most of libc it
 * returns the error number itself (0 on success) and leaves errno alone.
 */
export function pthreadSigmask(
  how: number,
  set: Uint8Array | null,
  oldSet: Uint8Array | null,
): number {
  if (set && set.byteLength < SIGSET_BYTES) throw new RangeError('sigset must be 128 bytes');
  if (oldSet && oldSet.byteLength < SIGSET_BYTES) throw new RangeError('sigset must be 128 bytes');
  return c.pthreadSigmask(how, set, oldSet) as number;
}

/**
 * sigtimedwait(2) on `set`, waiting at most `timeoutNs` (0 polls). Returns
 * the signal taken, or -1 with errno EAGAIN when none was pending.
 */
export function sigtimedwait(set: Uint8Array, timeoutNs = 0): number {
  if (set.byteLength < SIGSET_BYTES) throw new RangeError('sigset must be 128 bytes');
  const info = Buffer.alloc(128); // siginfo_t
  const ns = Math.max(0, Math.floor(timeoutNs));
  const timeout = Buffer.alloc(16); // struct timespec
  timeout.writeBigInt64LE(BigInt(Math.floor(ns / 1e9)), 0);
  timeout.writeBigInt64LE(BigInt(ns % 1e9), 8);
  return c.sigtimedwait(set, info, timeout) as number;
}

/**
 * Set `sig` to SIG_IGN for the whole process, so a stray process-directed
 * kick signal cannot end Node. Returns false if signal(2) failed.
 */
export function ignoreSignal(sig: number): boolean {
  const SIG_IGN = 1;
  const SIG_ERR = 2 ** 64 - 1;
  const previous = Number(c.signal(sig, SIG_IGN));
  return previous !== SIG_ERR;
}

/** A new, empty glibc sigset_t ({@link SIGSET_BYTES} bytes). */
export function sigsetEmpty(): Buffer {
  return Buffer.alloc(SIGSET_BYTES);
}

/** Adds signal `sig` (1-based) to `set`: bit sig-1. */
export function sigsetAdd(set: Uint8Array, sig: number): void {
  checkSignal(set, sig);
  set[(sig - 1) >> 3]! |= 1 << ((sig - 1) & 7);
}

/** Removes signal `sig` from `set`. */
export function sigsetDel(set: Uint8Array, sig: number): void {
  checkSignal(set, sig);
  set[(sig - 1) >> 3]! &= ~(1 << ((sig - 1) & 7));
}

/** Whether signal `sig` is in `set`. */
export function sigsetHas(set: Uint8Array, sig: number): boolean {
  checkSignal(set, sig);
  return (set[(sig - 1) >> 3]! & (1 << ((sig - 1) & 7))) !== 0;
}

function checkSignal(set: Uint8Array, sig: number): void {
  if (!Number.isInteger(sig) || sig < 1 || sig > set.byteLength * 8) {
    throw new RangeError(`signal ${sig} does not fit a ${set.byteLength}-byte sigset`);
  }
}

/**
 * A Uint8Array over native memory at `ptr`, without a copy. Using it after
 * the memory is unmapped crashes the process, so owners must drop views
 * before unmapping. Lengths above {@link MAX_NATIVE_VIEW_BYTES} are refused
 * here because koffi would abort the process instead of throwing.
 */
export function viewNative(ptr: bigint, length: number): Uint8Array {
  if (ptr === 0n || ptr === MAP_FAILED) throw new RangeError('viewNative: invalid pointer');
  if (!Number.isSafeInteger(length) || length <= 0 || length > MAX_NATIVE_VIEW_BYTES) {
    throw new RangeError(
      `viewNative: length ${length} is outside 1..${MAX_NATIVE_VIEW_BYTES}; view large memory in pieces`,
    );
  }
  return new Uint8Array(koffi.view(ptr, length));
}

/**
 * Copies `bytes` to native memory at `ptr` without a view of it: a view
 * is an external buffer, and V8 answers a new large one (guest RAM) with a
 * full garbage collection, which a few writes need not pay.
 */
export function copyToNative(ptr: bigint, bytes: Uint8Array): void {
  if (ptr === 0n || ptr === MAP_FAILED) throw new RangeError('copyToNative: invalid pointer');
  if (bytes.byteLength > 0) c.memcpyTo(ptr, bytes, bytes.byteLength);
}

/** Sets `length` bytes of native memory at `ptr` to `value`, without a view (see copyToNative). */
export function fillNative(ptr: bigint, length: number, value: number): void {
  if (ptr === 0n || ptr === MAP_FAILED) throw new RangeError('fillNative: invalid pointer');
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`fillNative: invalid length ${length}`);
  }
  if (length > 0) c.memsetAt(ptr, value & 0xff, length);
}

/** A zero buffer to compare native memory against, a stretch at a time. */
const ZEROS = Buffer.alloc(1 << 20);

/** Whether `length` bytes of native memory at `ptr` are all zero, without a view (see copyToNative). */
export function isZeroNative(ptr: bigint, length: number): boolean {
  if (ptr === 0n || ptr === MAP_FAILED) throw new RangeError('isZeroNative: invalid pointer');
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`isZeroNative: invalid length ${length}`);
  }
  for (let done = 0; done < length; done += ZEROS.length) {
    const n = Math.min(ZEROS.length, length - done);
    if (c.memcmpAt(ptr + BigInt(done), ZEROS, n) !== 0) return false;
  }
  return true;
}

/** The native address of a Buffer's memory (for structs that carry a pointer). */
export function addressOf(buffer: Uint8Array): bigint {
  return toAddress(koffi.address(buffer));
}

function toAddress(value: any): bigint {
  if (value === null || value === undefined) return 0n;
  return BigInt.asUintN(64, BigInt(value));
}
