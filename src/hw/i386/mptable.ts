/**
 * An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
 * (Linux with `acpi=off`, or with no RSDP to find) learns the vCPUs' local
 * APIC ids, the I/O APIC and the ISA interrupt wiring, and so brings every
 * `-smp N` vCPU up with INIT/SIPI.
 *
 * Layout of the bytes returned, written at `baseAddr`:
 *   baseAddr + 0   floating pointer structure "_MP_" (16 bytes)
 *   baseAddr + 16  configuration table "PCMP": header, then entries sorted
 *                  by type as the spec requires (processors, bus, I/O APIC,
 *                  I/O interrupts, local interrupts)
 *
 * Linux looks for "_MP_" on 16-byte boundaries in the first KiB of RAM, in
 * the last KiB below 640 KiB (0x9fc00), and in the BIOS area 0xf0000 to
 * 0xfffff, so the table must start in one of those. At 0x9fc00 it must end
 * by 0xa0000, which leaves room for 40 vCPUs; larger VMs go at 0xf0000
 * (mpTableBase chooses). Linux reserves 0x9f000 to 1 MiB for itself when
 * the BIOS data area is empty, as it is here; the e820 map should still
 * mark the table reserved.
 *
 * Interrupt wiring follows KVM's in-kernel irqchip with its default GSI
 * routing (no KVM_SET_GSI_ROUTING): ISA IRQ n is GSI n, which KVM sends to
 * both the 8259 and I/O APIC pin n, so the PIT (GSI 0) arrives on pin 0.
 * A VMM that installs QEMU's routing (GSI 0 to pin 2) passes
 * `pitIoapicPin: 2` and the table says IRQ 0 is on pin 2, as QEMU's does.
 */
import { TsvmmError } from '../../util/errors.js';

/** Where the table goes by default: the last KiB below 640 KiB, where Linux searches. */
export const MPTABLE_EBDA_BASE = 0x9fc00;
/** The BIOS area, also searched; room for a table of any size we build. */
export const MPTABLE_BIOS_BASE = 0xf0000;
/** Most vCPUs: the I/O APIC takes id cpuCount, and 0xff is the broadcast id. */
export const MPTABLE_MAX_CPUS = 254;

export const MP_LOCAL_APIC_ADDR = 0xfee00000;
export const MP_IOAPIC_ADDR = 0xfec00000;
/** KVM's in-kernel I/O APIC version register value. */
export const MP_IOAPIC_VERSION = 0x11;
/** KVM's local APIC version register (low byte): an integrated xAPIC. */
export const MP_LAPIC_VERSION = 0x14;
/** Number of ISA IRQs described. */
export const MP_ISA_IRQS = 16;

export const MP_FLOATING_SIZE = 16;
export const MP_CONFIG_HEADER_SIZE = 44;
export const MP_PROCESSOR_ENTRY_SIZE = 20;
export const MP_SMALL_ENTRY_SIZE = 8;

/** Entry types of the base configuration table. */
export const MP_ENTRY = {
  PROCESSOR: 0,
  BUS: 1,
  IOAPIC: 2,
  IO_INTERRUPT: 3,
  LOCAL_INTERRUPT: 4,
} as const;

/** Interrupt types of I/O and local interrupt entries. */
export const MP_INT = { INT: 0, NMI: 1, SMI: 2, EXTINT: 3 } as const;

/** Processor entry CPU flags. */
export const MP_CPU_ENABLED = 1;
export const MP_CPU_BSP = 2;

/** Default CPU signature and features when none are given: family 6, FPU and APIC. */
const DEFAULT_CPU_SIGNATURE = 0x600;
const DEFAULT_CPU_FEATURES = 0x201;

/** Options of buildMpTable. */
export interface MpTableOptions {
  /**
   * CPUID leaf 1 EAX of the vCPUs: stepping, model and family (bits 0..11)
   * go into each processor entry. Default family 6.
   */
  cpuSignature?: number;
  /** CPUID leaf 1 EDX of the vCPUs, for each processor entry. Default FPU and APIC. */
  cpuFeatures?: number;
  /** I/O APIC pin of ISA IRQ 0 (the PIT): 0 with KVM's default routing, 2 with QEMU's. */
  pitIoapicPin?: 0 | 2;
}

