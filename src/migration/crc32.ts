import * as zlib from 'node:zlib';

/**
 * CRC-32 (IEEE 802.3, the zlib/PNG/gzip polynomial 0xEDB88320, reflected),
 * continued from `previous` so a stream can be checksummed in pieces:
 * `crc32(b, crc32(a)) === crc32(concat(a, b))`.
 *
 * Node 20.15+ ships zlib's native crc32 (several GB/s); older Node 20 falls
 * back to a slicing-by-8 table in JavaScript that computes the same value.
 */
export function crc32(data: Uint8Array, previous = 0): number {
  return impl(data, previous);
}

type Crc32Fn = (data: Uint8Array, previous: number) => number;

const native = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

const TABLES = buildTables();

function buildTables(): Uint32Array[] {
  const tables: Uint32Array[] = [];
  const t0 = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t0[n] = c >>> 0;
  }
  tables.push(t0);
  for (let t = 1; t < 8; t++) {
    const prev = tables[t - 1]!;
    const cur = new Uint32Array(256);
    for (let n = 0; n < 256; n++) cur[n] = (t0[prev[n]! & 0xff]! ^ (prev[n]! >>> 8)) >>> 0;
    tables.push(cur);
  }
  return tables;
}

/** The JavaScript implementation, exported so tests can compare it with zlib's. */
export function crc32Portable(data: Uint8Array, previous = 0): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES as [
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
  ];
  let c = ~previous >>> 0;
  let i = 0;
  const n = data.length;
  // Eight bytes per step: each table folds one byte position at once.
  for (; i + 8 <= n; i += 8) {
    const a =
      (c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>> 0;
    c =
      t7[a & 0xff]! ^
      t6[(a >>> 8) & 0xff]! ^
      t5[(a >>> 16) & 0xff]! ^
      t4[a >>> 24]! ^
      t3[data[i + 4]!]! ^
      t2[data[i + 5]!]! ^
      t1[data[i + 6]!]! ^
      t0[data[i + 7]!]!;
  }
  for (; i < n; i++) c = t0[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

const impl: Crc32Fn = native ? (d, p) => native(d, p) >>> 0 : crc32Portable;

/** Whether the native zlib implementation is in use (for benchmarks and reports). */
export const crc32IsNative = native !== undefined;
