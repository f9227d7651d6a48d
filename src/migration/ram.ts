import { MigrationStreamError } from './errors.js';
import type { StreamReader, StreamWriter } from './qemu-file.js';

/** The target page size: x86's 4 KiB, QEMU's TARGET_PAGE_SIZE. */
export const PAGE_SIZE = 4096;
const PAGE_MASK_LOW = PAGE_SIZE - 1;

/** RAM_SAVE_FLAG_* from QEMU's migration/ram.c, in the low bits of each be64 header. */
export const RAM_SAVE_FLAG_ZERO = 0x02;
export const RAM_SAVE_FLAG_MEM_SIZE = 0x04;
export const RAM_SAVE_FLAG_PAGE = 0x08;
export const RAM_SAVE_FLAG_EOS = 0x10;
export const RAM_SAVE_FLAG_CONTINUE = 0x20;

/** The version QEMU gives its "ram" section, which analyze-migration.py requires. */
export const RAM_SECTION_VERSION = 4;

/** One block of guest RAM (QEMU's RAMBlock), by its id ("pc.ram"). */
export interface RamBlock {
  readonly id: string;
  /** Bytes; a multiple of the page size. */
  readonly size: number;
  /** A view or copy of `len` bytes at `offset`; the saver only reads it. */
  read(offset: number, len: number): Uint8Array;
  /** Copies `bytes` into the block at `offset`. */
  write(offset: number, bytes: Uint8Array): void;
  /**
   * Optional: for the `count` pages from page index `firstPage`, one byte
   * per page, 1 where the page is certainly zero without reading it (host
   * memory never populated), 0 where it must be read to know. Undefined
   * when this cannot be told (the saver then reads every page). Reading an
   * untouched page of an anonymous mapping can allocate it, so the saver
   * asks first and sends these pages as zero pages without a read.
   */
  unpopulatedPages?(firstPage: number, count: number): Uint8Array | undefined;
  /**
   * Optional: whether `len` bytes at `offset` are all zero, told without
   * `read` (which may make a view of the whole block, and a thread's first
   * view of guest RAM costs it a full garbage collection).
   */
  isZero?(offset: number, len: number): boolean;
}

/** Guest RAM as the stream sees it; the machine adapts its memory to this. */
export interface RamAccessor {
  readonly blocks: readonly RamBlock[];
}

/** Pages to send from one block, as page indices (offset / PAGE_SIZE). */
export interface RamPageSelection {
  readonly block: string;
  readonly pages: Iterable<number>;
}

/** Counters QEMU reports in query-migrate's "ram" object. */
export interface RamCounters {
  /** Pages sent in full (QEMU's "normal"). */
  normalPages: number;
  /** Pages sent as zero pages (QEMU's "duplicate"). */
  zeroPages: number;
}

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
const NO_PAGE = new Uint8Array(0);

/**
 * Whether a page is all zeros. A native memcmp against a zero page beats
 * JavaScript word loops: measured on this project's host, 14.8 GB/s against
 * 6.5 GB/s for a BigUint64Array loop and 4.3 GB/s for Int32Array.
 */
export function isZeroPage(page: Uint8Array): boolean {
  return ZERO_PAGE.equals(page);
}

/** Whether the page at byte `at` of `data` is all zeros, without a view of it. */
export function isZeroPageAt(data: Uint8Array, at: number): boolean {
  return ZERO_PAGE.compare(data, at, at + PAGE_SIZE) === 0;
}

const ZERO_RUN_PAGES = 256;
const ZERO_RUN = Buffer.alloc(ZERO_RUN_PAGES * PAGE_SIZE);

/** Whether `data` (at most 1 MiB: a run of pages, a bitmap) is all zeros: one memcmp. */
export function isZeroRun(data: Uint8Array): boolean {
  return (
    data.length <= ZERO_RUN.length && ZERO_RUN.compare(data, 0, data.length, 0, data.length) === 0
  );
}

/** Sum of the block sizes. */
export function ramTotal(ram: RamAccessor): number {
  let n = 0;
  for (const b of ram.blocks) n += b.size;
  return n;
}

