import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import { Pagemap, processPagemap } from '../util/pagemap.js';
import { withOutgoing } from './channels.js';
import {
  blockOffsetOfGpa,
  type GuestMemoryRamOptions,
  type GuestRam,
  guestMemoryRam,
  PC_RAM_BLOCK,
} from './guest-memory-ram.js';
import { bufferSource } from './qemu-file.js';
import { PAGE_SIZE } from './ram.js';
import { loadVmState, type StreamStats, saveVmState } from './stream.js';

const MiB = 2 ** 20;
const dir = mkdtempSync(join(tmpdir(), 'tsvmm-gmram-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Two slots over plain buffers, laid out as the pc split puts them: low RAM, then RAM above 4 GiB. */
function splitRam(): GuestRam & { low: Uint8Array; high: Uint8Array } {
  const low = new Uint8Array(3 * 4096);
  const high = new Uint8Array(2 * 4096);
  const at = (gpa: number): [Uint8Array, number] =>
    gpa >= 0x1_0000_0000 ? [high, gpa - 0x1_0000_0000] : [low, gpa];
  return {
    low,
    high,
    slots: [
      { slot: 1, gpa: 0x1_0000_0000, size: high.length, hostAddr: 0n, hostOffset: low.length },
      { slot: 0, gpa: 0, size: low.length, hostAddr: 0n, hostOffset: 0 },
    ],
    view: (gpa, len) => {
      const [mem, off] = at(Number(gpa));
      return mem.subarray(off, off + len);
    },
    write: (gpa, bytes) => {
      const [mem, off] = at(Number(gpa));
      mem.set(bytes, off);
    },
  };
}

test('guest RAM is one "pc.ram" block running through the slots in guest-physical order', () => {
  const mem = splitRam();
  const ram = guestMemoryRam(mem);
  assert.equal(ram.blocks.length, 1);
  const block = ram.blocks[0]!;
  assert.equal(block.id, PC_RAM_BLOCK);
  assert.equal(block.size, 5 * 4096);
  // A write straddling the two slots lands in both.
  block.write(3 * 4096 - 2, Uint8Array.of(1, 2, 3, 4));
  assert.deepEqual([...mem.low.subarray(-2)], [1, 2]);
  assert.deepEqual([...mem.high.subarray(0, 2)], [3, 4]);
  assert.deepEqual([...block.read(3 * 4096 - 2, 4)], [1, 2, 3, 4]);
  assert.equal(blockOffsetOfGpa(mem, 0x1_0000_0001), 3 * 4096 + 1);
  assert.equal(blockOffsetOfGpa(mem, 0xf000_0000), undefined);
  assert.throws(() => block.read(5 * 4096 - 1, 2), /run past/);
});

test('guestMemoryRam over a real GuestMemory mapping reads and writes guest RAM', () => {
  const memory = GuestMemory.create(1 << 20);
  try {
    const block = guestMemoryRam(memory).blocks[0]!;
    block.write(0x2000, Uint8Array.of(9, 8, 7));
    assert.deepEqual([...memory.read(0x2000, 3)], [9, 8, 7]);
    assert.deepEqual([...block.read(0x2000, 3)], [9, 8, 7]);
  } finally {
    memory.close();
  }
});

/** Whether this process can read its pagemap (a test that needs it skips otherwise). */
function pagemapReadable(memory: GuestMemory): boolean {
  return processPagemap().unpopulated(memory.hostAddr, 1) !== undefined;
}

/** Saves `memory` to a file through guestMemoryRam(memory, options); returns its bytes and stats. */
async function saveToFile(
  memory: GuestMemory,
  name: string,
  options?: GuestMemoryRamOptions,
): Promise<[Buffer, StreamStats]> {
  const path = join(dir, name);
  const stats = await withOutgoing(`file:${path}`, (sink) =>
    saveVmState({
      sink,
      machineType: 'pc',
      vcpus: 1,
      ram: guestMemoryRam(memory, options),
      devices: [],
      chunkPages: 512,
    }),
  );
  return [readFileSync(path), stats];
}

test('unpopulatedPages: a fresh mapping is all unpopulated, written pages are not', (t) => {
  const memory = GuestMemory.create(8 * MiB);
  try {
    if (!pagemapReadable(memory)) return t.skip('/proc/self/pagemap cannot be read here');
    const block = guestMemoryRam(memory).blocks[0]!;
    assert.ok(block.unpopulatedPages);
    const pages = (8 * MiB) / PAGE_SIZE;
    assert.ok(block.unpopulatedPages(0, pages)!.every((b) => b === 1));
    block.write(3 * PAGE_SIZE, Uint8Array.of(1));
    block.write(2000 * PAGE_SIZE, new Uint8Array(PAGE_SIZE)); // zeros, but populated
    const map = block.unpopulatedPages(0, pages)!;
    assert.equal(map[3], 0);
    assert.equal(map[2000], 0);
    // More than 2 MiB (a transparent huge page) from both writes.
    assert.equal(map[1200], 1);
    assert.deepEqual(block.unpopulatedPages(1199, 3), Uint8Array.of(1, 1, 1));
  } finally {
    memory.close();
  }
});

test('unpopulatedPages runs through both slots of a pc split above 3.5 GiB', (t) => {
  // 4 GiB of address space, none of it touched: slot 0 below the hole, slot 1 above 4 GiB.
  const memory = GuestMemory.create(4 * 1024 * MiB);
  try {
    if (!pagemapReadable(memory)) return t.skip('/proc/self/pagemap cannot be read here');
    assert.equal(memory.slots.length, 2);
    const block = guestMemoryRam(memory).blocks[0]!;
    const boundary = memory.slots[0]!.size / PAGE_SIZE;
    const blockPage = boundary + 10;
    // The page 10 pages into slot 1 is written through the block.
    block.write(blockPage * PAGE_SIZE, Uint8Array.of(7));
    const map = block.unpopulatedPages!(boundary - 4, 16)!;
    assert.equal(map.length, 16);
    assert.equal(map[14], 0);
    assert.equal(map[0], 1, 'the end of slot 0 is untouched');
  } finally {
    memory.close();
  }
});

test('no unpopulatedPages for memory that is not a host mapping, or when turned off', () => {
  assert.equal(guestMemoryRam(splitRam()).blocks[0]!.unpopulatedPages, undefined);
  const memory = GuestMemory.create(1 * MiB);
  try {
    assert.equal(guestMemoryRam(memory, { pagemap: null }).blocks[0]!.unpopulatedPages, undefined);
  } finally {
    memory.close();
  }
});

test('unpopulatedPages refuses closed memory rather than calling it zero', () => {
  const memory = GuestMemory.create(1 * MiB);
  const block = guestMemoryRam(memory).blocks[0]!;
  memory.close();
  assert.throws(() => block.unpopulatedPages!(0, 1));
});

test('saving with pagemap gives the same stream, byte for byte, without reading untouched RAM', async (t) => {
  const size = 64 * MiB;
  const memory = GuestMemory.create(size);
  try {
    if (!pagemapReadable(memory)) return t.skip('/proc/self/pagemap cannot be read here');
    // Data at the start and end, zeros written (populated) in the middle.
    const data = new Uint8Array(3 * PAGE_SIZE).map((_, i) => (i % 251) + 1);
    memory.write(0x1000, data);
    memory.write(size - 2 * PAGE_SIZE, data.subarray(0, PAGE_SIZE));
    memory.write(16 * MiB + 0x123, data.subarray(0, 17));
    memory.fill(24 * MiB, 4 * PAGE_SIZE, 0);
    const pages = size / PAGE_SIZE;
    const untouched = guestMemoryRam(memory).blocks[0]!.unpopulatedPages!(0, pages)!;
    const before = untouched.reduce((n, b) => n + b, 0);
    assert.ok(before > pages / 2, `${before} of ${pages} pages unpopulated`);

    const [withPagemap, s1] = await saveToFile(memory, 'pagemap.bin');
    // Nothing was populated by the save.
    const afterSave = guestMemoryRam(memory).blocks[0]!.unpopulatedPages!(0, pages)!;
    assert.deepEqual(afterSave, untouched);

    const [reading, s2] = await saveToFile(memory, 'read.bin', { pagemap: null });
    assert.ok(withPagemap.equals(reading), 'the two streams differ');
    assert.deepEqual(s1, s2);
    assert.equal(s1.normalPages, 5);
    assert.equal(s1.zeroPages, pages - 5);

    // A pagemap that fails (EACCES, say) falls back to reading: same stream again.
    const failing = new Pagemap({
      read() {
        throw Object.assign(new Error('EACCES'), { code: 'EACCES' });
      },
    });
    const [fallback] = await saveToFile(memory, 'fallback.bin', { pagemap: failing });
    assert.ok(fallback.equals(reading), 'the fallback stream differs');
    assert.equal(failing.unavailable, true);

    // Loaded into fresh RAM (ramIsZeroed), zero pages are not written or read.
    const dst = GuestMemory.create(size);
    try {
      await loadVmState({
        source: bufferSource(withPagemap),
        machineType: 'pc',
        ramIsZeroed: true,
        vcpus: 1,
        ram: guestMemoryRam(dst),
        devices: [],
      });
      assert.deepEqual(dst.read(0x1000, data.length), data);
      assert.deepEqual(dst.read(16 * MiB + 0x123, 17), data.subarray(0, 17));
      const dstMap = guestMemoryRam(dst).blocks[0]!.unpopulatedPages!(0, pages)!;
      let populated = 0;
      for (const b of dstMap) populated += b ? 0 : 1;
      // Only the 5 data pages (and the huge pages around them) were touched.
      assert.ok(populated <= 4 * 512, `${populated} pages populated by the load`);
      assert.equal(dstMap[(24 * MiB) / PAGE_SIZE + 1024], 1);
    } finally {
      dst.close();
    }
  } finally {
    memory.close();
  }
});
