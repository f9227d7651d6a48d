/**
 * The body of one vCPU thread (a worker_thread): QEMU's kvm_vcpu_thread_fn.
 *
 * It owns its vCPU fd, loops on KVM_RUN, serves the exits it can itself
 * (port I/O and MMIO, through hw/vcpu-devices.ts), runs work queued by the
 * main thread (runOnCpu) and parks while the VM is paused. The main thread
 * talks to it through the shared control cells of vcpu-control.ts and a
 * MessagePort; a kick (KICK_SIGNAL, unblocked only inside KVM_RUN) makes
 * KVM_RUN return so the loop looks at its requests.
 */
import { type MessagePort, parentPort, receiveMessageOnPort } from 'node:worker_threads';
import { type VcpuDevicePlan, VcpuDevices } from '../../hw/vcpu-devices.js';
import { installTraceConfig, type TraceConfig, traceEvent } from '../../trace/control.js';
import { TsvmmError } from '../../util/errors.js';
import {
  gettid,
  pthreadSigmask,
  SIG_BLOCK,
  sigsetAdd,
  sigsetDel,
  sigsetEmpty,
  sigtimedwait,
  sysClose,
} from './ffi.js';
import { exitReasonName, KVM_EXIT, KVM_SYSTEM_EVENT } from './ioctls.js';
import { KVM_EXIT_IO_OUT } from './structs/run.js';
import { KvmVcpu } from './vcpu.js';
import {
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
  STATE_RUNNING,
  type VcpuMessage,
  type VcpuWorkRequest,
} from './vcpu-control.js';
import { describeVcpuRegisters, runVcpuOp, type VcpuOpContext } from './vcpu-ops.js';
import { KvmVm } from './vm.js';

/** The first message a vCPU thread gets: the vCPU it runs (its work port transferred with it). */
export interface VcpuThreadInit {
  type: 'init';
  data: VcpuThreadData;
}

/** What the main thread hands a new vCPU thread. */
export interface VcpuThreadData {
  index: number;
  vcpuFd: number;
  vmFd: number;
  runMmapSize: number;
  control: SharedArrayBuffer;
  workPort: MessagePort;
  /** Where the answers to queued work go (then CTL_DONE is bumped). */
  replyPort: MessagePort;
  devices: VcpuDevicePlan;
  trace: TraceConfig;
  /**
   * Fault injection (`-x-vcpu-ignores-kicks`): keep the kick signal blocked
   * inside KVM_RUN too, so a vCPU the guest keeps in the kernel (halted
   * with interrupts off) can no longer be taken out of KVM_RUN: the case
   * the forced exit exists for.
   */
  ignoreKicks?: boolean;
}

const port = parentPort!;
// The thread may be started before its vCPU exists (prestartVcpuWorkers:
// Node's start and the loading of this module overlap with the main
// thread's own start-up), so what it runs comes in its first message.
// Saying it is loaded lets a process that ends before it builds a VM wait
// until no native code runs here (vcpu-prestart.ts says why).
port.postMessage({ type: 'loaded' } satisfies VcpuMessage);
port.once('message', (message: VcpuThreadInit) => runVcpuThread(message.data));