/** Checks the accessor once so a broken adapter fails before a stream starts. */
export function validateRam(ram: RamAccessor): void {
  const ids = new Set<string>();
  for (const b of ram.blocks) {
    if (ids.has(b.id)) throw new RangeError(`RAM block '${b.id}' appears twice`);
    ids.add(b.id);
    if (!b.id || Buffer.byteLength(b.id) > 255) {
      throw new RangeError(`RAM block id '${b.id}' must be 1 to 255 bytes long`);
    }
    if (!Number.isSafeInteger(b.size) || b.size <= 0 || b.size % PAGE_SIZE !== 0) {
      throw new RangeError(
        `RAM block '${b.id}' size ${b.size} is not a positive multiple of ${PAGE_SIZE}`,
      );
    }
  }
}

/**
 * The setup part of the "ram" section: the total size with
 * RAM_SAVE_FLAG_MEM_SIZE, then each block's id and length, then EOS.
 */
export function saveRamSetup(w: StreamWriter, ram: RamAccessor): void {
  w.u64n(ramTotal(ram) + RAM_SAVE_FLAG_MEM_SIZE);
  for (const b of ram.blocks) {
    w.str8(b.id);
    w.u64n(b.size);
  }
  w.u64n(RAM_SAVE_FLAG_EOS);
}

/**
 * Writes pages of one RAM section: each page's be64 header (offset | flags,
 * RAM_SAVE_FLAG_CONTINUE when the block is the previous page's, else the
 * block id follows), then a single 0 byte for a zero page or the 4 KiB.
 * The caller ends the section with {@link saveRamEos}.
 */
export class RamPageWriter {
  private lastBlock: RamBlock | undefined;

  constructor(
    private readonly w: StreamWriter,
    readonly counters: RamCounters,
  ) {}

  /** Starts a new section: QEMU's loader accepts CONTINUE across sections, analyze-migration.py too, but naming the block again keeps each section self-contained. */
  newSection(): void {
    this.lastBlock = undefined;
  }

  page(block: RamBlock, offset: number, data: Uint8Array): void {
    this.pageAt(block, offset, data, 0, isZeroPage(data));
  }

  /**
   * `count` zero pages of `block` from byte `offset` on, one after the
   * other: the same records as `count` calls of pageAt with zero set.
   */
  zeroRun(block: RamBlock, offset: number, count: number): void {
    if (count <= 0) return;
    let at = offset;
    let left = count;
    if (block !== this.lastBlock) {
      this.pageAt(block, at, NO_PAGE, 0, true);
      at += PAGE_SIZE;
      left--;
    }
    this.w.pageRecordRun(at / PAGE_SIZE, left, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE);
    this.counters.zeroPages += left;
  }

  /**
   * The page at byte `at` of `data` (a view of a run of pages), whose
   * zeroness the caller has found: no view or copy of the page is made
   * besides the one into the stream buffer.
   */
  pageAt(block: RamBlock, offset: number, data: Uint8Array, at: number, zero: boolean): void {
    let flags = zero ? RAM_SAVE_FLAG_ZERO : RAM_SAVE_FLAG_PAGE;
    if (block === this.lastBlock) flags |= RAM_SAVE_FLAG_CONTINUE;
    this.w.u64n(offset + flags);
    if (block !== this.lastBlock) {
      this.w.str8(block.id);
      this.lastBlock = block;
    }
    if (zero) {
      this.w.u8(0);
      this.counters.zeroPages++;
    } else {
      this.w.bytesFrom(data, at, at + PAGE_SIZE);
      this.counters.normalPages++;
    }
  }
}

/** Ends a RAM section. */
export function saveRamEos(w: StreamWriter): void {
  w.u64n(RAM_SAVE_FLAG_EOS);
}

function malformed(r: StreamReader, what: string): MigrationStreamError {
  return new MigrationStreamError(
    'MIGRATION_MALFORMED',
    `${what} in the 'ram' section near byte ${r.offset}`,
  );
}

/** One entry of the block list at the start of the "ram" section. */
export interface RamBlockEntry {
  id: string;
  size: number;
}

/**
 * Reads one RAM section's payload up to and including its EOS into `stage`
 * (reset first), which holds its pages until the section's checksum has
 * been verified. The block list (START only) is returned for
 * {@link checkRamShape} after that verification too, so that damage is
 * reported as damage and not as a different machine.
 */
