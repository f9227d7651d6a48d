/**
 * Takes the uncompressed kernel (the ELF vmlinux) out of a bzImage.
 *
 * A bzImage's protected-mode part, which starts (setup_sects + 1) x 512
 * bytes into the file, holds the kernel's own decompressor and, at
 * payload_offset (setup header 0x248) for payload_length (0x24c) bytes, the
 * compressed vmlinux. Under PVM the guest runs that decompressor through
 * KVM's instruction emulator (about 70 s for Debian's LZ4 kernel); booting
 * the ELF we extract here skips it.
 *
 * We decode the two formats Debian and most distributions use for x86 (gzip
 * through node:zlib, LZ4 through lz4-legacy.ts). Anything else is refused
 * with a {@link VmlinuxError} saying what to do instead.
 */
import { gunzipSync } from 'node:zlib';
import { KernelImageError, parseKernelImage } from '../../hw/i386/boot/kernel-image.js';
import { Lz4Error, VmlinuxError } from './errors.js';
import { decompressLz4Legacy } from './lz4-legacy.js';

/** A payload compression, as its magic number names it. */
export type PayloadCompression =
  | 'gzip'
  | 'lz4'
  | 'xz'
  | 'zstd'
  | 'bzip2'
  | 'lzma'
  | 'lzo'
  | 'elf'
  | 'unknown';

/** Ceiling on the decompressed kernel; real ones are tens of MiB. */
const MAX_VMLINUX = 1024 * 1024 * 1024;

const MAGICS: ReadonlyArray<readonly [PayloadCompression, readonly number[]]> = [
  ['lz4', [0x02, 0x21, 0x4c, 0x18]],
  ['gzip', [0x1f, 0x8b]],
  ['xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ['zstd', [0x28, 0xb5, 0x2f, 0xfd]],
  ['bzip2', [0x42, 0x5a, 0x68]], // "BZh"
  ['lzma', [0x5d, 0x00, 0x00]],
  ['lzo', [0x89, 0x4c, 0x5a, 0x4f]], // "\x89LZO"
  ['elf', [0x7f, 0x45, 0x4c, 0x46]],
];

/** The compression a payload's first bytes announce. */
export function payloadCompression(payload: Uint8Array): PayloadCompression {
  for (const [name, magic] of MAGICS) {
    if (payload.length >= magic.length && magic.every((b, i) => payload[i] === b)) return name;
  }
  return 'unknown';
}

/** A bzImage's compressed payload, and how it is compressed. */
export interface KernelPayload {
  compression: PayloadCompression;
  /** The payload bytes (a view into the bzImage). */
  data: Uint8Array;
  /** Where the payload starts in the bzImage file. */
  fileOffset: number;
}

/**
 * Finds the compressed payload of a bzImage through its setup header.
 * Throws {@link VmlinuxError} VMLINUX_NOT_BZIMAGE if the file is not a
 * (64-bit, bootable) bzImage or has no payload.
 */
export function findKernelPayload(bzImage: Uint8Array): KernelPayload {
  let image: ReturnType<typeof parseKernelImage>;
  try {
    image = parseKernelImage(bzImage);
  } catch (e) {
    if (!(e instanceof KernelImageError)) throw e;
    throw new VmlinuxError('VMLINUX_NOT_BZIMAGE', `cannot extract vmlinux: ${e.message}`, {
      cause: e,
    });
  }
  if (image.kind !== 'bzimage') {
    throw new VmlinuxError(
      'VMLINUX_NOT_BZIMAGE',
      'cannot extract vmlinux: the file is already an ELF kernel, not a bzImage',
    );
  }
  const { payloadOffset, payloadLength } = image.header;
  if (payloadLength === 0) {
    throw new VmlinuxError(
      'VMLINUX_NOT_BZIMAGE',
      'cannot extract vmlinux: the bzImage header gives payload_length 0 (boot protocol before 2.08 has no payload fields)',
    );
  }
  // parseKernelImage checked that the payload lies inside the protected-mode part.
  const data = image.protectedMode.subarray(payloadOffset, payloadOffset + payloadLength);
  return {
    compression: payloadCompression(data),
    data,
    fileOffset: bzImage.length - image.protectedMode.length + payloadOffset,
  };
}

/**
 * The uncompressed ELF vmlinux inside a bzImage whose payload is gzip or LZ4
 * compressed. Throws {@link VmlinuxError}: VMLINUX_NOT_BZIMAGE,
 * VMLINUX_UNSUPPORTED_COMPRESSION (xz, zstd, bzip2, lzma, lzo, unknown),
 * VMLINUX_CORRUPT_PAYLOAD, or VMLINUX_NOT_ELF when the result is not an
 * ELF64 x86-64 executable that parseKernelImage accepts.
 *
 * @example
 * const vmlinux = extractVmlinux(readFileSync('vmlinuz'));
 * writeFileSync('vmlinux', vmlinux); // tsvmm -kernel vmlinux boots it directly
 */
export function extractVmlinux(bzImage: Uint8Array): Uint8Array {
  const payload = findKernelPayload(bzImage);
  let vmlinux: Uint8Array;
  switch (payload.compression) {
    case 'lz4':
      try {
        vmlinux = decompressLz4Legacy(payload.data, { maxOutput: MAX_VMLINUX });
      } catch (e) {
        if (!(e instanceof Lz4Error)) throw e;
        throw corrupt('LZ4', e);
      }
      break;
    case 'gzip':
      try {
        vmlinux = gunzipSync(payload.data, { maxOutputLength: MAX_VMLINUX });
      } catch (e) {
        throw corrupt('gzip', e);
      }
      break;
    case 'elf':
      // CONFIG_KERNEL_UNCOMPRESSED: the payload is vmlinux itself.
      vmlinux = payload.data.slice();
      break;
    default: {
      const what =
        payload.compression === 'unknown'
          ? `of an unknown format (it starts with ${Buffer.from(payload.data.subarray(0, 6)).toString('hex')})`
          : `${payload.compression}-compressed`;
      throw new VmlinuxError(
        'VMLINUX_UNSUPPORTED_COMPRESSION',
        `cannot extract vmlinux: the bzImage's payload is ${what}, and tsvmm decodes only gzip and lz4; use a kernel built with CONFIG_KERNEL_GZIP or CONFIG_KERNEL_LZ4, or pass the bzImage to -kernel (its own decompressor then runs in the guest, slowly under PVM)`,
      );
    }
  }
  try {
    const parsed = parseKernelImage(vmlinux);
    if (parsed.kind !== 'elf') throw new KernelImageError('it is a bzImage, not an ELF');
  } catch (e) {
    if (!(e instanceof KernelImageError)) throw e;
    throw new VmlinuxError(
      'VMLINUX_NOT_ELF',
      `the bzImage's ${payload.compression} payload decompressed to ${vmlinux.length} bytes that are not a bootable ELF64 x86-64 kernel: ${e.message}`,
      { cause: e },
    );
  }
  return vmlinux;
}

function corrupt(format: string, e: unknown): VmlinuxError {
  const reason = e instanceof Error ? e.message : String(e);
  return new VmlinuxError(
    'VMLINUX_CORRUPT_PAYLOAD',
    `cannot extract vmlinux: the bzImage's ${format} payload does not decompress (${reason}); the file is damaged, or pass the bzImage itself to -kernel`,
    { cause: e },
  );
}
