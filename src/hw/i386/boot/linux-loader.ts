/**
 * Loads a Linux kernel (bzImage or ELF) with its command line and initrd
 * into guest RAM for the x86-64 64-bit boot protocol: the BSP then starts
 * in long mode (src/hw/i386/long-mode.ts) at `entry` with RSI =
 * `bootParamsAddr`.
 *
 * The guest-physical map, low addresses first:
 *
 *   0x000500 ..            GDT and IDT                  (long-mode.ts)
 *   0x007000 .. 0x008000   boot_params, the zero page   (Firecracker's address)
 *   0x009000 .. 0x00f000   PML4, PDPT, 4 page dirs      (long-mode.ts)
 *   0x020000 ..            command line, NUL-terminated (the probe guest's area,
 *                          unused when a kernel is given)
 *   0x09fc00 .. 0x100000   reserved in e820: EBDA, MP table, legacy ROM area
 *   0x100000 ..            the protected-mode kernel of a bzImage, or the ELF's
 *                          PT_LOAD segments at their own physical addresses
 *   runtime_start ..+init_size
 *                          where a bzImage decompresses itself and runs
 *                          (pref_address, 16 MiB for Debian's kernels)
 *   .. min(initrd_addr_max, end of RAM below 4 GiB)
 *                          the initrd, page-aligned, as high as it fits
 *
 * Everything stays below 4 GiB, inside the boot identity map.
 *
 * A bzImage's protected-mode part goes at 1 MiB, not at pref_address:
 * 1 MiB is where boot.rst puts a LOADED_HIGH kernel and where QEMU puts it;
 * it is right for relocatable and non-relocatable kernels alike; and the
 * decompressor first copies itself to the end of its buffer at
 * runtime_start anyway, so loading at pref_address would save nothing.
 */
import { TsvmmError } from '../../../util/errors.js';
import {
  type AddressRange,
  BOOT_PARAMS_SIZE,
  buildBootParams,
  ELF_CMDLINE_SIZE,
  ELF_INITRD_ADDR_MAX,
  e820Map,
} from './boot-params.js';
import { type KernelImage, parseKernelImage } from './kernel-image.js';

/** Where the zero page goes. */
export const BOOT_PARAMS_ADDR = 0x7000;
/** Where the command line goes. */
export const CMDLINE_ADDR = 0x20000;
/** Where a bzImage's protected-mode kernel goes. */
export const KERNEL_LOAD_ADDR = 0x100000;
/** The command line must end below the reserved legacy area. */
const CMDLINE_LIMIT = 0x9fc00;
const PAGE = 4096;
const FOUR_GiB = 0x1_0000_0000;

/** The kernel, command line or initrd cannot be placed in this VM's RAM. */
export class LinuxLoadError extends TsvmmError {}

/** The part of guest memory the loader uses (GuestMemory has it). */
export interface LoaderMemory {
  /** Bytes of guest RAM in all. */
  readonly size: number;
  /** RAM pieces by guest-physical address; one must start at 0. */
  readonly slots: readonly { gpa: number; size: number }[];
  write(gpa: number, bytes: Uint8Array): void;
}

/** What to load. */
export interface LinuxLoadOptions {
  /** The kernel file: a bzImage or an ELF64 x86-64 executable. */
  kernel: Uint8Array;
  initrd?: Uint8Array;
  cmdline: string;
  /**
   * Guest-physical ranges the machine keeps for itself (MP or ACPI tables
   * and the like): reported reserved in e820, and kept clear of the kernel
   * and initrd.
   */
  reserved?: readonly AddressRange[];
  /** Guest-physical address of the ACPI RSDP, written into boot_params. */
  acpiRsdpAddr?: number;
}

/** Where everything went, and where the BSP starts. */
export interface LinuxBoot {
  kind: KernelImage['kind'];
  /** RIP of the 64-bit entry point. */
  entry: bigint;
  /** RSI at entry: the zero page. */
  bootParamsAddr: number;
  cmdlineAddr: number;
  initrd?: { addr: number; size: number };
  /** Memory the kernel occupies before it reads the e820 map, end exclusive. */
  kernelRange: { start: number; end: number };
}

