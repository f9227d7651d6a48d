/**
 * A vCPU fd: KVM_RUN and the vCPU state ioctls, each one method with a
 * typed result. Built from an fd number and the kvm_run mapping size, so a
 * vCPU worker thread can build its own from numbers posted to it.
 */
import { traceEvent } from '../../trace/control.js';
import { CoalescedRing } from './coalesced-ring.js';
import { Errno } from './errno.js';
import { KvmIoctlError, SyscallError } from './errors.js';
import {
  ioctlInt,
  lastErrno,
  MAP_FAILED,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
  sysMmap,
  sysMunmap,
  viewNative,
} from './ffi.js';
import { KVM_EXIT, KVM_IOCTLS, type KvmIoctlName } from './ioctls.js';
import { KvmFd } from './kvm-fd.js';
import { KVM_COALESCED_RING_BYTES } from './structs/coalesced-mmio.js';
import {
  allocKvmCpuid2,
  decodeKvmCpuid2,
  encodeKvmCpuid2,
  type KvmCpuidEntry2,
} from './structs/cpuid.js';
import {
  decodeKvmXcrs,
  encodeKvmXcrs,
  KVM_FPU,
  KVM_XCRS_SIZE,
  KVM_XSAVE_SIZE,
  type KvmFpu,
  type KvmXcrs,
  type KvmXsave,
} from './structs/fpu.js';
import type { StructCodec } from './structs/layout.js';
import { decodeKvmMsrs, encodeKvmMsrs, type KvmMsrEntry } from './structs/msrs.js';
import {
  KVM_DEBUGREGS,
  KVM_REGS,
  KVM_SREGS,
  type KvmDebugregs,
  type KvmRegs,
  type KvmSregs,
} from './structs/regs.js';
import { KVM_RUN_SIZE, KvmRun } from './structs/run.js';
import {
  encodeKvmSignalMask,
  KVM_LAPIC_STATE,
  KVM_MP_STATE_STRUCT,
  KVM_VCPU_EVENTS,
  type KvmLapicState,
  type KvmMpState,
  type KvmVcpuEvents,
} from './structs/vcpu-state.js';
import { KVM_ENABLE_CAP_STRUCT } from './structs/vm.js';

const KVM_RUN_REQUEST = KVM_IOCTLS.KVM_RUN;
const traceVcpuIoctl = traceEvent('kvm_vcpu_ioctl');

/** Options for {@link KvmVcpu}. */
export interface KvmVcpuOptions {
  /** The vCPU's cpu index, shown as `cpu=` in its trace records (-1 when not given). */
  index?: number;
}

/**
 * A KVM vCPU: its fd and its mapped kvm_run page. Every ioctl on it but
 * KVM_RUN is traced as `kvm_vcpu_ioctl cpu= type= ret=`; KVM_RUN is far too
 * frequent, and `kvm_run_exit` covers it.
 */
export class KvmVcpu extends KvmFd {
  /** The cpu index given at construction, or -1. */
  readonly index: number;
  /** Native address of the kvm_run mapping. */
  readonly runPtr: bigint;
  /** Length of the kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE). */
  readonly runSize: number;
  /** Typed access to the kvm_run page. */
  readonly kvmRun: KvmRun;
  #coalescedRing: CoalescedRing | undefined;

  /**
   * Takes ownership of vCPU fd `fd` and maps its kvm_run page
   * (`runMmapSize` from Kvm.getVcpuMmapSize()). If mapping fails the
   * constructor throws and the fd stays the caller's to close.
   */
  constructor(fd: number, runMmapSize: number, options: KvmVcpuOptions = {}) {
    super(fd, `vCPU fd ${fd}`);
    this.index = options.index ?? -1;
    if (!Number.isInteger(runMmapSize) || runMmapSize < KVM_RUN_SIZE) {
      throw new RangeError(`kvm_run mapping size ${runMmapSize} is smaller than struct kvm_run`);
    }
    const ptr = sysMmap(null, runMmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ptr === MAP_FAILED) {
      throw new SyscallError('mmap(kvm_run)', lastErrno(), 'is this fd a KVM vCPU?');
    }
    this.runPtr = ptr;
    this.runSize = runMmapSize;
    this.kvmRun = new KvmRun(viewNative(ptr, runMmapSize));
  }

  /**
   * KVM_RUN: runs the vCPU until the next exit and returns the exit reason
   * (KVM_EXIT_*). A signal or immediate_exit makes KVM_RUN fail with
   * EINTR; that is returned as KVM_EXIT.INTR, the reason KVM itself
   * records for it. EAGAIN is returned the same way: KVM gives it when the
   * vCPU cannot enter yet, for example an AP's first run after INIT/SIPI,
   * and the caller simply runs again (QEMU does the same). Any other
   * failure throws KvmIoctlError.
   */
  run(): number {
    const result = ioctlInt(this.fd, KVM_RUN_REQUEST, 0);
    if (result >= 0) return this.kvmRun.exitReason;
    const errno = lastErrno();
    if (errno === Errno.EINTR || errno === Errno.EAGAIN) return KVM_EXIT.INTR;
    throw new KvmIoctlError('KVM_RUN', errno);
  }

