/**
 * Recognises the two kinds of kernel image `-kernel` accepts and takes them
 * apart, without touching guest memory:
 *
 * - a bzImage, read through its setup header (the kernel's
 *   Documentation/arch/x86/boot.rst), booted through the 64-bit entry at
 *   load address + 0x200, which needs boot protocol 2.12 and XLF_KERNEL_64;
 * - an ELF64 x86-64 executable (an uncompressed vmlinux, or our own probe
 *   OS), loaded segment by segment at the segments' physical addresses and
 *   entered in 64-bit mode with RSI pointing at boot_params, as Firecracker
 *   enters vmlinux.
 *
 * Anything else is refused with a {@link KernelImageError} that says what
 * is wrong with the file.
 */
import { TsvmmError } from '../../../util/errors.js';

/** The file given as a kernel cannot be booted; the message says why. */
export class KernelImageError extends TsvmmError {
  constructor(message: string) {
    super('KERNEL_IMAGE_INVALID', message);
  }
}

/** Where the setup header starts in a bzImage and in boot_params. */
export const SETUP_HEADER_OFFSET = 0x1f1;
/**
 * The setup header never reaches past this offset: boot_params'
 * edd_mbr_sig_buffer starts here.
 */
export const SETUP_HEADER_LIMIT = 0x290;
/** "HdrS", little-endian, at 0x202. */
export const HDRS_MAGIC = 0x53726448;
/** The oldest boot protocol with xloadflags, so with a declared 64-bit entry. */
export const MIN_PROTOCOL_64BIT = 0x020c;
/** The 64-bit entry point's offset from where the protected-mode kernel is loaded. */
export const ENTRY_64_OFFSET = 0x200;

/** loadflags bit 0: the protected-mode kernel goes at 1 MiB (a bzImage). */
export const LOADED_HIGH = 0x01;
/** loadflags bit 7: heap_end_ptr is valid. */
export const CAN_USE_HEAP = 0x80;
/** xloadflags bit 0: the kernel has the 64-bit entry at +0x200. */
export const XLF_KERNEL_64 = 0x01;
/** xloadflags bit 1: kernel, boot_params, command line and initrd may sit above 4 GiB. */
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;

const ELF_MAGIC = 0x464c457f; // "\x7fELF" read little-endian
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const EM_X86_64 = 62;
const PT_LOAD = 1;
const PT_NOTE = 4;
const ELF64_HEADER_SIZE = 64;
const ELF64_PHDR_SIZE = 56;
/** Xen's note type for the 32-bit PVH entry point; QEMU's -kernel boots ELFs through it. */
const XEN_ELFNOTE_PHYS32_ENTRY = 18;

const MiB = 0x100000;
const FOUR_GiB = 0x1_0000_0000;

/** The fields of a bzImage setup header the loader uses, decoded. */
export interface SetupHeader {
  /** Sectors of real-mode setup code after the boot sector (0 in the file means 4). */
  setupSects: number;
  /** Boot protocol version, e.g. 0x020f for 2.15. */
  version: number;
  loadflags: number;
  /** Size of the protected-mode code in bytes (syssize x 16). */
  syssize: number;
  /** Highest address the initrd may occupy (its last byte). */
  initrdAddrMax: number;
  kernelAlignment: number;
  relocatable: boolean;
  /** log2 of the alignment the kernel needs at least. */
  minAlignment: number;
  xloadflags: number;
  /** Longest command line, without its terminating NUL. */
  cmdlineSize: number;
  /** Offset of the compressed payload from the start of the protected-mode kernel. */
  payloadOffset: number;
  payloadLength: number;
  /** Where the kernel prefers to run (and where a non-relocatable one always runs). */
  prefAddress: number;
  /** Contiguous bytes the kernel needs from its runtime start before it reads the e820 map. */
  initSize: number;
  /** The kernel's version string, when the header points at one. */
  kernelVersion?: string;
}

/** A parsed bzImage. */
export interface BzImage {
  kind: 'bzimage';
  header: SetupHeader;
  /**
   * The setup header exactly as the image holds it, from 0x1f1 to its end
   * (0x202 + the byte at 0x201): boot_params starts from a copy of it.
   */
  setupHeaderBytes: Uint8Array;
  /** The protected-mode kernel: every byte after the (setup_sects + 1) x 512 setup area. */
  protectedMode: Uint8Array;
  /** How the payload is compressed, from its magic number ('unknown' if not recognised). */
  payloadCompression: string;
}

