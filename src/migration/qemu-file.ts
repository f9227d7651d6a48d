import { crc32 } from './crc32.js';
import { MigrationStreamError } from './errors.js';

/**
 * Where an outgoing stream goes. The writer reuses `buf` once `write` has
 * returned (or its promise resolved): a sink that keeps data must copy it.
 * The promise is awaited before the next write: the writer's back-pressure.
 */
export interface ByteSink {
  write(buf: Uint8Array): Promise<void> | void;
  /**
   * Seekable sinks (a file) only: moves the write position `n` bytes on
   * without writing them (a hole in a sparse file). Every earlier write
   * has finished when the writer calls it.
   */
  skip?(n: number): Promise<void> | void;
  /**
   * Seekable sinks only: writes `buf` at byte `position` of the stream
   * (from its start, not the file's), without moving the write position.
   * The buffer is the caller's until the promise resolves.
   */
  writeAt?(buf: Uint8Array, position: number): Promise<void>;
  /** Seekable sinks only: where the stream starts in its file (file:PATH,offset=N). */
  readonly fileOffset?: number;
  /**
   * Set by a sink that passes each buffer on instead of copying it (to
   * another thread): the writer gives `buf` up with the write and never
   * touches it again, and takes chunk buffers back from `reclaim()`, so
   * that chunks are neither copied nor allocated anew.
   */
  readonly takesBuffers?: boolean;
  /** A buffer the sink is done with, for the writer to fill again; undefined if none. */
  reclaim?(): Uint8Array | undefined;
}

/**
 * Where an incoming stream comes from: fill `into` from its start with up to
 * `into.length` bytes and return how many were read; 0 means the end.
 */
export interface ByteSource {
  read(into: Uint8Array): Promise<number>;
  /** Seekable sources (a file) only: moves the read position `n` bytes on without reading them. */
  skip?(n: number): void;
  /**
   * Seekable sources only: fills `into` from byte `position` of the file
   * (absolute, not from the stream's start); returns the bytes read.
   */
  readAt?(into: Uint8Array, position: number): Promise<number>;
  /** Seekable sources over an open file only: its descriptor, for mmap. */
  readonly fd?: number;
}

/** A position in a stream and the CRC-32 of every byte before it. */
export interface StreamCheckpoint {
  offset: number;
  crc: number;
}

const CHUNK = 1 << 20;
/** 4 KiB pages in 4 GiB: where the high word of a page's offset changes. */
const PAGES_PER_4G = 0x10_0000;

/**
 * The buffered, big-endian writing side of a stream (QEMU's QEMUFile for
 * output). Puts are synchronous into a 1 MiB chunk; full chunks queue up and
 * `flushIfNeeded()` hands them to the sink. One write is in flight while
 * the next chunk fills: `flushIfNeeded()` starts a write without waiting
 * and returns a promise only when a full chunk waits behind a write still
 * in flight (the back-pressure). It keeps a running CRC-32 over every byte
 * so that integrity records cost one pass over the data.
 */
export class StreamWriter {
  private buf: Uint8Array;
  private view: DataView;
  private pos = 0;
  private hashed = 0;
  private crc = 0;
  private written = 0;
  private readonly queued: Uint8Array[] = [];
  // Chunks the sink is done with. Reusing them matters: first-touch page
  // faults on fresh 1 MiB buffers cost more than the copies themselves.
  private readonly spare: Uint8Array[] = [];
  /** Bytes sealed but not yet accepted by the sink (queued or in flight). */
  private queuedBytes = 0;
  /** The sink write under way, if any; it never rejects (see `failure`). */
  private inflight: Promise<void> | undefined;
  private failed = false;
  private failure: unknown;
  private readonly startedAt = performance.now();
  /** The bytes of a page record that stay the same along a run (pageRecordRun). */
  private readonly recordPattern = new Uint8Array(9);

  private readonly chunk: number;

