import { isMainThread } from 'node:worker_threads';

/**
 * A mutex over one Int32 of a SharedArrayBuffer, usable from the main thread
 * and from every worker that was handed the same buffer. It is tsvmm's
 * counterpart of QEMU's big lock for device state that several vCPU threads
 * touch: held only for the few microseconds a register access takes.
 *
 * 0 = free, 1 = held, 2 = held with waiters (so unlock knows to notify).
 * The main thread may not block in Atomics.wait, so it spins there instead;
 * the hold times are short enough for that.
 */
export class SharedLock {
  private readonly cell: Int32Array;
  private readonly canWait: boolean;

  constructor(buffer: SharedArrayBuffer, byteOffset = 0) {
    this.cell = new Int32Array(buffer, byteOffset, 1);
    // Atomics.wait throws on the main thread of Node; workers may block.
    this.canWait = !isMainThread;
  }

  lock(): void {
    let c = Atomics.compareExchange(this.cell, 0, 0, 1);
    if (c === 0) return;
    do {
      if (c === 2 || Atomics.compareExchange(this.cell, 0, 1, 2) !== 0) {
        if (this.canWait) Atomics.wait(this.cell, 0, 2, 1);
      }
      c = Atomics.compareExchange(this.cell, 0, 0, 2);
    } while (c !== 0);
  }

  unlock(): void {
    if (Atomics.exchange(this.cell, 0, 0) === 2) Atomics.notify(this.cell, 0, 1);
  }

  /** Runs `fn` with the lock held. */
  with<T>(fn: () => T): T {
    this.lock();
    try {
      return fn();
    } finally {
      this.unlock();
    }
  }
}