/** The thread's life once its vCPU is named: set-up, the KVM_RUN loop until told to end, clean-up. */
function runVcpuThread(data: VcpuThreadData): void {
  const ctl = new Int32Array(data.control);
  installTraceConfig(data.trace, `vcpu${data.index}`);
  const traceExit = traceEvent('kvm_run_exit');
  const traceWork = traceEvent('process_queued_cpu_work');
  const traceTiming = traceEvent('kvm_run_timing');

  function post(message: VcpuMessage): void {
    port.postMessage(message);
  }

  // The VM fd belongs to the main thread: this handle only issues KVM_IRQ_LINE
  // on it and is never closed here.
  const vm = new KvmVm(data.vmFd);
  let vcpu: KvmVcpu;
  try {
    vcpu = new KvmVcpu(data.vcpuFd, data.runMmapSize, { index: data.index });
  } catch (err) {
    // The fd is this thread's, and a vCPU that failed here is never closed
    // by anyone else: the thread ends with the error (its 'error' event).
    sysClose(data.vcpuFd);
    throw err;
  }
  const run = vcpu.kvmRun;
  const ctx: VcpuOpContext = { vcpu, index: data.index, unpark: () => (parked = false) };
  const devices = new VcpuDevices(data.devices, {
    setIrqLine: (irq, level) => vm.irqLine(irq, level ? 1 : 0),
    countWrite: () => Atomics.add(ctl, CTL_PIO_COUNT, 1),
    unassigned: () => {},
    coalescedRing: (page) => vcpu.coalescedRing(page),
  });

  /** Set when the guest asked for something only the main thread can do (reset, power-off, a failure). */
  let parked = false;

  const kickSet = sigsetEmpty();
  sigsetAdd(kickSet, KICK_SIGNAL);

  function blockKickOutsideKvmRun(): void {
    const previous = sigsetEmpty();
    const err = pthreadSigmask(SIG_BLOCK, kickSet, previous);
    if (err !== 0) throw new TsvmmError('VCPU_SIGMASK', `pthread_sigmask failed: errno ${err}`);
    // Inside KVM_RUN: the thread's usual mask, with the kick let through.
    // Under -x-vcpu-ignores-kicks every signal stays blocked there instead:
    // a process-directed SIGTERM could otherwise land on this thread and
    // interrupt KVM_RUN just as a kick would.
    if (data.ignoreKicks) previous.fill(0xff);
    else sigsetDel(previous, KICK_SIGNAL);
    vcpu.setSignalMask(previous);
  }

  /** Takes a pending kick so it does not cut short the next KVM_RUN. */
  function eatKick(): void {
    while (sigtimedwait(kickSet, 0) === KICK_SIGNAL) {
      // drained one; loop in case of several
    }
  }

  function drainWork(): void {
    for (;;) {
      const received = receiveMessageOnPort(data.workPort);
      if (!received) return;
      const request = received.message as VcpuWorkRequest;
      traceWork.emit({ cpu: data.index, op: request.op });
      try {
        const result = runVcpuOp(ctx, request.op, request.arg);
        answer({ type: 'done', id: request.id, result });
      } catch (err) {
        const e = err as { code?: string; message?: string };
        answer({
          type: 'done',
          id: request.id,
          error: { code: e.code, message: e.message ?? String(err) },
        });
      }
    }
  }

  /** Answers queued work on the reply port and wakes a main thread waiting for it. */
  function answer(message: VcpuMessage): void {
    data.replyPort.postMessage(message);
    Atomics.add(ctl, CTL_DONE, 1);
    Atomics.notify(ctl, CTL_DONE);
  }

  function park(message: VcpuMessage): void {
    parked = true;
    post(message);
  }

  function handleExit(reason: number): void {
    switch (reason) {
      case KVM_EXIT.IO: {
        const isWrite = run.ioDirection === KVM_EXIT_IO_OUT;
        devices.portIo(run.ioPort, run.ioSize, run.ioCount, isWrite, run.ioData());
        return;
      }
      case KVM_EXIT.MMIO: {
        const m = run.mmio();
        devices.mmio(m.physAddr, m.len, m.isWrite, m.data);
        return;
      }
      case KVM_EXIT.INTR:
        eatKick();
        return;
      case KVM_EXIT.HLT:
        // Only without an in-kernel irqchip; wait for a request a moment, then run again.
        Atomics.wait(ctl, CTL_DOORBELL, Atomics.load(ctl, CTL_DOORBELL), 1);
        return;
      case KVM_EXIT.SHUTDOWN:
        // A triple fault: a PC resets.
        park({ type: 'guest-shutdown', reason: 'guest-reset' });
        return;
      case KVM_EXIT.SYSTEM_EVENT: {
        const type = run.systemEvent().type;
        const cause =
          type === KVM_SYSTEM_EVENT.RESET
            ? 'guest-reset'
            : type === KVM_SYSTEM_EVENT.CRASH
              ? 'guest-panic'
              : 'guest-shutdown';
        park({ type: 'guest-shutdown', reason: cause });
        return;
      }
      case KVM_EXIT.INTERNAL_ERROR: {
        const ie = run.internalError();
        park({
          type: 'internal-error',
          // As QEMU prints it: the suberror, then each data word KVM gave
          // (for an emulation failure: flags, then the instruction's length
          // and bytes, which say what KVM's emulator could not run).
          description: `KVM internal error. Suberror: ${ie.suberror}\n${ie.data
            .map((d, i) => `extra data[${i}]: 0x${d.toString(16).padStart(16, '0')}\n`)
            .join('')}${describeVcpuRegisters(vcpu)}`,
        });
        return;
      }
      case KVM_EXIT.FAIL_ENTRY: {
        const fe = run.failEntry();
        park({
          type: 'internal-error',
          description: `KVM_EXIT_FAIL_ENTRY, hardware entry failure reason 0x${fe.hardwareEntryFailureReason.toString(16)}\n${describeVcpuRegisters(vcpu)}`,
        });
        return;
      }
      case KVM_EXIT.IRQ_WINDOW_OPEN:
        return;
      default:
        park({
          type: 'internal-error',
          description: `unhandled KVM exit ${exitReasonName(reason)} (${reason})\n${describeVcpuRegisters(vcpu)}`,
        });
    }
  }

  function loop(): void {
    /** When the last KVM_RUN returned (performance.now() ms) if it was timed, for kvm_run_timing's out_us. */
    let lastReturn: number | undefined;
    for (;;) {
      const bell = Atomics.load(ctl, CTL_DOORBELL);
      drainWork();
      const request = Atomics.load(ctl, CTL_REQUEST);
      if (request & REQUEST_EXIT) return;
      if (request & REQUEST_PAUSE || parked) {
        if (request & REQUEST_PAUSE && Atomics.load(ctl, CTL_STATE) !== STATE_PAUSED) {
          Atomics.store(ctl, CTL_STATE, STATE_PAUSED);
          Atomics.notify(ctl, CTL_STATE);
        }
        Atomics.wait(ctl, CTL_DOORBELL, bell);
        continue;
      }
      if (Atomics.load(ctl, CTL_STATE) !== STATE_RUNNING)
        Atomics.store(ctl, CTL_STATE, STATE_RUNNING);
      const timing = traceTiming.enabled;
      const entered = timing ? performance.now() : 0;
      let reason = vcpu.run();
      // -x-vcpu-ignores-kicks: the blocked mask keeps KVM_RUN from returning
      // on a kick where KVM honours it; PVM returns EINTR anyway, so go
      // straight back in, as a vCPU stuck in the kernel would (until the
      // forced exit ends the process).
      while (data.ignoreKicks && reason === KVM_EXIT.INTR) {
        eatKick();
        reason = vcpu.run();
      }
      if (timing) {
        const returned = performance.now();
        traceTiming.emit({
          cpu: data.index,
          reason: exitReasonName(reason),
          run_us: Math.round((returned - entered) * 1000),
          // -1: the previous KVM_RUN was not timed (the event was just turned on).
          out_us: lastReturn === undefined ? -1 : Math.round((entered - lastReturn) * 1000),
        });
        lastReturn = returned;
      } else {
        lastReturn = undefined;
      }
      if (traceExit.enabled) traceExit.emit({ cpu: data.index, reason: exitReasonName(reason) });
      // Writes KVM queued while the guest ran come before whatever this exit is.
      devices.flushCoalesced();
      handleExit(reason);
    }
  }

  try {
    blockKickOutsideKvmRun();
    Atomics.store(ctl, CTL_TID, gettid());
    post({ type: 'ready', tid: gettid() });
    loop();
  } catch (err) {
    post({ type: 'fatal', message: (err as Error).message ?? String(err) });
    // This thread is out of KVM_RUN for good: say so, or a pause (the stop
    // into internal-error that the failure brings, or the shutdown's) would
    // wait for it forever.
    Atomics.store(ctl, CTL_STATE, STATE_PAUSED);
    Atomics.notify(ctl, CTL_STATE);
    // Wait for the main thread to ask us to end: it owns the decision.
    while (!(Atomics.load(ctl, CTL_REQUEST) & REQUEST_EXIT)) {
      const bell = Atomics.load(ctl, CTL_DOORBELL);
      drainWork();
      Atomics.wait(ctl, CTL_DOORBELL, bell, 100);
    }
  } finally {
    vcpu.close();
    data.workPort.close();
    Atomics.store(ctl, CTL_STATE, STATE_EXITED);
    Atomics.notify(ctl, CTL_STATE);
  }
}
