import assert from 'node:assert/strict';
import { test } from 'node:test';
import { fakeCoalescedRing } from '../../test-support/coalesced-ring.js';
import type { CoalescedRing } from './coalesced-ring.js';
import {
  KVM_COALESCED_MMIO_MAX,
  KVM_COALESCED_MMIO_RING_HEADER_SIZE,
} from './structs/coalesced-mmio.js';

function drainAll(ring: CoalescedRing) {
  const seen: { addr: number; pio: boolean; data: number[] }[] = [];
  ring.drain((addr, pio, data) => seen.push({ addr, pio, data: [...data] }));
  return seen;
}

test('KVM_COALESCED_MMIO_MAX is what a 4 KiB page holds: 170 entries', () => {
  assert.equal(KVM_COALESCED_MMIO_MAX, 170);
});

test('queued writes come out oldest first, each slot freed (first catches up with last)', () => {
  const { ring, view, push } = fakeCoalescedRing();
  assert.equal(ring.pending, false);
  push(0x3f8, [0x68]);
  push(0x3f8, [0x69]);
  push(0x80, [1, 2], true);
  assert.equal(ring.pending, true);
  assert.deepEqual(drainAll(ring), [
    { addr: 0x3f8, pio: true, data: [0x68] },
    { addr: 0x3f8, pio: true, data: [0x69] },
    { addr: 0x80, pio: true, data: [1, 2] },
  ]);
  assert.equal(ring.pending, false);
  assert.equal(view.getUint32(0, true), 3);
  assert.deepEqual(drainAll(ring), []);
});

test('the indices wrap at KVM_COALESCED_MMIO_MAX', () => {
  const { ring, push, view } = fakeCoalescedRing();
  const sent: number[] = [];
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 100; i++) push(0x3f8, [(round * 100 + i) & 0xff]);
    ring.drain((_a, _p, d) => sent.push(d[0]!));
  }
  assert.equal(sent.length, 300);
  assert.deepEqual(
    sent,
    Array.from({ length: 300 }, (_, i) => i & 0xff),
  );
  assert.equal(view.getUint32(0, true), 300 % KVM_COALESCED_MMIO_MAX);
});

test('an index outside the ring is a typed error, never a read out of bounds', () => {
  const { ring, view } = fakeCoalescedRing();
  view.setUint32(4, KVM_COALESCED_MMIO_MAX + 5, true);
  assert.throws(() => ring.drain(() => {}), { code: 'KVM_STRUCT_INVALID' });
});

test('a length above 8 is clamped to the entry data; a detached ring reads empty', () => {
  const { ring, view, push } = fakeCoalescedRing();
  push(0x3f8, [1]);
  view.setUint32(KVM_COALESCED_MMIO_RING_HEADER_SIZE + 8, 4096, true);
  assert.equal(drainAll(ring)[0]!.data.length, 8);
  push(0x3f8, [2]);
  ring.detach();
  assert.equal(ring.pending, false);
  assert.deepEqual(drainAll(ring), []);
});
