/**
 * A decoder for LZ4's "legacy" frame format, which Linux uses for
 * CONFIG_KERNEL_LZ4 (`lz4 -l`), and for the LZ4 block format inside it.
 *
 * Legacy frame: the magic 0x184C2102 (little-endian, bytes 02 21 4c 18),
 * then blocks, each a u32 LE compressed size and that many bytes of one LZ4
 * block. Every block decompresses on its own (no window shared between
 * blocks) to at most 8 MiB. A frame may be followed by another magic (files
 * concatenated), and the kernel's payload ends with the uncompressed size as
 * a u32 LE after the last block (scripts/Makefile.lib, size_append): four
 * final bytes whose value equals the bytes decoded so far are taken as that
 * trailer, not as a block header.
 *
 * Block: sequences of a token (literal count in the high nibble, match
 * length - 4 in the low nibble; 15 means "add the following bytes, up to and
 * including the first that is not 255"), the literals, a u16 LE offset back
 * into the output and the match, which may overlap the bytes it produces
 * (offset < length repeats a pattern). The last sequence has literals only.
 */
import { Lz4Error } from './errors.js';

/** The legacy frame's magic number, read little-endian. */
export const LZ4_LEGACY_MAGIC = 0x184c2102;
/** The most one legacy block decompresses to. */
export const LZ4_LEGACY_BLOCK_SIZE = 8 * 1024 * 1024;
/** LZ4_compressBound(8 MiB): no legacy block is larger compressed. */
export const LZ4_LEGACY_MAX_COMPRESSED =
  LZ4_LEGACY_BLOCK_SIZE + Math.floor(LZ4_LEGACY_BLOCK_SIZE / 255) + 16;
/** Default ceiling on a frame's output, far above any kernel. */
export const LZ4_DEFAULT_MAX_OUTPUT = 1024 * 1024 * 1024;

const MIN_MATCH = 4;
/** Copies at least this long go through set/copyWithin instead of a byte loop. */
const BULK_COPY = 32;

/**
 * Decodes the LZ4 block src[srcStart, srcEnd) into dst from dstStart,
 * writing no byte at or past dstLimit. Matches may reach back to dstStart
 * and no further. Returns the index in dst just past the last byte written.
 * Throws {@link Lz4Error} (LZ4_TRUNCATED, LZ4_CORRUPT) on bad input; it
 * never reads or writes outside the given ranges.
 */
export function decodeLz4Block(
  src: Uint8Array,
  srcStart: number,
  srcEnd: number,
  dst: Uint8Array,
  dstStart: number,
  dstLimit: number,
): number {
  if (srcStart < 0 || srcEnd > src.length || srcStart > srcEnd) {
    throw new RangeError(`block range [${srcStart}, ${srcEnd}) is outside the input`);
  }
  if (dstStart < 0 || dstLimit > dst.length || dstStart > dstLimit) {
    throw new RangeError(`output range [${dstStart}, ${dstLimit}) is outside the output buffer`);
  }
  let ip = srcStart;
  let op = dstStart;
  for (;;) {
    if (ip >= srcEnd) {
      throw new Lz4Error(
        'LZ4_TRUNCATED',
        `LZ4 block of ${srcEnd - srcStart} bytes ends where a sequence should start (a block ends with literals)`,
      );
    }
    const token = src[ip++]!;

    let literals = token >>> 4;
    if (literals === 15) {
      let b: number;
      do {
        if (ip >= srcEnd) throw truncated(srcStart, srcEnd, 'a literal length');
        b = src[ip++]!;
        literals += b;
      } while (b === 255);
    }
    if (literals > srcEnd - ip) {
      throw truncated(srcStart, srcEnd, `${literals} literal bytes`);
    }
    if (literals > dstLimit - op) throw tooLong(dstStart, dstLimit);
    if (literals < BULK_COPY) {
      for (let i = 0; i < literals; i++) dst[op + i] = src[ip + i]!;
    } else {
      dst.set(src.subarray(ip, ip + literals), op);
    }
    ip += literals;
    op += literals;
    if (ip === srcEnd) return op;

    if (srcEnd - ip < 2) throw truncated(srcStart, srcEnd, 'a match offset');
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op - dstStart) {
      throw new Lz4Error(
        'LZ4_CORRUPT',
        `corrupt LZ4 block: a match at output byte ${op - dstStart} refers ${offset} bytes back${offset === 0 ? ' (offset 0 is invalid)' : ', before the start of the block'}`,
      );
    }
    let length = (token & 15) + MIN_MATCH;
    if ((token & 15) === 15) {
      let b: number;
      do {
        if (ip >= srcEnd) throw truncated(srcStart, srcEnd, 'a match length');
        b = src[ip++]!;
        length += b;
      } while (b === 255);
    }
    if (length > dstLimit - op) throw tooLong(dstStart, dstLimit);
    const from = op - offset;
    if (offset >= length && length >= BULK_COPY) {
      dst.copyWithin(op, from, from + length);
    } else {
      // Overlapping (or short): byte by byte, so the pattern repeats.
      for (let i = 0; i < length; i++) dst[op + i] = dst[from + i]!;
    }
    op += length;
  }
}