export async function loadRamSection(
  r: StreamReader,
  ram: RamAccessor,
  isStart: boolean,
  stage: RamStage,
): Promise<RamBlockEntry[] | undefined> {
  stage.reset();
  let blockList: RamBlockEntry[] | undefined;
  let block: RamBlock | undefined;
  for (;;) {
    let p = r.need(8);
    if (p) await p;
    const hi = r.u32();
    const lo = r.u32();
    const flags = lo & PAGE_MASK_LOW;
    const addr = hi * 0x1_0000_0000 + (lo - flags);
    if (flags & RAM_SAVE_FLAG_MEM_SIZE) {
      if (!isStart || flags !== RAM_SAVE_FLAG_MEM_SIZE || blockList) {
        throw malformed(r, 'an unexpected block list');
      }
      blockList = await loadBlockList(r, addr);
      continue;
    }
    if (flags === RAM_SAVE_FLAG_EOS) return blockList;
    const kind = flags & ~RAM_SAVE_FLAG_CONTINUE;
    if (kind !== RAM_SAVE_FLAG_ZERO && kind !== RAM_SAVE_FLAG_PAGE) {
      throw malformed(
        r,
        `RAM flags 0x${flags.toString(16)} (compression, XBZRLE, multifd and postcopy are not supported)`,
      );
    }
    if (flags & RAM_SAVE_FLAG_CONTINUE) {
      if (!block) throw malformed(r, 'a CONTINUE page with no block before it');
    } else {
      const id = await r.str8();
      // The block list was verified against this machine already, so an
      // unknown id here is damage, not another machine.
      block = ram.blocks.find((b) => b.id === id);
      if (!block) throw malformed(r, `a page for an unknown RAM block '${id}'`);
    }
    if (addr + PAGE_SIZE > block.size) {
      throw malformed(
        r,
        `a page at 0x${addr.toString(16)} beyond block '${block.id}' (${block.size} bytes)`,
      );
    }
    if (kind === RAM_SAVE_FLAG_ZERO) {
      p = r.need(1);
      if (p) await p;
      const fill = r.u8();
      if (fill !== 0) throw malformed(r, `a zero page filled with 0x${fill.toString(16)}`);
      stage.zero(block, addr);
      stageZeroRecords(r, block, stage);
    } else {
      p = r.need(PAGE_SIZE);
      if (p) await p;
      stage.page(block, addr, r);
    }
  }
}

/** The low 12 bits of a zero page's header in the same block as the page before. */
const ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE;
/** A zero-page record: the be64 header and the fill byte. */
const ZERO_RECORD_BYTES = 9;

/**
 * Stages the zero-page records of `block` (ZERO | CONTINUE, fill byte 0,
 * inside the block) that follow in the reader's buffer, parsed in place: an
 * idle guest's stream is nearly all such records, and reading each through
 * need() and the getters was most of the loader's own time. It stops at the
 * first other record, or one it would have to refuse, and leaves that to
 * the general path, which reports it.
 */
function stageZeroRecords(r: StreamReader, block: RamBlock, stage: RamStage): void {
  const b = r.buffered();
  const limit = block.size - PAGE_SIZE;
  let k = 0;
  // The run of consecutive pages being gathered: [runStart, next).
  let runStart = -1;
  let next = -1;
  while (k + ZERO_RECORD_BYTES <= b.length) {
    const lo = ((b[k + 4]! << 24) | (b[k + 5]! << 16) | (b[k + 6]! << 8) | b[k + 7]!) >>> 0;
    if ((lo & PAGE_MASK_LOW) !== ZERO_CONTINUE || b[k + 8] !== 0) break;
    const hi = ((b[k]! << 24) | (b[k + 1]! << 16) | (b[k + 2]! << 8) | b[k + 3]!) >>> 0;
    const addr = hi * 0x1_0000_0000 + (lo - ZERO_CONTINUE);
    if (addr > limit) break;
    if (addr !== next) {
      if (runStart >= 0) stage.zeroRun(block, runStart, (next - runStart) / PAGE_SIZE);
      runStart = addr;
    }
    next = addr + PAGE_SIZE;
    k += ZERO_RECORD_BYTES;
  }
  if (runStart >= 0) stage.zeroRun(block, runStart, (next - runStart) / PAGE_SIZE);
  if (k > 0) r.advance(k);
}

