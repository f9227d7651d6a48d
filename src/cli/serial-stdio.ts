/**
 * `-serial stdio`: the guest's UART output already goes to fd 1 from the
 * vCPU threads; this module feeds what the user types to the UART. On a
 * terminal it switches to raw mode, so every key reaches the guest, and
 * turns Ctrl-C into a clean shutdown as QEMU's stdio backend does.
 */
import type { Serial16550 } from '../hw/char/serial.js';

const CTRL_C = 0x03;

/** Starts forwarding stdin to `serial`; returns a function that stops it and restores the terminal. */
export function attachSerialStdio(serial: Serial16550, onInterrupt: () => void): () => void {
  const stdin = process.stdin;
  const raw = stdin.isTTY === true;
  if (raw) stdin.setRawMode(true);
  let pending: Buffer = Buffer.alloc(0);
  let retry: NodeJS.Timeout | undefined;
  const feed = () => {
    retry = undefined;
    const taken = serial.receive(pending);
    pending = pending.subarray(taken);
    // The UART is full: hold the rest and offer it again shortly, as a slow line would.
    if (pending.length > 0) retry = setTimeout(feed, 10);
  };
  const onData = (chunk: Buffer) => {
    if (raw && chunk.includes(CTRL_C)) {
      onInterrupt();
      return;
    }
    pending = Buffer.concat([pending, chunk]);
    if (!retry) feed();
  };
  stdin.on('data', onData);
  return () => {
    stdin.off('data', onData);
    if (retry) clearTimeout(retry);
    if (raw) stdin.setRawMode(false);
    stdin.pause();
  };
}
