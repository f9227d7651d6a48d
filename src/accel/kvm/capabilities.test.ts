import assert from 'node:assert/strict';
import { test } from 'node:test';
import { kvmHostCapabilities } from './capabilities.js';
import { KVM_CAP } from './ioctls.js';

function host(answers: Record<number, number>) {
  return { checkExtension: (cap: number) => answers[cap] ?? 0 };
}

test('capabilities as this project measured them on a PVM host', () => {
  // ADJUST_CLOCK = 0xe (TSC_STABLE|REALTIME|HOST_TSC), KVMCLOCK_CTRL = 1 (kvm-from-node.md).
  const caps = kvmHostCapabilities(
    host({
      [KVM_CAP.ADJUST_CLOCK]: 0xe,
      [KVM_CAP.KVMCLOCK_CTRL]: 1,
      [KVM_CAP.TSC_DEADLINE_TIMER]: 1,
    }),
  );
  assert.deepEqual(caps, {
    kvmclockCtrl: true,
    clockTscStable: true,
    clockRealtime: true,
    tscDeadlineTimer: true,
  });
});

test('a host whose clock is not TSC-stable and that lacks KVMCLOCK_CTRL', () => {
  // REALTIME | HOST_TSC without TSC_STABLE.
  const caps = kvmHostCapabilities(host({ [KVM_CAP.ADJUST_CLOCK]: 0xc }));
  assert.deepEqual(caps, {
    kvmclockCtrl: false,
    clockTscStable: false,
    clockRealtime: true,
    tscDeadlineTimer: false,
  });
});

test('a host without KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK = TSC_STABLE only)', () => {
  const caps = kvmHostCapabilities(host({ [KVM_CAP.ADJUST_CLOCK]: 0x2 }));
  assert.equal(caps.clockRealtime, false);
  assert.equal(caps.clockTscStable, true);
});
