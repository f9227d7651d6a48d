import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatBacktrace, formatTraceLine } from './log.js';

test('a trace line is pid@seconds.micros:event key=value ... thread=name', () => {
  assert.equal(
    formatTraceLine(
      4242,
      1_700_000_000_123_456_789n,
      'runstate_set',
      { from: 'prelaunch', to: 'running' },
      'main',
    ),
    '4242@1700000000.123456:runstate_set from=prelaunch to=running thread=main',
  );
});

test('micros are zero padded, booleans print 1/0, bigints in decimal, no fields is fine', () => {
  assert.equal(
    formatTraceLine(
      1,
      5_000_007_000n,
      'kvmclock_vm_state_change',
      { running: true, state: 'running' },
      'main',
    ),
    '1@5.000007:kvmclock_vm_state_change running=1 state=running thread=main',
  );
  assert.equal(
    formatTraceLine(
      1,
      0n,
      'kvmclock_set_clock',
      { clock: 18446744073709551615n, ok: false },
      'vcpu1',
    ),
    '1@0.000000:kvmclock_set_clock clock=18446744073709551615 ok=0 thread=vcpu1',
  );
  assert.equal(
    formatTraceLine(1, 0n, 'vm_start', undefined, 'main'),
    '1@0.000000:vm_start thread=main',
  );
});

test('a backtrace becomes numbered, indented frames, innermost first', () => {
  const stack = 'Error\n    at vmStart (file:///a.js:1:1)\n    at main (file:///b.js:2:2)';
  assert.equal(
    formatBacktrace(stack),
    '    #0 vmStart (file:///a.js:1:1)\n    #1 main (file:///b.js:2:2)\n',
  );
  assert.equal(formatBacktrace(undefined), '');
});