  /**
   * `chunkBytes`: the size of each chunk, 1 MiB by default; a small value
   * suits a writer that puts a few kilobytes (a device section): each
   * chunk is a fresh allocation, and 1 MiB ones for a 6 KiB section made
   * the garbage collector run in the middle of a migration's downtime.
   */
  /**
   * `from`: the stream goes on from there (bytes another writer already
   * wrote to the same sink): offsets and the running CRC-32 continue
   * from it.
   */
  constructor(
    private readonly sink: ByteSink,
    private readonly options: {
      maxBandwidth?: number;
      chunkBytes?: number;
      from?: StreamCheckpoint;
    } = {},
  ) {
    this.written = options.from?.offset ?? 0;
    this.crc = options.from?.crc ?? 0;
    this.chunk = options.chunkBytes ?? CHUNK;
    if (!(Number.isInteger(this.chunk) && this.chunk >= 16)) {
      throw new RangeError(`chunkBytes must be an integer of at least 16, not ${this.chunk}`);
    }
    this.buf = new Uint8Array(this.chunk);
    this.view = new DataView(this.buf.buffer);
  }

  /** Bytes put so far (written or still buffered). */
  get offset(): number {
    return this.written + this.queuedBytes + this.pos;
  }

  /** Bytes the sink has accepted so far. */
  get transferred(): number {
    return this.written;
  }

  /** The offset and the CRC-32 of all bytes put before it. */
  checkpoint(): StreamCheckpoint {
    this.hashPending();
    return { offset: this.offset, crc: this.crc };
  }

  u8(v: number): void {
    this.room(1);
    this.buf[this.pos++] = v;
  }

  u16(v: number): void {
    this.room(2);
    this.view.setUint16(this.pos, v);
    this.pos += 2;
  }

  u32(v: number): void {
    this.room(4);
    this.view.setUint32(this.pos, v);
    this.pos += 4;
  }

  i32(v: number): void {
    this.room(4);
    this.view.setInt32(this.pos, v);
    this.pos += 4;
  }

  u64(v: bigint): void {
    this.room(8);
    this.view.setBigUint64(this.pos, v);
    this.pos += 8;
  }

  i64(v: bigint): void {
    this.room(8);
    this.view.setBigInt64(this.pos, v);
    this.pos += 8;
  }

  /** A be64 from a safe integer, without a BigInt on the hot RAM path. */
  u64n(v: number): void {
    this.room(8);
    this.view.setUint32(this.pos, Math.floor(v / 0x1_0000_0000));
    this.view.setUint32(this.pos + 4, v >>> 0);
    this.pos += 8;
  }

  /**
   * `count` records of 9 bytes for consecutive 4 KiB pages from page index
   * `firstPage` on: the be64 `page * 4096 + flags` (`flags` below 256),
   * then a 0 byte. That is a run of RAM zero-page records. A migration
   * thread writes them once, with cold code: a fill of the bytes that stay
   * the same and three stores per record took a third of the time of
   * nine computed stores per record.
   */
  pageRecordRun(firstPage: number, count: number, flags: number): void {
    if (!(Number.isInteger(flags) && flags >= 0 && flags < 256)) {
      throw new RangeError(`flags 0x${flags.toString(16)} do not fit in the low byte`);
    }
    let page = firstPage;
    let left = count;
    while (left > 0) {
      this.room(9);
      // The high word is the same up to the next 4 GiB (2^20 pages).
      const upTo4G = PAGES_PER_4G - (page % PAGES_PER_4G);
      const n = Math.min(left, upTo4G, Math.floor((this.buf.length - this.pos) / 9));
      const hi = Math.floor(page / PAGES_PER_4G);
      const pattern = this.recordPattern;
      pattern[0] = hi >>> 24;
      pattern[1] = hi >>> 16;
      pattern[2] = hi >>> 8;
      pattern[3] = hi;
      pattern[7] = flags;
      const buf = this.buf;
      let pos = this.pos;
      const end = pos + n * 9;
      Buffer.from(buf.buffer, buf.byteOffset, buf.length).fill(pattern, pos, end);
      // Bits 12-31 of the low word are the page's low 20 bits.
      let low = page % PAGES_PER_4G;
      for (; pos < end; pos += 9, low++) {
        buf[pos + 4] = low >>> 12;
        buf[pos + 5] = low >>> 4;
        buf[pos + 6] = low << 4;
      }
      this.pos = end;
      page += n;
      left -= n;
    }
  }

