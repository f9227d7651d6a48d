/**
 * The main thread's side of the vCPU threads: creates one worker per vCPU,
 * pauses and resumes them, queues work on them and ends them. Implements
 * the lifecycle's CpuController (system/cpus.ts).
 *
 * Every vCPU thread starts paused, as QEMU's do until vm_start. Ending
 * never hangs: each thread is asked to exit and kicked out of KVM_RUN, and
 * returns by itself (worker.terminate() would hang inside KVM_RUN).
 */
import { MessageChannel, receiveMessageOnPort, type Worker } from 'node:worker_threads';
import type { VcpuDevicePlan } from '../../hw/vcpu-devices.js';
import type { CpuController } from '../../system/cpus.js';
import { currentTraceConfig, traceEvent } from '../../trace/control.js';
import { TsvmmError } from '../../util/errors.js';
import { getpid, ignoreSignal, tgkill } from './ffi.js';
import {
  CTL_CELLS,
  CTL_DONE,
  CTL_DOORBELL,
  CTL_PIO_COUNT,
  CTL_REQUEST,
  CTL_STATE,
  CTL_TID,
  KICK_SIGNAL,
  REQUEST_EXIT,
  REQUEST_PAUSE,
  STATE_EXITED,
  STATE_PAUSED,
  type VcpuMessage,
  type VcpuWorkRequest,
} from './vcpu-control.js';
import { takeVcpuWorker } from './vcpu-prestart.js';
import type { VcpuThreadData, VcpuThreadInit } from './vcpu-thread.js';
import type { KvmVm } from './vm.js';

/** A failure reported by a vCPU thread, or an operation that failed there. */
export class VcpuError extends TsvmmError {}

/** What the guest asked for through a vCPU: only the main thread can act on it. */
export type GuestRequest =
  | {
      type: 'guest-shutdown';
      cpu: number;
      reason: 'guest-shutdown' | 'guest-reset' | 'guest-panic';
    }
  | { type: 'internal-error'; cpu: number; description: string }
  | { type: 'fatal'; cpu: number; message: string };

export interface VcpuThreadsOptions {
  vm: KvmVm;
  count: number;
  runMmapSize: number;
  devices: VcpuDevicePlan;
  onGuestRequest: (request: GuestRequest) => void;
  /** Fault injection: the threads ignore kicks inside KVM_RUN (see VcpuThreadData.ignoreKicks). */
  ignoreKicks?: boolean;
}

interface Pending {
  resolve(value: unknown): void;
  reject(err: Error): void;
}

/**
 * How long the main thread blocks for an answer from a vCPU thread (to
 * queued work, or the acknowledgement of a pause) before it goes on waiting
 * through its event loop. A vCPU thread out of KVM_RUN answers in
 * microseconds; waiting here, as QEMU's main loop waits on a condition
 * variable, saves the event-loop round trip (milliseconds on a busy host).
 * The bound keeps a thread that ignores kicks from holding the main thread.
 */
const SYNC_WAIT_MS = 20;

