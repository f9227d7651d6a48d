import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { CpuSavedState } from '../../accel/kvm/cpu-state.js';
import { withTscAt } from './migration-devices.js';

function savedWithMsrs(msrs: { index: number; data: bigint }[]): CpuSavedState {
  return { msrs } as unknown as CpuSavedState;
}

test('the TSC read when the clock was saved replaces the later one, and only the TSC', () => {
  const saved = savedWithMsrs([
    { index: 0x10, data: 5_000n },
    { index: 0x4b564d01, data: 0x20001n },
  ]);
  const out = withTscAt(saved, 4_000n);
  assert.deepEqual(out.msrs, [
    { index: 0x10, data: 4_000n },
    { index: 0x4b564d01, data: 0x20001n },
  ]);
  assert.equal(saved.msrs[0]!.data, 5_000n, 'the captured state is not changed in place');
});

test('without a TSC from the stop, the captured state is saved as it is', () => {
  const saved = savedWithMsrs([{ index: 0x10, data: 5_000n }]);
  assert.equal(withTscAt(saved, undefined), saved);
});