/**
 * Parses `options.kernel`, writes it, the command line, the initrd and
 * boot_params into `memory`, and says where the BSP starts. Throws
 * KernelImageError for a file that is not a bootable kernel and
 * LinuxLoadError when something does not fit. Nothing is written unless
 * everything fits.
 */
export function loadLinux(memory: LoaderMemory, options: LinuxLoadOptions): LinuxBoot {
  const image = parseKernelImage(options.kernel);
  const reserved = options.reserved ?? [];
  const lowRamEnd = lowRamEndOf(memory);

  const cmdline = Buffer.from(options.cmdline, 'utf8');
  const cmdlineMax = Math.min(
    image.kind === 'bzimage' ? image.header.cmdlineSize : ELF_CMDLINE_SIZE,
    CMDLINE_LIMIT - CMDLINE_ADDR - 1,
  );
  if (cmdline.includes(0)) {
    throw new LinuxLoadError(
      'KERNEL_CMDLINE_INVALID',
      'the kernel command line contains a NUL byte, which would cut it short; remove it',
    );
  }
  if (cmdline.byteLength > cmdlineMax) {
    throw new LinuxLoadError(
      'KERNEL_CMDLINE_TOO_LONG',
      `the kernel command line is ${cmdline.byteLength} bytes but this kernel takes at most ${cmdlineMax} (cmdline_size); shorten it`,
    );
  }

  const kernelRange = kernelRangeOf(image);
  if (kernelRange.end > lowRamEnd) {
    throw new LinuxLoadError(
      'KERNEL_TOO_LARGE_FOR_RAM',
      `the kernel needs guest RAM from ${hex(kernelRange.start)} to ${hex(kernelRange.end)} (${mib(kernelRange.end)} MiB) before it reads its memory map, but RAM below 4 GiB ends at ${hex(lowRamEnd)} (the VM has ${mib(memory.size)} MiB); give the VM more memory with -m`,
    );
  }

  const fixed: { name: string; start: number; end: number }[] = [
    { name: 'boot_params', start: BOOT_PARAMS_ADDR, end: BOOT_PARAMS_ADDR + BOOT_PARAMS_SIZE },
    { name: 'the command line', start: CMDLINE_ADDR, end: CMDLINE_ADDR + cmdline.byteLength + 1 },
    { name: 'the kernel', start: kernelRange.start, end: kernelRange.end },
  ];
  for (const r of reserved) {
    for (const f of fixed) {
      if (overlaps(r.start, r.start + r.size, f.start, f.end)) {
        throw new LinuxLoadError(
          'BOOT_LAYOUT_CONFLICT',
          `the machine reserves ${hex(r.start)}..${hex(r.start + r.size)}, where the loader puts ${f.name} (${hex(f.start)}..${hex(f.end)}); move the reserved range`,
        );
      }
    }
  }

  const initrdAddrMax = image.kind === 'bzimage' ? image.header.initrdAddrMax : ELF_INITRD_ADDR_MAX;
  const initrd =
    options.initrd && options.initrd.byteLength > 0
      ? placeInitrd(options.initrd.byteLength, {
          ceiling: Math.min(initrdAddrMax + 1, lowRamEnd),
          floor: kernelRange.end,
          reserved,
        })
      : undefined;

  const bootParams = buildBootParams({
    ...(image.kind === 'bzimage'
      ? { setupHeader: image.setupHeaderBytes, loadAddr: KERNEL_LOAD_ADDR }
      : {}),
    cmdlineAddr: CMDLINE_ADDR,
    ...(initrd ? { initrd } : {}),
    e820: e820Map(memory.slots, reserved),
    ...(options.acpiRsdpAddr !== undefined ? { acpiRsdpAddr: options.acpiRsdpAddr } : {}),
  });

  // Everything fits: write.
  if (image.kind === 'bzimage') {
    memory.write(KERNEL_LOAD_ADDR, image.protectedMode);
  } else {
    for (const segment of image.segments) {
      memory.write(segment.paddr, segment.data);
      zero(
        memory,
        segment.paddr + segment.data.byteLength,
        segment.memsz - segment.data.byteLength,
      );
    }
  }
  const cmdlineBytes = new Uint8Array(cmdline.byteLength + 1);
  cmdlineBytes.set(cmdline);
  memory.write(CMDLINE_ADDR, cmdlineBytes);
  if (initrd && options.initrd) memory.write(initrd.addr, options.initrd);
  memory.write(BOOT_PARAMS_ADDR, bootParams);

  const boot: LinuxBoot = {
    kind: image.kind,
    entry: BigInt(image.kind === 'bzimage' ? KERNEL_LOAD_ADDR + 0x200 : image.entry),
    bootParamsAddr: BOOT_PARAMS_ADDR,
    cmdlineAddr: CMDLINE_ADDR,
    kernelRange,
  };
  if (initrd) boot.initrd = initrd;
  return boot;
}