class VcpuThread {
  readonly ctl = new Int32Array(new SharedArrayBuffer(CTL_CELLS * 4));
  readonly worker: Worker;
  readonly port: MessageChannel['port1'];
  /** The answers to queued work: taken at once by `settle`, or as events. */
  readonly replies: MessageChannel['port1'];
  readonly exited: Promise<void>;
  readonly ready: Promise<void>;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  constructor(
    readonly index: number,
    /** The vCPU fd: its thread owns it and closes it when it ends. */
    readonly vcpuFd: number,
    options: VcpuThreadsOptions,
  ) {
    const channel = new MessageChannel();
    this.port = channel.port1;
    const replyChannel = new MessageChannel();
    this.replies = replyChannel.port1;
    this.replies.on('message', (message: VcpuMessage) => this.onReply(message));
    // The worker keeps the process alive while it runs; its answers need not.
    this.replies.unref();
    this.ctl[CTL_REQUEST] = REQUEST_PAUSE;
    const data: VcpuThreadData = {
      index,
      vcpuFd,
      vmFd: options.vm.fd,
      runMmapSize: options.runMmapSize,
      control: this.ctl.buffer as SharedArrayBuffer,
      workPort: channel.port2,
      replyPort: replyChannel.port2,
      devices: options.devices,
      trace: currentTraceConfig(),
      ...(options.ignoreKicks ? { ignoreKicks: true } : {}),
    };
    this.worker = takeVcpuWorker(index);
    const init: VcpuThreadInit = { type: 'init', data };
    this.worker.postMessage(init, [channel.port2, replyChannel.port2]);
    let readyResolve!: () => void;
    let readyReject!: (err: Error) => void;
    this.ready = new Promise((resolve, reject) => {
      readyResolve = resolve;
      readyReject = reject;
    });
    // Looked at by `started()`, which may come after a failure is known.
    this.ready.catch(() => {});
    this.worker.on('message', (message: VcpuMessage) => {
      switch (message.type) {
        case 'loaded':
          return;
        case 'ready':
          readyResolve();
          return;
        case 'done':
          this.onReply(message);
          return;
        case 'fatal':
          readyReject(new VcpuError('VCPU_THREAD_FAILED', `vCPU ${index}: ${message.message}`));
          options.onGuestRequest({ ...message, cpu: index });
          return;
        default:
          options.onGuestRequest({ ...message, cpu: index });
      }
    });
    this.exited = new Promise((resolve) => {
      this.worker.once('exit', () => {
        for (const p of this.pending.values()) {
          p.reject(new VcpuError('VCPU_EXITED', `vCPU ${index} thread ended`));
        }
        this.pending.clear();
        readyReject(new VcpuError('VCPU_EXITED', `vCPU ${index} thread ended before it was ready`));
        resolve();
      });
    });
    this.worker.on('error', (err) => {
      options.onGuestRequest({ type: 'fatal', cpu: index, message: err.message });
    });
  }

  ring(): void {
    Atomics.add(this.ctl, CTL_DOORBELL, 1);
    Atomics.notify(this.ctl, CTL_DOORBELL);
  }

  /**
   * The thread's kernel id, once it has stored it: read from the control
   * cells rather than its 'ready' message, which the event loop delivers
   * only after the main thread's current task.
   */
  get liveTid(): number {
    return Atomics.load(this.ctl, CTL_TID);
  }

  kick(): void {
    const tid = this.liveTid;
    if (tid > 0 && Atomics.load(this.ctl, CTL_STATE) !== STATE_EXITED) {
      tgkill(getpid(), tid, KICK_SIGNAL);
    }
  }

  queue(op: string, arg: unknown, wait: boolean, block = wait): Promise<unknown> {
    const id = this.nextId++;
    const request: VcpuWorkRequest = { id, op, arg };
    const done = wait
      ? new Promise<unknown>((resolve, reject) => this.pending.set(id, { resolve, reject }))
      : Promise.resolve(undefined);
    this.port.postMessage(request);
    this.ring();
    this.kick();
    // A thread still starting (its Node and code loading) would hold the
    // main thread for the whole budget: its answer comes as an event then.
    if (block && this.liveTid > 0) this.settle(SYNC_WAIT_MS);
    return done;
  }

  /**
   * Takes the answers the vCPU thread has posted, blocking up to `budgetMs`
   * while work is pending. What is not answered by then arrives later as
   * an event on the reply port.
   */
  settle(budgetMs: number): void {
    const deadline = performance.now() + budgetMs;
    for (;;) {
      // Read the counter before taking answers: a bump after it wakes the wait.
      const seen = Atomics.load(this.ctl, CTL_DONE);
      for (;;) {
        const received = receiveMessageOnPort(this.replies);
        if (!received) break;
        this.onReply(received.message as VcpuMessage);
      }
      if (this.pending.size === 0) return;
      if (Atomics.load(this.ctl, CTL_STATE) === STATE_EXITED) return;
      const left = deadline - performance.now();
      if (left <= 0) return;
      Atomics.wait(this.ctl, CTL_DONE, seen, left);
    }
  }