/** One PT_LOAD segment of an ELF kernel. */
export interface ElfSegment {
  /** Guest-physical load address (p_paddr). */
  paddr: number;
  /** Virtual address (p_vaddr); for vmlinux the high kernel mapping. */
  vaddr: bigint;
  /** The bytes from the file (p_filesz of them). */
  data: Uint8Array;
  /** Bytes in memory (p_memsz); those past `data` are zeroed (bss). */
  memsz: number;
}

/** A parsed ELF64 x86-64 kernel. */
export interface ElfKernel {
  kind: 'elf';
  /** PT_LOAD segments in ascending physical order. */
  segments: ElfSegment[];
  /** Guest-physical address of the 64-bit entry point. */
  entry: number;
  /** The PVH (32-bit) entry from a Xen PHYS32_ENTRY note, if the image has one. */
  pvhEntry?: number;
}

/** What {@link parseKernelImage} recognises. */
export type KernelImage = BzImage | ElfKernel;

/**
 * Recognises `bytes` as a bzImage or an ELF64 x86-64 executable and parses
 * it. Throws {@link KernelImageError} for anything tsvmm cannot boot.
 */
export function parseKernelImage(bytes: Uint8Array): KernelImage {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength >= 4 && view.getUint32(0, true) === ELF_MAGIC) return parseElf(bytes, view);
  if (bytes.byteLength >= 0x208 && view.getUint32(0x202, true) === HDRS_MAGIC) {
    return parseBzImage(bytes, view);
  }
  const size =
    bytes.byteLength < 0x208 ? ` (the file is only ${bytes.byteLength} bytes)` : ' at 0x202';
  throw new KernelImageError(
    `not a Linux kernel: no 'HdrS' setup header${size} and no ELF magic; give -kernel a bzImage (vmlinuz) or an ELF64 x86-64 kernel`,
  );
}

function parseBzImage(bytes: Uint8Array, view: DataView): BzImage {
  const version = view.getUint16(0x206, true);
  const versionText = `${version >> 8}.${(version & 0xff).toString().padStart(2, '0')}`;
  if (view.getUint16(0x1fe, true) !== 0xaa55) {
    throw new KernelImageError(
      "not a bootable bzImage: 'HdrS' is present but boot_flag at 0x1fe is not 0xaa55",
    );
  }
  if (version < MIN_PROTOCOL_64BIT) {
    throw new KernelImageError(
      `bzImage uses boot protocol ${versionText}; the 64-bit entry needs 2.12 or later (Linux 3.8+)`,
    );
  }
  const rawSects = view.getUint8(0x1f1);
  const setupSects = rawSects === 0 ? 4 : rawSects;
  const setupSize = (setupSects + 1) * 512;
  const headerEnd = Math.min(0x202 + view.getUint8(0x201), SETUP_HEADER_LIMIT);
  // Every field the loader reads sits below 0x264 (init_size ends there).
  if (bytes.byteLength < Math.max(setupSize, 0x264) || headerEnd < 0x264) {
    throw new KernelImageError(
      `truncated bzImage: the file is ${bytes.byteLength} bytes, shorter than its ${setupSize}-byte setup area or its setup header`,
    );
  }
  const loadflags = view.getUint8(0x211);
  if ((loadflags & LOADED_HIGH) === 0) {
    throw new KernelImageError(
      'not a bzImage: LOADED_HIGH is clear in loadflags (an old zImage), which only boots through real mode',
    );
  }
  const xloadflags = view.getUint16(0x236, true);
  if ((xloadflags & XLF_KERNEL_64) === 0) {
    throw new KernelImageError(
      'bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear): it is a 32-bit kernel; use an x86-64 kernel',
    );
  }
  const header: SetupHeader = {
    setupSects,
    version,
    loadflags,
    syssize: view.getUint32(0x1f4, true) * 16,
    initrdAddrMax: view.getUint32(0x22c, true),
    kernelAlignment: view.getUint32(0x230, true),
    relocatable: view.getUint8(0x234) !== 0,
    minAlignment: view.getUint8(0x235),
    xloadflags,
    cmdlineSize: view.getUint32(0x238, true),
    payloadOffset: view.getUint32(0x248, true),
    payloadLength: view.getUint32(0x24c, true),
    prefAddress: Number(view.getBigUint64(0x258, true)),
    initSize: view.getUint32(0x260, true),
  };
  const versionPtr = view.getUint16(0x20e, true);
  if (versionPtr !== 0 && versionPtr + 0x200 < setupSize) {
    const start = versionPtr + 0x200;
    const end = bytes.indexOf(0, start);
    if (end > start && end <= setupSize) {
      header.kernelVersion = Buffer.from(bytes.subarray(start, end)).toString('latin1');
    }
  }

  const protectedMode = bytes.subarray(setupSize);
  // syssize is rounded up to 16-byte paragraphs, so allow up to 15 bytes of slack.
  if (protectedMode.byteLength + 15 < header.syssize) {
    throw new KernelImageError(
      `truncated bzImage: the protected-mode kernel is ${protectedMode.byteLength} bytes but its header (syssize) says ${header.syssize}`,
    );
  }
  if (protectedMode.byteLength === 0) {
    throw new KernelImageError('truncated bzImage: nothing follows the setup area');
  }
  if (header.payloadOffset + header.payloadLength > protectedMode.byteLength) {
    throw new KernelImageError(
      `truncated bzImage: its payload (offset ${header.payloadOffset}, ${header.payloadLength} bytes) runs past the ${protectedMode.byteLength}-byte protected-mode kernel`,
    );
  }
  if (header.initSize === 0) {
    throw new KernelImageError(
      'bzImage header has init_size 0: the loader cannot tell how much memory the kernel needs',
    );
  }
  return {
    kind: 'bzimage',
    header,
    setupHeaderBytes: bytes.slice(SETUP_HEADER_OFFSET, headerEnd),
    protectedMode,
    payloadCompression:
      header.payloadLength === 0
        ? 'none'
        : compressionOf(protectedMode.subarray(header.payloadOffset)),
  };
}

