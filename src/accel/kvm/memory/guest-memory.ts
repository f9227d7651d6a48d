/**
 * Guest RAM: one anonymous host mapping, cut into KVM memory slots by a
 * layout (QEMU's pc split around the PCI hole by default), with bounds-
 * checked reads and writes by guest-physical address.
 *
 * Native views of the mapping are made in pieces of at most 1 GiB, because
 * koffi aborts the process for a view above 4 GiB. Each slot keeps its host
 * address (a bigint) so another thread (a vCPU worker, the migration
 * thread) can make its own views: koffi views cannot be posted.
 */
import { Errno, errnoName } from '../errno.js';
import {
  copyToNative,
  fillNative,
  isZeroNative,
  lastErrno,
  MADV_DONTFORK,
  MADV_HUGEPAGE,
  MADV_POPULATE_WRITE,
  MAP_ANONYMOUS,
  MAP_FAILED,
  MAP_FIXED,
  MAP_NORESERVE,
  MAP_PRIVATE,
  PROT_READ,
  PROT_WRITE,
  sysMadvise,
  sysMmap,
  sysMunmap,
  viewNative,
} from '../ffi.js';
import { KVM_MEM_LOG_DIRTY_PAGES } from '../structs/vm.js';
import type { KvmVm } from '../vm.js';
import {
  GuestMemoryAllocError,
  GuestMemoryClosedError,
  GuestMemoryError,
  GuestMemoryMapFileError,
  InvalidMemorySizeError,
} from './errors.js';
import { flatRamLayout, pcRamLayout, type RamRegion } from './layout.js';
import { MAX_MEMORY_SIZE } from './parse-size.js';

/** Host page size; every slot starts and ends on one. */
export const PAGE_SIZE = 4096;
/** A transparent huge page, and the alignment of guest RAM in the host. */
const HUGE_PAGE_SIZE = 2 * 1024 * 1024;

/** Largest native view made at once. */
export const VIEW_CHUNK_BYTES = 2 ** 30;

/** One KVM memory slot of guest RAM. */
export interface GuestMemorySlot {
  /** KVM slot number used by register(). */
  readonly slot: number;
  /** Guest-physical start. */
  readonly gpa: number;
  /** Length in bytes. */
  readonly size: number;
  /** Host virtual address of the slot's first byte. */
  readonly hostAddr: bigint;
  /** Offset of the slot inside the RAM mapping (for saving RAM in order). */
  readonly hostOffset: number;
}

/** Options for {@link GuestMemory.create}. */
export interface GuestMemoryOptions {
  /** `pc` (default): split around the PCI hole from 3.5 GiB; `flat`: one slot at 0. */
  layout?: 'pc' | 'flat';
  /** KVM slot number of the first slot; the others follow. Default 0. */
  firstSlot?: number;
  /**
   * Fault every page in before the guest runs (QEMU's -mem-prealloc): the
   * memory is known to be there, the guest never waits on a first-touch
   * fault, and the host's second-level page tables never change under a
   * running guest for a page's first write.
   */
  prealloc?: boolean;
}

/** Options for {@link GuestMemory.register}. */
export interface GuestMemoryRegisterOptions {
  /** Ask KVM to log dirty pages (for live migration). */
  logDirty?: boolean;
}

interface SlotState extends GuestMemorySlot {
  readonly end: number;
  // Lazily made views, one per VIEW_CHUNK_BYTES of the slot.
  readonly chunks: (Uint8Array | undefined)[];
  readonly dataViews: (DataView | undefined)[];
}

/** Guest RAM, mapped in this process. */
export class GuestMemory {
  /** Total RAM in bytes. */
  readonly size: number;
  /** The slots in guest-physical order. */
  readonly slots: readonly GuestMemorySlot[];
  readonly #base: bigint;
  readonly #slots: SlotState[];
  #closed = false;
  #fileBacked = false;

