import { UsageError } from './usage-error.js';

const UNITS: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * Parses a size as QEMU does for `-m`: a number, optionally with a
 * fraction, and an optional binary suffix B, K, M, G, T, P, E (either case).
 * A number without suffix is in `defaultUnit` (MiB for `-m`). Returns bytes.
 *
 * @example
 * parseSize('-m', '1.5G', 'M'); // 1610612736
 * parseSize('-m', '512', 'M');  // 536870912
 */
export function parseSize(option: string, text: string, defaultUnit: 'B' | 'M'): number {
  const match = /^(\d+)(?:\.(\d+))?([bkmgtpeBKMGTPE])?$/.exec(text);
  if (match === null) {
    throw new UsageError(
      `${option} ${text}: not a size; write a number with an optional suffix K, M, G or T, for example 512M or 2G`,
    );
  }
  const [, whole, fraction, suffix] = match;
  const unit = UNITS[(suffix ?? defaultUnit).toLowerCase()]!;
  if (fraction !== undefined && unit === 1) {
    throw new UsageError(`${option} ${text}: a size in bytes cannot have a fraction`);
  }
  const value = Number(`${whole}.${fraction ?? '0'}`) * unit;
  if (!Number.isSafeInteger(Math.ceil(value))) {
    throw new UsageError(`${option} ${text}: size too large`);
  }
  return Math.ceil(value);
}
