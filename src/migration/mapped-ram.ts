/**
 * The mapped-ram layout of the "ram" section (QEMU 9's `mapped-ram`
 * capability, docs/devel/migration/mapped-ram.rst): every page of a RAM
 * block has a fixed offset in the file, so a restore can map the file
 * instead of reading it.
 *
 * In the RAM_SAVE_FLAG_MEM_SIZE record of the START section, after each
 * block's id and length, comes the block's MappedRamHeader (packed,
 * big-endian: u32 version = 1, u64 page_size, u64 bitmap_offset, u64
 * pages_offset, offsets absolute in the file). The bitmap of the pages
 * present follows the header at once (bit N of byte N/8 for page N%8, in
 * unsigned longs: its size is rounded up to 8 bytes), then the file skips
 * to pages_offset, rounded up to 1 MiB, where page N of the block lives at
 * pages_offset + N * page_size; zero pages are holes (the file is sparse).
 * The stream goes on after the block's last page. tsvmm writes the bitmap
 * in line, so it is part of the stream its integrity records cover; the
 * pages are not (checking them would mean reading them all).
 */
import { MigrationStreamError } from './errors.js';
import type { ByteSink, ByteSource, StreamReader, StreamWriter } from './qemu-file.js';
import {
  isZeroPageAt,
  isZeroRun,
  PAGE_SIZE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  type RamAccessor,
  type RamBlock,
  type RamCounters,
  ramTotal,
} from './ram.js';

/** MappedRamHeader's version (QEMU's MAPPED_RAM_HDR_VERSION). */
export const MAPPED_RAM_HEADER_VERSION = 1;
/** The header's size: u32 + 3 * u64, packed. */
export const MAPPED_RAM_HEADER_SIZE = 28;
/** The pages region starts on this boundary (QEMU's MAPPED_RAM_FILE_OFFSET_ALIGNMENT). */
export const MAPPED_RAM_ALIGNMENT = 1 << 20;
/** The capability name, as the configuration section carries it. */
export const MAPPED_RAM_CAPABILITY = 'mapped-ram';

/** Pages scanned, and written, in one piece. */
const RUN_PAGES = 256;
/** The most bytes of consecutive present pages written by one call. */
const MAX_WRITE = 8 << 20;

/** Bytes of the bitmap of a block of `pages` pages: whole 64-bit longs, as QEMU's. */
export function mappedRamBitmapBytes(pages: number): number {
  return Math.ceil(pages / 64) * 8;
}

/** Where one block's bitmap and pages are in the file (absolute offsets). */
export interface MappedRamBlockEntry {
  readonly id: string;
  readonly size: number;
  readonly bitmapOffset: number;
  readonly pagesOffset: number;
  /** Bit N set: page N is in the file; clear: it is zero (a hole). */
  readonly bitmap: Uint8Array;
}

/** Whether page `n` is set in `bitmap`. */
export function pagePresent(bitmap: Uint8Array, n: number): boolean {
  return (bitmap[n >> 3]! & (1 << (n & 7))) !== 0;
}

function alignUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/**
 * The bitmap of the pages of `block` that are not zero: one pass, a
 * memcmp per 1 MiB run (a run that is all zero costs one), and none for
 * pages the block knows were never populated.
 */
export function presentPages(block: RamBlock): Uint8Array {
  const pages = block.size / PAGE_SIZE;
  const bitmap = new Uint8Array(mappedRamBitmapBytes(pages));
  let known = true;
  for (let first = 0; first < pages; first += RUN_PAGES) {
    const count = Math.min(RUN_PAGES, pages - first);
    const unpopulated = known ? block.unpopulatedPages?.(first, count) : undefined;
    if (!unpopulated || unpopulated.length !== count) known = false;
    if (unpopulated?.every((u) => u === 1)) continue;
    const data = block.read(first * PAGE_SIZE, count * PAGE_SIZE);
    if (isZeroRun(data)) continue;
    for (let k = 0; k < count; k++) {
      if (unpopulated?.[k]) continue;
      if (!isZeroPageAt(data, k * PAGE_SIZE)) {
        const n = first + k;
        bitmap[n >> 3]! |= 1 << (n & 7);
      }
    }
  }
  return bitmap;
}

/**
 * Writes the START section's RAM payload in the mapped-ram layout, up to
 * and including its EOS: the MEM_SIZE record with each block's header and
 * bitmap in line, a hole up to the end of each block's pages region, and
 * each present page written at its offset. The sink must be seekable
 * (file:); the guest must not run meanwhile (the bitmap is taken first).
 * `fileOffset` is where the stream starts in the file.
 */
