/**
 * tsvmm as a child process, for the tests that run the command itself:
 * spawned by pid, everything it prints kept, and killed on every way out
 * of a test.
 *
 * A child is killed by its pid when its test's scope closes (pass, fail or
 * timeout), when the test process exits, and, where util-linux's setpriv
 * is there, by the kernel when the test process dies any other way
 * (PR_SET_PDEATHSIG), so no tsvmm outlives the test that started it.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { DEFAULT_SHUTDOWN_DEADLINE_MS } from '../cli/options.js';
import { isJsonObject } from '../monitor/json-value.js';
import { QmpClient } from '../monitor/qmp-client.js';
import { scaled, TIME_SCALE } from './time-scale.js';

/** The compiled entry point of tsvmm. */
export const TSVMM_MAIN = fileURLToPath(new URL('../cli/main.cjs', import.meta.url));

/** How long a command that should exit at once may take. */
export const QUICK_EXIT_MS = scaled(15_000);
/** How long a VM may take to shut down after quit or a signal. */
export const SHUTDOWN_MS = scaled(20_000);
/** How long any single QMP exchange or event may take. */
export const QMP_MS = scaled(15_000);

/** How a child ended. */
export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));

/**
 * The command prefix that makes the kernel SIGKILL a child when this test
 * process dies (setpriv execs the command: the pid stays the child's).
 */
export function deathSignalPrefix(): string[] {
  return SETPRIV ? [SETPRIV, '--pdeathsig', 'KILL', '--'] : [];
}

