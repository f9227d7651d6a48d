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
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { QmpClient } from '../monitor/qmp-client.js';

/** The compiled entry point of tsvmm. */
export const TSVMM_MAIN = fileURLToPath(new URL('../cli/main.js', import.meta.url));

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
    const deadline = Date.now() + timeoutMs;
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
export async function within<T>(promise: Promise<T>, what: string, ms: number): Promise<T> {
  const timer = sleep(ms, 'timeout' as const, { ref: false });
  const result = await Promise.race([promise, timer]);
  if (result === 'timeout') throw new Error(`timed out after ${ms} ms waiting for ${what}`);
  return result as T;
}
