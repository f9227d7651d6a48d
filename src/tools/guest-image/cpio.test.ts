import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { type CpioEntry, encodeCpioNewc } from './cpio.js';

/** Deterministic bytes of any length (a small LCG), so the archive is the same each run. */
function pseudoRandom(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

/** Covers every entry kind and every padding case of names and data. */
const SAMPLE: readonly CpioEntry[] = [
  { kind: 'dir', path: 'bin', mode: 0o755 },
  { kind: 'dir', path: 'etc', mode: 0o750 },
  { kind: 'dir', path: 'tmp', mode: 0o1777 },
  { kind: 'file', path: 'bin/tool', mode: 0o755, data: pseudoRandom(4099, 1) },
  { kind: 'file', path: 'etc/a', mode: 0o644, data: Buffer.from('a\n') },
  { kind: 'file', path: 'etc/ab', mode: 0o600, data: Buffer.from('abc') },
  { kind: 'file', path: 'etc/abc', mode: 0o640, data: Buffer.from('abcd') },
  { kind: 'file', path: 'etc/abcd', mode: 0o444, data: Buffer.from('abcde') },
  { kind: 'file', path: 'etc/empty', mode: 0o644, data: Buffer.alloc(0) },
  { kind: 'symlink', path: 'bin/sh', target: 'tool' },
  { kind: 'symlink', path: 'etc/abs-link', target: '/bin/tool' },
  { kind: 'file', path: 'init', mode: 0o755, data: Buffer.from('#!/bin/sh\necho hi\n') },
];

const DEVICE: CpioEntry = { kind: 'chardev', path: 'console', mode: 0o600, major: 5, minor: 1 };

interface ParsedEntry {
  name: string;
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  rdevMajor: number;
  rdevMinor: number;
  data: Buffer;
}

/** An independent reader of newc archives: checks magic, alignment and the trailer. */
function parseNewc(archive: Buffer): ParsedEntry[] {
  const entries: ParsedEntry[] = [];
  let at = 0;
  for (;;) {
    assert.equal(at % 4, 0, 'each header starts 4-byte aligned');
    assert.equal(archive.toString('ascii', at, at + 6), '070701', `magic at ${at}`);
    const field = (i: number) => {
      const text = archive.toString('ascii', at + 6 + i * 8, at + 14 + i * 8);
      assert.match(text, /^[0-9a-fA-F]{8}$/);
      return Number.parseInt(text, 16);
    };
    const nameSize = field(11);
    const fileSize = field(6);
    const name = archive.toString('utf8', at + 110, at + 110 + nameSize - 1);
    assert.equal(archive[at + 110 + nameSize - 1], 0, 'name is NUL-terminated');
    const dataAt = at + 110 + nameSize + ((4 - ((110 + nameSize) % 4)) % 4);
    assert.equal(dataAt % 4, 0);
    const entry: ParsedEntry = {
      name,
      ino: field(0),
      mode: field(1),
      uid: field(2),
      gid: field(3),
      nlink: field(4),
      mtime: field(5),
      rdevMajor: field(9),
      rdevMinor: field(10),
      data: archive.subarray(dataAt, dataAt + fileSize),
    };
    assert.equal(field(12), 0, 'check field is 0 in newc');
    at = dataAt + fileSize + ((4 - (fileSize % 4)) % 4);
    for (let p = dataAt + fileSize; p < at; p++) assert.equal(archive[p], 0, 'padding is zero');
    if (name === 'TRAILER!!!') {
      assert.equal(fileSize, 0);
      break;
    }
    entries.push(entry);
  }
  assert.equal(at, archive.length, 'nothing after the trailer');
  return entries;
}

function typeBits(e: CpioEntry): number {
  return { dir: 0o040000, file: 0o100000, symlink: 0o120000, chardev: 0o020000 }[e.kind];
}

/** Runs Debian's cpio; fails the test with an install hint when cpio is missing. */
function cpio(args: string[], input: Buffer, cwd: string): string {
  const r = spawnSync('cpio', args, { input, cwd, encoding: 'buffer' });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT') {
    assert.fail('cpio is not installed: run `apt-get install cpio` (.ci/run installs it)');
  }
  assert.equal(r.status, 0, `cpio ${args.join(' ')}: ${r.stderr.toString()}`);
  return r.stdout.toString();
}

