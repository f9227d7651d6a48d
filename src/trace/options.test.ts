import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { currentTraceConfig, installTraceConfig, traceEvent } from './control.js';
import { parseTraceArg, parseTraceEventsFile, setUpTracing } from './options.js';

test('an events file: one pattern a line, # comments, blank lines, leading - disables', () => {
  const text = '# lifecycle\nvm_*   # all of it\n\n  -vm_reset\nkvmclock_ctrl\n';
  assert.deepEqual(parseTraceEventsFile(text), [
    { pattern: 'vm_*', enable: true, backtrace: false },
    { pattern: 'vm_reset', enable: false },
    { pattern: 'kvmclock_ctrl', enable: true, backtrace: false },
  ]);
});

test('-trace forms: bare pattern, enable=, leading -, events=, file=, backtrace=on', () => {
  assert.deepEqual(parseTraceArg('kvmclock_*'), {
    rules: [{ pattern: 'kvmclock_*', enable: true, backtrace: false }],
  });
  assert.deepEqual(parseTraceArg('-vm_start'), { rules: [{ pattern: 'vm_start', enable: false }] });
  assert.deepEqual(parseTraceArg('enable=vm_stop,backtrace=on,file=/tmp/x'), {
    rules: [{ pattern: 'vm_stop', enable: true, backtrace: true }],
    file: '/tmp/x',
  });
  const files: Record<string, string> = { '/ev': 'runstate_set\n-bh_*\n' };
  assert.deepEqual(
    parseTraceArg('events=/ev', (p) => files[p]!),
    {
      rules: [
        { pattern: 'runstate_set', enable: true, backtrace: false },
        { pattern: 'bh_*', enable: false },
      ],
    },
  );
});

test('bad -trace arguments are typed errors that show the syntax', () => {
  assert.throws(
    () => parseTraceArg('vm_start,colour=red'),
    (err: Error & { code?: string }) => {
      assert.equal(err.code, 'INVALID_TRACE_OPTION');
      assert.match(err.message, /colour=red.*-trace \[enable=\]PATTERN/);
      return true;
    },
  );
  assert.throws(() => parseTraceArg('vm_start,backtrace=yes'), { code: 'INVALID_TRACE_OPTION' });
  assert.throws(() => parseTraceArg('enable='), { code: 'INVALID_TRACE_OPTION' });
  assert.throws(() => parseTraceArg('events=/nonexistent/tsvmm-events'), {
    code: 'TRACE_FILE_ERROR',
  });
});

test('-D sends records to a file (truncated first); -trace events=FILE and patterns combine in order', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-trace-'));
  const previous = currentTraceConfig();
  try {
    const log = join(dir, 'out.log');
    writeFileSync(log, 'stale content\n');
    const events = join(dir, 'events');
    writeFileSync(events, '# what to see\nvm_*\n-vm_reset\n');
    const setup = setUpTracing({
      trace: [`events=${events}`, 'runstate_set', 'nosuchevent'],
      logFile: log,
    });
    assert.deepEqual(setup.warnings, ["trace event 'nosuchevent' does not exist"]);
    traceEvent('vm_start').emit();
    traceEvent('vm_reset').emit({ guest: false, reason: 'host-qmp-system-reset' });
    traceEvent('runstate_set').emit({ from: 'prelaunch', to: 'running' });
    traceEvent('bh_run').emit({ name: 'x' });
    setup.close();
    setup.close();
    const lines = readFileSync(log, 'utf8').split('\n').filter(Boolean);
    assert.deepEqual(
      lines.map((l) => l.replace(/^\d+@[\d.]+:/, '')),
      ['vm_start thread=main', 'runstate_set from=prelaunch to=running thread=main'],
    );
    assert.equal(currentTraceConfig().fd, 2, 'after close, records go to stderr, not a reused fd');
  } finally {
    installTraceConfig(previous);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an output file that cannot be opened is a typed error', () => {
  assert.throws(
    () => setUpTracing({ trace: ['vm_start'], logFile: '/nonexistent/dir/trace.log' }),
    {
      code: 'TRACE_FILE_ERROR',
    },
  );
});
