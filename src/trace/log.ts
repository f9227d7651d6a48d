import { writeOrDrop } from '../util/fd-writer.js';

/** A value a trace event carries. Booleans print as 1/0, like QEMU's `%d`. */
export type TraceValue = string | number | bigint | boolean;

/** The fields of one trace record, printed `key=value` in insertion order. */
export type TraceFields = Readonly<Record<string, TraceValue>>;

/**
 * Formats one trace line, without its newline:
 * `<pid>@<seconds>.<micros>:<event> key=value ... thread=<name>`.
 * `wallNs` is wall-clock time in nanoseconds since the epoch.
 */
export function formatTraceLine(
  pid: number,
  wallNs: bigint,
  event: string,
  fields: TraceFields | undefined,
  thread: string,
): string {
  const micros = wallNs / 1000n;
  const seconds = micros / 1_000_000n;
  const frac = (micros % 1_000_000n).toString().padStart(6, '0');
  let line = `${pid}@${seconds}.${frac}:${event}`;
  if (fields) {
    for (const key of Object.keys(fields)) line += ` ${key}=${formatValue(fields[key]!)}`;
  }
  return `${line} thread=${thread}`;
}

function formatValue(value: TraceValue): string {
  if (typeof value === 'boolean') return value ? '1' : '0';
  return String(value);
}

/**
 * Turns a V8 stack (as from `Error.captureStackTrace`) into indented,
 * numbered frames, innermost first, the way gdb's `bt` reads.
 */
export function formatBacktrace(stack: string | undefined): string {
  if (!stack) return '';
  const frames = stack
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('at '))
    .map((l) => l.slice(3));
  return frames.map((f, i) => `    #${i} ${f}\n`).join('');
}

/**
 * Writes a whole record with as few write(2) calls as possible, so records
 * from different threads sharing the fd interleave whole, never mid-line.
 * Tracing must never take the VMM down or hold up a vCPU thread: an fd
 * that stopped accepting data (closed pipe, full disk, a reader that
 * stopped reading) loses the record (see util/fd-writer.ts).
 */
export function writeRecord(fd: number, text: string): void {
  writeOrDrop(fd, Buffer.from(text, 'utf8'));
}
