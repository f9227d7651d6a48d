/**
 * Where guest RAM goes in the guest-physical address space.
 */

/** One contiguous piece of guest RAM. */
export interface RamRegion {
  /** Guest-physical start. */
  gpa: number;
  /** Length in bytes. */
  size: number;
  /** Offset of this piece inside the one host mapping of all RAM. */
  hostOffset: number;
}

/** Start of guest RAM above 4 GiB. */
export const PC_HIGH_RAM_BASE = 0x1_0000_0000;
/** End of RAM below 4 GiB when RAM is split; the PCI hole starts here. */
export const PC_LOW_RAM_SPLIT = 0xc000_0000;
/** RAM of this size or more is split; smaller RAM all fits below 4 GiB. */
export const PC_SPLIT_THRESHOLD = 0xe000_0000;

/**
 * The layout QEMU's `pc` machine uses: RAM below 3.5 GiB stays in one
 * piece at 0. From 3.5 GiB on, the first 3 GiB go at 0 and the rest at
 * 4 GiB, leaving 3..4 GiB for the PCI hole, and keeping 1 GiB-aligned
 * guest addresses on 1 GiB-aligned host addresses.
 */
export function pcRamLayout(size: number): RamRegion[] {
  if (size < PC_SPLIT_THRESHOLD) return [{ gpa: 0, size, hostOffset: 0 }];
  return [
    { gpa: 0, size: PC_LOW_RAM_SPLIT, hostOffset: 0 },
    { gpa: PC_HIGH_RAM_BASE, size: size - PC_LOW_RAM_SPLIT, hostOffset: PC_LOW_RAM_SPLIT },
  ];
}

/** All RAM in one piece at guest-physical 0 (microvm-like guests, tests). */
export function flatRamLayout(size: number): RamRegion[] {
  return [{ gpa: 0, size, hostOffset: 0 }];
}