/**
 * The memory a kernel occupies until it has read the e820 map. For a
 * bzImage that is its loaded image plus init_size bytes from its runtime
 * start. boot.rst gives the runtime start of a relocatable kernel as the
 * load address aligned up to kernel_alignment, but the x86-64 decompressor
 * never runs below LOAD_PHYSICAL_ADDR, which the header reports as
 * pref_address; so the start is the higher of the two.
 */
function kernelRangeOf(image: KernelImage): { start: number; end: number } {
  if (image.kind === 'elf') {
    const first = image.segments[0]!;
    const end = Math.max(...image.segments.map((s) => s.paddr + s.memsz));
    return { start: first.paddr, end };
  }
  const h = image.header;
  const align = Math.max(h.kernelAlignment, 1);
  const runtimeStart = h.relocatable
    ? Math.max(Math.ceil(KERNEL_LOAD_ADDR / align) * align, h.prefAddress)
    : h.prefAddress;
  const end = Math.max(
    KERNEL_LOAD_ADDR + image.protectedMode.byteLength,
    runtimeStart + h.initSize,
  );
  return { start: KERNEL_LOAD_ADDR, end };
}

/** The end of the RAM slot at guest-physical 0, capped at 4 GiB. */
function lowRamEndOf(memory: LoaderMemory): number {
  const low = memory.slots.find((s) => s.gpa === 0);
  if (!low) {
    throw new LinuxLoadError(
      'BOOT_LAYOUT_CONFLICT',
      'guest RAM has no slot at guest-physical 0, where the boot tables and command line go',
    );
  }
  return Math.min(low.size, FOUR_GiB);
}

/**
 * The highest page-aligned address below `ceiling` where `size` bytes fit
 * above `floor` (the kernel's end) without touching a reserved range.
 * Linux's own loaders (GRUB, QEMU) also put the initrd at the top, where it
 * is least in the decompressor's way.
 */
function placeInitrd(
  size: number,
  where: { ceiling: number; floor: number; reserved: readonly AddressRange[] },
): { addr: number; size: number } {
  let top = where.ceiling;
  for (;;) {
    const addr = Math.floor((top - size) / PAGE) * PAGE;
    if (addr < where.floor) {
      const room = Math.max(0, where.ceiling - where.floor);
      throw new LinuxLoadError(
        'INITRD_TOO_LARGE',
        `the initrd is ${size} bytes (${mib(size)} MiB) but only ${room} bytes (${mib(room)} MiB) are free between the kernel's end ${hex(where.floor)} and ${hex(where.ceiling)} (the lower of initrd_addr_max + 1 and the end of RAM below 4 GiB); give the VM more memory with -m or use a smaller initrd`,
      );
    }
    const hit = where.reserved.find((r) => overlaps(r.start, r.start + r.size, addr, addr + size));
    if (!hit) return { addr, size };
    top = hit.start;
  }
}

/** Zeroes `length` bytes at `gpa`, a megabyte at a time. */
function zero(memory: LoaderMemory, gpa: number, length: number): void {
  const chunk = new Uint8Array(Math.min(length, 0x100000));
  for (let done = 0; done < length; done += chunk.byteLength) {
    memory.write(gpa + done, chunk.subarray(0, Math.min(chunk.byteLength, length - done)));
  }
}

function overlaps(aStart: number, aEnd: number, bStart: number, bEnd: number): boolean {
  return aStart < bEnd && bStart < aEnd;
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

function mib(n: number): string {
  return (n / 0x100000).toFixed(1).replace(/\.0$/, '');
}
