/**
 * struct kvm_run: the page KVM shares with each vCPU thread (mmap of the
 * vCPU fd). Only the header and the exit payloads a monitor reads are
 * described, as byte offsets plus small readers over the mapped bytes. The
 * readers allocate nothing on the hot path (exit reason, port I/O fields).
 */
import { KvmClosedError, KvmStructError } from '../errors.js';

/** A field of kvm_run: byte offset, size, and its C member path. */
export interface KvmRunField {
  offset: number;
  size: number;
  c: string;
}

/** The kvm_run fields read or written by tsvmm (checked against linux/kvm.h by a test). */
export const KVM_RUN_FIELDS = {
  requestInterruptWindow: { offset: 0, size: 1, c: 'request_interrupt_window' },
  immediateExit: { offset: 1, size: 1, c: 'immediate_exit' },
  exitReason: { offset: 8, size: 4, c: 'exit_reason' },
  readyForInterruptInjection: { offset: 12, size: 1, c: 'ready_for_interrupt_injection' },
  ifFlag: { offset: 13, size: 1, c: 'if_flag' },
  flags: { offset: 14, size: 2, c: 'flags' },
  cr8: { offset: 16, size: 8, c: 'cr8' },
  apicBase: { offset: 24, size: 8, c: 'apic_base' },
  hwHardwareExitReason: { offset: 32, size: 8, c: 'hw.hardware_exit_reason' },
  failEntryReason: { offset: 32, size: 8, c: 'fail_entry.hardware_entry_failure_reason' },
  failEntryCpu: { offset: 40, size: 4, c: 'fail_entry.cpu' },
  exException: { offset: 32, size: 4, c: 'ex.exception' },
  exErrorCode: { offset: 36, size: 4, c: 'ex.error_code' },
  ioDirection: { offset: 32, size: 1, c: 'io.direction' },
  ioSize: { offset: 33, size: 1, c: 'io.size' },
  ioPort: { offset: 34, size: 2, c: 'io.port' },
  ioCount: { offset: 36, size: 4, c: 'io.count' },
  ioDataOffset: { offset: 40, size: 8, c: 'io.data_offset' },
  mmioPhysAddr: { offset: 32, size: 8, c: 'mmio.phys_addr' },
  mmioData: { offset: 40, size: 8, c: 'mmio.data' },
  mmioLen: { offset: 48, size: 4, c: 'mmio.len' },
  mmioIsWrite: { offset: 52, size: 1, c: 'mmio.is_write' },
  internalSuberror: { offset: 32, size: 4, c: 'internal.suberror' },
  internalNdata: { offset: 36, size: 4, c: 'internal.ndata' },
  internalData: { offset: 40, size: 128, c: 'internal.data' },
  systemEventType: { offset: 32, size: 4, c: 'system_event.type' },
  systemEventNdata: { offset: 36, size: 4, c: 'system_event.ndata' },
  systemEventData: { offset: 40, size: 128, c: 'system_event.data' },
  kvmValidRegs: { offset: 288, size: 8, c: 'kvm_valid_regs' },
  kvmDirtyRegs: { offset: 296, size: 8, c: 'kvm_dirty_regs' },
} as const satisfies Record<string, KvmRunField>;

/** Byte offsets of {@link KVM_RUN_FIELDS}, for code that reads the page directly. */
export const KvmRunOffset = Object.fromEntries(
  Object.entries(KVM_RUN_FIELDS).map(([name, field]) => [name, field.offset]),
) as { readonly [K in keyof typeof KVM_RUN_FIELDS]: number };

/** sizeof(struct kvm_run) on x86_64; the mapping is larger (KVM_GET_VCPU_MMAP_SIZE). */
export const KVM_RUN_SIZE = 2352;

/** kvm_run.io.direction values. */
export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

