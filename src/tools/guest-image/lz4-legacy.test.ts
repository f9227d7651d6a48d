import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Lz4Error } from './errors.js';
import {
  decodeLz4Block,
  decompressLz4Legacy,
  LZ4_LEGACY_BLOCK_SIZE,
  LZ4_LEGACY_MAX_COMPRESSED,
} from './lz4-legacy.js';
import { lz4LegacyCompress, prng, randomBytes, u32le } from './test-fixtures.js';

const MAGIC = Buffer.from([0x02, 0x21, 0x4c, 0x18]);

/** A legacy frame holding the given raw blocks. */
function frame(...blocks: number[][]): Buffer {
  return Buffer.concat([MAGIC, ...blocks.flatMap((b) => [u32le(b.length), Buffer.from(b)])]);
}

function lz4Code(code: string): (e: unknown) => boolean {
  return (e) => e instanceof Lz4Error && e.code === code;
}

/** Text-like data: words from a small vocabulary, so matches of every length. */
function textLike(n: number, seed: number): Buffer {
  const words = ['kvm', 'vcpu', 'guest', 'memory', 'interrupt', 'the ', 'of ', '\n', '0x', 'ioctl'];
  const next = prng(seed);
  const parts: string[] = [];
  let size = 0;
  while (size < n) {
    const w = words[next() % words.length]!;
    parts.push(w);
    size += w.length;
  }
  return Buffer.from(parts.join('')).subarray(0, n);
}

/** Periodic data with a period of 1..13 that changes now and then: overlapping matches. */
function repetitive(n: number, seed: number): Buffer {
  const next = prng(seed);
  const out = Buffer.alloc(n);
  let i = 0;
  while (i < n) {
    const period = 1 + (next() % 13);
    const run = 4 + (next() % 5000);
    for (let k = 0; k < period && i + k < n; k++) out[i + k] = next() & 0xff;
    for (let k = period; k < run && i + k < n; k++) out[i + k] = out[i + k - period]!;
    i += run;
  }
  return out;
}

const inputs: Array<[string, Buffer]> = [
  ['empty', Buffer.alloc(0)],
  ['one byte', Buffer.from('a')],
  ['13 bytes', Buffer.from('hello, world\n')],
  ['random 100 KiB', randomBytes(100 * 1024, 1)],
  ['1 MiB of one byte', Buffer.alloc(1024 * 1024, 0x5a)],
  ['periodic 2 MiB', repetitive(2 * 1024 * 1024, 2)],
  ['text 300 KiB', textLike(300 * 1024, 3)],
];

test('frames made by lz4 -l decode to their input, fast and HC', () => {
  for (const [name, data] of inputs) {
    for (const level of [1, 12]) {
      const compressed = lz4LegacyCompress(data, level);
      const out = decompressLz4Legacy(compressed);
      assert.equal(out.length, data.length, `${name} -${level}: length`);
      assert.ok(Buffer.from(out).equals(data), `${name} -${level}: bytes`);
    }
  }
});

test('frames over 8 MiB cross blocks; the kernel size trailer and concatenated frames are handled', (t) => {
  // 8 MiB of text, 3 MiB random, 9 MiB periodic: three blocks, the middle
  // one holding the random-text boundary.
  const data = Buffer.concat([
    textLike(8 * 1024 * 1024, 4),
    randomBytes(3 * 1024 * 1024, 5),
    repetitive(9 * 1024 * 1024, 6),
  ]);
  const compressed = lz4LegacyCompress(data, 1);
  const started = performance.now();
  const out = decompressLz4Legacy(compressed);
  const ms = performance.now() - started;
  t.diagnostic(
    `${data.length} bytes from ${compressed.length} compressed in ${ms.toFixed(0)} ms (${(data.length / 1e6 / (ms / 1000)).toFixed(0)} MB/s)`,
  );
  assert.ok(Buffer.from(out).equals(data));
  assert.ok(ms < 5000, `decoding took ${ms} ms`);

  // The kernel's payload: the frame, then the uncompressed size.
  const withSize = Buffer.concat([compressed, u32le(data.length)]);
  assert.ok(Buffer.from(decompressLz4Legacy(withSize)).equals(data));
  // A trailer that does not match the output is refused; a small one reads
  // as the header of a missing block.
  assert.throws(
    () => decompressLz4Legacy(Buffer.concat([compressed, u32le(data.length - 1)])),
    (e: unknown) =>
      e instanceof Lz4Error &&
      e.code === 'LZ4_CORRUPT' &&
      /ends with the u32 20971519, neither a block header nor the 20971520 bytes/.test(e.message),
  );
  assert.throws(
    () => decompressLz4Legacy(Buffer.concat([compressed, u32le(100)])),
    lz4Code('LZ4_TRUNCATED'),
  );
  // Two frames back to back (each starting with the magic), with a trailer.
  const small = Buffer.from('concatenated frames\n');
  const both = Buffer.concat([
    lz4LegacyCompress(small),
    compressed,
    u32le(small.length + data.length),
  ]);
  assert.ok(Buffer.from(decompressLz4Legacy(both)).equals(Buffer.concat([small, data])));
  // The empty frame with the kernel's zero size.
  assert.equal(decompressLz4Legacy(Buffer.concat([MAGIC, u32le(0)])).length, 0);
});

