/**
 * Guest RAM modelled page by page in host memory, allocating only pages
 * that are written, so tests can lay out 4 or 8 GiB guests. It has the
 * write interface of GuestMemory and refuses accesses outside its slots,
 * as GuestMemory does.
 */
import { pcRamLayout } from '../../../accel/kvm/memory/layout.js';

const PAGE = 4096;

/** Page-sparse guest RAM with QEMU pc's layout. */
export class SparseMemory {
  readonly size: number;
  readonly slots: readonly { gpa: number; size: number }[];
  /** Number of write() calls so far. */
  writes = 0;
  readonly #pages = new Map<number, Uint8Array>();

  constructor(size: number) {
    this.size = size;
    this.slots = pcRamLayout(size).map(({ gpa, size: len }) => ({ gpa, size: len }));
  }

  /** Writes `bytes` at `gpa`; throws when the range is not inside one slot. */
  write(gpa: number, bytes: Uint8Array): void {
    this.#check(gpa, bytes.byteLength);
    this.writes++;
    for (let done = 0; done < bytes.byteLength; ) {
      const addr = gpa + done;
      const page = Math.floor(addr / PAGE);
      const inPage = addr - page * PAGE;
      const n = Math.min(PAGE - inPage, bytes.byteLength - done);
      let buf = this.#pages.get(page);
      if (!buf) {
        buf = new Uint8Array(PAGE);
        this.#pages.set(page, buf);
      }
      buf.set(bytes.subarray(done, done + n), inPage);
      done += n;
    }
  }

  /** A copy of `length` bytes at `gpa`; never-written bytes read as 0. */
  read(gpa: number, length: number): Uint8Array {
    this.#check(gpa, length);
    const out = new Uint8Array(length);
    for (let done = 0; done < length; ) {
      const addr = gpa + done;
      const page = Math.floor(addr / PAGE);
      const inPage = addr - page * PAGE;
      const n = Math.min(PAGE - inPage, length - done);
      const buf = this.#pages.get(page);
      if (buf) out.set(buf.subarray(inPage, inPage + n), done);
      done += n;
    }
    return out;
  }

  #check(gpa: number, length: number): void {
    const ok = this.slots.some((s) => gpa >= s.gpa && gpa + length <= s.gpa + s.size);
    if (!ok)
      throw new RangeError(`access of ${length} bytes at 0x${gpa.toString(16)} is outside RAM`);
  }
}