function truncated(srcStart: number, srcEnd: number, what: string): Lz4Error {
  return new Lz4Error(
    'LZ4_TRUNCATED',
    `truncated LZ4 block: its ${srcEnd - srcStart} bytes end in the middle of ${what}`,
  );
}

function tooLong(dstStart: number, dstLimit: number): Lz4Error {
  return new Lz4Error(
    'LZ4_CORRUPT',
    `corrupt LZ4 block: it decompresses to more than ${dstLimit - dstStart} bytes`,
  );
}

/** Options of {@link decompressLz4Legacy}. */
export interface Lz4LegacyOptions {
  /** Refuse (LZ4_CORRUPT) output longer than this. Default 1 GiB. */
  maxOutput?: number;
}

/**
 * Decompresses a whole LZ4 legacy frame (or several, concatenated), with or
 * without the kernel's trailing u32 size. Throws {@link Lz4Error}:
 * LZ4_BAD_MAGIC when the input does not start with the magic, LZ4_TRUNCATED
 * when it ends early, LZ4_CORRUPT for anything else that does not decode.
 *
 * @example
 * const vmlinux = decompressLz4Legacy(payload); // payload starts 02 21 4c 18
 */
export function decompressLz4Legacy(input: Uint8Array, options: Lz4LegacyOptions = {}): Uint8Array {
  const maxOutput = options.maxOutput ?? LZ4_DEFAULT_MAX_OUTPUT;
  const end = input.length;
  if (end < 4 || readU32(input, 0) !== LZ4_LEGACY_MAGIC) {
    const head = Buffer.from(input.subarray(0, 4)).toString('hex');
    throw new Lz4Error(
      'LZ4_BAD_MAGIC',
      `not an LZ4 legacy frame: it starts with ${head || 'nothing'}, not 02214c18`,
    );
  }

  // A kernel payload's last four bytes give the output size: allocate it at once.
  const hint = end >= 8 ? readU32(input, end - 4) : 0;
  const guess = hint > 0 && hint <= maxOutput && hint <= end * 255 ? hint : end * 3;
  let out = new Uint8Array(Math.min(guess, maxOutput) + LZ4_LEGACY_BLOCK_SIZE);
  let op = 0;
  let ip = 4;
  while (ip < end) {
    if (end - ip < 4) {
      throw new Lz4Error(
        'LZ4_TRUNCATED',
        `truncated LZ4 legacy frame: ${end - ip} stray bytes at offset ${ip} where a block size should be`,
      );
    }
    const size = readU32(input, ip);
    if (size === LZ4_LEGACY_MAGIC) {
      ip += 4; // another frame follows
      continue;
    }
    if (end - ip === 4) {
      if (size === op % 2 ** 32) break; // the kernel's size trailer
      if (size > LZ4_LEGACY_MAX_COMPRESSED) {
        throw new Lz4Error(
          'LZ4_CORRUPT',
          `corrupt LZ4 legacy frame: it ends with the u32 ${size}, neither a block header nor the ${op} bytes decoded (the kernel's size trailer)`,
        );
      }
    }
    ip += 4;
    if (size > LZ4_LEGACY_MAX_COMPRESSED) {
      throw new Lz4Error(
        'LZ4_CORRUPT',
        `corrupt LZ4 legacy frame: the block at offset ${ip - 4} claims ${size} compressed bytes, more than the ${LZ4_LEGACY_MAX_COMPRESSED} an 8 MiB block can take`,
      );
    }
    if (size > end - ip) {
      throw new Lz4Error(
        'LZ4_TRUNCATED',
        `truncated LZ4 legacy frame: the block at offset ${ip - 4} claims ${size} bytes but only ${end - ip} remain`,
      );
    }
    if (out.length - op < LZ4_LEGACY_BLOCK_SIZE) {
      const grown = new Uint8Array(Math.max(out.length * 2, op + LZ4_LEGACY_BLOCK_SIZE));
      grown.set(out.subarray(0, op));
      out = grown;
    }
    op = decodeLz4Block(input, ip, ip + size, out, op, op + LZ4_LEGACY_BLOCK_SIZE);
    if (op > maxOutput) {
      throw new Lz4Error(
        'LZ4_CORRUPT',
        `LZ4 legacy frame decompresses to more than ${maxOutput} bytes; refusing it`,
      );
    }
    ip += size;
  }
  return op === out.length ? out : out.slice(0, op);
}

function readU32(bytes: Uint8Array, at: number): number {
  return (
    (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>> 0
  );
}
