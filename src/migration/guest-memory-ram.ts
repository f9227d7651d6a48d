/**
 * Guest RAM as the migration stream sees it: one RAM block "pc.ram" (as
 * QEMU's pc machine has one RAMBlock of that name, mapped below 4 GiB and,
 * above 3.5 GiB of RAM, again above 4 GiB), whose offsets run through the
 * KVM memory slots in guest-physical order. So a 6 GiB guest is one 6 GiB
 * block whose first 3.5 GiB are slot 0 and the rest slot 1, and the
 * stream's block list does not depend on where the PCI hole is.
 */
import type { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import type { RamAccessor, RamBlock } from './ram.js';

/** The id of the single RAM block. */
export const PC_RAM_BLOCK = 'pc.ram';

/** The GuestMemory methods the adapter uses. */
export type GuestRam = Pick<GuestMemory, 'slots' | 'view' | 'write'>;

interface Piece {
  /** Offset in the block. */
  start: number;
  gpa: number;
  size: number;
}

/**
 * A RamAccessor over guest RAM. Reads are views of guest memory (no copy)
 * unless the range straddles two slots; writes copy in.
 */
export function guestMemoryRam(memory: GuestRam): RamAccessor {
  const pieces: Piece[] = [];
  let total = 0;
  for (const s of [...memory.slots].sort((a, b) => a.gpa - b.gpa)) {
    pieces.push({ start: total, gpa: s.gpa, size: s.size });
    total += s.size;
  }
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
  return { blocks: total > 0 ? [block] : [] };
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
