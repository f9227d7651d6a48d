import { EventEmitter } from 'node:events';
import { traceEvent } from '../trace/control.js';
import { AsyncMutex } from './async-mutex.js';
import { VmChangeStateNotifiers } from './notifiers.js';
import { type RunState, RunStateMachine } from './runstate.js';

/**
 * What the lifecycle needs from the vCPU layer. The vCPU threads implement
 * it; tests use recording doubles.
 */
export interface CpuController {
  /** How many vCPUs the VM has; they are numbered 0 to count - 1. */
  readonly count: number;
  /**
   * Resolves when every vCPU thread has acknowledged it is out of KVM_RUN and
   * waiting. Pausing paused vCPUs is a no-op (a reset pauses whatever the state).
   */
  pauseAll(): Promise<void>;
  /** Lets every vCPU thread enter KVM_RUN again; a no-op for running vCPUs. */
  resumeAll(): Promise<void>;
  /**
   * Queues the named operation on vCPU `cpu`'s own thread, kicks the thread
   * out of KVM_RUN, and resolves with the operation's result once it ran
   * there. Paused vCPU threads still run queued work.
   */
  runOnCpu(cpu: number, op: string, arg?: unknown): Promise<unknown>;
  /** Like `runOnCpu`, without waiting for the operation to run. */
  asyncRunOnCpu(cpu: number, op: string, arg?: unknown): void;
  /** Brings the registers of every vCPU into the main thread's view (QEMU's cpu_synchronize_all_states). */
  synchronizeState?(): Promise<void>;
}

/** Why the VM shut down or reset (QAPI ShutdownCause). */
export type ShutdownReason =
  | 'none'
  | 'host-error'
  | 'host-qmp-quit'
  | 'host-qmp-system-reset'
  | 'host-signal'
  | 'host-ui'
  | 'guest-shutdown'
  | 'guest-reset'
  | 'guest-panic'
  | 'subsystem-reset'
  | 'snapshot-load';

/** Whether the guest (not the host) caused a shutdown or reset, as QMP reports it in `guest`. */
export function shutdownCausedByGuest(reason: ShutdownReason): boolean {
  return (
    reason === 'guest-shutdown' ||
    reason === 'guest-reset' ||
    reason === 'guest-panic' ||
    reason === 'snapshot-load'
  );
}

/** The data of the QMP SHUTDOWN and RESET events. */
export interface ShutdownEventData {
  readonly guest: boolean;
  readonly reason: ShutdownReason;
}

/** The lifecycle events QMP publishes, with their data. */
export type VmEventMap = {
  STOP: [];
  RESUME: [];
  SHUTDOWN: [ShutdownEventData];
  RESET: [ShutdownEventData];
};

/** The typed event bus of the VM's lifecycle; the QMP monitor listens to it. */
export class VmEvents extends EventEmitter<VmEventMap> {}

/** Resets a device or the machine; awaited in registration order. */
export type ResetHandler = (reason: ShutdownReason) => void | Promise<void>;

/** What `VmLifecycle` is built from; the parts not given are created. */
export interface VmLifecycleOptions {
  readonly cpus: CpuController;
  readonly runstate?: RunStateMachine;
  readonly notifiers?: VmChangeStateNotifiers;
  readonly events?: VmEvents;
}

const traceVmStart = traceEvent('vm_start');
const traceVmStop = traceEvent('vm_stop');
const traceVmReset = traceEvent('vm_reset');
const tracePauseAll = traceEvent('pause_all_vcpus');
const traceResumeAll = traceEvent('resume_all_vcpus');

/**
 * Starts, stops, resets and shuts down the VM (QEMU's system/cpus.c), with
 * its run state, change-state notifiers and event bus.
 *
 * Every public operation holds one FIFO mutex, so operations never overlap:
 * a stop requested while a start is still notifying waits for the start.
 * A change-state handler or reset handler must therefore never call these
 * methods itself (it would wait for itself); schedule a bottom half instead.
 */
export class VmLifecycle {
  readonly runstate: RunStateMachine;
  readonly notifiers: VmChangeStateNotifiers;
  readonly events: VmEvents;
  readonly cpus: CpuController;
  private readonly mutex = new AsyncMutex();
  private readonly resetHandlers: ResetHandler[] = [];

  constructor(options: VmLifecycleOptions) {
    this.cpus = options.cpus;
    this.runstate = options.runstate ?? new RunStateMachine();
    this.notifiers = options.notifiers ?? new VmChangeStateNotifiers();
    this.events = options.events ?? new VmEvents();
  }