async function loadBlockList(r: StreamReader, total: number): Promise<RamBlockEntry[]> {
  const list: RamBlockEntry[] = [];
  let left = total;
  while (left > 0) {
    const id = await r.str8();
    const p = r.need(8);
    if (p) await p;
    const hi = r.u32();
    const lo = r.u32();
    const size = hi * 0x1_0000_0000 + lo;
    if (size === 0 || size > left)
      throw malformed(r, `block '${id}' of ${size} bytes in the block list`);
    list.push({ id, size });
    left -= size;
  }
  return list;
}

/**
 * Refuses a stream whose RAM blocks differ from this machine's, naming the
 * difference (MIGRATION_SHAPE_MISMATCH).
 */
export function checkRamShape(list: readonly RamBlockEntry[], ram: RamAccessor): void {
  const mismatch = (msg: string) => new MigrationStreamError('MIGRATION_SHAPE_MISMATCH', msg);
  let total = 0;
  for (const e of list) total += e.size;
  const local = ramTotal(ram);
  if (total !== local) {
    throw mismatch(
      `RAM size mismatch: the stream has ${total} bytes of RAM, this machine has ${local}: ` +
        'start the destination with the same memory size',
    );
  }
  for (const e of list) {
    const block = ram.blocks.find((b) => b.id === e.id);
    if (!block) {
      throw mismatch(
        `the stream has RAM block '${e.id}' (${e.size} bytes), which this machine does not have`,
      );
    }
    if (block.size !== e.size) {
      throw mismatch(
        `RAM block '${e.id}' size mismatch: ${e.size} bytes in the stream, ${block.size} here`,
      );
    }
  }
  const ids = new Set(list.map((e) => e.id));
  if (ids.size !== list.length || ids.size !== ram.blocks.length) {
    throw mismatch(
      `the stream's RAM blocks (${list.map((e) => e.id).join(', ')}) do not match this ` +
        `machine's (${ram.blocks.map((b) => b.id).join(', ')})`,
    );
  }
}

/**
 * The pages of one RAM section between their arrival and the verification
 * of its checksum (the reader's own buffers are reused under them): their
 * blocks and offsets, and the contents of the non-zero ones packed in one
 * buffer that is reused from section to section (grown when a section has
 * more pages than any before).
 */
export class RamStage {
  private blocks: RamBlock[] = [];
  /** Offset in the block of each page, in stream order. */
  private offsets = new Float64Array(1024);
  /** Each page's index in `data`, or -1 for a run of zero pages. */
  private slots = new Int32Array(1024);
  /** Pages in each entry: 1 for a non-zero page, the run's length for zero pages. */
  private runs = new Int32Array(1024);
  private data = new Uint8Array(0);
  private count = 0;
  /** Non-zero pages staged (QEMU's "normal"). */
  normalPages = 0;
  /** Zero pages staged (QEMU's "duplicate"). */
  zeroPages = 0;

  /** Pages staged. */
  get pages(): number {
    return this.count;
  }

  reset(): void {
    this.count = this.normalPages = this.zeroPages = 0;
    this.blocks.length = 0;
  }

  /**
   * A zero page. Zero pages that follow each other in the stream and in the
   * block share one entry (an idle guest's stream is nearly all of them).
   */
  zero(block: RamBlock, offset: number): void {
    this.zeroRun(block, offset, 1);
  }

  /** `pages` zero pages of `block` from `offset` on, one after the other. */
  zeroRun(block: RamBlock, offset: number, pages: number): void {
    const last = this.count - 1;
    if (
      last >= 0 &&
      this.slots[last]! < 0 &&
      this.blocks[last] === block &&
      this.offsets[last]! + this.runs[last]! * PAGE_SIZE === offset
    ) {
      this.runs[last]! += pages;
    } else {
      this.add(block, offset, -1);
      this.runs[this.count - 1] = pages;
    }
    this.zeroPages += pages;
  }