test('hand-made blocks: length extensions, overlapping matches, copies that reach far', () => {
  const decode = (block: number[], max = 1 << 20) => {
    const out = new Uint8Array(max);
    const end = decodeLz4Block(Uint8Array.from(block), 0, block.length, out, 0, max);
    return Buffer.from(out.subarray(0, end));
  };
  // Literals only.
  assert.equal(decode([0x30, 0x61, 0x62, 0x63]).toString(), 'abc');
  // 15 literals need an extension byte of 0; 270 = 15 + 255 + 0.
  const fifteen = Buffer.alloc(15, 0x41);
  assert.ok(decode([0xf0, 0x00, ...fifteen]).equals(fifteen));
  const many = randomBytes(270, 7);
  assert.ok(decode([0xf0, 0xff, 0x00, ...many]).equals(many));
  // RLE: one literal, then a match of offset 1 and length 4 + 15 + 255 + 10.
  const rle = decode([0x1f, 0x78, 0x01, 0x00, 0xff, 0x0a, 0x00]);
  assert.ok(rle.equals(Buffer.alloc(1 + 4 + 15 + 255 + 10, 0x78)));
  // Offset 3 < length 9: "abc" repeats, then literals close the block.
  assert.equal(
    decode([0x35, 0x61, 0x62, 0x63, 0x03, 0x00, 0x20, 0x21, 0x21]).toString(),
    'abcabcabcabc!!',
  );
  // A long non-overlapping match (copyWithin) far back.
  const head = randomBytes(1000, 8);
  const block = [
    0xff,
    ...lenBytes(1000 - 15),
    ...head,
    0xe8,
    0x03,
    ...lenBytes(600 - 4 - 15),
    0x00,
  ];
  const copied = decode(block);
  assert.ok(copied.equals(Buffer.concat([head, head.subarray(0, 600)])));
});

/** The extension bytes for a length whose nibble is 15: n more, 255 at a time. */
function lenBytes(n: number): number[] {
  const out: number[] = [];
  while (n >= 255) {
    out.push(255);
    n -= 255;
  }
  out.push(n);
  return out;
}

test('every truncation of a frame is a typed error, never a hang or a wrong result', () => {
  const data = textLike(20_000, 9);
  const compressed = lz4LegacyCompress(data, 12);
  for (let n = 0; n < compressed.length; n++) {
    const prefix = compressed.subarray(0, n);
    if (n === 4) {
      // The magic alone is a complete, empty frame.
      assert.equal(decompressLz4Legacy(prefix).length, 0);
      continue;
    }
    assert.throws(
      () => decompressLz4Legacy(prefix),
      (e: unknown) =>
        e instanceof Lz4Error && e.code === (n < 4 ? 'LZ4_BAD_MAGIC' : 'LZ4_TRUNCATED'),
      `prefix of ${n} bytes`,
    );
  }
  // A block cut short: either a typed error or, when the cut falls right
  // after a run of literals, a valid shorter block whose output is a prefix.
  const block = compressed.subarray(8);
  let refused = 0;
  for (let n = 0; n < block.length; n++) {
    const out = new Uint8Array(data.length);
    try {
      const end = decodeLz4Block(block, 0, n, out, 0, data.length);
      assert.ok(Buffer.from(out.subarray(0, end)).equals(data.subarray(0, end)), `cut to ${n}`);
      assert.ok(end < data.length);
    } catch (e) {
      if (!(e instanceof Lz4Error)) throw e;
      refused++;
    }
  }
  // A cut right after a token with no literals is valid too, so many cuts decode.
  assert.ok(refused > block.length / 2, `${refused} of ${block.length} cuts refused`);
});