/** The compression format a payload's first bytes announce (boot.rst, payload_offset). */
function compressionOf(payload: Uint8Array): string {
  const b0 = payload[0];
  const b1 = payload[1];
  if (b0 === 0x1f && (b1 === 0x8b || b1 === 0x9e)) return 'gzip';
  if (b0 === 0x42 && b1 === 0x5a) return 'bzip2';
  if (b0 === 0x5d && b1 === 0x00) return 'lzma';
  if (b0 === 0xfd && b1 === 0x37) return 'xz';
  if (b0 === 0x02 && b1 === 0x21) return 'lz4';
  if (b0 === 0x28 && b1 === 0xb5) return 'zstd';
  if (b0 === 0x89 && b1 === 0x4c) return 'lzo';
  if (b0 === 0x7f && b1 === 0x45) return 'elf';
  return 'unknown';
}

function parseElf(bytes: Uint8Array, view: DataView): ElfKernel {
  if (bytes.byteLength < ELF64_HEADER_SIZE) {
    throw new KernelImageError(
      `truncated ELF kernel: the file is ${bytes.byteLength} bytes, shorter than an ELF64 header`,
    );
  }
  const elfClass = bytes[4];
  if (elfClass !== ELFCLASS64) {
    throw new KernelImageError(
      `ELF kernel is ${elfClass === 1 ? '32-bit (ELFCLASS32)' : `of unknown class ${elfClass}`}; tsvmm boots 64-bit (ELFCLASS64) x86-64 kernels only`,
    );
  }
  if (bytes[5] !== ELFDATA2LSB) {
    throw new KernelImageError('ELF kernel is big-endian; an x86-64 kernel is little-endian');
  }
  const machine = view.getUint16(18, true);
  if (machine !== EM_X86_64) {
    throw new KernelImageError(
      `ELF kernel is for machine ${machine}, not x86-64 (${EM_X86_64}); give an x86-64 kernel`,
    );
  }
  const type = view.getUint16(16, true);
  if (type !== ET_EXEC) {
    throw new KernelImageError(
      `ELF file has type ${type}, not an executable (ET_EXEC); a kernel is linked as an executable`,
    );
  }
  const entry = view.getBigUint64(24, true);
  const phoff = Number(view.getBigUint64(32, true));
  const phentsize = view.getUint16(54, true);
  const phnum = view.getUint16(56, true);
  if (phentsize < ELF64_PHDR_SIZE || phnum === 0) {
    throw new KernelImageError(
      `ELF kernel has no usable program headers (e_phnum ${phnum}, e_phentsize ${phentsize})`,
    );
  }
  if (phoff + phnum * phentsize > bytes.byteLength) {
    throw new KernelImageError(
      `truncated ELF kernel: its ${phnum} program headers at offset ${phoff} run past the end of the ${bytes.byteLength}-byte file`,
    );
  }

  const segments: ElfSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize;
    const pType = view.getUint32(at, true);
    const offset = Number(view.getBigUint64(at + 8, true));
    const vaddr = view.getBigUint64(at + 16, true);
    const paddr = view.getBigUint64(at + 24, true);
    const filesz = Number(view.getBigUint64(at + 32, true));
    const memsz = view.getBigUint64(at + 40, true);
    if (offset + filesz > bytes.byteLength) {
      throw new KernelImageError(
        `truncated ELF kernel: program header ${i} wants ${filesz} bytes at file offset ${offset}, past the end of the ${bytes.byteLength}-byte file`,
      );
    }
    if (pType === PT_NOTE) {
      pvhEntry ??= findPvhEntry(bytes.subarray(offset, offset + filesz));
      continue;
    }
    if (pType !== PT_LOAD || memsz === 0n) continue;
    if (BigInt(filesz) > memsz) {
      throw new KernelImageError(
        `ELF kernel segment ${i} has more file bytes (${filesz}) than memory bytes (${memsz})`,
      );
    }
    if (paddr < BigInt(MiB)) {
      throw new KernelImageError(
        `ELF kernel segment ${i} loads at physical 0x${paddr.toString(16)}, below 1 MiB, where the boot tables and legacy areas live; link the kernel at 1 MiB or above`,
      );
    }
    if (paddr + memsz > BigInt(FOUR_GiB)) {
      throw new KernelImageError(
        `ELF kernel segment ${i} (physical 0x${paddr.toString(16)}, ${memsz} bytes) reaches past 4 GiB, beyond the boot identity map; link it below 4 GiB`,
      );
    }
    segments.push({
      paddr: Number(paddr),
      vaddr,
      data: bytes.subarray(offset, offset + filesz),
      memsz: Number(memsz),
    });
  }
  if (segments.length === 0) {
    throw new KernelImageError('ELF kernel has no PT_LOAD segment: nothing to load');
  }
  segments.sort((a, b) => a.paddr - b.paddr);
  for (let i = 1; i < segments.length; i++) {
    const prev = segments[i - 1]!;
    const cur = segments[i]!;
    if (prev.paddr + prev.memsz > cur.paddr) {
      throw new KernelImageError(
        `ELF kernel segments overlap: 0x${prev.paddr.toString(16)}+${prev.memsz} and 0x${cur.paddr.toString(16)}`,
      );
    }
  }
  const kernel: ElfKernel = { kind: 'elf', segments, entry: physicalEntry(entry, segments) };
  if (pvhEntry !== undefined) kernel.pvhEntry = pvhEntry;
  return kernel;
}

