import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { GuestMemory, VIEW_CHUNK_BYTES } from './guest-memory.js';
import { parseMemorySize } from './parse-size.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

function isCode(code: string) {
  return (e: unknown) => (e as { code?: string }).code === code;
}

/** Writes distinct values at the first and last bytes of every slot and reads them back. */
function checkSlotEnds(mem: GuestMemory): void {
  mem.slots.forEach((slot, i) => {
    const first = slot.gpa;
    const last = slot.gpa + slot.size - 8;
    const a = 0x1111_0000_0000_0000n + BigInt(i);
    const b = 0x2222_0000_0000_0000n + BigInt(i);
    mem.writeU64(first, a);
    mem.writeU64(last, b);
    assert.equal(mem.readU64(first), a);
    assert.equal(mem.readU64(last), b);
    assert.equal(mem.readU8(slot.gpa + slot.size - 1), 0x22, 'the very last byte');
  });
}

test('512M of RAM is one slot at 0, both ends readable and writable', () => {
  const mem = GuestMemory.create(parseMemorySize('512M'));
  try {
    assert.deepEqual(
      mem.slots.map(({ slot, gpa, size }) => ({ slot, gpa, size })),
      [{ slot: 0, gpa: 0, size: 512 * MiB }],
    );
    assert.equal(mem.slots[0]!.hostAddr, mem.hostAddr);
    checkSlotEnds(mem);
  } finally {
    mem.close();
  }
});

