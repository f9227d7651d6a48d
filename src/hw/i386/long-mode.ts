/**
 * What a vCPU needs to start directly in 64-bit long mode: an identity map
 * of the low 4 GiB with 2 MiB pages, a GDT with flat 64-bit code and data
 * segments, and the matching special registers. Used by the probe guests
 * (which start in long mode on every vCPU) and by the Linux 64-bit boot
 * protocol (which expects long mode with an identity map on the BSP).
 *
 * The tables sit where Firecracker puts them (GDT at 0x500, PML4 at
 * 0x9000), below the first 64 KiB, which no guest image we load uses.
 */
import type { KvmSegment, KvmSregs } from '../../accel/kvm/structs/regs.js';

export const BOOT_GDT_ADDR = 0x500;
export const BOOT_IDT_ADDR = 0x520;
export const PML4_ADDR = 0x9000;
export const PDPT_ADDR = 0xa000;
/** Four page directories follow the PDPT: 4 x 1 GiB of 2 MiB pages. */
export const PD_ADDR = 0xb000;
export const IDENTITY_MAPPED_BYTES = 4 * 2 ** 30;

export const CODE_SELECTOR = 0x08;
export const DATA_SELECTOR = 0x10;
export const TSS_SELECTOR = 0x18;

/** CR0: PE, MP, ET, NE, WP, AM, PG. */
export const LONG_MODE_CR0 = 0x80050033n;
/** CR4: PAE. */
export const LONG_MODE_CR4 = 0x20n;
/** EFER: LME and LMA. */
export const LONG_MODE_EFER = 0x500n;

const PTE_PRESENT = 1n;
const PTE_WRITABLE = 2n;
const PDE_LARGE = 0x80n;

/** The part of guest memory this module needs: writes by guest-physical address. */
export interface PhysicalWriter {
  write(gpa: number, bytes: Uint8Array): void;
}

/** Segment descriptors, as the GDT holds them. */
export const GDT_ENTRIES: readonly bigint[] = [
  0n, // null
  gdtEntry(0xa09b, 0, 0xfffff), // 64-bit code: G, L, P, DPL0, S, type 0xb
  gdtEntry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL0, S, type 0x3
  gdtEntry(0x808b, 0, 0xfffff), // 64-bit busy TSS, needed for a valid TR
];

/** Encodes one 8-byte GDT descriptor from its flags (bits 8..15 access, 12..15 of the high word). */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base);
  const l = BigInt(limit);
  const f = BigInt(flags);
  return (
    ((b & 0xff000000n) << 32n) |
    ((f & 0xf0ffn) << 40n) |
    ((l & 0xf0000n) << 32n) |
    ((b & 0x00ffffffn) << 16n) |
    (l & 0xffffn)
  );
}

/** The hidden part of a segment register that a descriptor loads. */
export function segmentFromGdt(selector: number, entry: bigint): KvmSegment {
  const limitRaw = Number(((entry >> 32n) & 0xf0000n) | (entry & 0xffffn));
  const g = Number((entry >> 55n) & 1n);
  return {
    base: ((entry >> 16n) & 0xffffffn) | ((entry >> 32n) & 0xff000000n),
    limit: g ? limitRaw * 4096 + 4095 : limitRaw,
    selector,
    type: Number((entry >> 40n) & 0xfn),
    present: Number((entry >> 47n) & 1n),
    dpl: Number((entry >> 45n) & 3n),
    db: Number((entry >> 54n) & 1n),
    s: Number((entry >> 44n) & 1n),
    l: Number((entry >> 53n) & 1n),
    g,
    avl: Number((entry >> 52n) & 1n),
    unusable: 0,
  };
}

/** Writes the GDT, an empty IDT and the identity-map page tables into guest memory. */
export function writeLongModeTables(memory: PhysicalWriter): void {
  const gdt = Buffer.alloc(GDT_ENTRIES.length * 8);
  GDT_ENTRIES.forEach((entry, i) => {
    gdt.writeBigUInt64LE(entry, i * 8);
  });
  memory.write(BOOT_GDT_ADDR, gdt);
  memory.write(BOOT_IDT_ADDR, Buffer.alloc(8));

  const pml4 = Buffer.alloc(4096);
  pml4.writeBigUInt64LE(BigInt(PDPT_ADDR) | PTE_PRESENT | PTE_WRITABLE, 0);
  memory.write(PML4_ADDR, pml4);

  const pdpt = Buffer.alloc(4096);
  const pds = Buffer.alloc(4 * 4096);
  // Every entry maps below 4 GiB, so its high half is zero and the low half
  // fits a 32-bit write: 2,052 entries in plain numbers, where BigInts took
  // milliseconds of every boot and reset.
  const pdeFlags = Number(PTE_PRESENT | PTE_WRITABLE | PDE_LARGE);
  for (let gib = 0; gib < 4; gib++) {
    pdpt.writeUInt32LE(PD_ADDR + gib * 4096 + Number(PTE_PRESENT | PTE_WRITABLE), gib * 8);
    for (let i = 0; i < 512; i++) {
      const phys = gib * 0x40000000 + i * 0x200000;
      pds.writeUInt32LE(phys + pdeFlags, (gib * 512 + i) * 8);
    }
  }
  memory.write(PDPT_ADDR, pdpt);
  memory.write(PD_ADDR, pds);
}

/**
 * `sregs` (as read from a fresh vCPU) changed to 64-bit long mode over the
 * tables {@link writeLongModeTables} wrote. Fields not named here (APIC
 * base, pending interrupts) keep what KVM gave.
 */
export function longModeSregs(sregs: KvmSregs): KvmSregs {
  const code = segmentFromGdt(CODE_SELECTOR, GDT_ENTRIES[1]!);
  const data = segmentFromGdt(DATA_SELECTOR, GDT_ENTRIES[2]!);
  const tss = segmentFromGdt(TSS_SELECTOR, GDT_ENTRIES[3]!);
  return {
    ...sregs,
    cs: code,
    ds: data,
    es: data,
    fs: data,
    gs: data,
    ss: data,
    tr: tss,
    gdt: { base: BigInt(BOOT_GDT_ADDR), limit: GDT_ENTRIES.length * 8 - 1 },
    idt: { base: BigInt(BOOT_IDT_ADDR), limit: 7 },
    cr0: LONG_MODE_CR0,
    cr3: BigInt(PML4_ADDR),
    cr4: LONG_MODE_CR4,
    efer: LONG_MODE_EFER,
  };
}
