/**
 * A FIFO async mutex: callers of `run` go one at a time, in arrival order.
 * The lifecycle uses it so that a stop arriving while a start is still
 * notifying waits for the start to finish (QEMU gets this from the big QEMU
 * lock). It is not re-entrant: code running under it must not call `run`
 * on the same mutex again, or it waits for itself forever.
 */
export class AsyncMutex {
  private tail: Promise<void> = Promise.resolve();
  private held = false;

  /** Whether some call holds the mutex now. */
  get locked(): boolean {
    return this.held;
  }

  /** Runs `fn` once every earlier caller has finished, and returns its result. */
  run<T>(fn: () => Promise<T> | T): Promise<T> {
    const result = this.tail.then(async () => {
      this.held = true;
      try {
        return await fn();
      } finally {
        this.held = false;
      }
    });
    // The next caller waits for this one whether it succeeded or not.
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
