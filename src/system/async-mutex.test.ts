import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { AsyncMutex } from './async-mutex.js';

test('callers run one at a time in arrival order', async () => {
  const m = new AsyncMutex();
  const log: string[] = [];
  const job = (name: string, ms: number) =>
    m.run(async () => {
      log.push(`${name} in`);
      await sleep(ms);
      log.push(`${name} out`);
      return name;
    });
  const results = await Promise.all([job('a', 20), job('b', 1), job('c', 5)]);
  assert.deepEqual(results, ['a', 'b', 'c']);
  assert.deepEqual(log, ['a in', 'a out', 'b in', 'b out', 'c in', 'c out']);
  assert.equal(m.locked, false);
});

test('a failing caller releases the mutex for the next', async () => {
  const m = new AsyncMutex();
  await assert.rejects(
    m.run(() => {
      throw new Error('first fails');
    }),
    /first fails/,
  );
  assert.equal(await m.run(() => 42), 42);
});