  bytes(b: Uint8Array): void {
    this.bytesFrom(b, 0, b.length);
  }

  /** Bytes `start` to `end` of `b`, without a view of them on the fast path. */
  bytesFrom(b: Uint8Array, start: number, end: number): void {
    const n = end - start;
    if (this.buf.length - this.pos >= n) {
      this.buf.set(start === 0 && end === b.length ? b : b.subarray(start, end), this.pos);
      this.pos += n;
      return;
    }
    let off = start;
    while (off < end) {
      this.room(1);
      const k = Math.min(end - off, this.buf.length - this.pos);
      this.buf.set(b.subarray(off, off + k), this.pos);
      this.pos += k;
      off += k;
    }
  }

  /** A string preceded by its length in one byte, as QEMU writes idstrs. */
  str8(s: string): void {
    const b = Buffer.from(s, 'utf8');
    if (b.length > 255) throw new RangeError(`name '${s}' is longer than 255 bytes`);
    this.u8(b.length);
    this.bytes(b);
  }

  /**
   * Starts writing a full chunk if none is being written; returns a promise
   * (to await before putting more) only when one is in flight and another
   * waits, or when an earlier write failed.
   */
  flushIfNeeded(): Promise<void> | undefined {
    if (this.failed) return Promise.reject(this.failure);
    if (this.queued.length === 0) return undefined;
    if (this.inflight === undefined) {
      this.startWrite();
      return undefined;
    }
    return this.advance();
  }

  /**
   * Moves the stream `n` bytes on without writing them (the sink must be
   * seekable): they count in `offset` but not in the running CRC-32, and
   * the file keeps a hole there. Everything put before goes to the sink
   * first.
   */
  async skip(n: number): Promise<void> {
    if (!this.sink.skip) throw new Error('skip(): the sink is not seekable');
    await this.flush();
    await this.sink.skip(n);
    this.written += n;
  }

  /** Writes everything put so far to the sink. */
  async flush(): Promise<void> {
    this.seal();
    await this.settleAll();
  }

  /**
   * Waits until the sink has accepted every full chunk (the one being
   * filled stays): the pace of the sink, as before writes overlapped, at
   * the end of a pass over RAM.
   */
  async settleAll(): Promise<void> {
    if (this.failed) throw this.failure;
    for (;;) {
      if (this.inflight) await this.settle();
      if (this.queued.length === 0) return;
      this.startWrite();
    }
  }

  private room(n: number): void {
    if (this.buf.length - this.pos < n) this.seal();
  }

  private hashPending(): void {
    if (this.pos > this.hashed) {
      this.crc = crc32(this.buf.subarray(this.hashed, this.pos), this.crc);
      this.hashed = this.pos;
    }
  }

  private seal(): void {
    if (this.pos === 0) return;
    this.hashPending();
    this.queued.push(this.buf.subarray(0, this.pos));
    this.queuedBytes += this.pos;
    this.buf = this.spare.pop() ?? this.reclaimed() ?? new Uint8Array(this.chunk);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
    this.hashed = 0;
  }

  /** A whole chunk buffer back from a sink that takes buffers, if it has one. */
  private reclaimed(): Uint8Array | undefined {
    const back = this.sink.reclaim?.();
    return back && back.byteOffset === 0 && back.buffer.byteLength === this.chunk
      ? new Uint8Array(back.buffer)
      : undefined;
  }

