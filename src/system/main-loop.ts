import { traceEvent } from '../trace/control.js';
import { type ShutdownReason, shutdownCausedByGuest, type VmLifecycle } from './cpus.js';
import type { RunState } from './runstate.js';

const traceBhSchedule = traceEvent('bh_schedule');
const traceBhRun = traceEvent('bh_run');
const traceShutdownRequest = traceEvent('main_loop_shutdown_request');
const traceResetRequest = traceEvent('main_loop_reset_request');
const traceVmstopRequest = traceEvent('main_loop_vmstop_request');

/**
 * A bottom half: a callback that runs on the main thread's event loop soon
 * after it is scheduled, once per scheduling however many times it was
 * scheduled before it ran. Bottom halves scheduled one after another run in
 * that order; one scheduled from its own callback runs again on a later
 * turn. Other threads (vCPUs, migration) get work onto the main thread by
 * posting a message whose handler schedules a bottom half.
 */
export class BottomHalf {
  private handle: NodeJS.Immediate | undefined;

  constructor(
    readonly name: string,
    private readonly fn: () => void | Promise<void>,
    private readonly onError: (err: unknown, bh: BottomHalf) => void = rethrowLater,
  ) {}

  /** Whether it is scheduled and has not run yet. */
  get scheduled(): boolean {
    return this.handle !== undefined;
  }

  /** Schedules one run; does nothing if one is already pending. */
  schedule(): void {
    if (this.handle) return;
    traceBhSchedule.emit({ name: this.name });
    this.handle = setImmediate(() => this.dispatch());
  }

  /** Drops the pending run, if any. */
  cancel(): void {
    if (!this.handle) return;
    clearImmediate(this.handle);
    this.handle = undefined;
  }

  private dispatch(): void {
    this.handle = undefined;
    traceBhRun.emit({ name: this.name });
    try {
      const result = this.fn();
      if (result instanceof Promise) result.catch((err: unknown) => this.onError(err, this));
    } catch (err) {
      this.onError(err, this);
    }
  }
}

function rethrowLater(err: unknown): void {
  // Without a main loop to report to, an error in a bottom half is a crash, as it would be in a timer.
  throw err;
}

/** Why the main loop ended. */
export interface MainLoopExit {
  readonly reason: ShutdownReason;
  /** The signal that asked for the shutdown, if one did. */
  readonly signal?: NodeJS.Signals;
  /** The error that ended the loop, if one did (reason 'host-error'). */
  readonly error?: unknown;
}

/** What `MainLoop` is built from. */
export interface MainLoopOptions {
  readonly lifecycle: VmLifecycle;
  /** -no-shutdown: a guest's shutdown pauses the VM (state shutdown) instead of ending the process. */
  readonly noShutdown?: boolean;
  /** -no-reboot: a guest's reset ends the process instead. */
  readonly noReboot?: boolean;
  /** Where operator messages go ("terminating on signal ..."); stderr by default. */
  readonly log?: (message: string) => void;
  /**
   * Told of every shutdown request as it comes, repeats included, before
   * it is carried out: the CLI arms its exit deadline here.
   */
  readonly onShutdownRequest?: (reason: ShutdownReason, signal?: NodeJS.Signals) => void;
}

/**
 * The main loop (QEMU's qemu_main_loop over Node's event loop): it holds the
 * process open until a shutdown is requested, and carries out shutdown,
 * reset and stop requests in one place, on the main thread, one at a time.
 */
export class MainLoop {
  private readonly lifecycle: VmLifecycle;
  private readonly options: MainLoopOptions;
  private readonly log: (message: string) => void;
  private readonly requestsBh: BottomHalf;
  private shutdownRequest: { reason: ShutdownReason; signal?: NodeJS.Signals } | undefined;
  private resetRequest: ShutdownReason | undefined;
  private vmstopRequest: RunState | undefined;
  private exit: ((exit: MainLoopExit) => void) | undefined;
  private finished: MainLoopExit | undefined;
  private busy = false;

  constructor(options: MainLoopOptions) {
    this.options = options;
    this.lifecycle = options.lifecycle;
    this.log = options.log ?? ((m) => process.stderr.write(`tsvmm: ${m}\n`));
    this.requestsBh = this.newBottomHalf('main_loop_should_exit', () => this.handleRequests());
  }

  /** A bottom half whose errors end the loop with reason 'host-error' (QEMU would abort). */
  newBottomHalf(name: string, fn: () => void | Promise<void>): BottomHalf {
    return new BottomHalf(name, fn, (err) => this.fail(err));
  }

  /**
   * Runs until a shutdown is requested (or a bottom half fails) and says
   * why. While it runs, the process stays alive even with nothing else
   * pending. The VM is not stopped here: `runUntilShutdown` does that.
   */
  run(): Promise<MainLoopExit> {
    if (this.finished) return Promise.resolve(this.finished);
    if (this.exit) throw new Error('MainLoop.run called twice');
    const keepAlive = setInterval(() => {}, 1 << 30);
    return new Promise<MainLoopExit>((resolve) => {
      this.exit = (exit) => {
        clearInterval(keepAlive);
        resolve(exit);
      };
      if (this.shutdownRequest || this.resetRequest || this.vmstopRequest)
        this.requestsBh.schedule();
    });
  }

