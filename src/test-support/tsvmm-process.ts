// A tsvmm child process for end-to-end tests of the command: spawned as
// `node dist/cli/main.js`, with a deadline after which it is killed by pid,
// and a per-test Scope that removes its temp dirs, sockets and children in
// every outcome.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isJsonObject } from '../monitor/json-value.js';
import { QmpClient } from '../monitor/qmp-client.js';
import { scaled } from './time-scale.js';

/** The compiled entry point, next to this compiled test. */
export const MAIN_SCRIPT = fileURLToPath(new URL('../cli/main.js', import.meta.url));

/** How long a command that should exit at once may take. */
export const QUICK_EXIT_MS = scaled(15_000);
/** How long a VM may take to shut down after quit or a signal. */
export const SHUTDOWN_MS = scaled(20_000);
/** How long any single QMP exchange or event may take. */
export const QMP_MS = scaled(15_000);

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** One tsvmm child process and everything it printed. */
export class Tsvmm {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private exit: Exit | undefined;
  private readonly exitPromise: Promise<Exit>;

  constructor(args: readonly string[]) {
    this.child = spawn(process.execPath, [MAIN_SCRIPT, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child.stdout!.setEncoding('utf8').on('data', (s: string) => {
      this.stdout += s;
    });
    this.child.stderr!.setEncoding('utf8').on('data', (s: string) => {
      this.stderr += s;
    });
    // 'close' comes after the process ended and its stdout and stderr were read to the end.
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
    if (this.exited || this.child.pid === undefined) return;
    try {
      process.kill(this.child.pid, signal);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
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

  /** Kills the child if it still runs and waits for it to be gone. */
  async kill(): Promise<void> {
    if (this.exited) return;
    this.signal('SIGKILL');
    await Promise.race([this.exitPromise.catch(() => undefined), sleep(5_000)]);
  }
}

/** What a test created; torn down after it, pass or fail, newest first. */
export class Scope {
  private readonly children: Tsvmm[] = [];
  private readonly clients: QmpClient[] = [];
  private readonly dirs: string[] = [];

  constructor(t: TestContext) {
    t.after(() => this.close());
  }

  tempDir(): string {
    // Short, so a unix socket path inside stays under 108 bytes.
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-cli-'));
    this.dirs.push(dir);
    return dir;
  }

  start(args: readonly string[]): Tsvmm {
    const vm = new Tsvmm(args);
    this.children.push(vm);
    return vm;
  }

  /** Connects to `socket`, retrying until tsvmm listens there (or has exited). */
  async connect(socket: string, vm: Tsvmm, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + scaled(timeoutMs);
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
            `no QMP server at ${socket} after ${timeoutMs} ms (${(err as Error).message}).\nstderr:\n${vm.stderr}`,
          );
        }
        await sleep(20);
      }
    }
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.close();
    for (const vm of this.children.reverse()) await vm.kill();
    for (const d of this.dirs) rmSync(d, { recursive: true, force: true });
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
  const vm = new Scope(t).start(args);
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

export async function queryStatus(qmp: QmpClient): Promise<{ status: string; running: boolean }> {
  const r = await within(qmp.execute('query-status'), 'query-status');
  assert.ok(isJsonObject(r));
  assert.equal(typeof r.status, 'string');
  assert.equal(typeof r.running, 'boolean');
  return { status: r.status as string, running: r.running as boolean };
}

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

export function qmpArg(socket: string): string[] {
  return ['-qmp', `unix:${socket},server=on,wait=off`];
}
