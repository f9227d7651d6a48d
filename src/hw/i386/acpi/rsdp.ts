/**
 * The RSDP, where a guest starts reading ACPI, and the XSDT it points at,
 * which lists every other table but the DSDT (the FADT points at that).
 * ACPI 2.0+ form: revision 2, 36 bytes, a checksum over the first 20 bytes
 * (the ACPI 1.0 part) and an extended one over all 36. No RSDT: 32-bit
 * pointers are only for ACPI 1.0 guests, and every table is below 4 GiB
 * anyway, so the XSDT serves all.
 */
import {
  ACPI_OEM_ID,
  checksumOf,
  newTable,
  SDT_HEADER_SIZE,
  sealTable,
  writeAscii,
} from './sdt.js';

export const RSDP_SIZE = 36;
export const RSDP_REVISION = 2;
export const XSDT_REVISION = 1;

/** The RSDP pointing at an XSDT at `xsdtAddr`. */
export function buildRsdp(xsdtAddr: number): Uint8Array {
  const bytes = new Uint8Array(RSDP_SIZE);
  const view = new DataView(bytes.buffer);
  writeAscii(bytes, 0, 'RSD PTR ', 8);
  writeAscii(bytes, 9, ACPI_OEM_ID, 6);
  bytes[15] = RSDP_REVISION;
  view.setUint32(16, 0, true); // RsdtAddress: none
  view.setUint32(20, RSDP_SIZE, true);
  view.setBigUint64(24, BigInt(xsdtAddr), true);
  bytes[8] = checksumOf(bytes, 0, 20);
  bytes[32] = checksumOf(bytes, 0, RSDP_SIZE);
  return bytes;
}

/** The XSDT listing the tables at `tableAddrs`. */
export function buildXsdt(tableAddrs: readonly number[]): Uint8Array {
  const table = newTable('XSDT', XSDT_REVISION, SDT_HEADER_SIZE + 8 * tableAddrs.length);
  const view = new DataView(table.buffer);
  tableAddrs.forEach((addr, i) => {
    view.setBigUint64(SDT_HEADER_SIZE + 8 * i, BigInt(addr), true);
  });
  return sealTable(table);
}
