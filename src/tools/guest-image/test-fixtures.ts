/**
 * Synthetic kernels for the guest-image tests: a tiny ELF64 x86-64
 * executable, a bzImage around any payload, and Debian's `lz4` command to
 * make LZ4 legacy frames to decode.
 */
import { spawnSync } from 'node:child_process';

/** The hint given when the `lz4` command is missing. */
export const LZ4_INSTALL_HINT =
  'the lz4 command (Debian package lz4) is needed to make test data: apt-get install lz4 (CI: add lz4 to the packages .ci/run installs)';

/**
 * `lz4 -l` (legacy frame) of data, at a compression level (1 fast, 12 HC).
 * Throws with {@link LZ4_INSTALL_HINT} when lz4 is not installed.
 */
export function lz4LegacyCompress(data: Uint8Array, level = 1): Buffer {
  const run = spawnSync('lz4', ['-l', `-${level}`, '-c', '-q'], {
    input: data,
    maxBuffer: 1024 * 1024 * 1024,
  });
  if (run.error) {
    const code = (run.error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(LZ4_INSTALL_HINT);
    throw run.error;
  }
  if (run.status !== 0) throw new Error(`lz4 -l failed (${run.status}): ${run.stderr.toString()}`);
  return run.stdout;
}

/** `lz4 -dc` of data (any lz4 format), or undefined when lz4 is missing. */
export function lz4CliDecompress(data: Uint8Array): Buffer | undefined {
  const run = spawnSync('lz4', ['-d', '-c', '-q'], { input: data, maxBuffer: 1024 * 1024 * 1024 });
  if (run.error || run.status !== 0) return undefined;
  return run.stdout;
}

/** The u32 LE of n, as the kernel's size_append writes it after the payload. */
export function u32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

/**
 * A minimal ELF64 x86-64 executable that parseKernelImage accepts: one
 * PT_LOAD of `code` (padded with bss) at physical 16 MiB, entered at its
 * first byte, as vmlinux is.
 */
export function makeElfKernel(code: Uint8Array = Buffer.from('\xf4\xeb\xfd', 'latin1')): Buffer {
  const phoff = 64;
  const dataAt = 0x100;
  const paddr = 0x100_0000;
  const elf = Buffer.alloc(dataAt + code.length);
  elf.write('\x7fELF', 0, 'latin1');
  elf[4] = 2; // ELFCLASS64
  elf[5] = 1; // little-endian
  elf[6] = 1; // EV_CURRENT
  elf.writeUInt16LE(2, 16); // ET_EXEC
  elf.writeUInt16LE(62, 18); // EM_X86_64
  elf.writeUInt32LE(1, 20);
  elf.writeBigUInt64LE(BigInt(paddr), 24); // e_entry
  elf.writeBigUInt64LE(BigInt(phoff), 32);
  elf.writeUInt16LE(64, 52); // e_ehsize
  elf.writeUInt16LE(56, 54); // e_phentsize
  elf.writeUInt16LE(1, 56); // e_phnum
  elf.writeUInt32LE(1, phoff); // PT_LOAD
  elf.writeUInt32LE(5, phoff + 4); // R+X
  elf.writeBigUInt64LE(BigInt(dataAt), phoff + 8);
  elf.writeBigUInt64LE(0xffff_ffff_8100_0000n, phoff + 16);
  elf.writeBigUInt64LE(BigInt(paddr), phoff + 24);
  elf.writeBigUInt64LE(BigInt(code.length), phoff + 32);
  elf.writeBigUInt64LE(BigInt(code.length + 0x1000), phoff + 40);
  elf.writeBigUInt64LE(0x20_0000n, phoff + 48);
  Buffer.from(code).copy(elf, dataAt);
  return elf;
}

/** Options of {@link makeBzImage}. */
export interface BzImageOptions {
  /** The byte at 0x1f1; 0 means 4 sectors. Default 0. */
  setupSects?: number;
  /** Bytes of stand-in decompressor before the payload. Default 0x3c4. */
  payloadOffset?: number;
}

/**
 * A bzImage (boot protocol 2.15, 64-bit entry) whose protected-mode part
 * holds a stand-in decompressor, `payload` at payload_offset, and a few
 * bytes after it, as the kernel's build lays it out.
 */
export function makeBzImage(payload: Uint8Array, options: BzImageOptions = {}): Buffer {
  const rawSects = options.setupSects ?? 0;
  const setupSize = ((rawSects === 0 ? 4 : rawSects) + 1) * 512;
  const payloadOffset = options.payloadOffset ?? 0x3c4;
  const protectedMode = Buffer.alloc(payloadOffset + payload.length + 0x40, 0x90);
  Buffer.from(payload).copy(protectedMode, payloadOffset);
  const image = Buffer.concat([Buffer.alloc(setupSize), protectedMode]);
  image[0x1f1] = rawSects;
  image.writeUInt32LE(Math.ceil(protectedMode.length / 16), 0x1f4); // syssize
  image.writeUInt16LE(0xaa55, 0x1fe);
  image[0x200] = 0xeb; // jmp short over the header
  image[0x201] = 0x6a; // header ends at 0x26c
  image.write('HdrS', 0x202, 'latin1');
  image.writeUInt16LE(0x020f, 0x206);
  image[0x211] = 0x01; // LOADED_HIGH
  image.writeUInt32LE(0x7fffffff, 0x22c);
  image.writeUInt32LE(0x20_0000, 0x230);
  image[0x234] = 1;
  image[0x235] = 21;
  image.writeUInt16LE(0x0001, 0x236); // XLF_KERNEL_64
  image.writeUInt32LE(2048, 0x238);
  image.writeUInt32LE(payloadOffset, 0x248);
  image.writeUInt32LE(payload.length, 0x24c);
  image.writeBigUInt64LE(0x100_0000n, 0x258);
  image.writeUInt32LE(0x40_0000, 0x260);
  return image;
}

/** A deterministic pseudo-random generator (xorshift32), for reproducible test data. */
export function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** n pseudo-random bytes from seed. */
export function randomBytes(n: number, seed: number): Buffer {
  const next = prng(seed);
  const out = Buffer.alloc(n);
  for (let i = 0; i < n; i++) out[i] = next() & 0xff;
  return out;
}
