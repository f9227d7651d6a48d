/**
 * A VM fd: memory slots, the in-kernel irqchip and PIT, IRQ lines, the VM
 * clock, the dirty log and vCPU creation, each one method with a typed
 * result.
 */
import { traceEvent } from '../../trace/control.js';
import { addressOf } from './ffi.js';
import type { KvmIoctlName } from './ioctls.js';
import { closeFd, KvmFd } from './kvm-fd.js';
import { KVM_COALESCED_MMIO_ZONE } from './structs/coalesced-mmio.js';
import {
  KVM_CLOCK_DATA,
  KVM_DIRTY_LOG,
  KVM_ENABLE_CAP_STRUCT,
  KVM_IRQ_LEVEL,
  KVM_IRQCHIP,
  KVM_PIT_CONFIG,
  KVM_PIT_STATE2,
  KVM_USERSPACE_MEMORY_REGION,
  type KvmClockData,
  type KvmIrqchip,
  type KvmPitConfig,
  type KvmPitState2,
  type KvmUserspaceMemoryRegion,
} from './structs/vm.js';
import { KvmVcpu } from './vcpu.js';

/** What KVM_SET_CLOCK needs: the clock, and optionally flags and realtime. */
export type KvmClockSetting = Pick<KvmClockData, 'clock'> & Partial<KvmClockData>;

/** Options for {@link KvmVm}. */
export interface KvmVmOptions {
  /** KVM_GET_VCPU_MMAP_SIZE, needed by createVcpuHandle(). */
  vcpuMmapSize?: number;
}

const traceVmIoctl = traceEvent('kvm_vm_ioctl');

/** A KVM virtual machine. Every ioctl on it is traced as `kvm_vm_ioctl type= ret=`. */
export class KvmVm extends KvmFd {
  /** KVM_GET_VCPU_MMAP_SIZE of the system that made this VM, if known. */
  readonly vcpuMmapSize: number | undefined;

  /** Takes ownership of VM fd `fd` (from Kvm.createVm or a worker's postMessage). */
  constructor(fd: number, options: KvmVmOptions = {}) {
    super(fd, `VM fd ${fd}`);
    this.vcpuMmapSize = options.vcpuMmapSize;
  }

  protected override traceIoctl(name: KvmIoctlName, ret: number): void {
    if (traceVmIoctl.enabled) traceVmIoctl.emit({ type: name, ret });
  }

  /** KVM_CHECK_EXTENSION on the VM fd (the answer may differ per VM): 0 = absent. */
  checkExtension(cap: number): number {
    return this.ioctlInt('KVM_CHECK_EXTENSION', cap);
  }

  /** KVM_SET_USER_MEMORY_REGION: create, move, resize or (memorySize 0) delete a slot. */
  setUserMemoryRegion(region: KvmUserspaceMemoryRegion): void {
    this.ioctlPtr('KVM_SET_USER_MEMORY_REGION', KVM_USERSPACE_MEMORY_REGION.encode(region));
  }

  /** KVM_SET_TSS_ADDR: three pages of guest-physical space Intel VMX needs for real mode. */
  setTssAddr(addr: number): void {
    this.ioctlInt('KVM_SET_TSS_ADDR', addr);
  }

  /** KVM_SET_IDENTITY_MAP_ADDR: one page of guest-physical space for the EPT identity map. */
  setIdentityMapAddr(addr: bigint): void {
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64LE(addr);
    this.ioctlPtr('KVM_SET_IDENTITY_MAP_ADDR', buf);
  }

  /** KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and local APICs. */
  createIrqchip(): void {
    this.ioctlInt('KVM_CREATE_IRQCHIP');
  }

  /** KVM_CREATE_PIT2: in-kernel i8254 timer. */
  createPit2(config: KvmPitConfig = { flags: 0 }): void {
    this.ioctlPtr('KVM_CREATE_PIT2', KVM_PIT_CONFIG.encode(config));
  }

  /** KVM_GET_IRQCHIP for chip `chipId` (KVM_IRQCHIP_PIC_MASTER...). */
  getIrqchip(chipId: number): KvmIrqchip {
    const buf = KVM_IRQCHIP.encode({ chipId, chip: new Uint8Array(512) });
    this.ioctlPtr('KVM_GET_IRQCHIP', buf);
    return KVM_IRQCHIP.decode(buf);
  }

  /** KVM_SET_IRQCHIP. */
  setIrqchip(chip: KvmIrqchip): void {
    this.ioctlPtr('KVM_SET_IRQCHIP', KVM_IRQCHIP.encode(chip));
  }

  /** KVM_GET_PIT2. */
  getPit2(): KvmPitState2 {
    const buf = Buffer.alloc(KVM_PIT_STATE2.size);
    this.ioctlPtr('KVM_GET_PIT2', buf);
    return KVM_PIT_STATE2.decode(buf);
  }