  private constructor(base: bigint, size: number, regions: RamRegion[], firstSlot: number) {
    this.#base = base;
    this.size = size;
    this.#slots = regions.map((region, i) => {
      const chunkCount = Math.ceil(region.size / VIEW_CHUNK_BYTES);
      return {
        slot: firstSlot + i,
        gpa: region.gpa,
        size: region.size,
        hostAddr: base + BigInt(region.hostOffset),
        hostOffset: region.hostOffset,
        end: region.gpa + region.size,
        chunks: new Array<Uint8Array | undefined>(chunkCount),
        dataViews: new Array<DataView | undefined>(chunkCount),
      };
    });
    this.slots = this.#slots.map(({ slot, gpa, size: len, hostAddr, hostOffset }) =>
      Object.freeze({ slot, gpa, size: len, hostAddr, hostOffset }),
    );
  }

  /**
   * Maps `size` bytes of zeroed, private, anonymous RAM (no swap reserved:
   * pages are only taken when touched) and lays it out in slots.
   */
  static create(size: number, options: GuestMemoryOptions = {}): GuestMemory {
    if (
      !Number.isSafeInteger(size) ||
      size <= 0 ||
      size % PAGE_SIZE !== 0 ||
      size > MAX_MEMORY_SIZE
    ) {
      throw new InvalidMemorySizeError(
        `guest RAM of ${size} bytes: the size must be a positive multiple of ${PAGE_SIZE} up to 1 TiB`,
      );
    }
    const regions = options.layout === 'flat' ? flatRamLayout(size) : pcRamLayout(size);
    // 2 MiB aligned, as QEMU aligns RAM: a transparent huge page needs an
    // aligned host address, and KVM maps a guest 2 MiB page with one large
    // entry only when host and guest addresses agree modulo 2 MiB. Kernels
    // before 6.7 align only what is asked, so map 2 MiB more and give back
    // the ends.
    const reserved = sysMmap(
      null,
      size + HUGE_PAGE_SIZE,
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
      -1,
      0,
    );
    if (reserved === MAP_FAILED) {
      const errno = lastErrno();
      throw new GuestMemoryAllocError(size, errno, errnoName(errno));
    }
    const align = BigInt(HUGE_PAGE_SIZE);
    const base = (reserved + align - 1n) & ~(align - 1n);
    const head = Number(base - reserved);
    const tail = HUGE_PAGE_SIZE - head;
    if (head > 0) sysMunmap(reserved, head);
    if (tail > 0) sysMunmap(base + BigInt(size), tail);
    // Like QEMU: a forked child (child_process uses fork) must not share or
    // copy guest RAM. Only advice, so a failure changes nothing.
    sysMadvise(base, size, MADV_DONTFORK);
    // Transparent huge pages where the host allows them (THP "madvise"
    // mode): fewer page faults when the guest or a migration touches RAM
    // first (measured here: 256 MiB in 22 ms rather than 830 ms), and
    // larger mappings in KVM's page tables. Also only advice.
    sysMadvise(base, size, MADV_HUGEPAGE);
    const memory = new GuestMemory(base, size, regions, options.firstSlot ?? 0);
    if (options.prealloc) memory.prealloc();
    return memory;
  }

  /**
   * Faults every page in, writable: MADV_POPULATE_WRITE where the kernel has
   * it (5.14), else a write of zero to each page (the mapping is zeroed
   * anonymous memory, so the write changes nothing). A failure unmaps the
   * RAM and says why: the guest would not have had it.
   */
  private prealloc(): void {
    if (sysMadvise(this.#base, this.size, MADV_POPULATE_WRITE) === 0) return;
    const errno = lastErrno();
    if (errno !== Errno.EINVAL) {
      this.close();
      throw new GuestMemoryAllocError(this.size, errno, errnoName(errno), 'preallocate');
    }
    for (let start = 0; start < this.size; start += VIEW_CHUNK_BYTES) {
      const piece = viewNative(
        this.#base + BigInt(start),
        Math.min(VIEW_CHUNK_BYTES, this.size - start),
      );
      for (let offset = 0; offset < piece.byteLength; offset += PAGE_SIZE) piece[offset] = 0;
    }
  }

  /** Host address of the whole RAM mapping. */
  get hostAddr(): bigint {
    this.check();
    return this.#base;
  }

  /** Whether close() has been called. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Whether RAM is (partly) a private mapping of a file
   * ({@link mapFilePrivate}): a page it has not faulted in is then not
   * zero, so pagemap cannot tell zero pages.
   */
  get fileBacked(): boolean {
    return this.#fileBacked;
  }

  /**
   * Maps `length` bytes of the open file `fd` from `fileOffset` over guest
   * RAM from byte `ramOffset` of the mapping (QEMU's RAM block offset),
   * with mmap(MAP_PRIVATE | MAP_FIXED) at the same host addresses: pages
   * fault in from the page cache on first touch, a write (by the guest or
   * the host) goes to a private copy and never to the file, and a hole in
   * the file reads as zero. Views made before stay valid (same
   * addresses). The file may be closed afterwards; it must not shrink
   * while mapped (a page past its end would fault with SIGBUS), which the
   * caller checks. KVM follows a host mapping that changes under a
   * registered slot (its MMU notifier drops what it had mapped), but
   * callers that can should unregister the slots first and register them
   * again afterwards.
   */
  mapFilePrivate(fd: number, fileOffset: number, ramOffset = 0, length = this.size): void {
    this.check();
    if (
      !Number.isSafeInteger(fileOffset) ||
      fileOffset < 0 ||
      fileOffset % PAGE_SIZE !== 0 ||
      ramOffset % PAGE_SIZE !== 0 ||
      length % PAGE_SIZE !== 0 ||
      ramOffset < 0 ||
      length <= 0 ||
      ramOffset + length > this.size
    ) {
      throw new GuestMemoryMapFileError(
        `cannot map ${length} bytes of a file at offset ${fileOffset} over guest RAM at ${ramOffset}: ` +
          `offsets and length must be page aligned and within the ${this.size} bytes of RAM`,
        0,
      );
    }
    const at = this.#base + BigInt(ramOffset);
    // From here the range may no longer hold the old pages, even if the
    // call fails (mmap with MAP_FIXED unmaps first).
    this.#fileBacked = true;
    const got = sysMmap(
      at,
      length,
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE,
      fd,
      fileOffset,
    );
    if (got !== at) {
      const errno = lastErrno();
      throw new GuestMemoryMapFileError(
        `cannot map the saved RAM file (fd ${fd}, offset ${fileOffset}, ${length} bytes) over guest RAM ` +
          `(${errnoName(errno)}); this VM's RAM is now unusable: do not run it`,
        errno,
      );
    }
    // As create() does for the anonymous mapping (only advice).
    sysMadvise(at, length, MADV_DONTFORK);
  }

  /** Registers every slot with `vm` (KVM_SET_USER_MEMORY_REGION). */
  register(vm: KvmVm, options: GuestMemoryRegisterOptions = {}): void {
    this.check();
    const flags = options.logDirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
    for (const slot of this.#slots) {
      vm.setUserMemoryRegion({
        slot: slot.slot,
        flags,
        guestPhysAddr: BigInt(slot.gpa),
        memorySize: BigInt(slot.size),
        userspaceAddr: slot.hostAddr,
      });
    }
  }

  /** Removes every slot from `vm` (memory size 0), so RAM can be closed while the VM lives. */
  unregister(vm: KvmVm): void {
    this.check();
    for (const slot of this.#slots) {
      vm.setUserMemoryRegion({
        slot: slot.slot,
        flags: 0,
        guestPhysAddr: BigInt(slot.gpa),
        memorySize: 0n,
        userspaceAddr: slot.hostAddr,
      });
    }
  }

  /** The slot holding guest-physical `gpa`, or undefined if it is not RAM. */
  slotAt(gpa: number | bigint): GuestMemorySlot | undefined {
    this.check();
    const addr = toAddress(gpa);
    const index = this.#slots.findIndex((s) => addr >= s.gpa && addr < s.end);
    return index < 0 ? undefined : this.slots[index];
  }

  /** Host virtual address of guest-physical `gpa` (for a view made on another thread). */
  hostAddress(gpa: number | bigint): bigint {
    const [slot, offset] = this.locate(gpa, 1);
    return slot.hostAddr + BigInt(offset);
  }

  /** A copy of `length` bytes at `gpa`. */
  read(gpa: number | bigint, length: number): Uint8Array {
    const [slot, offset] = this.locate(gpa, length);
    const out = new Uint8Array(length);
    this.copy(slot, offset, length, (chunk, from, to, at) => out.set(chunk.subarray(from, to), at));
    return out;
  }

  /** Writes `bytes` at `gpa`. */
  write(gpa: number | bigint, bytes: Uint8Array): void {
    const [slot, offset] = this.locate(gpa, bytes.byteLength);
    if (!this.viewed(slot, offset, bytes.byteLength)) {
      copyToNative(slot.hostAddr + BigInt(offset), bytes);
      return;
    }
    this.copy(slot, offset, bytes.byteLength, (chunk, from, to, at) =>
      chunk.set(bytes.subarray(at, at + (to - from)), from),
    );
  }

  /**
   * Whether `length` bytes at `gpa` are all zero: one native compare a
   * stretch at a time, with or without this thread's views (see `viewed`).
   */
  isZero(gpa: number | bigint, length: number): boolean {
    const [slot, offset] = this.locate(gpa, length);
    return isZeroNative(slot.hostAddr + BigInt(offset), length);
  }

  /** Fills `length` bytes at `gpa` with `value`. */
  fill(gpa: number | bigint, length: number, value = 0): void {
    const [slot, offset] = this.locate(gpa, length);
    if (!this.viewed(slot, offset, length)) {
      fillNative(slot.hostAddr + BigInt(offset), length, value);
      return;
    }
    this.copy(slot, offset, length, (chunk, from, to) => chunk.fill(value, from, to));
  }

  /**
   * `length` bytes at `gpa` without a copy (at most 1 GiB). The view is
   * the guest's RAM: do not use it after close().
   */
  view(gpa: number | bigint, length: number): Uint8Array {
    this.check();
    if (length > VIEW_CHUNK_BYTES) {
      throw new GuestMemoryError(
        toAddress(gpa),
        length,
        'is larger than one view (1 GiB): view it in pieces',
      );
    }
    const [slot, offset] = this.locate(gpa, length);
    if (length === 0) return new Uint8Array(0);
    const index = Math.floor(offset / VIEW_CHUNK_BYTES);
    const inner = offset - index * VIEW_CHUNK_BYTES;
    const chunk = this.chunk(slot, index);
    if (inner + length <= chunk.byteLength) return chunk.subarray(inner, inner + length);
    // Spans two cached pieces: a view of its own, still at most 1 GiB.
    return viewNative(slot.hostAddr + BigInt(offset), length);
  }

  readU8(gpa: number | bigint): number {
    const [dv, at] = this.scalar(gpa, 1);
    return dv ? dv.getUint8(at) : this.read(gpa, 1)[0]!;
  }

  readU16(gpa: number | bigint): number {
    const [dv, at] = this.scalar(gpa, 2);
    return dv ? dv.getUint16(at, true) : bytesView(this.read(gpa, 2)).getUint16(0, true);
  }

  readU32(gpa: number | bigint): number {
    const [dv, at] = this.scalar(gpa, 4);
    return dv ? dv.getUint32(at, true) : bytesView(this.read(gpa, 4)).getUint32(0, true);
  }

  readU64(gpa: number | bigint): bigint {
    const [dv, at] = this.scalar(gpa, 8);
    return dv ? dv.getBigUint64(at, true) : bytesView(this.read(gpa, 8)).getBigUint64(0, true);
  }

  writeU8(gpa: number | bigint, value: number): void {
    const [dv, at] = this.scalar(gpa, 1);
    if (dv) dv.setUint8(at, value);
    else this.write(gpa, Uint8Array.of(value));
  }

  writeU16(gpa: number | bigint, value: number): void {
    const [dv, at] = this.scalar(gpa, 2);
    if (dv) dv.setUint16(at, value, true);
    else this.writeScalar(gpa, 2, (v) => v.setUint16(0, value, true));
  }

  writeU32(gpa: number | bigint, value: number): void {
    const [dv, at] = this.scalar(gpa, 4);
    if (dv) dv.setUint32(at, value, true);
    else this.writeScalar(gpa, 4, (v) => v.setUint32(0, value, true));
  }

  writeU64(gpa: number | bigint, value: bigint): void {
    const [dv, at] = this.scalar(gpa, 8);
    if (dv) dv.setBigUint64(at, value, true);
    else this.writeScalar(gpa, 8, (v) => v.setBigUint64(0, value, true));
  }

  /**
   * Unmaps guest RAM. Every later call throws GuestMemoryClosedError;
   * views handed out before must not be touched (the memory is gone).
   * Unregister the slots or close the VM first.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const slot of this.#slots) {
      slot.chunks.fill(undefined);
      slot.dataViews.fill(undefined);
    }
    sysMunmap(this.#base, this.size);
  }

  private check(): void {
    if (this.#closed) throw new GuestMemoryClosedError();
  }

  /** The slot and offset of an access, or a GuestMemoryError saying why not. */
  private locate(gpa: number | bigint, length: number): [SlotState, number] {
    this.check();
    const addr = toAddress(gpa);
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new GuestMemoryError(addr, length, 'has an invalid length');
    }
    for (const slot of this.#slots) {
      if (addr >= slot.gpa && addr < slot.end) {
        if (addr + length > slot.end) {
          throw new GuestMemoryError(
            addr,
            length,
            `runs past the end of RAM at 0x${slot.end.toString(16)}`,
          );
        }
        return [slot, addr - slot.gpa];
      }
      // An empty access right at the end of a slot is harmless.
      if (length === 0 && addr === slot.end) return [slot, addr - slot.gpa];
    }
    throw new GuestMemoryError(addr, length, `is outside guest RAM (${this.describe()})`);
  }

  private describe(): string {
    return this.#slots
      .map((s) => `0x${s.gpa.toString(16)}-0x${(s.end - 1).toString(16)}`)
      .join(', ');
  }

  /**
   * Whether this thread already has the views over `length` bytes at
   * `offset` in `slot`. Bulk writes go through libc until it has: a view
   * spans up to 1 GiB of guest RAM, and V8 meets a new external buffer
   * that large with a full garbage collection (milliseconds at every
   * start, for the few writes that load a guest).
   */
  private viewed(slot: SlotState, offset: number, length: number): boolean {
    const first = Math.floor(offset / VIEW_CHUNK_BYTES);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / VIEW_CHUNK_BYTES);
    for (let i = first; i <= last; i++) if (!slot.chunks[i]) return false;
    return true;
  }

  private chunk(slot: SlotState, index: number): Uint8Array {
    let chunk = slot.chunks[index];
    if (!chunk) {
      const start = index * VIEW_CHUNK_BYTES;
      const length = Math.min(VIEW_CHUNK_BYTES, slot.size - start);
      chunk = viewNative(slot.hostAddr + BigInt(start), length);
      slot.chunks[index] = chunk;
      slot.dataViews[index] = new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    }
    return chunk;
  }

  // Calls `step` once per cached piece the range [offset, offset+length) touches.
  private copy(
    slot: SlotState,
    offset: number,
    length: number,
    step: (chunk: Uint8Array, from: number, to: number, done: number) => void,
  ): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / VIEW_CHUNK_BYTES);
      const from = pos - index * VIEW_CHUNK_BYTES;
      const chunk = this.chunk(slot, index);
      const to = Math.min(chunk.byteLength, from + (length - done));
      step(chunk, from, to, done);
      done += to - from;
    }
  }

  // A DataView and offset for a scalar that lies within one piece, or
  // [undefined, 0] when it straddles two (then the slow path copies).
  private scalar(gpa: number | bigint, size: number): [DataView | undefined, number] {
    const [slot, offset] = this.locate(gpa, size);
    const index = Math.floor(offset / VIEW_CHUNK_BYTES);
    const inner = offset - index * VIEW_CHUNK_BYTES;
    this.chunk(slot, index);
    const dv = slot.dataViews[index]!;
    return inner + size <= dv.byteLength ? [dv, inner] : [undefined, 0];
  }

  private writeScalar(gpa: number | bigint, size: number, set: (view: DataView) => void): void {
    const bytes = new Uint8Array(size);
    set(bytesView(bytes));
    this.write(gpa, bytes);
  }
}

function toAddress(gpa: number | bigint): number {
  if (typeof gpa === 'bigint') {
    if (gpa < 0n || gpa > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new GuestMemoryError(Number(gpa), 0, 'is not a valid guest-physical address');
    }
    return Number(gpa);
  }
  if (!Number.isSafeInteger(gpa) || gpa < 0) {
    throw new GuestMemoryError(gpa, 0, 'is not a valid guest-physical address');
  }
  return gpa;
}

function bytesView(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