/** The MP table cannot be built as asked: bad vCPU count or placement. */
export class MpTableError extends TsvmmError {}

/** Bytes of the whole table (floating pointer and configuration table) for cpuCount vCPUs. */
export function mpTableSize(cpuCount: number): number {
  return MP_FLOATING_SIZE + configTableSize(cpuCount, MP_ISA_IRQS);
}

/** The default place for a table of cpuCount vCPUs: 0x9fc00 if it fits below 0xa0000, else 0xf0000. */
export function mpTableBase(cpuCount: number): number {
  return MPTABLE_EBDA_BASE + mpTableSize(cpuCount) <= 0xa0000
    ? MPTABLE_EBDA_BASE
    : MPTABLE_BIOS_BASE;
}

/**
 * The MP table for cpuCount vCPUs (APIC ids 0..cpuCount-1, vCPU 0 the
 * bootstrap processor), to be written at guest-physical baseAddr.
 *
 * @example
 * const base = mpTableBase(smp);
 * memory.write(base, buildMpTable(smp, base));
 */
export function buildMpTable(
  cpuCount: number,
  baseAddr: number,
  options: MpTableOptions = {},
): Uint8Array {
  if (!Number.isInteger(cpuCount) || cpuCount < 1 || cpuCount > MPTABLE_MAX_CPUS) {
    throw new MpTableError(
      'MPTABLE_CPU_COUNT',
      `cannot describe ${cpuCount} vCPUs in an MP table: give between 1 and ${MPTABLE_MAX_CPUS} (-smp)`,
    );
  }
  checkPlacement(cpuCount, baseAddr);
  const pitPin = options.pitIoapicPin ?? 0;
  // With IRQ 0 on pin 2, pin 2 is not also ISA IRQ 2 (the 8259 cascade,
  // which never fires): QEMU's tables leave IRQ 2 out likewise.
  const irqs = Array.from({ length: MP_ISA_IRQS }, (_, irq) => irq).filter(
    (irq) => !(pitPin === 2 && irq === 2),
  );
  const configLength = configTableSize(cpuCount, irqs.length);
  const bytes = new Uint8Array(MP_FLOATING_SIZE + configLength);
  const view = new DataView(bytes.buffer);
  const configAddr = baseAddr + MP_FLOATING_SIZE;

  // Floating pointer structure.
  writeAscii(bytes, 0, '_MP_');
  view.setUint32(4, configAddr, true);
  view.setUint8(8, 1); // length in 16-byte units
  view.setUint8(9, 4); // spec revision 1.4
  // Feature byte 1 = 0: a configuration table is present. Feature byte 2
  // bit 7 (IMCR) = 0: virtual wire mode, no PIC mode to leave.
  bytes[10] = checksum(bytes, 0, MP_FLOATING_SIZE);

  // Configuration table header.
  const c = MP_FLOATING_SIZE;
  writeAscii(bytes, c, 'PCMP');
  view.setUint16(c + 4, configLength, true);
  view.setUint8(c + 6, 4);
  writeAscii(bytes, c + 8, 'TSVMM   '); // OEM id, 8 bytes, space padded
  writeAscii(bytes, c + 16, 'TSVMM VM    '); // product id, 12 bytes
  // OEM table pointer and size stay 0.
  view.setUint16(c + 34, cpuCount + 1 + 1 + irqs.length + 2, true);
  view.setUint32(c + 36, MP_LOCAL_APIC_ADDR, true);
  // Extended table length and checksum stay 0.

  let at = c + MP_CONFIG_HEADER_SIZE;
  const signature = (options.cpuSignature ?? DEFAULT_CPU_SIGNATURE) & 0xfff;
  const features = (options.cpuFeatures ?? DEFAULT_CPU_FEATURES) >>> 0;
  for (let cpu = 0; cpu < cpuCount; cpu++) {
    bytes[at] = MP_ENTRY.PROCESSOR;
    bytes[at + 1] = cpu; // local APIC id
    bytes[at + 2] = MP_LAPIC_VERSION;
    bytes[at + 3] = MP_CPU_ENABLED | (cpu === 0 ? MP_CPU_BSP : 0);
    view.setUint32(at + 4, signature, true);
    view.setUint32(at + 8, features, true);
    at += MP_PROCESSOR_ENTRY_SIZE;
  }

  const ISA_BUS_ID = 0;
  bytes[at] = MP_ENTRY.BUS;
  bytes[at + 1] = ISA_BUS_ID;
  writeAscii(bytes, at + 2, 'ISA   ');
  at += MP_SMALL_ENTRY_SIZE;

  const ioapicId = cpuCount;
  bytes[at] = MP_ENTRY.IOAPIC;
  bytes[at + 1] = ioapicId;
  bytes[at + 2] = MP_IOAPIC_VERSION;
  bytes[at + 3] = 1; // enabled
  view.setUint32(at + 4, MP_IOAPIC_ADDR, true);
  at += MP_SMALL_ENTRY_SIZE;

  for (const irq of irqs) {
    // Flags 0: polarity and trigger conform to the bus (ISA: high, edge).
    bytes[at] = MP_ENTRY.IO_INTERRUPT;
    bytes[at + 1] = MP_INT.INT;
    bytes[at + 4] = ISA_BUS_ID;
    bytes[at + 5] = irq;
    bytes[at + 6] = ioapicId;
    bytes[at + 7] = irq === 0 ? pitPin : irq;
    at += MP_SMALL_ENTRY_SIZE;
  }

  // The 8259's output on every LAPIC's LINT0, NMI on LINT1 (0xff: all).
  for (const [type, lint] of [
    [MP_INT.EXTINT, 0],
    [MP_INT.NMI, 1],
  ] as const) {
    bytes[at] = MP_ENTRY.LOCAL_INTERRUPT;
    bytes[at + 1] = type;
    bytes[at + 4] = ISA_BUS_ID;
    bytes[at + 5] = 0;
    bytes[at + 6] = 0xff;
    bytes[at + 7] = lint;
    at += MP_SMALL_ENTRY_SIZE;
  }

  bytes[c + 7] = checksum(bytes, c, configLength);
  return bytes;
}

