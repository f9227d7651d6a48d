// bench/lib/common.mjs: what the benchmarks that run QEMU beside tsvmm
// share: child processes that are killed by pid on every way out, temporary
// directories that are always removed, timeouts, QEMU found (or installed
// from Debian's packages), and the statistics.
import { spawn, spawnSync } from 'node:child_process';
import { accessSync, constants, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root. */
export const root = fileURLToPath(new URL('../..', import.meta.url));

/** An error whose message is already meant for the user: printed as is, exit status 1. */
export class BenchError extends Error {}

const children = new Set();
const tempDirs = new Set();

function isRunning(child) {
  return child.exitCode === null && child.signalCode === null;
}

/** Kills every child still running, by its pid, and removes the temporary directories. */
function cleanUpNow() {
  for (const child of children) {
    if (child.pid !== undefined && isRunning(child)) {
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
  children.clear();
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}

process.on('exit', cleanUpNow);
for (const [signal, status] of [
  ['SIGINT', 130],
  ['SIGTERM', 143],
  ['SIGHUP', 129],
]) {
  process.on(signal, () => {
    process.stderr.write(`\nbench: ${signal}: stopping the child processes\n`);
    cleanUpNow();
    process.exit(status);
  });
}

/**
 * Runs `main`; a {@link BenchError} is printed as `<name>: <message>`, any
 * other error with its stack. Either way the children are killed and the
 * temporary directories removed (by the exit handler), and the status is 1.
 */
export async function runBench(name, main) {
  try {
    await main();
  } catch (err) {
    const usage = typeof err?.code === 'string' && err.code.startsWith('ERR_PARSE_ARGS');
    if (err instanceof BenchError || usage) console.error(`${name}: ${err.message}`);
    else console.error(`${name}: internal error: ${err?.stack ?? err}`);
    process.exitCode = 1;
  }
  cleanUpNow();
  process.exit();
}

/** Spawns a child that is killed (SIGKILL, by pid) if the benchmark ends before it does. */
export function spawnTracked(command, args, options) {
  const child = spawn(command, args, options);
  children.add(child);
  child.once('exit', () => children.delete(child));
  child.once('error', () => children.delete(child));
  return child;
}

/** Resolves with `{ code, signal }` once the child has exited (at once if it already has). */
export function exited(child) {
  if (!isRunning(child)) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: null, signal: null }));
  });
}

/**
 * Ends a child: `signal` first (SIGTERM: tsvmm and QEMU both shut down
 * cleanly on it), SIGKILL if it is still there after `graceMs`. Signal 0
 * sends nothing: it only waits `graceMs` for an exit already asked for.
 * Resolves with how it ended and whether it had to be killed.
 */
export async function stopChild(child, { signal = 'SIGTERM', graceMs = 5000 } = {}) {
  if (!isRunning(child)) return { ...(await exited(child)), killed: false };
  try {
    process.kill(child.pid, signal);
  } catch {
    // already gone
  }
  const ended = await Promise.race([exited(child), sleep(graceMs).then(() => null)]);
  if (ended) return { ...ended, killed: false };
  try {
    process.kill(child.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  return { ...(await exited(child)), killed: true };
}

/** Keeps the last `limit` characters a child writes on a stream, for error messages. */
export function collectTail(stream, limit = 4000) {
  const state = { text: '' };
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    state.text = (state.text + chunk).slice(-limit);
  });
  return state;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** `promise`, or a {@link BenchError} naming `what` if it takes longer than `ms`. */
export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new BenchError(`${what}: no answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A temporary directory, removed by {@link removeTempDir} or, failing that, at exit. */
export function makeTempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDir(dir) {
  rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

function findInPath(command) {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const path = join(dir, command);
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // not here
    }
  }
  return undefined;
}

function runInstallStep(argv, timeoutMs) {
  const asRoot = process.getuid?.() === 0;
  if (!asRoot && !findInPath('sudo')) {
    throw new BenchError(
      `qemu-system-x86_64 is missing and installing it needs root: run 'apt-get install -y qemu-system-x86' as root, then run the benchmark again`,
    );
  }
  const [command, ...args] = asRoot ? argv : ['sudo', '-n', ...argv];
  const result = spawnSync(command, args, {
    stdio: ['ignore', 2, 2],
    timeout: timeoutMs,
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
  if (result.error?.code === 'ETIMEDOUT') {
    throw new BenchError(`'${argv.join(' ')}' took longer than ${timeoutMs / 1000} s: stopped`);
  }
  if (result.error) throw new BenchError(`'${argv.join(' ')}': ${result.error.message}`);
  if (result.status !== 0) {
    throw new BenchError(
      `'${argv.join(' ')}' failed (status ${result.status ?? result.signal}): install qemu-system-x86 by hand`,
    );
  }
}

/**
 * The path of qemu-system-x86_64. If it is missing, installs Debian's
 * qemu-system-x86 (`apt-get update && apt-get install -y qemu-system-x86`)
 * and says so first.
 */
export function ensureQemu(name) {
  const found = findInPath('qemu-system-x86_64');
  if (found) return found;
  if (!findInPath('apt-get')) {
    throw new BenchError(
      'qemu-system-x86_64 is missing and this host has no apt-get: install QEMU (qemu-system-x86) and run the benchmark again',
    );
  }
  console.log(
    `${name}: qemu-system-x86_64 is missing: installing Debian's qemu-system-x86 (apt-get update && apt-get install -y qemu-system-x86)`,
  );
  runInstallStep(['apt-get', 'update'], 300_000);
  runInstallStep(['apt-get', 'install', '-y', 'qemu-system-x86'], 900_000);
  const installed = findInPath('qemu-system-x86_64');
  if (!installed) {
    throw new BenchError('qemu-system-x86 was installed but qemu-system-x86_64 is not on the PATH');
  }
  console.log(`${name}: installed ${qemuVersion(installed)}`);
  return installed;
}

/** `QEMU 7.2.22 (Debian ...)`, from `qemu-system-x86_64 --version`. */
export function qemuVersion(qemu) {
  const result = spawnSync(qemu, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  const m = /QEMU emulator version (\S+)(?: \(([^)]*)\))?/.exec(result.stdout ?? '');
  if (!m) return 'QEMU (version unknown)';
  return m[2] ? `QEMU ${m[1]} (${m[2]})` : `QEMU ${m[1]}`;
}

/** The median of a list of numbers (the mean of the two middle ones for an even count). */
export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** The p-th percentile by nearest rank: p99 of 200 samples is the 198th smallest. */
export function percentile(values, p) {
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1];
}

/** Left- or right-aligned table rows, two spaces apart, indented by two. */
export function table(rows, alignRight = () => true) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  return rows
    .map(
      (r) =>
        `  ${r
          .map((cell, i) =>
            alignRight(i) ? String(cell).padStart(widths[i]) : String(cell).padEnd(widths[i]),
          )
          .join('  ')
          .trimEnd()}`,
    )
    .join('\n');
}
