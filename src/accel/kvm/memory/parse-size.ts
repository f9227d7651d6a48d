/**
 * Memory sizes as QEMU's -m takes them.
 */
import { InvalidMemorySizeError } from './errors.js';

const UNITS: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
};

/** QEMU rounds -m up to a multiple of 8 KiB; so do we, to stay byte-compatible. */
export const MEMORY_SIZE_ALIGN = 8192;

/** The largest guest RAM accepted: 1 TiB, far below where numbers lose precision. */
export const MAX_MEMORY_SIZE = 2 ** 40;

/**
 * Parses a memory size the way QEMU's `-m` does: a number with an optional
 * suffix B, K, M, G or T (any case, powers of 1024; `MiB`/`MB` spellings
 * are taken too), where a plain number means MiB. Fractions are allowed (`1.5G`). Returns bytes, rounded up to
 * 8 KiB.
 *
 * @example parseMemorySize('512M') === 536870912
 * @example parseMemorySize('1024') === 1073741824
 */
export function parseMemorySize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|(b))?\s*$/i.exec(text);
  const hint = 'use a number of MiB or a number with a suffix K, M, G or T, such as 512M or 4G';
  if (!match) throw new InvalidMemorySizeError(`invalid memory size '${text}': ${hint}`);
  const unit = UNITS[(match[2] ?? match[3] ?? 'm').toLowerCase()]!;
  if (unit === 1 && match[1]!.includes('.')) {
    throw new InvalidMemorySizeError(
      `memory size '${text}': a size in bytes cannot have a fraction`,
    );
  }
  const bytes = Math.ceil(Number(match[1]) * unit);
  if (bytes <= 0) throw new InvalidMemorySizeError(`memory size '${text}' is zero: ${hint}`);
  if (bytes > MAX_MEMORY_SIZE) {
    throw new InvalidMemorySizeError(`memory size '${text}' is above the 1 TiB tsvmm supports`);
  }
  return Math.ceil(bytes / MEMORY_SIZE_ALIGN) * MEMORY_SIZE_ALIGN;
}
