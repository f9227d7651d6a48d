import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { captureTrace, traceBody } from './capture.js';
import {
  createTraceConfig,
  currentTraceConfig,
  installTraceConfig,
  traceEvent,
  traceEventGetState,
  traceEventSetState,
} from './control.js';
import { TRACE_EVENT_NAMES } from './events.js';

test('enabled events write a line; disabled events write nothing', async () => {
  const lines = await captureTrace(['kvmclock_*', '-kvmclock_ctrl'], () => {
    traceEvent('kvmclock_set_clock').emit({ clock: 5n });
    traceEvent('kvmclock_ctrl').emit({ cpu: 0, ret: 0 });
    traceEvent('vm_start').emit();
  });
  assert.deepEqual(lines.map(traceBody), ['kvmclock_set_clock clock=5']);
  assert.match(
    lines[0]!,
    new RegExp(`^${process.pid}@\\d+\\.\\d{6}:kvmclock_set_clock clock=5 thread=main$`),
  );
});

test('a disabled event reports enabled=false and its fields are never formatted', async () => {
  let formatted = 0;
  const costly = {
    toString() {
      formatted++;
      return 'x';
    },
  };
  const ev = traceEvent('vm_reset');
  await captureTrace([], () => {
    assert.equal(ev.enabled, false);
    if (ev.enabled) ev.emit({ reason: String(costly) });
    ev.emit({ reason: 'x' });
  });
  assert.equal(formatted, 0);
});

test('later rules override earlier ones, in order', async () => {
  const lines = await captureTrace(['-vm_*', 'vm_stop'], () => {
    traceEvent('vm_start').emit();
    traceEvent('vm_stop').emit({ state: 'paused' });
  });
  assert.deepEqual(lines.map(traceBody), ['vm_stop state=paused']);
});

test('the timestamp is wall-clock time', async () => {
  const before = Date.now();
  const lines = await captureTrace(['vm_start'], () => traceEvent('vm_start').emit());
  const stamp = Number(/@(\d+\.\d+):/.exec(lines[0]!)![1]) * 1000;
  assert.ok(Math.abs(stamp - before) < 1000, `${stamp} is near ${before}`);
});

test('-trace-backtrace adds the JS stack after each line, starting at the caller', async () => {
  function emittingCaller() {
    traceEvent('vm_start').emit();
  }
  const lines = await captureTrace(['vm_start'], emittingCaller, { backtrace: true });
  assert.equal(traceBody(lines[0]!), 'vm_start');
  assert.match(lines[1]!, /^ {4}#0 emittingCaller /);
  assert.ok(lines.length > 2);
  assert.ok(lines.slice(1).every((l) => /^ {4}#\d+ /.test(l)));
  assert.ok(!lines.some((l) => l.includes('TraceEvent.emit')), 'the tracer itself is cut off');
});

test('per-event backtrace=on gives a stack only for that event', async () => {
  const lines = await captureTrace(
    [{ pattern: 'vm_start', enable: true, backtrace: true }, 'vm_stop'],
    () => {
      traceEvent('vm_stop').emit({ state: 'paused' });
      traceEvent('vm_start').emit();
    },
  );
  assert.equal(traceBody(lines[0]!), 'vm_stop state=paused');
  assert.equal(traceBody(lines[1]!), 'vm_start');
  assert.match(lines[2]!, /^ {4}#0 /);
});

test('a non-wildcard pattern naming no event is a warning, not an error, on the command line', () => {
  const { warnings } = createTraceConfig({
    rules: [
      { pattern: 'no_such_event', enable: true },
      { pattern: 'no_such_*', enable: true },
    ],
  });
  assert.deepEqual(warnings, ["trace event 'no_such_event' does not exist"]);
});

test('QMP: get-state lists by pattern, set-state toggles, unknown names and empty matches are errors', async () => {
  await captureTrace(['kvmclock_ctrl'], () => {
    assert.deepEqual(traceEventGetState('kvmclock_ctrl'), [
      { name: 'kvmclock_ctrl', state: 'enabled', vcpu: false },
    ]);
    const all = traceEventGetState('*');
    assert.equal(all.length, TRACE_EVENT_NAMES.length);
    assert.equal(all.filter((e) => e.state === 'enabled').length, 1);
    assert.equal(traceEventSetState('vm_st*', true), 3); // vm_start, vm_stop, vm_state_notify
    assert.deepEqual(
      traceEventGetState('vm_st*').map((e) => e.state),
      ['enabled', 'enabled', 'enabled'],
    );
    assert.equal(traceEventSetState('kvmclock_ctrl', false), 1);
    assert.equal(traceEvent('kvmclock_ctrl').enabled, false);
    assert.deepEqual(traceEventGetState('no_such_*'), []);
    assert.throws(() => traceEventGetState('no_such_event'), { code: 'TRACE_EVENT_NOT_FOUND' });
    assert.throws(() => traceEventSetState('no_such_*', true), { code: 'TRACE_EVENT_NOT_FOUND' });
  });
});

test('QMP set-state keeps a per-event backtrace across off and on', async () => {
  const lines = await captureTrace([{ pattern: 'vm_start', enable: true, backtrace: true }], () => {
    traceEventSetState('vm_start', false);
    traceEvent('vm_start').emit();
    traceEventSetState('vm_start', true);
    traceEvent('vm_start').emit();
  });
  assert.equal(traceBody(lines[0]!), 'vm_start');
  assert.match(lines[1]!, /^ {4}#0 /);
});

test('a worker thread writes to the same fd under its own name, and sees QMP changes made on main', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-trace-'));
  const path = join(dir, 'trace.log');
  const fd = openSync(path, 'w');
  const previous = currentTraceConfig();
  const { config } = createTraceConfig({
    rules: [
      { pattern: 'kvmclock_ctrl', enable: true },
      { pattern: 'vm_start', enable: true },
    ],
    fd,
  });
  installTraceConfig(config);
  const worker = new Worker(new URL('./trace-test-worker.js', import.meta.url), {
    workerData: { config, name: 'vcpu0' },
  });
  const next = () => new Promise<unknown>((r) => worker.once('message', r));
  try {
    assert.equal(await next(), 'ready');
    traceEvent('vm_start').emit();
    worker.postMessage({ emit: 0 });
    assert.equal(await next(), 'emitted');
    traceEvent('vm_start').emit();
    // Turned off on main: the worker's next emit must write nothing.
    traceEventSetState('kvmclock_ctrl', false);
    worker.postMessage({ emit: 1 });
    assert.equal(await next(), 'emitted');
    worker.postMessage('exit');
    await new Promise((r) => worker.once('exit', r));
  } finally {
    installTraceConfig(previous);
    await worker.terminate();
    closeSync(fd);
  }
  const lines = readFileSync(path, 'utf8').split('\n').filter(Boolean);
  rmSync(dir, { recursive: true, force: true });
  assert.deepEqual(
    lines.map((l) => l.replace(/^\d+@[\d.]+:/, '')),
    ['vm_start thread=main', 'kvmclock_ctrl cpu=0 ret=0 thread=vcpu0', 'vm_start thread=main'],
  );
  const stamps = lines.map((l) => Number(/@(\d+\.\d+):/.exec(l)![1]));
  assert.deepEqual(
    [...stamps].sort((a, b) => a - b),
    stamps,
    'one clock across threads',
  );
  assert.ok(lines.every((l) => l.startsWith(`${process.pid}@`)));
});
