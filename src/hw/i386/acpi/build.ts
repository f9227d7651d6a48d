/**
 * Lays the ACPI tables out in one block of guest memory: the RSDP first
 * (on a 16-byte boundary, where Linux's scan of 0xe0000..0xfffff finds it
 * even without boot_params.acpi_rsdp_addr), then XSDT, FADT, DSDT and
 * MADT, each 16-byte aligned.
 *
 * The default block is 0xe0000..0xf0000, below the MP table's BIOS-area
 * spot (0xf0000) and inside the legacy range every e820 map we build
 * reserves.
 */
import { COM1_BASE, COM1_IRQ } from '../../char/serial.js';
import { buildDsdt } from './dsdt.js';
import { buildFadt } from './fadt.js';
import { buildMadt } from './madt.js';
import { buildRsdp, buildXsdt, RSDP_SIZE } from './rsdp.js';
import { AcpiTableError } from './sdt.js';

/** Where the tables go by default. */
export const ACPI_TABLES_BASE = 0xe0000;
/** Where the default block ends (exclusive): the MP table's BIOS-area spot. */
export const ACPI_TABLES_END = 0xf0000;
/** Most vCPUs: 8-bit xAPIC ids, one taken by the I/O APIC and 0xff the broadcast. */
export const ACPI_MAX_CPUS = 254;

/** The tables as written, with where each went. */
export interface AcpiTables {
  /** Guest-physical address of the block: write `bytes` here. */
  base: number;
  bytes: Uint8Array;
  /** Where the RSDP is (boot_params.acpi_rsdp_addr). */
  rsdpAddr: number;
  /** Each table's signature and guest-physical address, in layout order. */
  tables: { signature: string; addr: number; length: number }[];
}

/** Inputs of buildAcpiTables. */
export interface AcpiTablesOptions {
  cpuCount: number;
  /** Default ACPI_TABLES_BASE; 16-byte aligned. */
  base?: number;
  /** Where the block must end by (exclusive); default ACPI_TABLES_END. */
  limit?: number;
}

const ALIGN = 16;

/**
 * The ACPI tables for cpuCount vCPUs (APIC ids 0..cpuCount-1; the I/O APIC
 * takes id cpuCount, as in the MP table), laid out at `base`.
 *
 * @example
 * const acpi = buildAcpiTables({ cpuCount: smp });
 * memory.write(acpi.base, acpi.bytes);
 */
export function buildAcpiTables(options: AcpiTablesOptions): AcpiTables {
  const { cpuCount } = options;
  const base = options.base ?? ACPI_TABLES_BASE;
  const limit = options.limit ?? ACPI_TABLES_END;
  if (!Number.isInteger(cpuCount) || cpuCount < 1 || cpuCount > ACPI_MAX_CPUS) {
    throw new AcpiTableError(
      'ACPI_CPU_COUNT',
      `cannot describe ${cpuCount} vCPUs in the ACPI MADT: give between 1 and ${ACPI_MAX_CPUS} (-smp)`,
    );
  }
  if (!Number.isInteger(base) || base % ALIGN !== 0 || base < 0) {
    throw new AcpiTableError(
      'ACPI_PLACEMENT',
      `ACPI tables at ${base} are not 16-byte aligned: the guest finds the RSDP only on 16-byte boundaries`,
    );
  }
  const align = (n: number) => Math.ceil(n / ALIGN) * ALIGN;
  // Fixed-size tables first, so every address is known before the XSDT
  // and FADT that point at them are built.
  const dsdt = buildDsdt([{ name: 'COM1', ioBase: COM1_BASE, irq: COM1_IRQ, uid: 0 }]);
  const madt = buildMadt({ cpuCount, ioapicId: cpuCount });
  const xsdtAddr = base + align(RSDP_SIZE);
  const fadtAddr = xsdtAddr + align(buildXsdt([0, 0]).byteLength);
  const fadt0 = buildFadt(0);
  const dsdtAddr = fadtAddr + align(fadt0.byteLength);
  const madtAddr = dsdtAddr + align(dsdt.byteLength);
  const end = madtAddr + madt.byteLength;
  if (end > limit) {
    throw new AcpiTableError(
      'ACPI_PLACEMENT',
      `ACPI tables for ${cpuCount} vCPUs (${end - base} bytes) at 0x${base.toString(16)} run past 0x${limit.toString(16)}`,
    );
  }
  const fadt = buildFadt(dsdtAddr);
  const xsdt = buildXsdt([fadtAddr, madtAddr]);
  const rsdp = buildRsdp(xsdtAddr);
  const bytes = new Uint8Array(end - base);
  const tables: AcpiTables['tables'] = [];
  const put = (signature: string, addr: number, table: Uint8Array) => {
    bytes.set(table, addr - base);
    tables.push({ signature, addr, length: table.byteLength });
  };
  put('RSD PTR ', base, rsdp);
  put('XSDT', xsdtAddr, xsdt);
  put('FACP', fadtAddr, fadt);
  put('DSDT', dsdtAddr, dsdt);
  put('APIC', madtAddr, madt);
  return { base, bytes, rsdpAddr: base, tables };
}
