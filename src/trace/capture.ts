import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  createTraceConfig,
  currentTraceConfig,
  installTraceConfig,
  type TraceRule,
} from './control.js';

/**
 * Runs `fn` with the given patterns traced into a private temporary file on
 * this thread, then restores the previous set-up and returns the lines
 * written (backtrace lines included). For tests that assert what was traced.
 */
export async function captureTrace(
  patterns: readonly (string | TraceRule)[],
  fn: () => unknown,
  options: { backtrace?: boolean } = {},
): Promise<string[]> {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-trace-'));
  const path = join(dir, 'trace.log');
  const fd = openSync(path, 'w');
  const previous = currentTraceConfig();
  try {
    const rules = patterns.map((p) =>
      typeof p === 'string'
        ? p.startsWith('-')
          ? { pattern: p.slice(1), enable: false }
          : { pattern: p, enable: true }
        : p,
    );
    installTraceConfig(
      createTraceConfig({ rules, fd, backtrace: options.backtrace ?? false }).config,
    );
    await fn();
  } finally {
    installTraceConfig(previous);
    closeSync(fd);
  }
  try {
    return readFileSync(path, 'utf8').split('\n').filter(Boolean);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The `<event> key=value ...` part of a trace line, without pid, time and thread. */
export function traceBody(line: string): string {
  const colon = line.indexOf(':');
  return line.slice(colon + 1).replace(/ thread=\S+$/, '');
}