  /**
   * Blocks up to `budgetMs` until the thread has acknowledged a pause (or
   * ended). Returns whether it has.
   */
  waitPausedSync(budgetMs: number): boolean {
    const deadline = performance.now() + budgetMs;
    for (;;) {
      const state = Atomics.load(this.ctl, CTL_STATE);
      if (state === STATE_PAUSED || state === STATE_EXITED) return true;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      Atomics.wait(this.ctl, CTL_STATE, state, left);
    }
  }

  private onReply(message: VcpuMessage): void {
    if (message.type !== 'done') return;
    const p = this.pending.get(message.id);
    this.pending.delete(message.id);
    if (!p) return;
    if (message.error) {
      p.reject(new VcpuError(message.error.code ?? 'VCPU_OP_FAILED', message.error.message));
    } else p.resolve(message.result);
  }

  async waitPaused(): Promise<void> {
    for (;;) {
      const state = Atomics.load(this.ctl, CTL_STATE);
      if (state === STATE_PAUSED || state === STATE_EXITED) return;
      await waitAsync(this.ctl, CTL_STATE, state, 100);
    }
  }
}

/** Atomics.waitAsync, typed here because the ES2022 lib lacks it. */
function waitAsync(
  cells: Int32Array,
  index: number,
  value: number,
  timeoutMs: number,
): Promise<unknown> {
  const wa = (
    Atomics as unknown as {
      waitAsync(
        a: Int32Array,
        i: number,
        v: number,
        t: number,
      ): { async: boolean; value: Promise<string> | string };
    }
  ).waitAsync(cells, index, value, timeoutMs);
  return wa.async ? (wa.value as Promise<string>) : Promise.resolve(wa.value);
}

const traceKick = traceEvent('kvm_vcpu_kick');
const tracePause = traceEvent('pause_all_vcpus');
const traceResume = traceEvent('resume_all_vcpus');
const traceRunOnCpu = traceEvent('run_on_cpu');
const traceAsyncRunOnCpu = traceEvent('async_run_on_cpu');

let kickSignalIgnored = false;

/** All vCPU threads of one VM. */
export class VcpuThreads implements CpuController {
  /**
   * Node ends its workers when the process exits (process.exit, an
   * uncaught exception), and waits for each: one inside KVM_RUN would make
   * that wait forever. So on the way out, every thread is told to end and
   * kicked out of KVM_RUN first.
   */
  private readonly onProcessExit = () => this.requestExit();

  private constructor(private readonly threads: VcpuThread[]) {
    process.on('exit', this.onProcessExit);
  }

  /**
   * Creates the vCPUs (KVM_CREATE_VCPU) and hands each to its thread,
   * without waiting for the threads: work queued now (runOnCpu) runs once
   * each thread is up, and the caller goes on with what needs no vCPU (the
   * guest's load) meanwhile. `started()` says when every thread is ready
   * and paused; the caller ends them (`end()`) if that fails.
   */
  static launch(options: VcpuThreadsOptions): VcpuThreads {
    if (!kickSignalIgnored) {
      // A stray process-wide kick must not end Node; threads block it anyway.
      ignoreSignal(KICK_SIGNAL);
      kickSignalIgnored = true;
    }
    const threads: VcpuThread[] = [];
    const all = new VcpuThreads(threads);
    try {
      for (let i = 0; i < options.count; i++) {
        const fd = options.vm.createVcpu(i);
        threads.push(new VcpuThread(i, fd, options));
      }
    } catch (err) {
      // The threads made so far end once told to; nobody waits for them here.
      all.end().catch(() => {});
      throw err;
    }
    return all;
  }

  /** Settles when every thread is ready and paused; rejects if one failed to start. */
  async started(): Promise<void> {
    await Promise.all(this.threads.map((t) => t.ready));
    await Promise.all(this.threads.map((t) => t.waitPaused()));
  }

  get count(): number {
    return this.threads.length;
  }

