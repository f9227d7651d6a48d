/**
 * Guest RAM as the migration stream sees it: one RAM block "pc.ram" (as
 * QEMU's pc machine has one RAMBlock of that name, mapped below 4 GiB and,
 * above 3.5 GiB of RAM, again above 4 GiB), whose offsets run through the
 * KVM memory slots in guest-physical order. So a 6 GiB guest is one 6 GiB
 * block whose first 3.5 GiB are slot 0 and the rest slot 1, and the
 * stream's block list does not depend on where the PCI hole is.
 */
import { viewNative } from '../accel/kvm/ffi.js';
import type { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import { type Pagemap, processPagemap } from '../util/pagemap.js';
import { PAGE_SIZE, type RamAccessor, type RamBlock } from './ram.js';

/** The id of the single RAM block. */
export const PC_RAM_BLOCK = 'pc.ram';

/**
 * The GuestMemory methods the adapter uses. Each slot's `hostAddr` must be
 * where `view` reads it in this process's private anonymous memory (as
 * GuestMemory's are), or 0n for memory that is not such a mapping (a test
 * double over buffers): then pages are always read.
 */
export type GuestRam = Pick<GuestMemory, 'slots' | 'view' | 'write'> &
  Partial<Pick<GuestMemory, 'fileBacked' | 'isZero'>>;

/** Options for {@link guestMemoryRam}. */
export interface GuestMemoryRamOptions {
  /**
   * Where to learn which pages were never populated, so that the saver
   * sends them as zero pages without reading (allocating) them. Default:
   * this process's /proc/self/pagemap; null never asks.
   */
  readonly pagemap?: Pagemap | null;
}

interface Piece {
  /** Offset in the block. */
  start: number;
  gpa: number;
  size: number;
  hostAddr: bigint;
}

/**
 * A RamAccessor over guest RAM. Reads are views of guest memory (no copy)
 * unless the range straddles two slots; writes copy in. The block answers
 * unpopulatedPages from pagemap (see {@link GuestMemoryRamOptions}).
 */
export function guestMemoryRam(memory: GuestRam, options: GuestMemoryRamOptions = {}): RamAccessor {
  const pieces: Piece[] = [];
  let total = 0;
  for (const s of [...memory.slots].sort((a, b) => a.gpa - b.gpa)) {
    pieces.push({ start: total, gpa: s.gpa, size: s.size, hostAddr: s.hostAddr });
    total += s.size;
  }
  const mapped = pieces.every(
    (p) => p.hostAddr > 0n && p.hostAddr % BigInt(PAGE_SIZE) === 0n && p.size % PAGE_SIZE === 0,
  );
  const pagemap = options.pagemap === undefined ? processPagemap() : options.pagemap;
  // Each [piece, offset in piece, length] a block range touches.
  const walk = (
    offset: number,
    len: number,
    step: (gpa: number, at: number, n: number) => void,
  ) => {
    if (offset < 0 || len < 0 || offset + len > total) {
      throw new RangeError(
        `RAM block '${PC_RAM_BLOCK}': ${len} bytes at ${offset} run past ${total}`,
      );
    }
    let done = 0;
    for (const p of pieces) {
      if (done === len) break;
      const pos = offset + done;
      if (pos >= p.start + p.size) continue;
      const n = Math.min(len - done, p.start + p.size - pos);
      step(p.gpa + (pos - p.start), done, n);
      done += n;
    }
  };
  // The piece holding [offset, offset + len) whole, if one does: the hot
  // path (a page or a run of pages) needs no walk.
  const within = (offset: number, len: number): Piece | undefined => {
    for (const p of pieces) {
      if (offset >= p.start && offset + len <= p.start + p.size && offset >= 0 && len >= 0) {
        return p;
      }
    }
    return undefined;
  };
  const block: RamBlock = {
    id: PC_RAM_BLOCK,
    size: total,
    read(offset, len) {
      const one = within(offset, len);
      if (one) return memory.view(one.gpa + (offset - one.start), len);
      const parts: [number, number, number][] = [];
      walk(offset, len, (gpa, at, n) => parts.push([gpa, at, n]));
      if (parts.length === 1) return memory.view(parts[0]![0], len);
      const out = new Uint8Array(len);
      for (const [gpa, at, n] of parts) out.set(memory.view(gpa, n), at);
      return out;
    },
    write(offset, bytes) {
      const one = within(offset, bytes.length);
      if (one) {
        memory.write(one.gpa + (offset - one.start), bytes);
        return;
      }
      walk(offset, bytes.length, (gpa, at, n) => memory.write(gpa, bytes.subarray(at, at + n)));
    },
  };
  const isZero = memory.isZero?.bind(memory);
  if (isZero) {
    block.isZero = (offset, len) => {
      let zero = true;
      walk(offset, len, (gpa, _at, n) => {
        zero &&= isZero(gpa, n);
      });
      return zero;
    };
  }
  const result: RamAccessor = { blocks: total > 0 ? [block] : [] };
  if (mapped && (options.pagemap === undefined || options.pagemap === null)) {
    nativeLayouts.set(result, {
      layout: {
        slots: pieces.map(({ gpa, size, hostAddr }) => ({ gpa, size, hostAddr })),
        pagemap: options.pagemap === undefined,
      },
      memory,
    });
  }
  if (pagemap && mapped) {
    block.unpopulatedPages = (firstPage, count) => {
      // RAM mapped from a file (a mapped-ram restore): a page not faulted
      // in is the file's, not zero. Undefined makes the saver read pages.
      if (memory.fileBacked) return undefined;
      const out = new Uint8Array(count);
      let ok = true;
      walk(firstPage * PAGE_SIZE, count * PAGE_SIZE, (gpa, at, n) => {
        if (!ok) return;
        // Throws once the memory is closed: an unmapped range is not zeros.
        memory.view(gpa, 0);
        const piece = pieces.find((p) => gpa >= p.gpa && gpa < p.gpa + p.size)!;
        const map = pagemap.unpopulated(piece.hostAddr + BigInt(gpa - piece.gpa), n / PAGE_SIZE);
        if (map) out.set(map, at / PAGE_SIZE);
        else ok = false;
      });
      return ok ? out : undefined;
    };
  }
  return result;
}

/**
 * Where the RAM of a {@link guestMemoryRam} accessor lies in this process,
 * as plain data another thread can use ({@link nativeGuestRam}).
 */
export interface NativeRamLayout {
  readonly slots: readonly { gpa: number; size: number; hostAddr: bigint }[];
  /** Whether the accessor asks this process's pagemap about unpopulated pages. */
  readonly pagemap: boolean;
}

const nativeLayouts = new WeakMap<RamAccessor, { layout: NativeRamLayout; memory: GuestRam }>();

/**
 * The layout of `ram` when it is a guestMemoryRam accessor over mapped
 * memory (with the default or no pagemap), else undefined (buffers, a
 * test's own pagemap): then only this thread can read it.
 */
export function nativeRamLayout(ram: RamAccessor): NativeRamLayout | undefined {
  const entry = nativeLayouts.get(ram);
  if (!entry) return undefined;
  // pagemap cannot tell zero pages of RAM mapped from a file.
  return entry.memory.fileBacked ? { ...entry.layout, pagemap: false } : entry.layout;
}

/**
 * The same RAM in another thread of this process: a RamAccessor equal to
 * the one `layout` was taken from, reading through viewNative. Read-only.
 */
export function nativeGuestRam(layout: NativeRamLayout): RamAccessor {
  const slots = layout.slots.map((s, i) => ({ ...s, slot: i, hostOffset: 0 }));
  const find = (gpa: number, len: number) => {
    const s = slots.find((x) => gpa >= x.gpa && gpa + len <= x.gpa + x.size);
    if (!s) throw new RangeError(`guest RAM: ${len} bytes at 0x${gpa.toString(16)} not in a slot`);
    return s;
  };
  const memory: GuestRam = {
    slots,
    view(gpa, length) {
      const g = Number(gpa);
      const s = find(g, length);
      if (length === 0) return new Uint8Array(0);
      return viewNative(s.hostAddr + BigInt(g - s.gpa), length);
    },
    write() {
      throw new Error('guest RAM is read-only on the migration thread');
    },
  };
  return guestMemoryRam(memory, { pagemap: layout.pagemap ? undefined : null });
}

/** The block offset of guest-physical `gpa` (undefined outside RAM), for turning dirty-log bits into pages. */
export function blockOffsetOfGpa(memory: GuestRam, gpa: number): number | undefined {
  let start = 0;
  for (const s of [...memory.slots].sort((a, b) => a.gpa - b.gpa)) {
    if (gpa >= s.gpa && gpa < s.gpa + s.size) return start + (gpa - s.gpa);
    start += s.size;
  }
  return undefined;
}