test('our own newc reader gets back every name, mode, target and content', () => {
  const parsed = parseNewc(encodeCpioNewc([...SAMPLE, DEVICE]));
  assert.equal(parsed.length, SAMPLE.length + 1);
  [...SAMPLE, DEVICE].forEach((want, i) => {
    const got = parsed[i]!;
    assert.equal(got.name, want.path);
    assert.equal(got.ino, i + 1, 'inode numbers in order');
    assert.deepEqual([got.uid, got.gid, got.mtime], [0, 0, 0], 'root-owned, mtime 0');
    assert.equal(got.mode & 0o170000, typeBits(want), `${want.path} type`);
    if (want.kind === 'symlink') {
      assert.equal(got.mode & 0o7777, 0o777);
      assert.equal(got.data.toString('utf8'), want.target);
    } else {
      assert.equal(got.mode & 0o7777, want.mode, `${want.path} mode`);
    }
    if (want.kind === 'file') assert.deepEqual(got.data, Buffer.from(want.data));
    if (want.kind === 'dir') assert.equal(got.nlink, 2);
    else assert.equal(got.nlink, 1, 'no hard links: the kernel links files with nlink >= 2');
    if (want.kind === 'chardev') assert.deepEqual([got.rdevMajor, got.rdevMinor], [5, 1]);
  });
});

test('Debian cpio -t lists the same names with the same types and modes', () => {
  const listing = cpio(
    ['-t', '-v', '--quiet', '--numeric-uid-gid'],
    encodeCpioNewc([...SAMPLE, DEVICE]),
    tmpdir(),
  );
  const lines = listing.trim().split('\n');
  assert.equal(lines.length, SAMPLE.length + 1);
  const perms: Record<string, string> = {
    bin: 'drwxr-xr-x',
    etc: 'drwxr-x---',
    tmp: 'drwxrwxrwt',
    'bin/tool': '-rwxr-xr-x',
    'etc/ab': '-rw-------',
    'etc/abcd': '-r--r--r--',
    'bin/sh': 'lrwxrwxrwx',
    console: 'crw-------',
  };
  [...SAMPLE, DEVICE].forEach((want, i) => {
    const line = lines[i]!;
    const perm = line.split(/\s+/)[0];
    if (want.path in perms) assert.equal(perm, perms[want.path], line);
    if (want.kind === 'symlink') assert.ok(line.endsWith(`${want.path} -> ${want.target}`), line);
    else assert.ok(line.endsWith(` ${want.path}`), line);
  });
});

test('Debian cpio -i unpacks the same tree: modes, symlink targets, contents', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-cpio-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // Device nodes need root to create; the tree check does not need one.
  cpio(['-i', '--quiet', '--no-absolute-filenames'], encodeCpioNewc(SAMPLE), dir);
  for (const want of SAMPLE) {
    const path = join(dir, want.path);
    const st = lstatSync(path);
    assert.equal(st.mode & 0o170000, typeBits(want), `${want.path} type`);
    if (want.kind === 'symlink') {
      assert.equal(readlinkSync(path), want.target);
      continue;
    }
    if (want.kind === 'dir' || want.kind === 'file')
      assert.equal(st.mode & 0o7777, want.mode, `${want.path} mode`);
    if (want.kind === 'file') assert.deepEqual(readFileSync(path), Buffer.from(want.data));
  }
});

test('the same entries give byte-identical archives', () => {
  const a = encodeCpioNewc(SAMPLE);
  const b = encodeCpioNewc(SAMPLE.map((e) => ({ ...e })));
  assert.ok(a.equals(b));
});

test('bad paths, missing parents, duplicates and bad modes are refused', () => {
  const file = (path: string): CpioEntry => ({
    kind: 'file',
    path,
    mode: 0o644,
    data: Buffer.alloc(1),
  });
  for (const path of ['/abs', './x', 'a/../b', 'a//b', '', 'TRAILER!!!']) {
    assert.throws(() => encodeCpioNewc([file(path)]), { code: 'CPIO_BAD_PATH' }, path);
  }
  assert.throws(() => encodeCpioNewc([file('bin/x')]), { code: 'CPIO_MISSING_PARENT' });
  assert.throws(() => encodeCpioNewc([file('x'), file('x')]), { code: 'CPIO_DUPLICATE' });
  assert.throws(
    () => encodeCpioNewc([{ kind: 'file', path: 'x', mode: 0o100644, data: Buffer.alloc(0) }]),
    { code: 'CPIO_BAD_MODE' },
  );
  assert.throws(() => encodeCpioNewc([{ kind: 'symlink', path: 'l', target: '' }]), {
    code: 'CPIO_BAD_PATH',
  });
});

test('an empty archive is just the trailer', () => {
  const archive = encodeCpioNewc([]);
  assert.equal(parseNewc(archive).length, 0);
  assert.equal(archive.length % 4, 0);
  assert.equal(cpio(['-t', '--quiet'], archive, tmpdir()), '');
});
