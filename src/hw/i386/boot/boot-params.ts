/**
 * The zero page (struct boot_params) a Linux kernel reads at boot, and the
 * e820 memory map inside it. Offsets are those of the kernel's
 * Documentation/arch/x86/zero-page.rst and boot.rst.
 */
import { TsvmmError } from '../../../util/errors.js';
import {
  CAN_USE_HEAP,
  HDRS_MAGIC,
  LOADED_HIGH,
  SETUP_HEADER_LIMIT,
  SETUP_HEADER_OFFSET,
} from './kernel-image.js';

/** sizeof(struct boot_params). */
export const BOOT_PARAMS_SIZE = 4096;
/** e820 type of usable RAM. */
export const E820_RAM = 1;
/** e820 type of memory the guest must leave alone. */
export const E820_RESERVED = 2;
/** Entries the zero page's e820_table holds. */
export const E820_MAX_ENTRIES = 128;
/**
 * From the EBDA to 1 MiB: EBDA, VGA window, option ROMs and BIOS. Reported
 * reserved although tsvmm has no BIOS, as Firecracker does, so the guest
 * never puts anything there (the MP table may live at its start).
 */
export const LEGACY_RESERVED_START = 0x9fc00;
export const LEGACY_RESERVED_END = 0x100000;
/**
 * What an ELF kernel, which has no setup header of its own, is told the
 * command line may hold: Linux's x86 COMMAND_LINE_SIZE (2048) less the NUL.
 */
export const ELF_CMDLINE_SIZE = 2047;
/** The initrd ceiling an ELF kernel is given: the one every x86-64 bzImage declares. */
export const ELF_INITRD_ADDR_MAX = 0x7fffffff;
/** Boot protocol version written into the header synthesised for an ELF kernel (2.15). */
export const ELF_PROTOCOL_VERSION = 0x020f;

// Zero-page fields (zero-page.rst).
const ORIG_VIDEO_IS_VGA = 0x00f; // screen_info.orig_video_isVGA
const ACPI_RSDP_ADDR = 0x070;
const EXT_RAMDISK_IMAGE = 0x0c0;
const EXT_RAMDISK_SIZE = 0x0c4;
const EXT_CMD_LINE_PTR = 0x0c8;
const E820_ENTRIES = 0x1e8;
const E820_TABLE = 0x2d0;
const E820_ENTRY_SIZE = 20;
// Setup-header fields (boot.rst).
const VID_MODE = 0x1fa;
const BOOT_FLAG = 0x1fe;
const HEADER = 0x202;
const VERSION = 0x206;
const TYPE_OF_LOADER = 0x210;
const LOADFLAGS = 0x211;
const CODE32_START = 0x214;
const RAMDISK_IMAGE = 0x218;
const RAMDISK_SIZE = 0x21c;
const HEAP_END_PTR = 0x224;
const CMD_LINE_PTR = 0x228;
const INITRD_ADDR_MAX = 0x22c;
const KERNEL_ALIGNMENT = 0x230;
const CMDLINE_SIZE = 0x238;
const SETUP_DATA = 0x250;

/** vid_mode "normal": no mode switch, so the kernel probes no video BIOS. */
const VID_MODE_NORMAL = 0xffff;
/** type_of_loader for a loader without an assigned id. */
const LOADER_UNDEFINED = 0xff;
/**
 * heap_end_ptr: the end of the real-mode setup heap less 0x200, the value
 * QEMU and GRUB give. The 64-bit entry skips the real-mode setup, so only
 * CAN_USE_HEAP's promise matters, not the heap.
 */
const HEAP_END = 0xfe00;

/** The zero page or its e820 map cannot be built as asked. */
export class BootParamsError extends TsvmmError {}

/** A range of guest-physical addresses. */
export interface AddressRange {
  start: number;
  size: number;
}

/** One e820 entry. */
export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/**
 * The e820 map of guest RAM laid out in `ram` (GuestMemory.slots, in any
 * order): RAM below the EBDA, the legacy area 0x9fc00..1 MiB reserved,
 * RAM from 1 MiB to the end of each slot (so the PCI hole between low and
 * high RAM is absent, as on QEMU's pc), and each of `reserved` carved out
 * of RAM and reported reserved. Entries are sorted and touching entries of
 * one type merged.
 */
export function e820Map(
  ram: readonly { gpa: number; size: number }[],
  reserved: readonly AddressRange[] = [],
): E820Entry[] {
  const holes = mergeRanges([
    { start: LEGACY_RESERVED_START, size: LEGACY_RESERVED_END - LEGACY_RESERVED_START },
    ...reserved,
  ]);
  const entries: E820Entry[] = holes.map((r) => ({
    addr: r.start,
    size: r.size,
    type: E820_RESERVED,
  }));
  for (const slot of ram) {
    for (const piece of subtract({ start: slot.gpa, size: slot.size }, holes)) {
      entries.push({ addr: piece.start, size: piece.size, type: E820_RAM });
    }
  }
  entries.sort((a, b) => a.addr - b.addr);
  const merged: E820Entry[] = [];
  for (const e of entries) {
    const last = merged.at(-1);
    if (last && last.type === e.type && last.addr + last.size === e.addr) last.size += e.size;
    else merged.push({ ...e });
  }
  if (merged.length > E820_MAX_ENTRIES) {
    throw new BootParamsError(
      'E820_TABLE_FULL',
      `the e820 map needs ${merged.length} entries but the zero page holds ${E820_MAX_ENTRIES}; pass fewer reserved ranges`,
    );
  }
  return merged;
}

