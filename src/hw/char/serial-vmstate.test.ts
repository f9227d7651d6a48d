import assert from 'node:assert/strict';
import { test } from 'node:test';
import { roundTripThroughFile } from '../../migration/test-roundtrip.js';
import {
  createSerialState,
  Serial16550,
  UART_IER_DLM,
  UART_IIR_FCR,
  UART_LCR,
  UART_LSR,
  UART_MCR,
  UART_RBR_THR_DLL,
  UART_SCR,
} from './serial.js';
import {
  readSerialRegisters,
  SERIAL_VMSTATE,
  serialMigrationState,
  serialSection,
} from './serial-vmstate.js';

function uart(state = createSerialState()) {
  const out: number[] = [];
  const irq: boolean[] = [];
  const dev = new Serial16550(state, {
    transmit: (b) => out.push(...b),
    setIrq: (level) => irq.push(level),
  });
  return { state, dev, out, irq };
}

test('serial vmstate round trip through a file: registers, divisor, pending input and IRQ level', async () => {
  const src = uart();
  src.dev.write(UART_LCR, 0x83); // DLAB on, 8 bits
  src.dev.write(UART_RBR_THR_DLL, 0x01);
  src.dev.write(UART_IER_DLM, 0x00); // 115200 baud
  src.dev.write(UART_LCR, 0x03);
  src.dev.write(UART_IIR_FCR, 0x01); // FIFO on
  src.dev.write(UART_MCR, 0x0b);
  src.dev.write(UART_SCR, 0x5a);
  src.dev.write(UART_IER_DLM, 0x01); // received-data interrupt
  assert.equal(src.dev.receive(new TextEncoder().encode('hello')), 5);
  assert.equal(src.dev.read(UART_RBR_THR_DLL), 'h'.charCodeAt(0)); // the FIFO's head moves off 0
  assert.equal(src.dev.irqLevel, true);

  const dst = uart();
  const loaded = await roundTripThroughFile(
    [serialSection(serialMigrationState(src.state))],
    [serialSection(serialMigrationState(dst.state))],
  );
  assert.deepEqual(readSerialRegisters(dst.state), readSerialRegisters(src.state));
  // The destination UART behaves as the source would: same input, same status.
  assert.equal(dst.dev.irqLevel, true);
  assert.equal(dst.dev.read(UART_LSR) & 0x01, 1);
  const rest = [0, 1, 2, 3].map(() => dst.dev.read(UART_RBR_THR_DLL));
  assert.equal(String.fromCharCode(...rest), 'ello');
  assert.equal(dst.dev.read(UART_SCR), 0x5a);
  dst.dev.write(UART_LCR, 0x83);
  assert.equal(dst.dev.read(UART_RBR_THR_DLL), 0x01, 'divisor latch low');
  assert.equal(dst.dev.read(UART_IER_DLM), 0x00, 'divisor latch high');

  const desc = loaded.vmdesc.devices.find((d) => d.name === 'serial')!;
  assert.deepEqual(
    desc.fields.map((f) => f.name),
    SERIAL_VMSTATE.fields.map((f) => f.name),
  );
  assert.equal(desc.subsections?.[0]?.vmsd_name, 'serial/rx_buffer');
});

test('serial vmstate: an empty RX buffer sends no subsection and loads as empty', async () => {
  const src = uart();
  src.dev.write(UART_SCR, 0x11);
  const dst = uart();
  dst.dev.receive(Uint8Array.of(1, 2, 3)); // stale input on the destination is replaced
  const loaded = await roundTripThroughFile(
    [serialSection(serialMigrationState(src.state))],
    [serialSection(serialMigrationState(dst.state))],
  );
  assert.equal(loaded.vmdesc.devices.find((d) => d.name === 'serial')!.subsections, undefined);
  assert.deepEqual(readSerialRegisters(dst.state), readSerialRegisters(src.state));
  assert.equal(dst.dev.read(UART_LSR) & 0x01, 0);
});
