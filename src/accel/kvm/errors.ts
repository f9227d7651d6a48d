import { TsvmmError } from '../../util/errors.js';
import { errnoName } from './errno.js';

/**
 * A KVM ioctl returned -1. `ioctl` is the ioctl's name as in linux/kvm.h
 * (`KVM_SET_CLOCK`), `errno` the number and `errnoName` its name, so callers
 * can branch on `err.errnoName === 'EINTR'` without parsing the message.
 */
export class KvmIoctlError extends TsvmmError {
  readonly ioctl: string;
  readonly errno: number;
  readonly errnoName: string;

  constructor(ioctl: string, errno: number) {
    const name = errnoName(errno);
    super('KVM_IOCTL_FAILED', `${ioctl} failed: ${name}`);
    this.ioctl = ioctl;
    this.errno = errno;
    this.errnoName = name;
  }
}

/**
 * /dev/kvm (or the given device path) could not be opened. The message says
 * why and what to do; `errno` is the failed open's errno.
 */
export class KvmUnavailableError extends TsvmmError {
  readonly path: string;
  readonly errno: number;

  constructor(path: string, errno: number, reason: string) {
    super('KVM_UNAVAILABLE', `cannot open ${path} (${errnoName(errno)}): ${reason}`);
    this.path = path;
    this.errno = errno;
  }
}

/** The kernel's KVM speaks another API version than the stable one (12). */
export class KvmApiVersionError extends TsvmmError {
  readonly version: number;

  constructor(path: string, version: number, expected: number) {
    super(
      'KVM_API_VERSION_MISMATCH',
      `${path} reports KVM API version ${version}, tsvmm needs ${expected}: use a kernel with the stable KVM API`,
    );
    this.version = version;
  }
}

/**
 * A KVM handle was used after close(). Its fd number may already belong to
 * another file, so nothing is sent to the kernel.
 */
export class KvmClosedError extends TsvmmError {
  constructor(what: string) {
    super('KVM_HANDLE_CLOSED', `${what} was used after close(): create a new one`);
  }
}

/** A value given to a struct encoder does not fit the C field it goes to. */
export class KvmStructError extends TsvmmError {
  constructor(message: string) {
    super('KVM_STRUCT_INVALID', message);
  }
}

/** A libc call other than a KVM ioctl failed (mmap, munmap, close...). */
export class SyscallError extends TsvmmError {
  readonly syscall: string;
  readonly errno: number;
  readonly errnoName: string;

  constructor(syscall: string, errno: number, hint?: string) {
    const name = errnoName(errno);
    super('SYSCALL_FAILED', `${syscall} failed: ${name}${hint ? `: ${hint}` : ''}`);
    this.syscall = syscall;
    this.errno = errno;
    this.errnoName = name;
  }
}