/** Sorted, non-empty ranges with overlapping and touching ones joined. */
function mergeRanges(ranges: readonly AddressRange[]): AddressRange[] {
  const sorted = ranges.filter((r) => r.size > 0).sort((a, b) => a.start - b.start);
  const out: AddressRange[] = [];
  for (const r of sorted) {
    const last = out.at(-1);
    if (last && r.start <= last.start + last.size) {
      last.size = Math.max(last.size, r.start + r.size - last.start);
    } else {
      out.push({ start: r.start, size: r.size });
    }
  }
  return out;
}

/** The parts of `range` outside every one of `holes` (sorted, disjoint). */
function subtract(range: AddressRange, holes: readonly AddressRange[]): AddressRange[] {
  const out: AddressRange[] = [];
  let at = range.start;
  const end = range.start + range.size;
  for (const h of holes) {
    const hEnd = h.start + h.size;
    if (hEnd <= at || h.start >= end) continue;
    if (h.start > at) out.push({ start: at, size: h.start - at });
    at = Math.max(at, hEnd);
  }
  if (at < end) out.push({ start: at, size: end - at });
  return out;
}

/** What goes into the zero page. */
export interface BootParamsOptions {
  /**
   * The image's setup header from 0x1f1 on (BzImage.setupHeaderBytes).
   * Absent for an ELF kernel, which gets a minimal 2.15 header instead.
   */
  setupHeader?: Uint8Array;
  /** Where the protected-mode kernel was loaded (code32_start); bzImage only. */
  loadAddr?: number;
  /** Guest-physical address of the NUL-terminated command line. */
  cmdlineAddr: number;
  /** Where the initrd was placed, if there is one. */
  initrd?: { addr: number; size: number };
  e820: readonly E820Entry[];
  /** Guest-physical address of the ACPI RSDP, if the machine has ACPI tables. */
  acpiRsdpAddr?: number;
}

/** Builds the 4096-byte zero page. */
export function buildBootParams(options: BootParamsOptions): Uint8Array {
  const page = new Uint8Array(BOOT_PARAMS_SIZE);
  const view = new DataView(page.buffer);
  if (options.setupHeader) {
    page.set(
      options.setupHeader.subarray(0, SETUP_HEADER_LIMIT - SETUP_HEADER_OFFSET),
      SETUP_HEADER_OFFSET,
    );
  } else {
    // What vmlinux's early code reads from a header it was not built with.
    view.setUint16(BOOT_FLAG, 0xaa55, true);
    view.setUint32(HEADER, HDRS_MAGIC, true);
    view.setUint16(VERSION, ELF_PROTOCOL_VERSION, true);
    view.setUint32(INITRD_ADDR_MAX, ELF_INITRD_ADDR_MAX, true);
    view.setUint32(KERNEL_ALIGNMENT, 0x1000000, true);
    view.setUint32(CMDLINE_SIZE, ELF_CMDLINE_SIZE, true);
  }

  page[ORIG_VIDEO_IS_VGA] = 0;
  view.setUint16(VID_MODE, VID_MODE_NORMAL, true);
  page[TYPE_OF_LOADER] = LOADER_UNDEFINED;
  page[LOADFLAGS] = (page[LOADFLAGS] ?? 0) | LOADED_HIGH | CAN_USE_HEAP;
  view.setUint16(HEAP_END_PTR, HEAP_END, true);
  if (options.loadAddr !== undefined) view.setUint32(CODE32_START, options.loadAddr, true);
  view.setBigUint64(SETUP_DATA, 0n, true);

  view.setUint32(CMD_LINE_PTR, low32(options.cmdlineAddr), true);
  view.setUint32(EXT_CMD_LINE_PTR, high32(options.cmdlineAddr), true);
  if (options.initrd) {
    view.setUint32(RAMDISK_IMAGE, low32(options.initrd.addr), true);
    view.setUint32(EXT_RAMDISK_IMAGE, high32(options.initrd.addr), true);
    view.setUint32(RAMDISK_SIZE, low32(options.initrd.size), true);
    view.setUint32(EXT_RAMDISK_SIZE, high32(options.initrd.size), true);
  }
  if (options.acpiRsdpAddr !== undefined) {
    view.setBigUint64(ACPI_RSDP_ADDR, BigInt(options.acpiRsdpAddr), true);
  }

  if (options.e820.length > E820_MAX_ENTRIES) {
    throw new BootParamsError(
      'E820_TABLE_FULL',
      `${options.e820.length} e820 entries do not fit the zero page's ${E820_MAX_ENTRIES}`,
    );
  }
  page[E820_ENTRIES] = options.e820.length;
  options.e820.forEach((e, i) => {
    const at = E820_TABLE + i * E820_ENTRY_SIZE;
    view.setBigUint64(at, BigInt(e.addr), true);
    view.setBigUint64(at + 8, BigInt(e.size), true);
    view.setUint32(at + 16, e.type, true);
  });
  return page;
}

function low32(n: number): number {
  return n % 0x1_0000_0000;
}

function high32(n: number): number {
  return Math.floor(n / 0x1_0000_0000);
}