/** The port I/O exit payload (KVM_EXIT_IO). */
export interface KvmRunIo {
  direction: number;
  /** Bytes per access: 1, 2 or 4. */
  size: number;
  port: number;
  /** Number of accesses (more than 1 for rep ins/outs). */
  count: number;
  /** Offset of the data from the start of the kvm_run mapping. */
  dataOffset: number;
}

/** The MMIO exit payload (KVM_EXIT_MMIO). */
export interface KvmRunMmio {
  physAddr: bigint;
  /** The 8 data bytes inside the mapping: write the result here for a read. */
  data: Uint8Array;
  len: number;
  isWrite: boolean;
}

/** The payload of KVM_EXIT_INTERNAL_ERROR. */
export interface KvmRunInternalError {
  suberror: number;
  ndata: number;
  data: bigint[];
}

/** The payload of KVM_EXIT_SYSTEM_EVENT. */
export interface KvmRunSystemEvent {
  /** KVM_SYSTEM_EVENT_*. */
  type: number;
  ndata: number;
  data: bigint[];
}

/** The payload of KVM_EXIT_FAIL_ENTRY. */
export interface KvmRunFailEntry {
  hardwareEntryFailureReason: bigint;
  cpu: number;
}

/**
 * Typed access to a vCPU's kvm_run mapping. The bytes are the mapping
 * itself: after the vCPU is closed and the page unmapped any access would
 * crash the process, so {@link detach} is called first and later reads
 * throw KvmClosedError.
 */
export class KvmRun {
  #bytes: Uint8Array;
  #view: DataView;
  #attached = true;

  /** `bytes` is the whole kvm_run mapping (or a Buffer laid out like one, in tests). */
  constructor(bytes: Uint8Array) {
    if (bytes.byteLength < KVM_RUN_SIZE) {
      throw new KvmStructError(
        `kvm_run needs at least ${KVM_RUN_SIZE} bytes, got ${bytes.byteLength}`,
      );
    }
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** The mapping as bytes. Do not keep it past the vCPU's close(). */
  get bytes(): Uint8Array {
    this.check();
    return this.#bytes;
  }

  /** Why the last KVM_RUN returned (KVM_EXIT_*). */
  get exitReason(): number {
    this.check();
    return this.#view.getUint32(KVM_RUN_FIELDS.exitReason.offset, true);
  }

  /** Set to 1 to make the next KVM_RUN return at once with EINTR. */
  get immediateExit(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.immediateExit.offset);
  }
  set immediateExit(value: number) {
    this.check();
    this.#view.setUint8(KVM_RUN_FIELDS.immediateExit.offset, value);
  }

