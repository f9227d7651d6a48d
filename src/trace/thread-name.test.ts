import assert from 'node:assert/strict';
import { test } from 'node:test';
import { captureTrace } from './capture.js';
import { traceEvent, traceThreadName, withTraceThreadName } from './control.js';

test('withTraceThreadName names the records of an async task and everything it awaits, and nothing else', async () => {
  const ev = traceEvent('migration_thread');
  let inner = '';
  const lines = await captureTrace(['migration_thread'], async () => {
    ev.emit({ phase: 'before' });
    const task = withTraceThreadName('migration', async () => {
      await new Promise((r) => setTimeout(r, 1));
      inner = traceThreadName();
      ev.emit({ phase: 'inside' });
    });
    ev.emit({ phase: 'beside' });
    await task;
    ev.emit({ phase: 'after' });
  });
  assert.equal(inner, 'migration');
  assert.deepEqual(
    lines.map((l) => l.slice(l.indexOf(':') + 1)),
    [
      'migration_thread phase=before thread=main',
      'migration_thread phase=beside thread=main',
      'migration_thread phase=inside thread=migration',
      'migration_thread phase=after thread=main',
    ],
  );
});