  /** A non-zero page: its PAGE_SIZE bytes are copied from the reader. */
  page(block: RamBlock, offset: number, r: StreamReader): void {
    const slot = this.normalPages;
    const at = slot * PAGE_SIZE;
    if (at + PAGE_SIZE > this.data.length) {
      const grown = new Uint8Array(Math.max(256 * PAGE_SIZE, this.data.length * 2));
      grown.set(this.data.subarray(0, at));
      this.data = grown;
    }
    r.copyTo(this.data, at, PAGE_SIZE);
    this.add(block, offset, slot);
    this.normalPages++;
  }

  private add(block: RamBlock, offset: number, slot: number): void {
    const i = this.count;
    if (i === this.offsets.length) {
      const offsets = new Float64Array(i * 2);
      offsets.set(this.offsets);
      this.offsets = offsets;
      const slots = new Int32Array(i * 2);
      slots.set(this.slots);
      this.slots = slots;
      const runs = new Int32Array(i * 2);
      runs.set(this.runs);
      this.runs = runs;
    }
    this.blocks[i] = block;
    this.offsets[i] = offset;
    this.slots[i] = slot;
    this.runs[i] = 1;
    this.count = i + 1;
  }

  /**
   * Calls `data(block, offset, bytes, pages)` for each run of non-zero
   * pages that follow each other in the stream and in the block (one call
   * writes the run), and `zero(block, offset, pages)` for each such run of
   * zero pages, in stream order.
   */
  forEachRun(
    data: (block: RamBlock, offset: number, bytes: Uint8Array, pages: number) => void,
    zero: (block: RamBlock, offset: number, pages: number) => void,
  ): void {
    const { blocks, offsets, slots, runs, count } = this;
    let i = 0;
    while (i < count) {
      const block = blocks[i]!;
      const offset = offsets[i]!;
      const slot = slots[i]!;
      if (slot < 0) {
        zero(block, offset, runs[i]!);
        i++;
        continue;
      }
      let j = i + 1;
      while (
        j < count &&
        blocks[j] === block &&
        slots[j] === slot + (j - i) &&
        offsets[j] === offset + (j - i) * PAGE_SIZE
      ) {
        j++;
      }
      const n = j - i;
      data(block, offset, this.data.subarray(slot * PAGE_SIZE, (slot + n) * PAGE_SIZE), n);
      i = j;
    }
  }
}

/** Pages per question to RamBlock.unpopulatedPages on the load side: 256 MiB of guest RAM. */
const UNPOPULATED_WINDOW_PAGES = 64 * 1024;

/**
 * Writes verified pages into guest RAM. A zero page is written only if the
 * destination may not be zero already, as QEMU's loader does; it is known
 * zero without a read when this load has not written it and either the
 * caller says the RAM was fresh (all zero) or the block reports the page
 * unpopulated (RamBlock.unpopulatedPages: never touched, so zero). Other
 * zero pages are compared first, so untouched memory stays unallocated.
 * A fresh VM waiting for -incoming has its boot image in RAM, so it is not
 * all zero, but nearly all of its pages are unpopulated: reading each to
 * compare it (a view and a page fault per page) was most of an idle
 * guest's restore.
 */
export class RamCommitter {
  private readonly written = new Map<RamBlock, Uint8Array>();
  private lastBlock: RamBlock | undefined;
  private lastBits: Uint8Array | undefined;
  /** Per block: what unpopulatedPages said for one window of pages, or null if it cannot tell. */
  private readonly unpopulated = new Map<RamBlock, { first: number; map: Uint8Array } | null>();

  constructor(private readonly ramIsZeroed: boolean) {}