  /** Waits for the write in flight, then starts the next queued one. */
  private async advance(): Promise<void> {
    await this.settle();
    if (this.queued.length > 0) this.startWrite();
  }

  /** Waits for the write in flight; throws its error. */
  private async settle(): Promise<void> {
    await this.inflight;
    this.inflight = undefined;
    if (this.failed) throw this.failure;
  }

  private startWrite(): void {
    const chunk = this.queued.shift()!;
    this.inflight = this.writeChunk(chunk).catch((err: unknown) => {
      this.failed = true;
      this.failure = err;
    });
  }

  private async writeChunk(chunk: Uint8Array): Promise<void> {
    // Taken before the write: a sink that takes buffers leaves `chunk` detached.
    const n = chunk.length;
    await this.sink.write(chunk);
    this.queuedBytes -= n;
    this.written += n;
    if (
      !this.sink.takesBuffers &&
      chunk.buffer.byteLength === this.chunk &&
      this.spare.length < 2
    ) {
      this.spare.push(new Uint8Array(chunk.buffer));
    }
    await this.throttle();
  }

  private async throttle(): Promise<void> {
    const limit = this.options.maxBandwidth;
    if (!limit || limit <= 0) return;
    const due = (this.written / limit) * 1000;
    const elapsed = performance.now() - this.startedAt;
    if (due > elapsed) await new Promise((r) => setTimeout(r, due - elapsed));
  }
}

/**
 * The buffered, big-endian reading side of a stream. `need(n)` makes n bytes
 * available (returning undefined when they already are, so hot loops avoid a
 * promise per page); the getters then read synchronously. `take(n)` returns
 * a view into the reader's buffer, valid only until the next need() or
 * read(): buffers are reused, so callers copy what they keep.
 */
export class StreamReader {
  private buf = new Uint8Array(0);
  private view = new DataView(this.buf.buffer);
  private pos = 0;
  private end = 0;
  private hashed = 0;
  private base = 0;
  private crc = 0;
  private other = new Uint8Array(0);
  /** What is being read, for error messages ("section 'ram'"). */
  context = 'the stream header';

  constructor(private readonly source: ByteSource) {}

  /** Bytes consumed so far. */
  get offset(): number {
    return this.base + this.pos;
  }

  /** The offset and the CRC-32 of all bytes consumed before it. */
  checkpoint(): StreamCheckpoint {
    this.hashPending();
    return { offset: this.offset, crc: this.crc };
  }

  need(n: number): Promise<void> | undefined {
    return this.end - this.pos >= n ? undefined : this.fill(n);
  }

  /** Reads n bytes without a separate need() call. */
  async read(n: number): Promise<Uint8Array> {
    const p = this.need(n);
    if (p) await p;
    return this.take(n);
  }

  peekU8(): number {
    this.check(1);
    return this.buf[this.pos]!;
  }

  u8(): number {
    this.check(1);
    return this.buf[this.pos++]!;
  }

