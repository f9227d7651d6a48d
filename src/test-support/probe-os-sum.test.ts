import assert from 'node:assert/strict';
import { test } from 'node:test';
import { matchProbeSum, PROBE_DIRTY_CHUNK, probeSumReference } from './probe-os-sum.js';

const BASE = 0x200000;
const BYTES = 16 * PROBE_DIRTY_CHUNK; // 1 MiB: the reference stays quick

test('the matcher finds the pass and cursor of a sum computed as the guest does', () => {
  for (const [pass, cursor] of [
    [1, 0],
    [3, 0],
    [3, 5 * PROBE_DIRTY_CHUNK],
    [7, 15 * PROBE_DIRTY_CHUNK],
    [1, 9 * PROBE_DIRTY_CHUNK],
  ] as const) {
    const sum = probeSumReference(BASE, BYTES, pass, cursor);
    assert.deepEqual(
      matchProbeSum(BASE, BYTES, sum, [pass]),
      { pass, cursor },
      `${pass}/${cursor}`,
    );
    // Among several candidate passes, the right one.
    assert.deepEqual(matchProbeSum(BASE, BYTES, sum, [pass + 2, pass + 1, pass]), { pass, cursor });
  }
});

test('a sum over a wrong word, a wrong base or the wrong pass matches nothing', () => {
  const sum = probeSumReference(BASE, BYTES, 4, 3 * PROBE_DIRTY_CHUNK);
  assert.equal(matchProbeSum(BASE, BYTES, sum ^ 1n, [3, 4, 5]), undefined);
  assert.equal(matchProbeSum(BASE + PROBE_DIRTY_CHUNK, BYTES, sum, [3, 4, 5]), undefined);
  assert.equal(matchProbeSum(BASE, BYTES, sum, [6, 7]), undefined);
});

test('64 MiB (the live-migration tests) is checked in well under a few seconds per pass', () => {
  const bytes = 64 * 2 ** 20;
  const t0 = Date.now();
  assert.equal(matchProbeSum(BASE, bytes, 12345n, [2]), undefined);
  assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms`);
});

test('an area not in the guest form is refused', () => {
  assert.throws(() => matchProbeSum(BASE, 4096, 0n, [1]), RangeError);
});
