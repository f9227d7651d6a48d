/**
 * Which pages of a private anonymous mapping in this process were never
 * populated, from /proc/self/pagemap (one little-endian u64 per virtual
 * page; bit 63 "present", bit 62 "swapped"). A page of such a mapping
 * that is neither present nor swapped out has no memory behind it (never
 * written, or dropped by MADV_DONTNEED) and reads as zeros, so a caller can
 * know it is zero without reading it. Reading it would not be free: on a
 * kernel without the shared zero page (pvm_no_zero_page=1) a read of an
 * untouched page allocates it.
 *
 * The answer is only a hint of the instant it was taken, and only for
 * private anonymous memory (a file mapping's non-present page is not zero).
 * Unprivileged readers see the flags (only the PFNs are hidden), so the
 * file opens without CAP_SYS_ADMIN; where it cannot be read (not Linux,
 * EACCES, a host page size other than 4 KiB) callers get undefined and
 * read the memory instead.
 */
import { closeSync, openSync, readSync } from 'node:fs';

/** The page size pagemap is indexed by, here: x86-64's 4 KiB. */
export const PAGEMAP_PAGE_SIZE = 4096;

/** Entries read per pread: 64 Ki (512 KiB, 256 MiB of address space). */
export const PAGEMAP_CHUNK_ENTRIES = 64 * 1024;

/** Entries compared with zeros at once: 512 (4 KiB of entries, 2 MiB of memory). */
const ZERO_GROUP_ENTRIES = 512;
const ZERO_GROUP = Buffer.alloc(ZERO_GROUP_ENTRIES * 8);

/** Bits 62 and 63 of an entry, in its high 32-bit word. */
const PRESENT_OR_SWAPPED_HI = 0xc000_0000;

/** Reads pagemap entries; the default is /proc/self/pagemap, tests inject others. */
export interface PagemapSource {
  /**
   * Fills `into` (a whole number of 8-byte entries) with the entries from
   * virtual page `firstPage` on; returns the bytes read (0 past the end).
   * Throws when the file cannot be read.
   */
  read(into: Uint8Array, firstPage: number): number;
}

/** /proc/self/pagemap, opened on first use. */
class ProcPagemap implements PagemapSource {
  private fd: number | undefined;

  constructor(private readonly path: string) {}

  read(into: Uint8Array, firstPage: number): number {
    if (this.fd === undefined) this.fd = openSync(this.path, 'r');
    return readSync(this.fd, into, 0, into.length, firstPage * 8);
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

/**
 * Reports unpopulated pages of this process's private anonymous mappings.
 * Failures are remembered: after the first, every call returns undefined
 * without trying again.
 */
export class Pagemap {
  private failed = false;
  private buf: Uint8Array | undefined;

  constructor(
    private readonly source: PagemapSource | undefined = Pagemap.procSource(),
    private readonly chunkEntries = PAGEMAP_CHUNK_ENTRIES,
  ) {
    if (!source) this.failed = true;
    if (!(Number.isInteger(chunkEntries) && chunkEntries > 0)) {
      throw new RangeError(`chunkEntries must be a positive integer, not ${chunkEntries}`);
    }
  }

  /** /proc/self/pagemap where it can exist (Linux, 4 KiB pages), else undefined. */
  static procSource(path = '/proc/self/pagemap'): PagemapSource | undefined {
    if (process.platform !== 'linux' || process.arch !== 'x64') return undefined;
    return new ProcPagemap(path);
  }

  /** Whether a read has failed (and every answer is now undefined). */
  get unavailable(): boolean {
    return this.failed;
  }

  /**
   * For the `count` pages of 4 KiB from host virtual address `addr`
   * (page-aligned), one byte per page: 1 where the page is neither present
   * nor swapped (so, in a private anonymous mapping, certainly zero), 0
   * where it may hold data. Undefined when pagemap cannot be read.
   */
  unpopulated(addr: bigint, count: number): Uint8Array | undefined {
    if (this.failed) return undefined;
    if (addr % BigInt(PAGEMAP_PAGE_SIZE) !== 0n || addr <= 0n) {
      throw new RangeError(`address 0x${addr.toString(16)} is not a page-aligned host address`);
    }
    if (!(Number.isSafeInteger(count) && count >= 0)) {
      throw new RangeError(`page count ${count} is not a non-negative integer`);
    }
    const out = new Uint8Array(count);
    const first = Number(addr / BigInt(PAGEMAP_PAGE_SIZE));
    if (!this.buf) this.buf = new Uint8Array(this.chunkEntries * 8);
    const buf = this.buf;
    const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
    let done = 0;
    try {
      while (done < count) {
        const want = Math.min(this.chunkEntries, count - done) * 8;
        let got = 0;
        while (got < want) {
          const n = this.source!.read(buf.subarray(got, want), first + done + got / 8);
          if (n <= 0 || n % 8 !== 0) throw new Error(`pagemap read returned ${n} bytes`);
          got += n;
        }
        const entries = want / 8;
        for (let g = 0; g < entries; g += ZERO_GROUP_ENTRIES) {
          const end = Math.min(entries, g + ZERO_GROUP_ENTRIES);
          // A group of all-zero entries (never-touched memory: most of an
          // idle guest's) is found by one memcmp instead of a look at each.
          if (ZERO_GROUP.compare(buf, g * 8, end * 8, 0, (end - g) * 8) === 0) {
            out.fill(1, done + g, done + end);
            continue;
          }
          // Little-endian: entry i's high word (bits 32..63) is word 2i + 1.
          for (let i = g; i < end; i++) {
            if ((words[2 * i + 1]! & PRESENT_OR_SWAPPED_HI) === 0) out[done + i] = 1;
          }
        }
        done += entries;
      }
    } catch {
      this.failed = true;
      this.close();
      return undefined;
    }
    return out;
  }

  /** Closes the file (it reopens on the next call unless a read has failed). */
  close(): void {
    if (this.source instanceof ProcPagemap) this.source.close();
  }
}

let shared: Pagemap | undefined;

/** One Pagemap for the process (its file stays open, one descriptor). */
export function processPagemap(): Pagemap {
  shared ??= new Pagemap();
  return shared;
}
