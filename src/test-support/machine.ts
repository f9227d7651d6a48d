import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type MachineOptions, X86Machine } from '../hw/i386/machine.js';
import { scaled } from './time-scale.js';

/** A machine whose UART writes to a temp file, and a way to read what it wrote. */
export interface MachineUnderTest {
  machine: X86Machine;
  /** Everything the guest printed so far. */
  output(): string;
}

/**
 * Creates a machine for a test, runs `body`, and always destroys it and its
 * temp files, so no vCPU thread, fd or file outlives the test.
 */
export async function withMachine(
  options: Omit<MachineOptions, 'serialFd'>,
  body: (m: MachineUnderTest) => Promise<void>,
): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-test-'));
  const path = join(dir, 'serial.out');
  const fd = openSync(path, 'w');
  let machine: X86Machine | undefined;
  try {
    machine = await X86Machine.create({ ...options, serialFd: fd });
    await body({ machine, output: () => readFileSync(path, 'utf8') });
  } finally {
    await machine?.destroy();
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Polls `check` until it returns true or `timeoutMs` passes; says what was awaited on failure. */
export async function waitFor(
  what: string,
  check: () => boolean,
  timeoutMs = 20_000,
): Promise<void> {
  const limit = scaled(timeoutMs);
  const deadline = Date.now() + limit;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${limit} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The probe's lines, parsed: `probe cpu=<n> <event> key=value ...`. */
export interface ProbeLine {
  cpu: number;
  event: string;
  fields: Record<string, bigint>;
}

const PROBE_LINE = /^probe cpu=(\d+) (\w+)((?: \w+=\d+)*)$/;

/** Parses every complete line; a line that is not in the probe's format throws (a torn or lost line). */
export function parseProbeOutput(text: string, options: { resumed?: boolean } = {}): ProbeLine[] {
  const lines = text.split('\n');
  lines.pop(); // the last piece is incomplete (or empty)
  // A guest restored from a migration may finish a line whose start went
  // out from the source before the save: that first piece is not ours.
  if (options.resumed && lines.length > 0 && !lines[0]!.startsWith('probe cpu=')) lines.shift();
  return lines.map((line) => {
    const m = PROBE_LINE.exec(line);
    if (!m) throw new Error(`malformed probe line: ${JSON.stringify(line)}`);
    const fields: Record<string, bigint> = {};
    for (const kv of m[3]!.trim().split(' ').filter(Boolean)) {
      const [k, v] = kv.split('=');
      fields[k!] = BigInt(v!);
    }
    return { cpu: Number(m[1]), event: m[2]!, fields };
  });
}

/** The probe's whole lines in the file at `path` so far (none if it does not exist yet). */
export function readProbeLines(path: string, options: { resumed?: boolean } = {}): ProbeLine[] {
  return existsSync(path) ? parseProbeOutput(readFileSync(path, 'utf8'), options) : [];
}

/** How many fds and threads this process has now (to prove nothing leaked). */
export function processResources(): { fds: number; threads: number } {
  return {
    fds: readdirSync('/proc/self/fd').length,
    threads: readdirSync('/proc/self/task').length,
  };
}