test('corrupt frames are typed errors: bad offsets, oversized blocks and output, mutations', () => {
  assert.throws(() => decompressLz4Legacy(Buffer.from('not lz4 at all')), lz4Code('LZ4_BAD_MAGIC'));
  assert.throws(
    () => decompressLz4Legacy(lz4LegacyCompress(Buffer.from('x')).subarray(1)),
    lz4Code('LZ4_BAD_MAGIC'),
  );
  // Offset 0, and an offset before the block's first byte.
  assert.throws(
    () => decompressLz4Legacy(frame([0x10, 0x61, 0x00, 0x00, 0x00])),
    lz4Code('LZ4_CORRUPT'),
  );
  assert.throws(
    () => decompressLz4Legacy(frame([0x10, 0x61, 0x02, 0x00, 0x00])),
    lz4Code('LZ4_CORRUPT'),
  );
  // Blocks are independent: a match cannot reach into the previous block.
  assert.throws(
    () => decompressLz4Legacy(frame([0x10, 0x61], [0x00, 0x01, 0x00, 0x00])),
    lz4Code('LZ4_CORRUPT'),
  );
  // An empty block, and a block that ends right after a match.
  assert.throws(() => decompressLz4Legacy(frame([], [0x10, 0x61])), lz4Code('LZ4_TRUNCATED'));
  assert.throws(
    () => decompressLz4Legacy(frame([0x10, 0x61, 0x01, 0x00])),
    lz4Code('LZ4_TRUNCATED'),
  );
  // A block size no 8 MiB block can have.
  const huge = Buffer.concat([MAGIC, u32le(LZ4_LEGACY_MAX_COMPRESSED + 1), Buffer.alloc(16)]);
  assert.throws(() => decompressLz4Legacy(huge), lz4Code('LZ4_CORRUPT'));
  // One block that would decompress to 8 MiB + 1: a literal and a long RLE match.
  const matchLen = LZ4_LEGACY_BLOCK_SIZE; // + 1 literal = 8 MiB + 1
  const rle = [0x1f, 0x61, 0x01, 0x00, ...lenBytes(matchLen - 4 - 15), 0x00];
  assert.throws(() => decompressLz4Legacy(frame(rle)), lz4Code('LZ4_CORRUPT'));
  const exact = [0x1f, 0x61, 0x01, 0x00, ...lenBytes(matchLen - 1 - 4 - 15), 0x00];
  assert.equal(decompressLz4Legacy(frame(exact)).length, LZ4_LEGACY_BLOCK_SIZE);
  // The output ceiling.
  assert.throws(
    () => decompressLz4Legacy(frame(exact, exact), { maxOutput: LZ4_LEGACY_BLOCK_SIZE + 1 }),
    lz4Code('LZ4_CORRUPT'),
  );

  // Random damage: every outcome is a result or an Lz4Error, nothing else.
  const data = textLike(50_000, 10);
  const good = lz4LegacyCompress(data, 1);
  const next = prng(11);
  let refused = 0;
  for (let round = 0; round < 3000; round++) {
    const bad = Buffer.from(good);
    const flips = 1 + (next() % 4);
    for (let k = 0; k < flips; k++) {
      bad[8 + (next() % (bad.length - 8))] = next() & 0xff;
    }
    try {
      const out = decompressLz4Legacy(bad, { maxOutput: 64 * 1024 * 1024 });
      assert.ok(out.length <= LZ4_LEGACY_BLOCK_SIZE);
    } catch (e) {
      if (!(e instanceof Lz4Error)) throw e;
      refused++;
    }
  }
  assert.ok(refused > 1000, `only ${refused} of 3000 damaged frames were refused`);
});