  /** Set to 1 to get KVM_EXIT_IRQ_WINDOW_OPEN when the guest can take an interrupt. */
  get requestInterruptWindow(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.requestInterruptWindow.offset);
  }
  set requestInterruptWindow(value: number) {
    this.check();
    this.#view.setUint8(KVM_RUN_FIELDS.requestInterruptWindow.offset, value);
  }

  get readyForInterruptInjection(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.readyForInterruptInjection.offset);
  }

  get ifFlag(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.ifFlag.offset);
  }

  /** KVM_RUN_X86_SMM and friends. */
  get flags(): number {
    this.check();
    return this.#view.getUint16(KVM_RUN_FIELDS.flags.offset, true);
  }

  get cr8(): bigint {
    this.check();
    return this.#view.getBigUint64(KVM_RUN_FIELDS.cr8.offset, true);
  }

  get apicBase(): bigint {
    this.check();
    return this.#view.getBigUint64(KVM_RUN_FIELDS.apicBase.offset, true);
  }

  /** io.direction: KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT. */
  get ioDirection(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.ioDirection.offset);
  }

  get ioSize(): number {
    this.check();
    return this.#view.getUint8(KVM_RUN_FIELDS.ioSize.offset);
  }

  get ioPort(): number {
    this.check();
    return this.#view.getUint16(KVM_RUN_FIELDS.ioPort.offset, true);
  }

  get ioCount(): number {
    this.check();
    return this.#view.getUint32(KVM_RUN_FIELDS.ioCount.offset, true);
  }

  /**
   * io.data_offset. A u64 in C, but always inside the small mapping, so
   * only its low half is read: a number, no BigInt on the hot path.
   */
  get ioDataOffset(): number {
    this.check();
    return this.#view.getUint32(KVM_RUN_FIELDS.ioDataOffset.offset, true);
  }

  /** The whole port I/O payload as one object. */
  io(): KvmRunIo {
    return {
      direction: this.ioDirection,
      size: this.ioSize,
      port: this.ioPort,
      count: this.ioCount,
      dataOffset: this.ioDataOffset,
    };
  }

  /**
   * The port I/O data (size × count bytes) inside the mapping, without a
   * copy: read it for an OUT, fill it for an IN.
   */
  ioData(): Uint8Array {
    const start = this.ioDataOffset;
    const end = start + this.ioSize * this.ioCount;
    if (end > this.#bytes.byteLength) {
      throw new KvmStructError(
        `kvm_run io data ${start}..${end} lies outside the ${this.#bytes.byteLength}-byte mapping`,
      );
    }
    return this.#bytes.subarray(start, end);
  }

  /** The MMIO payload; `data` is inside the mapping. */
  mmio(): KvmRunMmio {
    this.check();
    const f = KVM_RUN_FIELDS;
    return {
      physAddr: this.#view.getBigUint64(f.mmioPhysAddr.offset, true),
      data: this.#bytes.subarray(f.mmioData.offset, f.mmioData.offset + 8),
      len: this.#view.getUint32(f.mmioLen.offset, true),
      isWrite: this.#view.getUint8(f.mmioIsWrite.offset) !== 0,
    };
  }

  /** The KVM_EXIT_INTERNAL_ERROR payload (at most 16 data words). */
  internalError(): KvmRunInternalError {
    this.check();
    const f = KVM_RUN_FIELDS;
    const ndata = this.#view.getUint32(f.internalNdata.offset, true);
    return {
      suberror: this.#view.getUint32(f.internalSuberror.offset, true),
      ndata,
      data: this.words(f.internalData.offset, Math.min(ndata, 16)),
    };
  }

  /** The KVM_EXIT_SYSTEM_EVENT payload (at most 16 data words). */
  systemEvent(): KvmRunSystemEvent {
    this.check();
    const f = KVM_RUN_FIELDS;
    const ndata = this.#view.getUint32(f.systemEventNdata.offset, true);
    return {
      type: this.#view.getUint32(f.systemEventType.offset, true),
      ndata,
      data: this.words(f.systemEventData.offset, Math.min(ndata, 16)),
    };
  }

  /** The KVM_EXIT_FAIL_ENTRY payload. */
  failEntry(): KvmRunFailEntry {
    this.check();
    const f = KVM_RUN_FIELDS;
    return {
      hardwareEntryFailureReason: this.#view.getBigUint64(f.failEntryReason.offset, true),
      cpu: this.#view.getUint32(f.failEntryCpu.offset, true),
    };
  }

  /** hw.hardware_exit_reason, for KVM_EXIT_UNKNOWN. */
  hardwareExitReason(): bigint {
    this.check();
    return this.#view.getBigUint64(KVM_RUN_FIELDS.hwHardwareExitReason.offset, true);
  }

  /**
   * Forget the mapping; every later access throws. Called by the vCPU
   * before it unmaps the page.
   */
  detach(): void {
    this.#attached = false;
    this.#bytes = new Uint8Array(0);
    this.#view = new DataView(this.#bytes.buffer);
  }

  private words(offset: number, n: number): bigint[] {
    return Array.from({ length: n }, (_, i) => this.#view.getBigUint64(offset + 8 * i, true));
  }

  private check(): void {
    if (!this.#attached) throw new KvmClosedError('kvm_run of a closed vCPU');
  }
}