  /**
   * Starts the VM: sets `running`, emits RESUME, runs the change-state
   * handlers (so kvmclock is set before any vCPU runs), and only then
   * resumes the vCPUs. Returns false, doing nothing, if it was running.
   */
  vmStart(): Promise<boolean> {
    return this.mutex.run(async () => {
      if (!(await this.prepareStart())) return false;
      await this.resumeAll();
      return true;
    });
  }

  /**
   * The first half of `vmStart`: state `running`, RESUME, handlers; the
   * vCPUs stay paused. Returns false, doing nothing, if it was running.
   */
  vmPrepareStart(): Promise<boolean> {
    return this.mutex.run(() => this.prepareStart());
  }

  /** Stops the VM into `state` and emits STOP; does nothing if it was not running. */
  vmStop(state: RunState): Promise<void> {
    return this.mutex.run(() => this.stop(state, true));
  }

  /**
   * Stops the VM into `state` if it runs; otherwise just moves the run state
   * to `state` (the migration path uses it: postmigrate → finish-migrate).
   */
  vmStopForceState(state: RunState): Promise<void> {
    return this.mutex.run(async () => {
      if (this.runstate.isRunning()) await this.stop(state, true);
      else this.runstate.set(state);
    });
  }

  /**
   * If the VM runs: sets `state`, pauses every vCPU (waiting until each is
   * out of KVM_RUN), runs the change-state handlers with running=false, and
   * emits STOP when `sendStop`. Does nothing otherwise.
   */
  doVmStop(state: RunState, sendStop: boolean): Promise<void> {
    return this.mutex.run(() => this.stop(state, sendStop));
  }

  /** Stops the VM for good as the process ends: state `shutdown`, never a STOP event. */
  vmShutdown(): Promise<void> {
    return this.mutex.run(() => this.stop('shutdown', false));
  }

  /**
   * Emits SHUTDOWN for a shutdown the main loop is carrying out (QEMU's
   * qemu_system_shutdown). The VM itself is stopped later, by `vmShutdown`
   * during cleanup, or by `vmStop('shutdown')` under -no-shutdown.
   */
  systemShutdown(reason: ShutdownReason): void {
    this.events.emit('SHUTDOWN', { guest: shutdownCausedByGuest(reason), reason });
  }

  /** Registers a machine or device reset handler; returns a function that removes it. */
  addResetHandler(handler: ResetHandler): () => void {
    this.resetHandlers.push(handler);
    return () => {
      const at = this.resetHandlers.indexOf(handler);
      if (at >= 0) this.resetHandlers.splice(at, 1);
    };
  }

  /**
   * Resets the machine: pauses the vCPUs, synchronises their state, runs
   * every reset handler, emits RESET (except for subsystem resets), and
   * resumes the vCPUs if the VM runs. A VM that was not running (nor
   * migrating) is left in `prelaunch`, ready for `cont`.
   */
  vmReset(reason: ShutdownReason): Promise<void> {
    return this.mutex.run(async () => {
      const guest = shutdownCausedByGuest(reason);
      traceVmReset.emit({ guest, reason });
      await this.pauseAll();
      await this.cpus.synchronizeState?.();
      for (const handler of [...this.resetHandlers]) await handler(reason);
      if (reason !== 'none' && reason !== 'subsystem-reset') {
        this.events.emit('RESET', { guest, reason });
      }
      if (this.runstate.isRunning()) await this.resumeAll();
      else if (!this.runstate.check('inmigrate') && !this.runstate.check('finish-migrate')) {
        this.runstate.set('prelaunch');
      }
    });
  }

  private async prepareStart(): Promise<boolean> {
    if (this.runstate.isRunning()) return false;
    traceVmStart.emit();
    // Set the state first: if the table forbids the start, nothing is announced.
    this.runstate.set('running');
    this.events.emit('RESUME');
    await this.notifiers.notify(true, 'running');
    return true;
  }

  private async stop(state: RunState, sendStop: boolean): Promise<void> {
    traceVmStop.emit({ state });
    if (!this.runstate.isRunning()) return;
    this.runstate.set(state);
    await this.pauseAll();
    await this.notifiers.notify(false, state);
    if (sendStop) this.events.emit('STOP');
  }

  private async pauseAll(): Promise<void> {
    tracePauseAll.emit({ count: this.cpus.count });
    await this.cpus.pauseAll();
  }

  private async resumeAll(): Promise<void> {
    traceResumeAll.emit({ count: this.cpus.count });
    await this.cpus.resumeAll();
  }
}