  /**
   * vCPU `index`'s fd, to map a page the VM shares through every vCPU fd
   * (the coalesced ring) while the threads run. The thread owns the fd:
   * never close it or issue ioctls on it from here.
   */
  vcpuFd(index: number): number {
    const t = this.threads[index];
    if (!t) throw new RangeError(`no vCPU ${index}`);
    return t.vcpuFd;
  }

  /** Kernel thread ids of the vCPU threads, by index (query-cpus-fast's thread-id). */
  get threadIds(): number[] {
    return this.threads.map((t) => t.liveTid);
  }

  /** Writes the guest made to the counting port, summed over vCPUs (the exit-rate benchmark). */
  countedWrites(): number {
    return this.threads.reduce((sum, t) => sum + Atomics.load(t.ctl, CTL_PIO_COUNT), 0);
  }

  async pauseAll(): Promise<void> {
    tracePause.emit({ count: this.threads.length });
    for (const t of this.threads) {
      Atomics.or(t.ctl, CTL_REQUEST, REQUEST_PAUSE);
      t.ring();
      traceKick.emit({ cpu: t.index });
      t.kick();
    }
    // Threads out of KVM_RUN acknowledge within microseconds: wait for that
    // here (as QEMU's pause_all_vcpus does), and through the event loop only
    // for a thread that takes longer.
    const deadline = performance.now() + SYNC_WAIT_MS;
    const late = this.threads.filter(
      (t) => !t.waitPausedSync(Math.max(0, deadline - performance.now())),
    );
    if (late.length > 0) await Promise.all(late.map((t) => t.waitPaused()));
  }

  async resumeAll(): Promise<void> {
    traceResume.emit({ count: this.threads.length });
    for (const t of this.threads) {
      Atomics.and(t.ctl, CTL_REQUEST, ~REQUEST_PAUSE);
      t.ring();
    }
  }

  runOnCpu(cpu: number, op: string, arg?: unknown): Promise<unknown> {
    traceRunOnCpu.emit({ cpu, op });
    return this.thread(cpu).queue(op, arg, true);
  }

  /**
   * `runOnCpu` without the main thread's blocking wait for the answer: it
   * comes through the event loop. For work queued ahead of what the main
   * thread does meanwhile (a vCPU's set-up while the guest is loaded).
   */
  queueOnCpu(cpu: number, op: string, arg?: unknown): Promise<unknown> {
    traceRunOnCpu.emit({ cpu, op });
    return this.thread(cpu).queue(op, arg, true, false);
  }

  asyncRunOnCpu(cpu: number, op: string, arg?: unknown): void {
    traceAsyncRunOnCpu.emit({ cpu, op });
    void this.thread(cpu).queue(op, arg, false);
  }

  /**
   * Tells every thread to end and kicks it out of KVM_RUN, without waiting:
   * synchronous, for the exit paths that cannot wait (see end()).
   */
  requestExit(): void {
    for (const t of this.threads) {
      Atomics.or(t.ctl, CTL_REQUEST, REQUEST_EXIT);
      t.ring();
      t.kick();
    }
  }

  /** Whether every thread has ended (or reported it is about to). */
  get allExited(): boolean {
    return this.threads.every((t) => Atomics.load(t.ctl, CTL_STATE) === STATE_EXITED);
  }

  /** Asks every thread to end, kicks it out of KVM_RUN, and waits until all have ended. */
  async end(): Promise<void> {
    this.requestExit();
    // A thread inside a long KVM_RUN may have taken the first kick before
    // seeing the request; kick again until every thread is gone.
    const timer = setInterval(() => {
      for (const t of this.threads) t.kick();
    }, 20);
    try {
      await Promise.all(this.threads.map((t) => t.exited));
    } finally {
      clearInterval(timer);
      for (const t of this.threads) {
        t.port.close();
        t.replies.close();
      }
      process.off('exit', this.onProcessExit);
    }
  }

  private thread(cpu: number): VcpuThread {
    const t = this.threads[cpu];
    if (!t)
      throw new VcpuError(
        'VCPU_NO_SUCH_CPU',
        `there is no vCPU ${cpu} (the VM has ${this.threads.length})`,
      );
    return t;
  }
}