test('4G of RAM is split around the PCI hole: 3 GiB at 0 and 1 GiB at 4 GiB', () => {
  const mem = GuestMemory.create(parseMemorySize('4G'));
  try {
    assert.deepEqual(
      mem.slots.map(({ slot, gpa, size, hostOffset }) => ({ slot, gpa, size, hostOffset })),
      [
        { slot: 0, gpa: 0, size: 3 * GiB, hostOffset: 0 },
        { slot: 1, gpa: 4 * GiB, size: GiB, hostOffset: 3 * GiB },
      ],
    );
    assert.equal(mem.slots[1]!.hostAddr, mem.hostAddr + BigInt(3 * GiB));
    checkSlotEnds(mem);
    // The PCI hole is not RAM.
    assert.throws(() => mem.readU32(0xc000_0000), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(() => mem.readU32(0xffff_fffc), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.equal(mem.slotAt(0xd000_0000), undefined);
    assert.equal(mem.slotAt(4 * GiB)?.slot, 1);
  } finally {
    mem.close();
  }
});

test('8G of RAM: 3 GiB low, 5 GiB high, every end and every 1 GiB view seam works', () => {
  const mem = GuestMemory.create(parseMemorySize('8G'));
  try {
    assert.deepEqual(
      mem.slots.map(({ gpa, size }) => ({ gpa, size })),
      [
        { gpa: 0, size: 3 * GiB },
        { gpa: 4 * GiB, size: 5 * GiB },
      ],
    );
    assert.equal(mem.size, 8 * GiB);
    checkSlotEnds(mem);
    // A u32 and a u64 straddling a 1 GiB view seam inside the high slot.
    const seam = 4 * GiB + 2 * VIEW_CHUNK_BYTES;
    mem.writeU32(seam - 2, 0xaabbccdd);
    assert.equal(mem.readU32(seam - 2), 0xaabbccdd);
    assert.deepEqual([...mem.read(seam - 2, 4)], [0xdd, 0xcc, 0xbb, 0xaa]);
    mem.writeU64(seam - 3, 0x0102030405060708n);
    assert.equal(mem.readU64(seam - 3), 0x0102030405060708n);
    // A view across the seam is one view of the same memory.
    const view = mem.view(seam - 16, 32);
    assert.equal(view.byteLength, 32);
    view[15] = 0x42;
    view[16] = 0x43;
    assert.equal(mem.readU8(seam - 1), 0x42);
    assert.equal(mem.readU8(seam), 0x43);
    // A large copy across the seam.
    const bytes = new Uint8Array(3 * MiB).map((_, i) => i & 0xff);
    mem.write(seam - MiB, bytes);
    assert.deepEqual(mem.read(seam - MiB, 3 * MiB), bytes);
    // The last byte of RAM is at 9 GiB - 1.
    assert.throws(() => mem.readU8(9 * GiB), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
  } finally {
    mem.close();
  }
});

test('views share memory with reads and writes, and read() returns a copy', () => {
  const mem = GuestMemory.create(16 * MiB);
  try {
    const view = mem.view(0x1000, 16);
    view.set([1, 2, 3, 4]);
    assert.equal(mem.readU32(0x1000), 0x04030201);
    const copy = mem.read(0x1000, 4);
    mem.writeU32(0x1000, 0);
    assert.deepEqual([...copy], [1, 2, 3, 4]);
    assert.equal(view[0], 0);
    mem.fill(0x2000, 8, 0xff);
    assert.equal(mem.readU64(0x2000), 0xffffffffffffffffn);
    assert.equal(mem.readU64(0x2000n), 0xffffffffffffffffn, 'bigint addresses too');
    mem.writeU16(0x3000, 0xbeef);
    assert.equal(mem.readU16(0x3000), 0xbeef);
    assert.equal(mem.hostAddress(0x3000), mem.hostAddr + 0x3000n);
    assert.equal(mem.read(16 * MiB, 0).byteLength, 0, 'an empty read at the end is fine');
  } finally {
    mem.close();
  }
});

test('writes, fills and zero checks before any view (through libc) agree with those after', () => {
  const mem = GuestMemory.create(16 * MiB);
  try {
    // No view yet: these go through libc.
    mem.write(0x5000, Uint8Array.of(9, 8, 7));
    mem.fill(0x6000, 3, 0x5a);
    assert.equal(mem.isZero(0x5000, 4096), false);
    assert.equal(
      mem.isZero(0x7000, 2 * MiB),
      true,
      'untouched RAM is zero, past one compare buffer too',
    );
    assert.equal(mem.isZero(0x6003, 0x1000), true, 'the fill stopped at its length');
    // The first read makes the view; what libc wrote is there.
    assert.deepEqual([...mem.read(0x5000, 3)], [9, 8, 7]);
    assert.deepEqual([...mem.read(0x6000, 4)], [0x5a, 0x5a, 0x5a, 0]);
    // With the view: the same answers, now read through it.
    mem.fill(0x5000, 3, 0);
    assert.equal(mem.isZero(0x5000, 4096), true);
    mem.writeU8(0x9fff, 1);
    assert.equal(mem.isZero(0x7000, 2 * MiB), false);
    assert.throws(() => mem.isZero(16 * MiB - 1, 2), /runs past the end/);
  } finally {
    mem.close();
  }
});

test('accesses outside RAM or across a slot end throw GuestMemoryError and change nothing', () => {
  const mem = GuestMemory.create(parseMemorySize('4G'));
  try {
    const lowEnd = 3 * GiB;
    mem.writeU32(lowEnd - 4, 0x12345678);
    assert.throws(
      () => mem.writeU64(lowEnd - 4, 0n),
      (e: unknown) => {
        assert.equal((e as { code?: string }).code, 'GUEST_MEMORY_OUT_OF_RANGE');
        assert.equal((e as Error).name, 'GuestMemoryError');
        assert.match((e as Error).message, /0xbffffffc .*runs past the end of RAM at 0xc0000000/);
        return true;
      },
    );
    assert.equal(mem.readU32(lowEnd - 4), 0x12345678, 'the failed write wrote nothing');
    assert.throws(() => mem.read(lowEnd - 10, 20), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(
      () => mem.write(lowEnd - 1, new Uint8Array(2)),
      isCode('GUEST_MEMORY_OUT_OF_RANGE'),
    );
    assert.throws(() => mem.view(lowEnd - 1, 2), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(
      () => mem.readU8(5 * GiB),
      /outside guest RAM \(0x0-0xbfffffff, 0x100000000-0x13fffffff\)/,
    );
    assert.throws(() => mem.readU8(-1), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(() => mem.readU8(1.5), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(() => mem.readU8(1n << 60n), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(() => mem.read(0, -1), isCode('GUEST_MEMORY_OUT_OF_RANGE'));
    assert.throws(() => mem.view(0, GiB + 1), /in pieces/);
  } finally {
    mem.close();
  }
});

test('every access after close() throws GuestMemoryClosedError instead of crashing', () => {
  const mem = GuestMemory.create(parseMemorySize('512M'));
  mem.writeU32(0, 1);
  mem.view(0, 4096);
  mem.close();
  assert.equal(mem.closed, true);
  const closed = isCode('GUEST_MEMORY_CLOSED');
  assert.throws(() => mem.readU32(0), closed);
  assert.throws(() => mem.writeU32(0, 1), closed);
  assert.throws(() => mem.read(0, 1), closed);
  assert.throws(() => mem.write(0, new Uint8Array(1)), closed);
  assert.throws(() => mem.view(0, 1), closed);
  assert.throws(() => mem.fill(0, 1), closed);
  assert.throws(() => mem.hostAddr, closed);
  assert.throws(() => mem.hostAddress(0), closed);
  mem.close(); // twice is fine
});

test('creating and closing guest memory leaks no file descriptor', () => {
  const before = readdirSync('/proc/self/fd').length;
  for (const size of ['512M', '4G', '8G']) {
    const mem = GuestMemory.create(parseMemorySize(size));
    mem.writeU8(0, 1);
    mem.close();
  }
  assert.equal(readdirSync('/proc/self/fd').length, before);
});

test('flat layout and firstSlot', () => {
  const mem = GuestMemory.create(parseMemorySize('4G'), { layout: 'flat', firstSlot: 3 });
  try {
    assert.deepEqual(
      mem.slots.map(({ slot, gpa, size }) => ({ slot, gpa, size })),
      [{ slot: 3, gpa: 0, size: 4 * GiB }],
    );
    mem.writeU32(0xc000_0000, 7);
    assert.equal(mem.readU32(0xc000_0000), 7);
  } finally {
    mem.close();
  }
});

test('sizes that are not whole pages are refused', () => {
  for (const bad of [0, -4096, 4097, 1.5, Number.NaN, 2 ** 41]) {
    assert.throws(() => GuestMemory.create(bad), isCode('INVALID_MEMORY_SIZE'));
  }
});

test('another thread can view guest RAM from the slot host address', async () => {
  const mem = GuestMemory.create(parseMemorySize('4G'));
  try {
    const ffiUrl = new URL('../ffi.js', import.meta.url).href;
    const gpa = 4 * GiB + 0x2000;
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      import(workerData.ffiUrl).then(({ viewNative }) => {
        const view = viewNative(workerData.ptr, 8);
        const seen = new DataView(view.buffer, view.byteOffset, 8).getUint32(0, true);
        view.set([9, 8, 7, 6], 4);
        parentPort.postMessage(seen);
      });
    `;
    mem.writeU32(gpa, 0xcafef00d);
    const worker = new Worker(code, {
      eval: true,
      workerData: { ffiUrl, ptr: mem.hostAddress(gpa) },
    });
    const seen = await new Promise<number>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await worker.terminate();
    assert.equal(seen, 0xcafef00d, 'the worker read what this thread wrote');
    assert.deepEqual(
      [...mem.read(gpa + 4, 4)],
      [9, 8, 7, 6],
      'this thread reads what the worker wrote',
    );
  } finally {
    mem.close();
  }
});

/** The VmFlags line of the mapping that starts at `addr`, from /proc/self/smaps. */
function vmFlagsOf(addr: bigint): string[] {
  const smaps = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  const start = smaps.findIndex((line) => line.startsWith(`${addr.toString(16)}-`));
  assert.ok(start >= 0, `mapping at 0x${addr.toString(16)} is in /proc/self/smaps`);
  const flags = smaps.slice(start + 1).find((line) => line.startsWith('VmFlags:'));
  return flags!.slice('VmFlags:'.length).trim().split(/\s+/);
}

test('guest RAM is advised for huge pages and kept out of forked children', () => {
  const mem = GuestMemory.create(parseMemorySize('64M'));
  try {
    const flags = vmFlagsOf(mem.hostAddr);
    assert.ok(flags.includes('hg'), `MADV_HUGEPAGE in ${flags.join(' ')}`);
    assert.ok(flags.includes('dc'), `MADV_DONTFORK in ${flags.join(' ')}`);
  } finally {
    mem.close();
  }
});

/** Resident bytes of this process, from /proc/self/status. */
function residentBytes(): number {
  const kb = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  assert.ok(kb, 'VmRSS in /proc/self/status');
  return Number(kb[1]) * 1024;
}

test('prealloc faults every page in at once (-mem-prealloc); without it pages come on first touch', () => {
  const size = 64 * 2 ** 20;
  const lazyBefore = residentBytes();
  const lazy = GuestMemory.create(size);
  try {
    assert.ok(residentBytes() - lazyBefore < size / 2, 'lazy RAM is not resident yet');
  } finally {
    lazy.close();
  }
  const before = residentBytes();
  const mem = GuestMemory.create(size, { prealloc: true });
  try {
    assert.ok(residentBytes() - before >= size * 0.9, 'preallocated RAM is resident');
    // Still zeroed RAM, readable and writable at both ends.
    assert.deepEqual([...mem.read(0, 4)], [0, 0, 0, 0]);
    assert.deepEqual([...mem.read(size - 4, 4)], [0, 0, 0, 0]);
    mem.write(size - 1, Uint8Array.of(7));
    assert.equal(mem.read(size - 1, 1)[0], 7);
  } finally {
    mem.close();
  }
});
