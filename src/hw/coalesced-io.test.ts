import assert from 'node:assert/strict';
import { test } from 'node:test';
import { fakeCoalescedRing } from '../test-support/coalesced-ring.js';
import {
  createSerialState,
  Serial16550,
  UART_IER_DLM,
  UART_IIR_FCR,
  UART_LCR,
  UART_RBR_THR_DLL,
} from './char/serial.js';
import { CoalescedIo, createCoalescedIoState } from './coalesced-io.js';

test('byte writes to one port go to the device as one run; another port starts a new run', () => {
  const { ring, push } = fakeCoalescedRing();
  const runs: [number, string][] = [];
  const io = new CoalescedIo(ring, createCoalescedIoState(), (port, bytes) =>
    runs.push([port, Buffer.from(bytes).toString()]),
  );
  for (const b of Buffer.from('ok\n')) push(0x3f8, [b]);
  push(0x2f8, [0x41]);
  push(0x3f8, [0x42]);
  io.flush();
  assert.deepEqual(runs, [
    [0x3f8, 'ok\n'],
    [0x2f8, 'A'],
    [0x3f8, 'B'],
  ]);
  io.flush();
  assert.equal(runs.length, 3, 'nothing twice');
});

test('writes wider than a byte are dropped, as the exit path drops them for the UART', () => {
  const { ring, push } = fakeCoalescedRing();
  const runs: number[][] = [];
  const io = new CoalescedIo(ring, createCoalescedIoState(), (_p, bytes) => runs.push([...bytes]));
  push(0x3f8, [1, 2]);
  push(0x3f8, [3]);
  io.flush();
  assert.deepEqual(runs, [[3]]);
});

test('through the UART: queued bytes are transmitted in order, and a later read sees their THRE interrupt', () => {
  const { ring, push } = fakeCoalescedRing();
  const sent: number[] = [];
  const uart = new Serial16550(createSerialState(), {
    transmit: (bytes) => sent.push(...bytes),
    setIrq: () => {},
  });
  const io = new CoalescedIo(ring, createCoalescedIoState(), (port, bytes) =>
    uart.writeMany(port - 0x3f8, bytes),
  );
  uart.write(UART_IER_DLM, 0x02); // THRI on
  assert.equal(uart.read(UART_IIR_FCR) & 0x0f, 0x02, 'enabling THRI raises it');
  assert.equal(uart.read(UART_IIR_FCR) & 0x0f, 0x01, 'reading IIR acknowledged it');
  for (const b of Buffer.from('hi')) push(0x3f8, [b]);
  // What a vCPU does before serving its exit (the IIR read that follows the guest's writes).
  io.flush();
  assert.equal(Buffer.from(sent).toString(), 'hi');
  assert.equal(uart.read(UART_IIR_FCR) & 0x0f, 0x02, 'THR emptied: THRE pending again');
  // With DLAB set, a write to offset 0 is the divisor latch, in order with the bytes around it.
  uart.write(UART_LCR, 0x80);
  push(0x3f8, [0x01]);
  io.flush();
  uart.write(UART_LCR, 0x03);
  assert.equal(Buffer.from(sent).toString(), 'hi', 'the divisor write was not transmitted');
  push(0x3f8, [0x21]);
  io.flush();
  assert.equal(Buffer.from(sent).toString(), 'hi!');
  assert.equal(uart.read(UART_RBR_THR_DLL), 0, 'nothing received');
});
