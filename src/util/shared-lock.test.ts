import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { SharedLock } from './shared-lock.js';

function runWorker(buffer: SharedArrayBuffer, rounds: number): Promise<void> {
  const worker = new Worker(new URL('../test-support/lock-worker.js', import.meta.url), {
    workerData: { buffer, rounds },
  });
  return new Promise((resolve, reject) => {
    worker.once('error', reject);
    worker.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`exit ${code}`))));
  });
}

test('shared lock loses no update between two workers and the main thread', async () => {
  const buffer = new SharedArrayBuffer(8);
  const lock = new SharedLock(buffer, 0);
  const counter = new Int32Array(buffer, 4, 1);
  const rounds = 50_000;
  const workers = [runWorker(buffer, rounds), runWorker(buffer, rounds)];
  // The main thread takes part too (it spins instead of waiting).
  for (let i = 0; i < 2_000; i++) {
    lock.with(() => {
      counter[0] = counter[0]! + 1;
    });
    if (i % 100 === 0) await new Promise((r) => setImmediate(r));
  }
  await Promise.all(workers);
  assert.equal(counter[0], 2 * rounds + 2_000);
  assert.equal(Atomics.load(new Int32Array(buffer, 0, 1), 0), 0, 'lock left free');
});

test('with() releases the lock when the body throws', () => {
  const buffer = new SharedArrayBuffer(4);
  const lock = new SharedLock(buffer);
  assert.throws(() =>
    lock.with(() => {
      throw new Error('boom');
    }),
  );
  assert.equal(Atomics.load(new Int32Array(buffer), 0), 0);
});
