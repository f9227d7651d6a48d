/**
 * A writer for the cpio "newc" format (SVR4 without CRC, magic "070701"),
 * the only format Linux unpacks as an initramfs.
 *
 * Each entry is a 110-byte ASCII header (the magic, then 13 fields of 8
 * hex digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
 * devminor, rdevmajor, rdevminor, namesize, check), the NUL-terminated name
 * padded so the data starts on a 4-byte boundary, then the data padded to
 * 4 bytes. A symlink's data is its target. The archive ends with an entry
 * named "TRAILER!!!".
 *
 * The output depends on the entries alone: owner root, mtime 0 and inode
 * numbers given in order, so the same entries give the same bytes on any
 * machine, at any time.
 */
import { CpioError } from './errors.js';

/** One thing to put in the archive. `path` is relative ("bin/sh"), with no "." or ".." parts. */
export type CpioEntry =
  | { kind: 'dir'; path: string; mode: number }
  | { kind: 'file'; path: string; mode: number; data: Uint8Array }
  | { kind: 'symlink'; path: string; target: string }
  | { kind: 'chardev'; path: string; mode: number; major: number; minor: number };

const MAGIC = '070701';
const HEADER_SIZE = 110;
const TRAILER = 'TRAILER!!!';

/** File type bits of st_mode. */
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;

const U32_MAX = 0xffffffff;

/**
 * The newc archive holding `entries`, in their order, then the trailer.
 * Every entry's parent directory must come before it (the kernel's
 * unpacker creates no missing parents).
 *
 * @example
 * const cpio = encodeCpioNewc([
 *   { kind: 'dir', path: 'bin', mode: 0o755 },
 *   { kind: 'file', path: 'bin/busybox', mode: 0o755, data: busybox },
 *   { kind: 'symlink', path: 'bin/sh', target: 'busybox' },
 * ]);
 */
export function encodeCpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const seen = new Set<string>();
  const dirs = new Set<string>();
  let ino = 1;
  for (const entry of entries) {
    checkPath(entry.path);
    if (seen.has(entry.path)) {
      throw new CpioError(
        'CPIO_DUPLICATE',
        `cpio entry "${entry.path}" is given twice: give each path once`,
      );
    }
    const slash = entry.path.lastIndexOf('/');
    if (slash > 0 && !dirs.has(entry.path.slice(0, slash))) {
      throw new CpioError(
        'CPIO_MISSING_PARENT',
        `cpio entry "${entry.path}" comes before its directory "${entry.path.slice(0, slash)}": add the directory first`,
      );
    }
    seen.add(entry.path);
    if (entry.kind === 'dir') dirs.add(entry.path);
    parts.push(...encodeEntry(entry, ino++));
  }
  parts.push(...encodeRecord(TRAILER, { ino: 0, mode: 0, nlink: 1 }, new Uint8Array(0)));
  return Buffer.concat(parts);
}

function encodeEntry(entry: CpioEntry, ino: number): Buffer[] {
  switch (entry.kind) {
    case 'dir':
      return encodeRecord(
        entry.path,
        { ino, mode: S_IFDIR | perm(entry), nlink: 2 },
        new Uint8Array(0),
      );
    case 'file':
      return encodeRecord(entry.path, { ino, mode: S_IFREG | perm(entry), nlink: 1 }, entry.data);
    case 'symlink': {
      if (entry.target.length === 0 || entry.target.includes('\0')) {
        throw new CpioError(
          'CPIO_BAD_PATH',
          `symlink "${entry.path}" has an empty or NUL-holding target`,
        );
      }
      return encodeRecord(
        entry.path,
        { ino, mode: S_IFLNK | 0o777, nlink: 1 },
        Buffer.from(entry.target, 'utf8'),
      );
    }
    case 'chardev':
      return encodeRecord(
        entry.path,
        {
          ino,
          mode: S_IFCHR | perm(entry),
          nlink: 1,
          rdevMajor: u32(entry.major, entry.path),
          rdevMinor: u32(entry.minor, entry.path),
        },
        new Uint8Array(0),
      );
  }
}

interface HeaderFields {
  ino: number;
  mode: number;
  nlink: number;
  rdevMajor?: number;
  rdevMinor?: number;
}

/** Header, name and data of one record, each padded to 4 bytes. */
function encodeRecord(name: string, h: HeaderFields, data: Uint8Array): Buffer[] {
  const nameBytes = Buffer.from(`${name}\0`, 'utf8');
  if (data.byteLength > U32_MAX) {
    throw new CpioError(
      'CPIO_TOO_LARGE',
      `cpio entry "${name}" is ${data.byteLength} bytes; newc holds at most 4 GiB - 1`,
    );
  }
  const fields = [
    h.ino,
    h.mode,
    0, // uid
    0, // gid
    h.nlink,
    0, // mtime: fixed, so the archive is reproducible
    data.byteLength,
    0, // devmajor
    0, // devminor
    h.rdevMajor ?? 0,
    h.rdevMinor ?? 0,
    nameBytes.byteLength,
    0, // check: unused in newc
  ];
  const header = Buffer.from(
    MAGIC + fields.map((f) => f.toString(16).padStart(8, '0')).join(''),
    'ascii',
  );
  return [
    header,
    nameBytes,
    padding(HEADER_SIZE + nameBytes.byteLength),
    Buffer.from(data.buffer, data.byteOffset, data.byteLength),
    padding(data.byteLength),
  ];
}

function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

function perm(entry: { path: string; mode: number }): number {
  if (!Number.isInteger(entry.mode) || entry.mode < 0 || entry.mode > 0o7777) {
    throw new CpioError(
      'CPIO_BAD_MODE',
      `cpio entry "${entry.path}" has mode ${entry.mode}: give permission bits only (0 to 0o7777)`,
    );
  }
  return entry.mode;
}

function u32(value: number, path: string): number {
  if (!Number.isInteger(value) || value < 0 || value > U32_MAX) {
    throw new CpioError(
      'CPIO_TOO_LARGE',
      `cpio entry "${path}": device number ${value} is not a 32-bit value`,
    );
  }
  return value;
}

function checkPath(path: string): void {
  const parts = path.split('/');
  if (
    path.length === 0 ||
    path.includes('\0') ||
    path === TRAILER ||
    parts.some((p) => p === '' || p === '.' || p === '..')
  ) {
    throw new CpioError(
      'CPIO_BAD_PATH',
      `cpio path "${path}" is not a plain relative path: write "bin/sh", not "/bin/sh", "./bin/sh" or "bin//sh"`,
    );
  }
}