  u16(): number {
    this.check(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }

  u32(): number {
    this.check(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }

  i32(): number {
    this.check(4);
    const v = this.view.getInt32(this.pos);
    this.pos += 4;
    return v;
  }

  u64(): bigint {
    this.check(8);
    const v = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return v;
  }

  i64(): bigint {
    this.check(8);
    const v = this.view.getBigInt64(this.pos);
    this.pos += 8;
    return v;
  }

  /** A be64 split as [high 32 bits, low 32 bits], for the RAM hot path. */
  u64parts(): [number, number] {
    this.check(8);
    const hi = this.view.getUint32(this.pos);
    const lo = this.view.getUint32(this.pos + 4);
    this.pos += 8;
    return [hi, lo];
  }

  /** Copies the next n bytes into `dest` at `at` (need() them first). */
  copyTo(dest: Uint8Array, at: number, n: number): void {
    this.check(n);
    dest.set(this.buf.subarray(this.pos, this.pos + n), at);
    this.pos += n;
  }

  /**
   * The bytes buffered and not consumed yet, as a view valid until the next
   * need() or read(): a hot loop parses records in place, then consumes
   * what it parsed with advance().
   */
  buffered(): Uint8Array {
    return this.buf.subarray(this.pos, this.end);
  }

  /** Consumes `n` buffered bytes (see buffered()). */
  advance(n: number): void {
    this.check(n);
    this.pos += n;
  }

  take(n: number): Uint8Array {
    this.check(n);
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }

  /**
   * Passes over the next `n` bytes without reading them where they are not
   * buffered yet (the source must be seekable): they count in `offset` but
   * not in the running CRC-32, as on the writing side.
   */
  skip(n: number): void {
    this.hashPending();
    const have = this.end - this.pos;
    if (have >= n) {
      this.pos += n;
      this.hashed = this.pos;
      return;
    }
    if (!this.source.skip) throw new Error('skip(): the source is not seekable');
    this.base += this.end + (n - have);
    this.pos = this.end = this.hashed = 0;
    this.source.skip(n - have);
  }

  /** A string preceded by its one-byte length. */
  async str8(): Promise<string> {
    const p = this.need(1);
    if (p) await p;
    const len = this.u8();
    return Buffer.from(await this.read(len)).toString('utf8');
  }

  private check(n: number): void {
    if (this.end - this.pos < n) {
      // Callers must need() first; reaching here is a bug in this module.
      throw new Error(`StreamReader: ${n} bytes read without need()`);
    }
  }

  private hashPending(): void {
    if (this.pos > this.hashed) {
      this.crc = crc32(this.buf.subarray(this.hashed, this.pos), this.crc);
      this.hashed = this.pos;
    }
  }

  private async fill(n: number): Promise<void> {
    if (this.buf.length - this.pos < n) {
      // Move the unread tail to the start of the other buffer (two are
      // reused in turn; fresh ones would cost a page fault per 4 KiB).
      this.hashPending();
      const size = Math.max(CHUNK, n);
      const next = this.other.length >= size ? this.other : new Uint8Array(size);
      next.set(this.buf.subarray(this.pos, this.end));
      this.other = this.buf;
      this.base += this.pos;
      this.end -= this.pos;
      this.pos = 0;
      this.hashed = 0;
      this.buf = next;
      this.view = new DataView(next.buffer);
    }
    while (this.end - this.pos < n) {
      const got = await this.source.read(this.buf.subarray(this.end));
      if (got === 0) {
        throw new MigrationStreamError(
          'MIGRATION_TRUNCATED',
          `the migration stream ends at byte ${this.base + this.end} in ${this.context}, ` +
            `${n - (this.end - this.pos)} more byte(s) were expected: the file was cut short or ` +
            'the sender stopped; use a complete stream',
        );
      }
      this.end += got;
    }
  }
}

/** A source over bytes already in memory (a saved snapshot, a test); seekable, as a file image. */
export function bufferSource(data: Uint8Array, start = 0): ByteSource {
  let pos = start;
  return {
    async read(into) {
      const n = Math.max(0, Math.min(into.length, data.length - pos));
      into.set(data.subarray(pos, pos + n));
      pos += n;
      return n;
    },
    skip(n) {
      pos += n;
    },
    async readAt(into, position) {
      const n = Math.max(0, Math.min(into.length, data.length - position));
      into.set(data.subarray(position, position + n));
      return n;
    },
  };
}

/** A sink that keeps everything written, for snapshots in memory and tests. */
export class BufferSink implements ByteSink {
  private readonly chunks: Uint8Array[] = [];

  write(buf: Uint8Array): void {
    this.chunks.push(Uint8Array.from(buf));
  }

  /** Everything written so far, as one buffer. */
  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}
