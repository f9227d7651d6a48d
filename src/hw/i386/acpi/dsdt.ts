/**
 * The DSDT: the AML namespace. Ours describes one device, COM1, so that a
 * guest on hardware-reduced ACPI (which has no legacy PIC and pre-maps no
 * ISA interrupts) still learns that the UART at 0x3f8 raises IRQ 4 and
 * routes it through the I/O APIC. Without it Linux's 8250 driver cannot
 * claim IRQ 4 and the serial console takes no input.
 */
import { concat, device, eisaId, integer, name, resource, resourceTemplate, scope } from './aml.js';
import { newTable, SDT_HEADER_SIZE, sealTable } from './sdt.js';

/** DSDT revision 2: integers in this namespace are 64 bits. */
export const DSDT_REVISION = 2;

/** The UARTs the machine has, as the DSDT lists them. */
export interface DsdtSerialPort {
  /** AML name, e.g. COM1. */
  name: string;
  ioBase: number;
  irq: number;
  uid: number;
}

/** The DSDT for a machine with these serial ports. */
export function buildDsdt(serialPorts: readonly DsdtSerialPort[]): Uint8Array {
  const devices = serialPorts.map((port) =>
    device(port.name, [
      name('_HID', eisaId('PNP0501')), // a 16550A-compatible UART
      name('_UID', integer(port.uid)),
      name('_CRS', resourceTemplate([resource.io16(port.ioBase, 8), resource.irq(port.irq)])),
    ]),
  );
  const aml = concat([scope('\\_SB', devices)]);
  const table = newTable('DSDT', DSDT_REVISION, SDT_HEADER_SIZE + aml.byteLength);
  table.set(aml, SDT_HEADER_SIZE);
  return sealTable(table);
}
