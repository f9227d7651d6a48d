/**
 * The common part of the KVM handles: an owned fd, ioctls on it that throw
 * KvmIoctlError on failure, and a close() after which nothing more reaches
 * the kernel (a closed fd number may already name another file).
 */
import { Errno } from './errno.js';
import { KvmClosedError, KvmIoctlError, SyscallError } from './errors.js';
import { ioctlInt, ioctlPtr, lastErrno, sysClose } from './ffi.js';
import { KVM_IOCTLS, type KvmIoctlName } from './ioctls.js';

/**
 * Issues KVM ioctl `name` on `fd` with a pointer argument (or NULL) and
 * returns its non-negative result; throws KvmIoctlError on -1.
 */
export function kvmIoctlPtr(fd: number, name: KvmIoctlName, arg: Uint8Array | null): number {
  const result = ioctlPtr(fd, KVM_IOCTLS[name], arg);
  if (result < 0) throw new KvmIoctlError(name, lastErrno());
  return result;
}

/**
 * Issues KVM ioctl `name` on `fd` with an integer argument and returns its
 * non-negative result; throws KvmIoctlError on -1.
 */
export function kvmIoctlInt(fd: number, name: KvmIoctlName, arg: number | bigint = 0): number {
  const result = ioctlInt(fd, KVM_IOCTLS[name], arg);
  if (result < 0) throw new KvmIoctlError(name, lastErrno());
  return result;
}

/** Closes `fd`, treating EINTR as closed (Linux frees the fd anyway). */
export function closeFd(fd: number, what: string): void {
  if (sysClose(fd) < 0) {
    const errno = lastErrno();
    if (errno !== Errno.EINTR) throw new SyscallError(`close(${what})`, errno);
  }
}

/** Base of Kvm, KvmVm and KvmVcpu: one owned file descriptor. */
export class KvmFd {
  #fd: number;
  readonly #what: string;

  protected constructor(fd: number, what: string) {
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`${what}: invalid fd ${fd}`);
    this.#fd = fd;
    this.#what = what;
  }

  /** The fd number. Throws KvmClosedError after close(). */
  get fd(): number {
    if (this.#fd < 0) throw new KvmClosedError(this.#what);
    return this.#fd;
  }

  /** Whether close() has been called. */
  get closed(): boolean {
    return this.#fd < 0;
  }

  /** Closes the fd. Safe to call twice. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    closeFd(fd, this.#what);
  }

  /** KVM ioctl `name` with a pointer argument (or NULL); traced through {@link traceIoctl}. */
  protected ioctlPtr(name: KvmIoctlName, arg: Uint8Array | null): number {
    return this.#checked(name, ioctlPtr(this.fd, KVM_IOCTLS[name], arg));
  }

  /** KVM ioctl `name` with an integer argument; traced through {@link traceIoctl}. */
  protected ioctlInt(name: KvmIoctlName, arg: number | bigint = 0): number {
    return this.#checked(name, ioctlInt(this.fd, KVM_IOCTLS[name], arg));
  }

  /**
   * Called after every ioctl issued through ioctlPtr/ioctlInt with its
   * result, or -errno when it failed (before the error is thrown). The
   * base class traces nothing; KvmVm and KvmVcpu emit their trace events.
   */
  protected traceIoctl(_name: KvmIoctlName, _ret: number): void {}

  #checked(name: KvmIoctlName, result: number): number {
    if (result < 0) {
      // errno first: the trace record's write(2) may change it.
      const errno = lastErrno();
      this.traceIoctl(name, -errno);
      throw new KvmIoctlError(name, errno);
    }
    this.traceIoctl(name, result);
    return result;
  }
}
