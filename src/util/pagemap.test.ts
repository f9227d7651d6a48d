import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import { Pagemap, type PagemapSource, processPagemap } from './pagemap.js';

const MiB = 2 ** 20;
const PRESENT = 1n << 63n;
const SWAPPED = 1n << 62n;
const SOFT_DIRTY = 1n << 55n;

/** A pagemap over `entries` (page i of the address space is entries[i - base]). */
function fakeSource(
  base: number,
  entries: bigint[],
  maxBytes = Infinity,
): PagemapSource & {
  calls: number;
} {
  const src = {
    calls: 0,
    read(into: Uint8Array, firstPage: number): number {
      src.calls++;
      const dv = new DataView(into.buffer, into.byteOffset, into.byteLength);
      const n = Math.min(
        into.length / 8,
        Math.floor(maxBytes / 8),
        entries.length - (firstPage - base),
      );
      for (let i = 0; i < n; i++) dv.setBigUint64(i * 8, entries[firstPage - base + i]!, true);
      return Math.max(0, n * 8);
    },
  };
  return src;
}

test('a fresh anonymous mapping is all unpopulated', (t) => {
  if (!Pagemap.procSource()) return t.skip('no /proc/self/pagemap here');
  const memory = GuestMemory.create(8 * MiB, { layout: 'flat' });
  try {
    const map = processPagemap().unpopulated(memory.hostAddr, (8 * MiB) / 4096);
    if (!map) return t.skip('/proc/self/pagemap cannot be read here');
    assert.equal(map.length, 2048);
    assert.ok(map.every((b) => b === 1));
  } finally {
    memory.close();
  }
});

test('written pages read as populated, pages far from them stay unpopulated', (t) => {
  if (!Pagemap.procSource()) return t.skip('no /proc/self/pagemap here');
  const memory = GuestMemory.create(16 * MiB, { layout: 'flat' });
  try {
    const written = [0, 5, 8 * 256 + 3];
    for (const p of written) memory.write(p * 4096 + 100, Uint8Array.of(1));
    const map = new Pagemap().unpopulated(memory.hostAddr, 4096);
    if (!map) return t.skip('/proc/self/pagemap cannot be read here');
    for (const p of written) assert.equal(map[p], 0, `page ${p} was written`);
    // A transparent huge page populates all 2 MiB around a write, so only
    // pages more than 2 MiB from every write are certainly untouched.
    for (const p of [5 * 256, 5 * 256 + 1, 4095]) assert.equal(map[p], 1, `page ${p} untouched`);
    // An answer in small pieces is the same answer.
    const pieces = new Pagemap(undefined, 7).unpopulated(memory.hostAddr, 4096);
    assert.deepEqual(pieces, map);
  } finally {
    memory.close();
  }
});

test('entries: only "present" and "swapped" mean the page may hold data', () => {
  const base = 0x7f00_0000_0000 / 4096;
  const entries = [0n, PRESENT | 123n, SWAPPED | 5n, SOFT_DIRTY, PRESENT | SWAPPED, 0n, 0n];
  // Two entries per pread, and a source that gives back at most 8 bytes at a time.
  for (const [chunk, max] of [
    [2, Infinity],
    [64, 8],
  ] as const) {
    const pm = new Pagemap(fakeSource(base, entries, max), chunk);
    assert.deepEqual([...pm.unpopulated(BigInt(base) * 4096n, 7)!], [1, 0, 0, 1, 0, 1, 1]);
    assert.deepEqual([...pm.unpopulated(BigInt(base + 1) * 4096n, 3)!], [0, 0, 1]);
  }
});

test('a pagemap that cannot be read answers undefined, and is not asked again', () => {
  const failing = {
    calls: 0,
    read(): number {
      failing.calls++;
      throw Object.assign(new Error('EACCES: permission denied'), { code: 'EACCES' });
    },
  };
  const pm = new Pagemap(failing);
  assert.equal(pm.unpopulated(0x10_0000n, 4), undefined);
  assert.equal(pm.unavailable, true);
  assert.equal(pm.unpopulated(0x10_0000n, 4), undefined);
  assert.equal(failing.calls, 1);
  // A file that ends early, a missing file, no pagemap at all.
  assert.equal(new Pagemap(fakeSource(0x100, [0n])).unpopulated(0x100_000n, 2), undefined);
  assert.equal(
    new Pagemap(Pagemap.procSource('/nonexistent/pagemap') ?? failing).unpopulated(0x10_0000n, 1),
    undefined,
  );
});

test('addresses must be page-aligned', () => {
  const pm = new Pagemap(fakeSource(0, []));
  assert.throws(() => pm.unpopulated(0x1001n, 1), RangeError);
  assert.throws(() => pm.unpopulated(0x1000n, -1), RangeError);
  assert.deepEqual(pm.unpopulated(0x1000n, 0), new Uint8Array(0));
});
