/**
 * What every ACPI system description table shares: the 36-byte header
 * (signature, length, revision, checksum, OEM and creator ids) and the
 * rule that all of a table's bytes sum to 0 mod 256.
 */
import { TsvmmError } from '../../../util/errors.js';

/** Bytes of the common header every table but the RSDP starts with. */
export const SDT_HEADER_SIZE = 36;
/** Offset of the checksum byte in the common header. */
export const SDT_CHECKSUM_OFFSET = 9;

/** OEM id (6 bytes) in the RSDP and every header. */
export const ACPI_OEM_ID = 'TSVMM ';
/** OEM table id (8 bytes) in every header. */
export const ACPI_OEM_TABLE_ID = 'TSVMMVM ';
/** Creator id (4 bytes): the tool that made the table. */
export const ACPI_CREATOR_ID = 'TSVM';
export const ACPI_OEM_REVISION = 1;
export const ACPI_CREATOR_REVISION = 1;

/** The ACPI tables cannot be built as asked: bad vCPU count or placement. */
export class AcpiTableError extends TsvmmError {}

/**
 * A table of `length` bytes with its header filled in, checksum still 0:
 * the caller writes the body, then calls sealTable.
 */
export function newTable(signature: string, revision: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  const view = new DataView(bytes.buffer);
  writeAscii(bytes, 0, signature, 4);
  view.setUint32(4, length, true);
  bytes[8] = revision;
  writeAscii(bytes, 10, ACPI_OEM_ID, 6);
  writeAscii(bytes, 16, ACPI_OEM_TABLE_ID, 8);
  view.setUint32(24, ACPI_OEM_REVISION, true);
  writeAscii(bytes, 28, ACPI_CREATOR_ID, 4);
  view.setUint32(32, ACPI_CREATOR_REVISION, true);
  return bytes;
}

/** Sets the header's checksum so the whole table sums to 0; returns the table. */
export function sealTable(bytes: Uint8Array): Uint8Array {
  bytes[SDT_CHECKSUM_OFFSET] = 0;
  bytes[SDT_CHECKSUM_OFFSET] = checksumOf(bytes, 0, bytes.byteLength);
  return bytes;
}

/** The byte that makes bytes[at, at + length) sum to 0 mod 256 when stored in a zeroed slot among them. */
export function checksumOf(bytes: Uint8Array, at: number, length: number): number {
  let sum = 0;
  for (let i = at; i < at + length; i++) sum = (sum + bytes[i]!) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** Writes `text` at `at`, padded with spaces to `width` bytes. */
export function writeAscii(bytes: Uint8Array, at: number, text: string, width: number): void {
  for (let i = 0; i < width; i++) bytes[at + i] = i < text.length ? text.charCodeAt(i) : 0x20;
}