  commit(stage: RamStage): void {
    stage.forEachRun(
      (block, offset, bytes, pages) => {
        block.write(offset, bytes);
        const bits = this.bits(block);
        const first = offset / PAGE_SIZE;
        for (let index = first; index < first + pages; index++)
          bits[index >> 3]! |= 1 << (index & 7);
      },
      (block, offset, pages) => {
        const bits = this.bits(block);
        const first = offset / PAGE_SIZE;
        const end = first + pages;
        // Pages that may hold data are checked a stretch at a time: one
        // view and one memcmp for the stretch, then page by page only
        // where it is not all zero.
        let check = -1;
        let index = first;
        while (index < end) {
          const w = this.ramIsZeroed ? undefined : this.window(block, index);
          const stop = w ? Math.min(end, w.first + w.map.length) : end;
          const map = w?.map;
          const base = w?.first ?? 0;
          // The common case, fresh RAM: every page of the stretch known zero
          // (two native scans), so nothing to read or write.
          if (
            check < 0 &&
            (this.ramIsZeroed || (map && map.subarray(index - base, stop - base).indexOf(0) < 0)) &&
            isZeroRun(bits.subarray(index >> 3, ((stop - 1) >> 3) + 1))
          ) {
            index = stop;
            continue;
          }
          for (; index < stop; index++) {
            const known =
              !(bits[index >> 3]! & (1 << (index & 7))) &&
              (this.ramIsZeroed || (map !== undefined && map[index - base] === 1));
            if (!known) {
              if (check < 0) check = index;
              else if (index - check >= ZERO_RUN_PAGES) {
                this.zeroIfNeeded(block, check, index);
                check = index;
              }
            } else if (check >= 0) {
              this.zeroIfNeeded(block, check, index);
              check = -1;
            }
          }
        }
        if (check >= 0) this.zeroIfNeeded(block, check, end);
      },
    );
  }

  /** Makes pages [from, to) of `block` zero, writing only those that are not. */
  private zeroIfNeeded(block: RamBlock, from: number, to: number): void {
    if (block.isZero) {
      if (block.isZero(from * PAGE_SIZE, (to - from) * PAGE_SIZE)) return;
      for (let index = from; index < to; index++) {
        if (!block.isZero(index * PAGE_SIZE, PAGE_SIZE)) block.write(index * PAGE_SIZE, ZERO_PAGE);
      }
      return;
    }
    const data = block.read(from * PAGE_SIZE, (to - from) * PAGE_SIZE);
    if (isZeroRun(data)) return;
    for (let index = from; index < to; index++) {
      if (!isZeroPageAt(data, (index - from) * PAGE_SIZE))
        block.write(index * PAGE_SIZE, ZERO_PAGE);
    }
  }

  /**
   * The block's answer to unpopulatedPages for the window of pages that
   * holds `index` (1 where the page is unpopulated now), or undefined when
   * the block cannot tell. An answer taken earlier in this load still holds
   * for the pages this load has not written (nothing else writes guest RAM
   * during a load; the caller checks the written bits first); the answer
   * for a window taken after some of its pages were written says they are
   * populated, which only costs a compare.
   */
  private window(block: RamBlock, index: number): { first: number; map: Uint8Array } | undefined {
    const w = this.unpopulated.get(block);
    if (w === null) return undefined;
    if (w !== undefined && index >= w.first && index < w.first + w.map.length) return w;
    const first = index - (index % UNPOPULATED_WINDOW_PAGES);
    const count = Math.min(UNPOPULATED_WINDOW_PAGES, block.size / PAGE_SIZE - first);
    const map = block.unpopulatedPages?.(first, count);
    if (!map || map.length !== count) {
      this.unpopulated.set(block, null);
      return undefined;
    }
    const fresh = { first, map };
    this.unpopulated.set(block, fresh);
    return fresh;
  }

  private bits(block: RamBlock): Uint8Array {
    if (block === this.lastBlock) return this.lastBits!;
    let bits = this.written.get(block);
    if (!bits) {
      bits = new Uint8Array(Math.ceil(block.size / PAGE_SIZE / 8));
      this.written.set(block, bits);
    }
    this.lastBlock = block;
    this.lastBits = bits;
    return bits;
  }
}

/**
 * A RAM accessor over plain memory, one Uint8Array per block: for tests
 * and tools that hold guest RAM in a buffer. `read` returns views.
 */
export function createBufferRam(blocks: readonly { id: string; size: number }[]): RamAccessor & {
  readonly memory: ReadonlyMap<string, Uint8Array>;
} {
  const memory = new Map<string, Uint8Array>();
  const list: RamBlock[] = blocks.map(({ id, size }) => {
    const mem = new Uint8Array(size);
    memory.set(id, mem);
    return {
      id,
      size,
      read: (offset, len) => mem.subarray(offset, offset + len),
      write: (offset, bytes) => mem.set(bytes, offset),
    };
  });
  return { blocks: list, memory };
}