  /** KVM_SET_PIT2. */
  setPit2(state: KvmPitState2): void {
    this.ioctlPtr('KVM_SET_PIT2', KVM_PIT_STATE2.encode(state));
  }

  /**
   * KVM_REGISTER_COALESCED_MMIO for ports `port`..`port + length - 1`:
   * KVM queues the guest's writes there in the coalesced ring instead of
   * exiting for each (KVM_CAP_COALESCED_PIO).
   */
  registerCoalescedPio(port: number, length: number): void {
    this.ioctlPtr(
      'KVM_REGISTER_COALESCED_MMIO',
      KVM_COALESCED_MMIO_ZONE.encode({ addr: BigInt(port), size: length, pio: 1 }),
    );
  }

  /** KVM_IRQ_LINE: drive GSI `irq` to `level` (0 or 1). */
  irqLine(irq: number, level: number): void {
    this.ioctlPtr('KVM_IRQ_LINE', KVM_IRQ_LEVEL.encode({ irq, level }));
  }

  /**
   * KVM_IRQ_LINE_STATUS: like irqLine, and returns the delivery status
   * (> 0 delivered to that many, 0 coalesced, < 0 masked or failed).
   */
  irqLineStatus(irq: number, level: number): number {
    const buf = KVM_IRQ_LEVEL.encode({ irq, level });
    this.ioctlPtr('KVM_IRQ_LINE_STATUS', buf);
    return buf.readInt32LE(0);
  }

  /** KVM_GET_CLOCK: kvmclock now, with host realtime and TSC when flags say so. */
  getClock(): KvmClockData {
    const buf = Buffer.alloc(KVM_CLOCK_DATA.size);
    this.ioctlPtr('KVM_GET_CLOCK', buf);
    return KVM_CLOCK_DATA.decode(buf);
  }

  /**
   * KVM_SET_CLOCK. With flags 0 the clock is set to `clock` exactly; with
   * KVM_CLOCK_REALTIME KVM adds the realtime elapsed since `realtime`.
   */
  setClock(setting: KvmClockSetting): void {
    const data: KvmClockData = {
      clock: setting.clock,
      flags: setting.flags ?? 0,
      realtime: setting.realtime ?? 0n,
      hostTsc: setting.hostTsc ?? 0n,
    };
    this.ioctlPtr('KVM_SET_CLOCK', KVM_CLOCK_DATA.encode(data));
  }

  /**
   * KVM_GET_DIRTY_LOG for memory slot `slot` of `pages` pages (the slot
   * must have KVM_MEM_LOG_DIRTY_PAGES). Returns the bitmap, one bit per
   * page (bit i of byte j = page 8j+i), and KVM clears it for the next call.
   */
  getDirtyLog(slot: number, pages: number): Uint8Array {
    // KVM writes whole 64-bit words: round the bitmap up to one.
    const bitmap = Buffer.alloc(Math.ceil(pages / 64) * 8);
    const arg = KVM_DIRTY_LOG.encode({ slot, dirtyBitmap: addressOf(bitmap) });
    this.ioctlPtr('KVM_GET_DIRTY_LOG', arg);
    return new Uint8Array(bitmap);
  }

  /** KVM_ENABLE_CAP on the VM (needs KVM_CAP_ENABLE_CAP_VM). */
  enableCap(cap: number, args: readonly bigint[] = [], flags = 0): void {
    const padded = [...args, 0n, 0n, 0n, 0n].slice(0, 4);
    this.ioctlPtr('KVM_ENABLE_CAP', KVM_ENABLE_CAP_STRUCT.encode({ cap, flags, args: padded }));
  }

  /**
   * KVM_CREATE_VCPU: returns the new vCPU's fd number. Pass it (and
   * vcpuMmapSize) to `new KvmVcpu(fd, size)` on the thread that will run it.
   */
  createVcpu(id: number): number {
    return this.ioctlInt('KVM_CREATE_VCPU', id);
  }

  /**
   * createVcpu(id) wrapped in a KvmVcpu on this thread. `runMmapSize`
   * defaults to the size given when the VM was made by Kvm.createVm(). The
   * handle's trace records carry `cpu=<id>` (tsvmm's vCPU ids are the
   * cpu indexes).
   */
  createVcpuHandle(id: number, runMmapSize = this.vcpuMmapSize): KvmVcpu {
    if (runMmapSize === undefined) {
      throw new RangeError(
        'createVcpuHandle: the kvm_run mapping size is unknown; pass Kvm.getVcpuMmapSize()',
      );
    }
    const fd = this.createVcpu(id);
    try {
      return new KvmVcpu(fd, runMmapSize, { index: id });
    } catch (error) {
      closeFd(fd, `vCPU fd ${fd}`);
      throw error;
    }
  }
}
