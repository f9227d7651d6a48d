/**
 * The coalesced I/O ring: the page of the vCPU mapping where KVM queues
 * the writes to registered zones (KVM_REGISTER_COALESCED_MMIO) instead of
 * leaving KVM_RUN for each. One ring serves the whole VM; every vCPU fd
 * maps the same page. KVM is the only producer (it advances `last`);
 * userspace takes entries from `first`, and must take them in order, and
 * before it handles any other access to the same device, so that a read
 * never overtakes a write the guest made before it. Several threads
 * consume it, so the caller serialises {@link CoalescedRing.drain}.
 */
import { KvmStructError, SyscallError } from './errors.js';
import {
  lastErrno,
  MAP_FAILED,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
  sysMmap,
  sysMunmap,
  viewNative,
} from './ffi.js';
import {
  KVM_COALESCED_MMIO_MAX,
  KVM_COALESCED_MMIO_RING_HEADER_SIZE,
  KVM_COALESCED_MMIO_SIZE,
  KVM_COALESCED_RING_BYTES,
} from './structs/coalesced-mmio.js';

const FIRST = 0;
const LAST = 4;
const ENTRY_LEN = 8;
const ENTRY_PIO = 12;
const ENTRY_DATA = 16;

/** Receives one queued write: `data` is a view of the ring, valid only during the call. */
export type CoalescedWriteHandler = (addr: number, pio: boolean, data: Uint8Array) => void;

/** Typed access to one mapped ring page (or a buffer laid out like one, in tests). */
export class CoalescedRing {
  #bytes: Uint8Array;
  #view: DataView;

  constructor(bytes: Uint8Array) {
    if (bytes.byteLength < KVM_COALESCED_RING_BYTES) {
      throw new KvmStructError(
        `the coalesced ring needs ${KVM_COALESCED_RING_BYTES} bytes, got ${bytes.byteLength}`,
      );
    }
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, KVM_COALESCED_RING_BYTES);
  }

  /** Whether KVM queued writes not taken yet. */
  get pending(): boolean {
    return this.#view.getUint32(FIRST, true) !== this.#view.getUint32(LAST, true);
  }

  /**
   * Hands every queued write to `take`, oldest first, freeing each slot
   * after its call. Returns how many were taken. An index outside the ring
   * (a corrupt page) is a KvmStructError, never a read out of bounds.
   */
  drain(take: CoalescedWriteHandler): number {
    const v = this.#view;
    let first = v.getUint32(FIRST, true);
    const last = v.getUint32(LAST, true);
    if (first >= KVM_COALESCED_MMIO_MAX || last >= KVM_COALESCED_MMIO_MAX) {
      throw new KvmStructError(
        `coalesced ring indices first=${first} last=${last} outside 0..${KVM_COALESCED_MMIO_MAX - 1}`,
      );
    }
    let taken = 0;
    while (first !== last) {
      const entry = KVM_COALESCED_MMIO_RING_HEADER_SIZE + first * KVM_COALESCED_MMIO_SIZE;
      const addr = v.getUint32(entry, true) + v.getUint32(entry + 4, true) * 2 ** 32;
      const len = Math.min(v.getUint32(entry + ENTRY_LEN, true), 8);
      const pio = v.getUint32(entry + ENTRY_PIO, true) !== 0;
      const dataStart = entry + ENTRY_DATA;
      take(addr, pio, this.#bytes.subarray(dataStart, dataStart + len));
      first = (first + 1) % KVM_COALESCED_MMIO_MAX;
      v.setUint32(FIRST, first, true);
      taken++;
    }
    return taken;
  }

  /** Forgets the page before it is unmapped: from then on the ring reads as empty. */
  detach(): void {
    this.#bytes = new Uint8Array(KVM_COALESCED_RING_BYTES);
    this.#view = new DataView(this.#bytes.buffer);
  }
}

/** A ring mapped on its own from a vCPU fd (for a thread that has no kvm_run mapping). */
export interface MappedCoalescedRing {
  readonly ring: CoalescedRing;
  /** Unmaps the page; the ring must not be used afterwards. */
  unmap(): void;
}

/**
 * Maps the ring page of vCPU fd `vcpuFd`, found at `pageOffset` pages into
 * the vCPU mapping (what KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns).
 */
export function mapCoalescedRing(vcpuFd: number, pageOffset: number): MappedCoalescedRing {
  const ptr = sysMmap(
    null,
    KVM_COALESCED_RING_BYTES,
    PROT_READ | PROT_WRITE,
    MAP_SHARED,
    vcpuFd,
    pageOffset * KVM_COALESCED_RING_BYTES,
  );
  if (ptr === MAP_FAILED) throw new SyscallError('mmap(coalesced ring)', lastErrno());
  const ring = new CoalescedRing(viewNative(ptr, KVM_COALESCED_RING_BYTES));
  let mapped = true;
  return {
    ring,
    unmap: () => {
      if (!mapped) return;
      mapped = false;
      ring.detach();
      sysMunmap(ptr, KVM_COALESCED_RING_BYTES);
    },
  };
}
