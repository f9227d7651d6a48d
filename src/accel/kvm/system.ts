/**
 * The KVM system fd (/dev/kvm): API version, capabilities, host CPUID and
 * MSR lists, and VM creation.
 */
import { probeKvmHost } from '../../util/kvm-gate.js';
import { Errno, errnoName } from './errno.js';
import { KvmApiVersionError, KvmIoctlError, KvmUnavailableError } from './errors.js';
import { lastErrno, O_CLOEXEC, O_RDWR, sysOpen } from './ffi.js';
import { KVM_API_VERSION } from './ioctls.js';
import { KvmFd } from './kvm-fd.js';
import { allocKvmCpuid2, decodeKvmCpuid2, type KvmCpuidEntry2 } from './structs/cpuid.js';
import { allocKvmMsrList, decodeKvmMsrList } from './structs/msrs.js';
import { KvmVm } from './vm.js';

/** The default KVM device. */
export const KVM_DEVICE_PATH = '/dev/kvm';

/** Options for {@link Kvm.open}. */
export interface KvmOpenOptions {
  /** Device to open instead of /dev/kvm. */
  path?: string;
}

// QEMU starts KVM_GET_SUPPORTED_CPUID at a guess and doubles on E2BIG; the
// kernel does not say how many entries it needs. 8192 is far above any
// real CPU's table and bounds the loop.
const CPUID_FIRST_CAPACITY = 128;
const CPUID_MAX_CAPACITY = 8192;

/** The KVM system handle. */
export class Kvm extends KvmFd {
  /** The device path this handle was opened from. */
  readonly path: string;

  private constructor(fd: number, path: string) {
    super(fd, path);
    this.path = path;
  }

  /**
   * Opens /dev/kvm (or `options.path`) and checks that it speaks KVM API
   * version 12. Throws KvmUnavailableError, with what to do, when the
   * device cannot be opened; KvmIoctlError when the file is not a KVM
   * device; KvmApiVersionError for another API version.
   */
  static open(options: KvmOpenOptions = {}): Kvm {
    const path = options.path ?? KVM_DEVICE_PATH;
    const fd = sysOpen(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      const errno = lastErrno();
      throw new KvmUnavailableError(path, errno, unavailableReason(path, errno));
    }
    const kvm = new Kvm(fd, path);
    try {
      const version = kvm.getApiVersion();
      if (version !== KVM_API_VERSION) throw new KvmApiVersionError(path, version, KVM_API_VERSION);
    } catch (error) {
      kvm.close();
      throw error;
    }
    return kvm;
  }

  /** KVM_GET_API_VERSION (12 on every Linux since 2.6.22). */
  getApiVersion(): number {
    return this.ioctlInt('KVM_GET_API_VERSION');
  }

  /** KVM_CHECK_EXTENSION: 0 if `cap` (a KVM_CAP value) is absent, else a cap-specific value. */
  checkExtension(cap: number): number {
    return this.ioctlInt('KVM_CHECK_EXTENSION', cap);
  }

  /** KVM_GET_VCPU_MMAP_SIZE: the length to map of each vCPU fd (kvm_run and more). */
  getVcpuMmapSize(): number {
    return this.ioctlInt('KVM_GET_VCPU_MMAP_SIZE');
  }

  /** KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can offer a guest on this host. */
  getSupportedCpuid(): KvmCpuidEntry2[] {
    for (let capacity = CPUID_FIRST_CAPACITY; ; capacity *= 2) {
      const buf = allocKvmCpuid2(capacity);
      try {
        this.ioctlPtr('KVM_GET_SUPPORTED_CPUID', buf);
        return decodeKvmCpuid2(buf);
      } catch (error) {
        const tooSmall = error instanceof KvmIoctlError && error.errno === Errno.E2BIG;
        if (!tooSmall || capacity >= CPUID_MAX_CAPACITY) throw error;
      }
    }
  }

  /** KVM_GET_MSR_INDEX_LIST: the MSRs a monitor must save and restore. */
  getMsrIndexList(): number[] {
    // Asked with room for none, KVM fails with E2BIG and writes the count.
    const probe = allocKvmMsrList(0);
    try {
      this.ioctlPtr('KVM_GET_MSR_INDEX_LIST', probe);
      return [];
    } catch (error) {
      if (!(error instanceof KvmIoctlError && error.errno === Errno.E2BIG)) throw error;
    }
    const buf = allocKvmMsrList(probe.readUInt32LE(0));
    this.ioctlPtr('KVM_GET_MSR_INDEX_LIST', buf);
    return decodeKvmMsrList(buf);
  }

  /**
   * KVM_CREATE_VM (type 0, the default x86 VM). The VM keeps this
   * system's KVM_GET_VCPU_MMAP_SIZE for its vCPUs.
   */
  createVm(type = 0): KvmVm {
    const vcpuMmapSize = this.getVcpuMmapSize();
    // KVM_CREATE_VM can fail with EINTR when a signal arrives while KVM
    // sets the VM up; QEMU retries too.
    for (;;) {
      try {
        const fd = this.ioctlInt('KVM_CREATE_VM', type);
        return new KvmVm(fd, { vcpuMmapSize });
      } catch (error) {
        if (!(error instanceof KvmIoctlError && error.errno === Errno.EINTR)) throw error;
      }
    }
  }
}

/** Says why `path` could not be opened and what to do about it. */
function unavailableReason(path: string, errno: number): string {
  const probe = probeKvmHost(path);
  if (errno === Errno.EACCES || errno === Errno.EPERM) {
    return 'this user may not use KVM: add the user to the kvm group or run as root';
  }
  if (errno === Errno.ENOENT || errno === Errno.ENOTDIR) {
    return probe.usable ? `${path} does not exist: check the path` : probe.reason;
  }
  if (errno === Errno.ENXIO || errno === Errno.ENODEV) {
    return 'the device node exists but no KVM driver answers: load kvm_intel or kvm_amd and enable virtualization in the firmware';
  }
  if (errno === Errno.EMFILE || errno === Errno.ENFILE) {
    return 'too many open files: close some or raise the limit (ulimit -n)';
  }
  return probe.usable ? `open failed with ${errnoName(errno)}` : probe.reason;
}
