import { scaled } from './time-scale.js';

/**
 * Retries `check` (which throws while its condition does not hold yet)
 * until it passes or `timeoutMs` has gone by, then rethrows its last error.
 * For asserting on work another part of the event loop finishes, without
 * guessing how long that takes on a loaded machine.
 */
export async function eventually(check: () => void, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + scaled(timeoutMs);
  for (;;) {
    try {
      check();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}