function configTableSize(cpuCount: number, irqCount: number): number {
  return (
    MP_CONFIG_HEADER_SIZE +
    cpuCount * MP_PROCESSOR_ENTRY_SIZE +
    (1 + 1 + irqCount + 2) * MP_SMALL_ENTRY_SIZE
  );
}

/** Regions where Linux's smp_scan_config looks for "_MP_", and where a table there must end. */
const SCANNED_REGIONS: readonly { start: number; end: number }[] = [
  { start: 0, end: 0x400 },
  { start: MPTABLE_EBDA_BASE, end: 0xa0000 },
  { start: MPTABLE_BIOS_BASE, end: 0x100000 },
];

function checkPlacement(cpuCount: number, baseAddr: number): void {
  const size = mpTableSize(cpuCount);
  const hex = (n: number) => `0x${n.toString(16)}`;
  if (!Number.isInteger(baseAddr) || baseAddr % 16 !== 0) {
    throw new MpTableError(
      'MPTABLE_PLACEMENT',
      `MP table address ${baseAddr} is not 16-byte aligned: the guest only finds "_MP_" on 16-byte boundaries`,
    );
  }
  const region = SCANNED_REGIONS.find((r) => baseAddr >= r.start && baseAddr < r.end);
  if (!region) {
    throw new MpTableError(
      'MPTABLE_PLACEMENT',
      `MP table at ${hex(baseAddr)} is where no guest looks for it: put it at ${hex(MPTABLE_EBDA_BASE)} or ${hex(MPTABLE_BIOS_BASE)} (see mpTableBase)`,
    );
  }
  if (baseAddr + size > region.end) {
    throw new MpTableError(
      'MPTABLE_PLACEMENT',
      `MP table for ${cpuCount} vCPUs (${size} bytes) at ${hex(baseAddr)} runs past ${hex(region.end)}: place it with mpTableBase(${cpuCount})`,
    );
  }
}

function writeAscii(bytes: Uint8Array, at: number, text: string): void {
  for (let i = 0; i < text.length; i++) bytes[at + i] = text.charCodeAt(i);
}

/** The byte that makes bytes[at, at + length) sum to 0 mod 256 (its own slot counted as 0). */
function checksum(bytes: Uint8Array, at: number, length: number): number {
  let sum = 0;
  for (let i = at; i < at + length; i++) sum = (sum + bytes[i]!) & 0xff;
  return (0x100 - sum) & 0xff;
}
