import { writeSync } from 'node:fs';

/**
 * Output that must never hold up the thread writing it: the guest's UART
 * bytes and trace records, written from vCPU threads and the main thread.
 * A thread stuck in a write loop cannot be paused, kicked or ended, so a
 * reader that went away or stopped reading costs us output, never the VM.
 */

/** How long one write waits, in total, for a non-blocking fd that is full. */
const FULL_WAIT_MS = 100;

const pauseCell = new Int32Array(new SharedArrayBuffer(4));

/** Fds (per thread) whose last write found them full for FULL_WAIT_MS: no more waiting until one takes data again. */
const stalled = new Set<number>();

/** Fds (per thread) whose reader is gone (EPIPE): a pipe never gets one back, so they are not written again. */
const broken = new Set<number>();

/**
 * Writes all of `bytes` to `fd` with as few write(2) calls as possible (so
 * records from threads sharing the fd interleave whole). Gives up, dropping
 * the rest, when the fd fails (EPIPE: the reader closed; ENOSPC; EBADF) or
 * stays full (EAGAIN on a non-blocking pipe) for FULL_WAIT_MS. Once an fd
 * stayed full, later writes do not wait for it at all until it takes data
 * again, and once its reader is gone (EPIPE) it is not written at all.
 * Returns whether everything was written. Never throws.
 */
export function writeOrDrop(fd: number, bytes: Uint8Array): boolean {
  // Each failed write costs a thrown error; a vCPU tracing every exit into
  // a closed pipe would spend its time on them.
  if (broken.has(fd)) return false;
  let off = 0;
  let waited = 0;
  while (off < bytes.byteLength) {
    try {
      off += writeSync(fd, bytes, off, bytes.byteLength - off);
      stalled.delete(fd);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EPIPE') broken.add(fd);
      if (code !== 'EAGAIN') return false;
      if (stalled.has(fd) || waited >= FULL_WAIT_MS) {
        stalled.add(fd);
        return false;
      }
      Atomics.wait(pauseCell, 0, 0, 1);
      waited++;
    }
  }
  return true;
}