/**
 * e_entry as a physical address. vmlinux links `phys_startup_64` as its
 * entry, already physical; other ELFs may give a virtual entry, which is
 * translated through the segment whose virtual range holds it.
 */
function physicalEntry(entry: bigint, segments: readonly ElfSegment[]): number {
  for (const s of segments) {
    if (entry >= BigInt(s.paddr) && entry < BigInt(s.paddr + s.memsz)) return Number(entry);
  }
  for (const s of segments) {
    if (entry >= s.vaddr && entry < s.vaddr + BigInt(s.memsz)) {
      return Number(entry - s.vaddr) + s.paddr;
    }
  }
  throw new KernelImageError(
    `ELF kernel entry point 0x${entry.toString(16)} lies in no loaded segment, physical or virtual`,
  );
}

/** The PVH entry from a note area, if it has a Xen PHYS32_ENTRY note. */
function findPvhEntry(notes: Uint8Array): number | undefined {
  const view = new DataView(notes.buffer, notes.byteOffset, notes.byteLength);
  let at = 0;
  while (at + 12 <= notes.byteLength) {
    const namesz = view.getUint32(at, true);
    const descsz = view.getUint32(at + 4, true);
    const type = view.getUint32(at + 8, true);
    const nameAt = at + 12;
    const descAt = nameAt + align4(namesz);
    if (descAt + descsz > notes.byteLength) return undefined;
    const name = Buffer.from(notes.subarray(nameAt, nameAt + namesz)).toString('latin1');
    if (name === 'Xen\0' && type === XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4) {
      return descsz >= 8 ? Number(view.getBigUint64(descAt, true)) : view.getUint32(descAt, true);
    }
    at = descAt + align4(descsz);
  }
  return undefined;
}

function align4(n: number): number {
  return (n + 3) & ~3;
}
