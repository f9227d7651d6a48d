// Worker used by shared-lock.test.ts: increments a plain (non-atomic) counter
// under the shared lock, so lost updates would show if the lock failed.
import { workerData } from 'node:worker_threads';
import { SharedLock } from '../util/shared-lock.js';

const { buffer, rounds } = workerData as { buffer: SharedArrayBuffer; rounds: number };
const lock = new SharedLock(buffer, 0);
const counter = new Int32Array(buffer, 4, 1);
for (let i = 0; i < rounds; i++) {
  lock.lock();
  const v = counter[0]!;
  // A read-modify-write with a gap, so a broken lock loses updates.
  for (let spin = 0; spin < 5; spin++) counter[0] = v;
  counter[0] = v + 1;
  lock.unlock();
}