  /** Asks for the process to end (QEMU's qemu_system_shutdown_request). The first request wins. */
  requestShutdown(reason: ShutdownReason, signal?: NodeJS.Signals): void {
    traceShutdownRequest.emit({ guest: shutdownCausedByGuest(reason), reason });
    this.options.onShutdownRequest?.(reason, signal);
    if (this.shutdownRequest) return;
    this.shutdownRequest = signal ? { reason, signal } : { reason };
    this.requestsBh.schedule();
  }

  /** Asks for a machine reset; under -no-reboot a guest's reset becomes a shutdown. */
  requestReset(reason: ShutdownReason): void {
    traceResetRequest.emit({ guest: shutdownCausedByGuest(reason), reason });
    if (this.options.noReboot && reason !== 'subsystem-reset') {
      this.requestShutdown(reason);
      return;
    }
    this.resetRequest = reason;
    this.requestsBh.schedule();
  }

  /** Asks for the VM to stop into `state` (from a vCPU thread's message, for example). */
  requestVmStop(state: RunState): void {
    traceVmstopRequest.emit({ state });
    this.vmstopRequest = state;
    this.requestsBh.schedule();
  }

  private async handleRequests(): Promise<void> {
    if (this.finished || !this.exit) return;
    const shutdown = this.shutdownRequest;
    const ends = shutdown && !(this.options.noShutdown && shutdownCausedByGuest(shutdown.reason));
    if (shutdown && ends) {
      // Ending never waits for a stop or reset under way: that one may be
      // what is stuck. runUntilShutdown takes the VM down from here.
      if (shutdown.signal) this.log(`terminating on signal ${shutdown.signal}`);
      this.lifecycle.systemShutdown(shutdown.reason);
      this.finish({ ...shutdown });
      return;
    }
    if (this.busy) {
      // A request came in while the last one was being carried out: look again after it.
      return;
    }
    this.busy = true;
    try {
      if (shutdown) {
        // -no-shutdown and the guest asked: the VM stops in state shutdown instead.
        this.lifecycle.systemShutdown(shutdown.reason);
        this.shutdownRequest = undefined;
        await this.lifecycle.vmStop('shutdown');
      }
      const reset = this.resetRequest;
      if (reset !== undefined) {
        this.resetRequest = undefined;
        await this.lifecycle.vmReset(reset);
      }
      const vmstop = this.vmstopRequest;
      if (vmstop !== undefined) {
        this.vmstopRequest = undefined;
        await this.lifecycle.vmStop(vmstop);
      }
    } finally {
      this.busy = false;
    }
    if (this.shutdownRequest || this.resetRequest !== undefined || this.vmstopRequest) {
      this.requestsBh.schedule();
    }
  }

  private fail(err: unknown): void {
    this.log(`internal error, shutting down: ${err instanceof Error ? err.message : String(err)}`);
    this.finish({ reason: 'host-error', error: err });
  }

  private finish(exit: MainLoopExit): void {
    if (this.finished) return;
    this.finished = exit;
    this.exit?.(exit);
  }
}

/** The signals that ask for a clean shutdown. */
export const SHUTDOWN_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

/** Where signals come from: `process`, or an EventEmitter in tests. */
export interface SignalSource {
  on(signal: NodeJS.Signals, listener: (signal: NodeJS.Signals) => void): unknown;
  off(signal: NodeJS.Signals, listener: (signal: NodeJS.Signals) => void): unknown;
}

/**
 * Makes SIGINT, SIGTERM and SIGHUP request a clean shutdown (reason
 * 'host-signal'), as QEMU's termsig handler does, instead of killing the
 * process. Returns a function that removes the handlers.
 */
export function installSignalHandlers(loop: MainLoop, source: SignalSource = process): () => void {
  const onSignal = (signal: NodeJS.Signals) => loop.requestShutdown('host-signal', signal);
  for (const s of SHUTDOWN_SIGNALS) source.on(s, onSignal);
  return () => {
    for (const s of SHUTDOWN_SIGNALS) source.off(s, onSignal);
  };
}

/** What to do after the VM stopped, before the process ends. */
export type Cleanup = () => void | Promise<void>;

/**
 * Runs the main loop to its end, then cleans up the way QEMU's qemu_cleanup
 * does: `vmShutdown` (change-state handlers see running=false, state
 * shutdown; no STOP event), then `cleanup` (stop vCPU threads, close files).
 * Returns the process exit status: 0 for any requested shutdown, 1 if the
 * loop ended on an error or cleanup failed. This is the one place that
 * decides the exit status; the CLI passes it to process.exit.
 */
export async function runUntilShutdown(
  loop: MainLoop,
  lifecycle: VmLifecycle,
  cleanup?: Cleanup,
  log: (message: string) => void = (m) => process.stderr.write(`tsvmm: ${m}\n`),
): Promise<number> {
  const exit = await loop.run();
  let status = exit.error === undefined ? 0 : 1;
  try {
    await lifecycle.vmShutdown();
  } catch (err) {
    log(`stopping the VM failed: ${err instanceof Error ? err.message : String(err)}`);
    status = 1;
  }
  try {
    await cleanup?.();
  } catch (err) {
    log(`cleanup failed: ${err instanceof Error ? err.message : String(err)}`);
    status = 1;
  }
  return status;
}