export async function saveMappedRam(
  w: StreamWriter,
  sink: ByteSink,
  ram: RamAccessor,
  counters: RamCounters,
): Promise<MappedRamBlockEntry[]> {
  const writeAt = sink.writeAt?.bind(sink);
  if (!writeAt || !sink.skip) {
    throw new MigrationStreamError(
      'MIGRATION_MALFORMED',
      'the mapped-ram layout needs a seekable sink (a file: URI); this one is a stream',
    );
  }
  const fileOffset = sink.fileOffset ?? 0;
  const entries: MappedRamBlockEntry[] = [];
  w.u64n(ramTotal(ram) + RAM_SAVE_FLAG_MEM_SIZE);
  for (const block of ram.blocks) {
    const pages = block.size / PAGE_SIZE;
    const bitmap = presentPages(block);
    w.str8(block.id);
    w.u64n(block.size);
    const bitmapOffset = fileOffset + w.offset + MAPPED_RAM_HEADER_SIZE;
    const pagesOffset = alignUp(bitmapOffset + bitmap.length, MAPPED_RAM_ALIGNMENT);
    w.u32(MAPPED_RAM_HEADER_VERSION);
    w.u64n(PAGE_SIZE);
    w.u64n(bitmapOffset);
    w.u64n(pagesOffset);
    w.bytes(bitmap);
    await w.skip(pagesOffset + block.size - (fileOffset + w.offset));
    // Runs of present pages, each written where it belongs.
    let n = 0;
    while (n < pages) {
      if (!pagePresent(bitmap, n)) {
        counters.zeroPages++;
        n++;
        continue;
      }
      let end = n + 1;
      while (end < pages && end - n < MAX_WRITE / PAGE_SIZE && pagePresent(bitmap, end)) end++;
      const data = block.read(n * PAGE_SIZE, (end - n) * PAGE_SIZE);
      await writeAt(data, pagesOffset - fileOffset + n * PAGE_SIZE);
      counters.normalPages += end - n;
      n = end;
    }
    entries.push({ id: block.id, size: block.size, bitmapOffset, pagesOffset, bitmap });
  }
  w.u64n(RAM_SAVE_FLAG_EOS);
  return entries;
}

function malformed(r: StreamReader, what: string): MigrationStreamError {
  return new MigrationStreamError(
    'MIGRATION_MALFORMED',
    `${what} in the mapped-ram 'ram' section near byte ${r.offset}`,
  );
}

async function be64(r: StreamReader): Promise<number> {
  const p = r.need(8);
  if (p) await p;
  const hi = r.u32();
  const lo = r.u32();
  const v = hi * 0x1_0000_0000 + lo;
  if (!Number.isSafeInteger(v)) throw malformed(r, `a 64-bit value 0x${hi.toString(16)}…`);
  return v;
}

/**
 * Reads the START section's mapped-ram payload up to and including its
 * EOS: each block's id, length, header and bitmap, skipping its pages
 * region (the source must be seekable; a file cut inside a region shows
 * as a truncation at the next read). Nothing is written to guest RAM:
 * the caller keeps the entries until the stream is verified, then
 * {@link applyMappedRam}. `fileOffset` is where the stream starts in the file.
 */
export async function loadMappedRamSection(
  r: StreamReader,
  fileOffset: number,
): Promise<MappedRamBlockEntry[]> {
  const first = await be64(r);
  if (first % PAGE_SIZE !== RAM_SAVE_FLAG_MEM_SIZE) {
    throw malformed(r, 'no block list (RAM_SAVE_FLAG_MEM_SIZE) at the start');
  }
  let left = first - RAM_SAVE_FLAG_MEM_SIZE;
  const entries: MappedRamBlockEntry[] = [];
  while (left > 0) {
    const id = await r.str8();
    const size = await be64(r);
    if (size === 0 || size > left || size % PAGE_SIZE !== 0) {
      throw malformed(r, `block '${id}' of ${size} bytes in the block list`);
    }
    left -= size;
    let p = r.need(MAPPED_RAM_HEADER_SIZE);
    if (p) await p;
    const version = r.u32();
    if (version !== MAPPED_RAM_HEADER_VERSION) {
      throw new MigrationStreamError(
        'MIGRATION_VERSION',
        `block '${id}' has a MappedRamHeader of version ${version}; this build reads version ${MAPPED_RAM_HEADER_VERSION}`,
      );
    }
    const pageSize = await be64(r);
    const bitmapOffset = await be64(r);
    const pagesOffset = await be64(r);
    if (pageSize !== PAGE_SIZE) {
      throw new MigrationStreamError(
        'MIGRATION_SHAPE_MISMATCH',
        `block '${id}' was saved with ${pageSize}-byte pages; this build uses ${PAGE_SIZE}`,
      );
    }
    const here = fileOffset + r.offset;
    const bitmapBytes = mappedRamBitmapBytes(size / PAGE_SIZE);
    if (bitmapOffset !== here) {
      throw malformed(
        r,
        `block '${id}': its bitmap at ${bitmapOffset}, not ${here} after its header`,
      );
    }
    if (pagesOffset < bitmapOffset + bitmapBytes || pagesOffset % PAGE_SIZE !== 0) {
      throw malformed(
        r,
        `block '${id}': its pages at ${pagesOffset} overlap its bitmap or are not page aligned`,
      );
    }
    p = r.need(bitmapBytes);
    if (p) await p;
    const bitmap = r.take(bitmapBytes).slice();
    r.skip(pagesOffset + size - (fileOffset + r.offset));
    entries.push({ id, size, bitmapOffset, pagesOffset, bitmap });
  }
  if ((await be64(r)) !== RAM_SAVE_FLAG_EOS) throw malformed(r, 'no EOS after the block list');
  return entries;
}