  /**
   * The VM's coalesced I/O ring, as this vCPU's mapping holds it
   * `pageOffset` pages in (KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)).
   */
  coalescedRing(pageOffset: number): CoalescedRing {
    const start = pageOffset * KVM_COALESCED_RING_BYTES;
    if (
      !Number.isInteger(pageOffset) ||
      pageOffset < 1 ||
      start + KVM_COALESCED_RING_BYTES > this.runSize
    ) {
      throw new RangeError(
        `the coalesced ring at page ${pageOffset} is outside the ${this.runSize}-byte vCPU mapping`,
      );
    }
    this.#coalescedRing ??= new CoalescedRing(
      viewNative(this.runPtr + BigInt(start), KVM_COALESCED_RING_BYTES),
    );
    return this.#coalescedRing;
  }

  protected override traceIoctl(name: KvmIoctlName, ret: number): void {
    if (traceVcpuIoctl.enabled) traceVcpuIoctl.emit({ cpu: this.index, type: name, ret });
  }

  /** KVM_GET_REGS. */
  getRegs(): KvmRegs {
    return this.getStruct('KVM_GET_REGS', KVM_REGS);
  }

  /** KVM_SET_REGS. */
  setRegs(regs: KvmRegs): void {
    this.ioctlPtr('KVM_SET_REGS', KVM_REGS.encode(regs));
  }

  /** KVM_GET_SREGS. */
  getSregs(): KvmSregs {
    return this.getStruct('KVM_GET_SREGS', KVM_SREGS);
  }

  /** KVM_SET_SREGS. */
  setSregs(sregs: KvmSregs): void {
    this.ioctlPtr('KVM_SET_SREGS', KVM_SREGS.encode(sregs));
  }

  /** KVM_GET_FPU. */
  getFpu(): KvmFpu {
    return this.getStruct('KVM_GET_FPU', KVM_FPU);
  }

  /** KVM_SET_FPU. */
  setFpu(fpu: KvmFpu): void {
    this.ioctlPtr('KVM_SET_FPU', KVM_FPU.encode(fpu));
  }

  /** KVM_GET_XSAVE: the legacy 4096-byte XSAVE area. */
  getXsave(): KvmXsave {
    const buf = Buffer.alloc(KVM_XSAVE_SIZE);
    this.ioctlPtr('KVM_GET_XSAVE', buf);
    return { region: new Uint8Array(buf) };
  }

  /**
   * KVM_GET_XSAVE2: the XSAVE area of `size` bytes, the size that
   * KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) returns on the VM fd.
   */
  getXsave2(size: number): KvmXsave {
    const buf = Buffer.alloc(Math.max(size, KVM_XSAVE_SIZE));
    this.ioctlPtr('KVM_GET_XSAVE2', buf);
    return { region: new Uint8Array(buf) };
  }

  /** KVM_SET_XSAVE. `region` is at least 4096 bytes (larger if it came from XSAVE2). */
  setXsave(xsave: KvmXsave): void {
    if (xsave.region.byteLength < KVM_XSAVE_SIZE) {
      throw new RangeError(
        `an XSAVE area is at least ${KVM_XSAVE_SIZE} bytes, got ${xsave.region.byteLength}`,
      );
    }
    this.ioctlPtr('KVM_SET_XSAVE', Buffer.from(xsave.region));
  }

  /** KVM_GET_XCRS. */
  getXcrs(): KvmXcrs {
    const buf = Buffer.alloc(KVM_XCRS_SIZE);
    this.ioctlPtr('KVM_GET_XCRS', buf);
    return decodeKvmXcrs(buf);
  }

  /** KVM_SET_XCRS. */
  setXcrs(xcrs: KvmXcrs): void {
    this.ioctlPtr('KVM_SET_XCRS', encodeKvmXcrs(xcrs));
  }

  /**
   * KVM_GET_MSRS for the given MSR indices. KVM stops at the first MSR it
   * cannot read, so the result may be shorter than `indices`: it holds the
   * MSRs read, in order.
   */
  getMsrs(indices: readonly number[]): KvmMsrEntry[] {
    const buf = encodeKvmMsrs(indices.map((index) => ({ index, data: 0n })));
    const read = this.ioctlPtr('KVM_GET_MSRS', buf);
    return decodeKvmMsrs(buf, read);
  }

  /**
   * KVM_SET_MSRS. Returns how many MSRs KVM set: it stops at the first it
   * refuses, so a result below entries.length names the refused one.
   */
  setMsrs(entries: readonly KvmMsrEntry[]): number {
    return this.ioctlPtr('KVM_SET_MSRS', encodeKvmMsrs(entries));
  }

  /** KVM_SET_CPUID2: the CPUID table the guest sees. */
  setCpuid2(entries: readonly KvmCpuidEntry2[]): void {
    this.ioctlPtr('KVM_SET_CPUID2', encodeKvmCpuid2(entries));
  }

  /** KVM_GET_CPUID2: the table set with setCpuid2 (room for `capacity` entries). */
  getCpuid2(capacity = 256): KvmCpuidEntry2[] {
    const buf = allocKvmCpuid2(capacity);
    this.ioctlPtr('KVM_GET_CPUID2', buf);
    return decodeKvmCpuid2(buf);
  }

  /** KVM_GET_LAPIC. */
  getLapic(): KvmLapicState {
    return this.getStruct('KVM_GET_LAPIC', KVM_LAPIC_STATE);
  }

  /** KVM_SET_LAPIC. */
  setLapic(lapic: KvmLapicState): void {
    this.ioctlPtr('KVM_SET_LAPIC', KVM_LAPIC_STATE.encode(lapic));
  }

  /** KVM_GET_VCPU_EVENTS. */
  getVcpuEvents(): KvmVcpuEvents {
    return this.getStruct('KVM_GET_VCPU_EVENTS', KVM_VCPU_EVENTS);
  }

  /** KVM_SET_VCPU_EVENTS. */
  setVcpuEvents(events: KvmVcpuEvents): void {
    this.ioctlPtr('KVM_SET_VCPU_EVENTS', KVM_VCPU_EVENTS.encode(events));
  }

  /** KVM_GET_MP_STATE. */
  getMpState(): KvmMpState {
    return this.getStruct('KVM_GET_MP_STATE', KVM_MP_STATE_STRUCT);
  }

  /** KVM_SET_MP_STATE. */
  setMpState(state: KvmMpState): void {
    this.ioctlPtr('KVM_SET_MP_STATE', KVM_MP_STATE_STRUCT.encode(state));
  }

  /** KVM_GET_DEBUGREGS. */
  getDebugregs(): KvmDebugregs {
    return this.getStruct('KVM_GET_DEBUGREGS', KVM_DEBUGREGS);
  }

  /** KVM_SET_DEBUGREGS. */
  setDebugregs(regs: KvmDebugregs): void {
    this.ioctlPtr('KVM_SET_DEBUGREGS', KVM_DEBUGREGS.encode(regs));
  }

  /**
   * KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is inside
   * KVM_RUN (a kernel 8-byte sigset, or a 128-byte glibc sigset_t whose
   * first 8 bytes are used). null removes the mask, so KVM_RUN keeps the
   * thread's own mask.
   */
  setSignalMask(sigset: Uint8Array | null): void {
    this.ioctlPtr('KVM_SET_SIGNAL_MASK', sigset ? encodeKvmSignalMask(sigset) : null);
  }

  /**
   * KVM_KVMCLOCK_CTRL: tell the guest (through its pvclock page) that it
   * was stopped by the host, so its watchdogs do not fire. EINVAL until the
   * guest has enabled kvmclock.
   */
  kvmclockCtrl(): void {
    this.ioctlInt('KVM_KVMCLOCK_CTRL');
  }

  /** KVM_GET_TSC_KHZ: the vCPU's TSC frequency in kHz. */
  getTscKhz(): number {
    return this.ioctlInt('KVM_GET_TSC_KHZ');
  }

  /** KVM_SET_TSC_KHZ (needs KVM_CAP_TSC_CONTROL). */
  setTscKhz(khz: number): void {
    this.ioctlInt('KVM_SET_TSC_KHZ', khz);
  }

  /** KVM_NMI: queue an NMI (with no in-kernel irqchip). */
  nmi(): void {
    this.ioctlInt('KVM_NMI');
  }

  /** KVM_ENABLE_CAP on this vCPU. */
  enableCap(cap: number, args: readonly bigint[] = [], flags = 0): void {
    const padded = [...args, 0n, 0n, 0n, 0n].slice(0, 4);
    this.ioctlPtr('KVM_ENABLE_CAP', KVM_ENABLE_CAP_STRUCT.encode({ cap, flags, args: padded }));
  }

  /**
   * Unmaps kvm_run and closes the vCPU fd. Views obtained from kvmRun
   * before this must not be used afterwards.
   */
  override close(): void {
    if (this.closed) return;
    this.kvmRun.detach();
    this.#coalescedRing?.detach();
    if (sysMunmap(this.runPtr, this.runSize) < 0) {
      const errno = lastErrno();
      super.close();
      throw new SyscallError('munmap(kvm_run)', errno);
    }
    super.close();
  }

  private getStruct<T>(name: KvmIoctlName, codec: StructCodec<T>): T {
    const buf = Buffer.alloc(codec.size);
    this.ioctlPtr(name, buf);
    return codec.decode(buf);
  }
}