/** Every child still running, killed by pid when this process exits. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function track(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const c of live) killByPid(c, 'SIGKILL');
    });
  }
}

/** Sends `signal` to `child` by its pid if it still runs; a child already gone is no error. */
export function killByPid(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  try {
    process.kill(child.pid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

/**
 * Under emulation (TIME_SCALE > 1) a clean shutdown takes seconds, past
 * tsvmm's 1.5 s forced-exit deadline: the deadline stretches with the
 * scale, unless the test sets its own. On a KVM host nothing is added.
 */
function shutdownDeadlineArgs(args: readonly string[]): string[] {
  if (TIME_SCALE <= 1 || args.includes('-x-shutdown-deadline')) return [];
  if (args.some((a) => a === '--help' || a === '-help' || a === '-h' || a === '-version'))
    return [];
  return ['-x-shutdown-deadline', String(scaled(DEFAULT_SHUTDOWN_DEADLINE_MS))];
}

/** What a TsvmmProcess is started with. */
export interface TsvmmSpawnOptions {
  /** A command that runs tsvmm, such as `ip netns exec NS` (it must exec it, keeping the pid). */
  readonly prefix?: readonly string[];
  /** stdin: a pipe (to type on the guest's console) or nothing. */
  readonly stdin?: 'pipe' | 'ignore';
}

/** One tsvmm child process and everything it printed. */
export class TsvmmProcess {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private exit: Exit | undefined;
  private readonly exitPromise: Promise<Exit>;

  constructor(args: readonly string[], options: TsvmmSpawnOptions = {}) {
    const argv = [
      ...deathSignalPrefix(),
      ...(options.prefix ?? []),
      process.execPath,
      TSVMM_MAIN,
      ...shutdownDeadlineArgs(args),
      ...args,
    ];
    this.child = spawn(argv[0]!, argv.slice(1), {
      stdio: [options.stdin ?? 'ignore', 'pipe', 'pipe'],
    });
    track(this.child);
    this.child.stdin?.on('error', () => {});
    this.child.stdout!.setEncoding('utf8').on('data', (s: string) => {
      this.stdout += s;
    });
    this.child.stderr!.setEncoding('utf8').on('data', (s: string) => {
      this.stderr += s;
    });
    // 'close' comes after the process ended and its stdout and stderr were
    // read to the end, or were closed by the test (see closeOutput).
    this.exitPromise = new Promise((resolve, reject) => {
      this.child.once('error', reject);
      this.child.once('close', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    // A spawn failure is reported by whoever awaits the exit, never as an unhandled rejection.
    this.exitPromise.catch(() => {});
  }

  get pid(): number {
    const pid = this.child.pid;
    if (pid === undefined) throw new Error('tsvmm did not start');
    return pid;
  }

  get exited(): boolean {
    return (
      this.exit !== undefined || this.child.exitCode !== null || this.child.signalCode !== null
    );
  }

  /** Sends `signal` to this child, by its pid, if it still runs. */
  signal(signal: NodeJS.Signals): void {
    killByPid(this.child, signal);
  }

  /** Resolves with the exit status once the process is gone (its output may still be open). */
  processExit(): Promise<Exit> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return Promise.resolve({ code: this.child.exitCode, signal: this.child.signalCode });
    }
    return new Promise((resolve) =>
      this.child.once('exit', (code, signal) => resolve({ code, signal })),
    );
  }

  /** Waits for the exit; past `timeoutMs` kills the child by pid and fails with what it printed. */
  async waitExit(timeoutMs: number): Promise<Exit> {
    const timer = sleep(timeoutMs, 'timeout' as const, { ref: false });
    const result = await Promise.race([this.exitPromise, timer]);
    if (result === 'timeout') {
      this.signal('SIGKILL');
      throw new Error(
        `tsvmm (pid ${this.child.pid}) did not exit within ${timeoutMs} ms; killed it.\nstderr:\n${this.stderr}`,
      );
    }
    return result;
  }

  /** Types a line on the guest's console (stdin must be a pipe). */
  type(line: string): void {
    this.child.stdin!.write(`${line}\r`);
  }

  /** Complete lines of stdout, without their CR. */
  lines(): string[] {
    const all = this.stdout.split('\n');
    all.pop();
    return all.map((l) => l.replace(/\r$/, ''));
  }

  /** Kills the child (SIGKILL unless told) if it still runs, and waits for it to be gone. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.exited) return;
    this.signal(signal);
    await Promise.race([this.exitPromise.catch(() => undefined), sleep(10_000)]);
  }
}

/**
 * What one test made, torn down after it in every outcome, newest first:
 * QMP clients closed, children killed by pid, cleanups run, temp dirs
 * removed. A failing step never keeps the others from running.
 */
export class ProcessScope {
  private readonly children: TsvmmProcess[] = [];
  private readonly clients: QmpClient[] = [];
  private readonly dirs: string[] = [];
  private readonly cleanups: (() => unknown)[] = [];

  constructor(t: TestContext) {
    t.after(() => this.close());
  }

  /** A new temp dir, short so a unix socket path inside stays under 108 bytes. */
  tempDir(prefix = 'tsvmm-t-'): string {
    const dir = mkdtempSync(join(tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  /** Starts tsvmm with `args`; it is killed when the scope closes. */
  start(args: readonly string[], options: TsvmmSpawnOptions = {}): TsvmmProcess {
    const vm = new TsvmmProcess(args, options);
    this.children.push(vm);
    return vm;
  }

  /** Runs `fn` when the scope closes (after the children are gone). */
  onClose(fn: () => unknown): void {
    this.cleanups.push(fn);
  }

  /** Connects to `socket`, retrying until tsvmm listens there (or has exited). */
  async connect(socket: string, vm: TsvmmProcess, timeoutMs = 30_000): Promise<QmpClient> {
    const limit = scaled(timeoutMs);
    const deadline = Date.now() + limit;
    for (;;) {
      if (vm.exited) {
        throw new Error(`tsvmm exited before its QMP socket was up.\nstderr:\n${vm.stderr}`);
      }
      try {
        const client = await QmpClient.connect({ path: socket });
        this.clients.push(client);
        return client;
      } catch (err) {
        if (Date.now() > deadline) {
          throw new Error(
            `no QMP server at ${socket} after ${limit} ms (${(err as Error).message}).\nstderr:\n${vm.stderr}`,
          );
        }
        await sleep(20);
      }
    }
  }

  async close(): Promise<void> {
    const errors: unknown[] = [];
    const attempt = async (fn: () => unknown) => {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    };
    for (const c of this.clients) await attempt(() => c.close());
    for (const vm of this.children.reverse()) await attempt(() => vm.kill());
    for (const fn of this.cleanups.reverse()) await attempt(fn);
    for (const d of this.dirs) await attempt(() => rmSync(d, { recursive: true, force: true }));
    if (errors.length > 0) throw errors[0];
  }
}

/** `promise`, or a failure naming `what` once `ms` has passed. */
export async function within<T>(promise: Promise<T>, what: string, ms = QMP_MS): Promise<T> {
  const timer = sleep(ms, 'timeout' as const, { ref: false });
  const result = await Promise.race([promise, timer]);
  if (result === 'timeout') throw new Error(`timed out after ${ms} ms waiting for ${what}`);
  return result as T;
}

/** Runs tsvmm with `args` to its exit (killed by pid past the deadline). */
export async function runToExit(
  t: TestContext,
  args: readonly string[],
): Promise<Exit & { stdout: string; stderr: string }> {
  const vm = new ProcessScope(t).start(args);
  const exit = await vm.waitExit(QUICK_EXIT_MS);
  return { ...exit, stdout: vm.stdout, stderr: vm.stderr };
}

/** An error reported the way a user should see it: one `tsvmm:` line, no JS stack. */
export function assertCleanError(stderr: string): void {
  assert.match(stderr, /^tsvmm: /);
  assert.doesNotMatch(stderr, /^\s+at /m, 'no stack trace');
  assert.doesNotMatch(stderr, /internal error/);
}

/** The greeting, then capabilities negotiation. */
export async function negotiate(qmp: QmpClient): Promise<void> {
  const greeting = await within(qmp.greeting(), 'the QMP greeting');
  assert.ok(isJsonObject(greeting.QMP), 'the greeting has a QMP member');
  assert.deepEqual(await within(qmp.execute('qmp_capabilities'), 'qmp_capabilities'), {});
}

/** query-status, checked for shape. */
export async function queryStatus(qmp: QmpClient): Promise<{ status: string; running: boolean }> {
  const r = await within(qmp.execute('query-status'), 'query-status');
  assert.ok(isJsonObject(r));
  assert.equal(typeof r.status, 'string');
  assert.equal(typeof r.running, 'boolean');
  return { status: r.status as string, running: r.running as boolean };
}

/** Polls query-status until the VM runs. */
export async function waitRunning(qmp: QmpClient): Promise<void> {
  const deadline = Date.now() + QMP_MS;
  for (;;) {
    const s = await queryStatus(qmp);
    if (s.status === 'running') {
      assert.equal(s.running, true);
      return;
    }
    if (Date.now() > deadline) throw new Error(`the VM never reached running (still ${s.status})`);
    await sleep(20);
  }
}

/**
 * After quit or a signal: reads every event until the server closes the
 * connection, and checks it was one SHUTDOWN with `reason` and no STOP.
 */
export async function expectShutdownOnly(qmp: QmpClient, reason: string): Promise<void> {
  await within(qmp.closed(), 'the QMP connection to close', SHUTDOWN_MS);
  const events = qmp.pendingEvents();
  const names = events.map((e) => e.event);
  const shutdowns = events.filter((e) => e.event === 'SHUTDOWN');
  assert.equal(shutdowns.length, 1, `one SHUTDOWN event, got ${JSON.stringify(names)}`);
  assert.deepEqual(shutdowns[0]!.data, { guest: false, reason });
  assert.ok(!names.includes('STOP'), `no STOP on the way out, got ${JSON.stringify(names)}`);
}

/** The -qmp option for a unix socket server that does not wait for a client. */
export function qmpArg(socket: string): string[] {
  return ['-qmp', `unix:${socket},server=on,wait=off`];
}

/** A tsvmm started by {@link startWithQmp}: its process, its negotiated QMP client, its serial file. */
export interface QmpVm {
  vm: TsvmmProcess;
  qmp: QmpClient;
  serial: string;
}

/**
 * Starts tsvmm with `args`, a QMP socket at DIR/NAME.sock and the guest's
 * serial in DIR/NAME.serial, then connects and negotiates.
 */
export async function startWithQmp(
  scope: ProcessScope,
  dir: string,
  name: string,
  args: readonly string[],
): Promise<QmpVm> {
  const sock = join(dir, `${name}.sock`);
  const serial = join(dir, `${name}.serial`);
  const vm = scope.start([...qmpArg(sock), '-serial', `file:${serial}`, ...args]);
  const qmp = await scope.connect(sock, vm);
  await negotiate(qmp);
  return { vm, qmp, serial };
}