/** Set bits of each byte value. */
const POPCOUNT = Uint8Array.from({ length: 256 }, (_, v) => {
  let n = 0;
  for (let b = v; b; b >>= 1) n += b & 1;
  return n;
});

/** Set bits of a 32-bit word (the classic SWAR count). */
function popcount32(v: number): number {
  let x = v - ((v >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/**
 * Counts the present pages of an entry: 32 pages at a time where the
 * bitmap is 4-byte aligned in memory, else a byte at a time (a 2 GiB
 * block has 512 Ki pages, and this is on the restore's critical path).
 */
export function countPresent(entry: MappedRamBlockEntry): number {
  const { bitmap } = entry;
  const pages = entry.size / PAGE_SIZE;
  let n = 0;
  let byte = 0;
  if (bitmap.byteOffset % 4 === 0) {
    const words = new Uint32Array(bitmap.buffer, bitmap.byteOffset, pages >>> 5);
    for (let i = 0; i < words.length; i++) n += popcount32(words[i]!);
    byte = words.length * 4;
  }
  const whole = pages >> 3;
  for (; byte < whole; byte++) n += POPCOUNT[bitmap[byte]!]!;
  for (let p = whole * 8; p < pages; p++) if (pagePresent(bitmap, p)) n++;
  return n;
}

/**
 * Maps a block's pages region over its guest RAM, privately: `fd` is the
 * open file, `fileOffset` the region's start, `length` the block's size.
 * Provided by the machine (GuestMemory.mapFilePrivate); absent, the
 * pages are read and copied.
 */
export type MapRamFromFile = (
  blockId: string,
  fd: number,
  fileOffset: number,
  length: number,
) => void;

const ZERO_PAGE = new Uint8Array(PAGE_SIZE);

/**
 * Puts the verified mapped-ram blocks into guest RAM: by mapping each
 * block's pages region (`map`, with the source's fd) or, without either,
 * by reading its present pages from the file (`source.readAt`) into the
 * block; pages absent from the bitmap are zero (written only where RAM
 * may not be zero already, unless `ramIsZeroed`).
 */
export async function applyMappedRam(
  entries: readonly MappedRamBlockEntry[],
  ram: RamAccessor,
  source: ByteSource,
  options: { map?: MapRamFromFile; ramIsZeroed: boolean; counters: RamCounters },
): Promise<'mapped' | 'copied'> {
  const { map, counters } = options;
  const fd = source.fd;
  for (const e of entries) {
    const present = countPresent(e);
    counters.normalPages += present;
    counters.zeroPages += e.size / PAGE_SIZE - present;
  }
  if (map && fd !== undefined) {
    for (const e of entries) map(e.id, fd, e.pagesOffset, e.size);
    return 'mapped';
  }
  const readAt = source.readAt?.bind(source);
  if (!readAt) {
    throw new MigrationStreamError(
      'MIGRATION_MALFORMED',
      'the mapped-ram layout needs a seekable source (a file: URI) to read its pages',
    );
  }
  const buf = new Uint8Array(MAX_WRITE);
  for (const e of entries) {
    const block = ram.blocks.find((b) => b.id === e.id)!;
    const pages = e.size / PAGE_SIZE;
    let n = 0;
    while (n < pages) {
      if (!pagePresent(e.bitmap, n)) {
        if (!options.ramIsZeroed && !isZeroPageAt(block.read(n * PAGE_SIZE, PAGE_SIZE), 0)) {
          block.write(n * PAGE_SIZE, ZERO_PAGE);
        }
        n++;
        continue;
      }
      let end = n + 1;
      while (end < pages && end - n < MAX_WRITE / PAGE_SIZE && pagePresent(e.bitmap, end)) end++;
      const len = (end - n) * PAGE_SIZE;
      const got = await readAt(buf.subarray(0, len), e.pagesOffset + n * PAGE_SIZE);
      if (got !== len) {
        throw new MigrationStreamError(
          'MIGRATION_TRUNCATED',
          `block '${e.id}': pages ${n} to ${end - 1} end at byte ${e.pagesOffset + n * PAGE_SIZE + got} of the file`,
        );
      }
      block.write(n * PAGE_SIZE, buf.subarray(0, len));
      n = end;
    }
  }
  return 'copied';
}
