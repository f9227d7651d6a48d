import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  createSerialState,
  SERIAL_RX_CAPACITY,
  Serial16550,
  UART_IER_DLM,
  UART_IIR_FCR,
  UART_LCR,
  UART_LSR,
  UART_MCR,
  UART_MSR,
  UART_RBR_THR_DLL,
  UART_SCR,
} from './serial.js';

function makeUart() {
  const sent: number[] = [];
  const irqs: boolean[] = [];
  const uart = new Serial16550(createSerialState(), {
    transmit: (bytes) => sent.push(...bytes),
    setIrq: (level) => irqs.push(level),
  });
  return { uart, sent, irqs };
}

test('bytes written to THR are transmitted and LSR always shows THR empty', () => {
  const { uart, sent } = makeUart();
  for (const b of Buffer.from('hi\n')) uart.write(UART_RBR_THR_DLL, b);
  assert.deepEqual(Buffer.from(sent).toString(), 'hi\n');
  assert.equal(uart.read(UART_LSR), 0x60);
});

test('a rep outsb run is transmitted in one piece', () => {
  const chunks: string[] = [];
  const uart = new Serial16550(createSerialState(), {
    transmit: (bytes) => chunks.push(Buffer.from(bytes).toString()),
    setIrq: () => {},
  });
  uart.writeMany(UART_RBR_THR_DLL, Buffer.from('probe cpu=0 ready\n'));
  assert.deepEqual(chunks, ['probe cpu=0 ready\n']);
});

test('DLAB switches offsets 0 and 1 to the divisor latch', () => {
  const { uart, sent } = makeUart();
  uart.write(UART_LCR, 0x80);
  uart.write(UART_RBR_THR_DLL, 0x01);
  uart.write(UART_IER_DLM, 0x02);
  assert.equal(uart.read(UART_RBR_THR_DLL), 0x01);
  assert.equal(uart.read(UART_IER_DLM), 0x02);
  uart.write(UART_LCR, 0x03);
  assert.equal(uart.read(UART_IER_DLM), 0, 'IER untouched by the DLM write');
  assert.equal(sent.length, 0, 'divisor writes are not transmitted');
  assert.equal(uart.read(UART_LCR), 0x03);
});

test('enabling the THRE interrupt raises IRQ at once; reading IIR acknowledges it', () => {
  const { uart, irqs } = makeUart();
  assert.equal(uart.read(UART_IIR_FCR), 0x01, 'no interrupt pending');
  uart.write(UART_IER_DLM, 0x02);
  assert.deepEqual(irqs, [true]);
  assert.equal(uart.read(UART_IIR_FCR), 0x02);
  assert.deepEqual(irqs, [true, false]);
  assert.equal(uart.read(UART_IIR_FCR), 0x01);
  uart.write(UART_RBR_THR_DLL, 0x41);
  assert.deepEqual(irqs, [true, false, true], 'each transmitted byte re-arms THRE');
});

test('received bytes set DR, raise the RX interrupt, and are read in order', () => {
  const { uart, irqs } = makeUart();
  uart.write(UART_IER_DLM, 0x01);
  assert.equal(uart.receive(Buffer.from('ab')), 2);
  assert.deepEqual(irqs, [true]);
  assert.equal(uart.read(UART_LSR) & 0x01, 0x01);
  assert.equal(uart.read(UART_IIR_FCR), 0x04);
  assert.equal(uart.read(UART_RBR_THR_DLL), 0x61);
  assert.equal(uart.read(UART_RBR_THR_DLL), 0x62);
  assert.equal(uart.read(UART_LSR) & 0x01, 0);
  assert.deepEqual(irqs, [true, false]);
  assert.equal(uart.read(UART_RBR_THR_DLL), 0, 'empty RBR reads 0');
});

test('RX data outranks THRE in IIR and FIFO mode sets the top bits', () => {
  const { uart } = makeUart();
  uart.write(UART_IIR_FCR, 0x01);
  uart.write(UART_IER_DLM, 0x03);
  uart.receive(Buffer.from('x'));
  assert.equal(uart.read(UART_IIR_FCR), 0xc4);
  uart.read(UART_RBR_THR_DLL);
  assert.equal(uart.read(UART_IIR_FCR), 0xc2);
});

test('FCR can clear the receive FIFO', () => {
  const { uart } = makeUart();
  uart.receive(Buffer.from('xyz'));
  uart.write(UART_IIR_FCR, 0x03);
  assert.equal(uart.read(UART_LSR) & 0x01, 0);
});

test('loopback mode returns transmitted bytes to the receiver and wires MCR to MSR', () => {
  const { uart, sent } = makeUart();
  uart.write(UART_MCR, 0x10 | 0x0a); // loop, RTS, OUT2
  uart.write(UART_RBR_THR_DLL, 0x5a);
  assert.equal(sent.length, 0);
  assert.equal(uart.read(UART_RBR_THR_DLL), 0x5a);
  assert.equal(uart.read(UART_MSR), 0x90, 'RTS->CTS and OUT2->DCD');
  uart.write(UART_MCR, 0);
  assert.equal(uart.read(UART_MSR), 0xb0, 'outside loopback a peer is connected');
});

test('the scratch register keeps its value and LSR ignores writes', () => {
  const { uart } = makeUart();
  uart.write(UART_SCR, 0xa5);
  assert.equal(uart.read(UART_SCR), 0xa5);
  uart.write(UART_LSR, 0);
  assert.equal(uart.read(UART_LSR), 0x60);
});

test('console input beyond the buffer is refused, not lost silently', () => {
  const { uart } = makeUart();
  const big = new Uint8Array(SERIAL_RX_CAPACITY + 10).fill(0x41);
  assert.equal(uart.receive(big), SERIAL_RX_CAPACITY);
  assert.equal(uart.receive(Uint8Array.of(1)), 0);
});

test('two instances over the same state see one UART', () => {
  const state = createSerialState();
  const a = new Serial16550(state, { transmit: () => {}, setIrq: () => {} });
  const b = new Serial16550(state, { transmit: () => {}, setIrq: () => {} });
  a.write(UART_LCR, 0x03);
  assert.equal(b.read(UART_LCR), 0x03);
  b.receive(Buffer.from('q'));
  assert.equal(a.read(UART_RBR_THR_DLL), 0x71);
});
