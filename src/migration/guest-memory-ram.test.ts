import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import {
  blockOffsetOfGpa,
  type GuestRam,
  guestMemoryRam,
  PC_RAM_BLOCK,
} from './guest-memory-ram.js';

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
