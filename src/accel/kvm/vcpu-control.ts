/**
 * The shared-memory protocol between the main thread and one vCPU thread.
 * Each vCPU has a small Int32Array over a SharedArrayBuffer:
 *
 * - DOORBELL: bumped by the main thread on every request (pause, resume,
 *   queued work, exit); a paused vCPU thread waits on it.
 * - REQUEST: what the main thread wants (PAUSE, EXIT bits).
 * - STATE: what the vCPU thread is doing (STARTING, RUNNING, PAUSED, EXITED);
 *   the main thread waits on it to know a pause was acknowledged.
 * - TID: the vCPU thread's kernel thread id, the target of kicks.
 * - PIO_COUNT: port writes to the benchmark port, counted on the vCPU thread.
 * - DONE: bumped by the vCPU thread after each answer to queued work it
 *   posted on its reply port; the main thread can wait on it and take the
 *   answer at once (receiveMessageOnPort), without a trip through its event
 *   loop, as QEMU's run_on_cpu waits on a condition variable.
 */
export const CTL_DOORBELL = 0;
export const CTL_REQUEST = 1;
export const CTL_STATE = 2;
export const CTL_TID = 3;
export const CTL_PIO_COUNT = 4;
export const CTL_DONE = 5;
export const CTL_CELLS = 8;

export const REQUEST_PAUSE = 1;
export const REQUEST_EXIT = 2;

export const STATE_STARTING = 0;
export const STATE_RUNNING = 1;
export const STATE_PAUSED = 2;
export const STATE_EXITED = 3;

/**
 * The signal that kicks a vCPU thread out of KVM_RUN. Blocked on vCPU
 * threads except inside KVM_RUN. Node keeps SIGUSR1 for its inspector.
 */
export const KICK_SIGNAL = 12; // SIGUSR2

/** Work queued for a vCPU thread: a named operation with plain-data argument. */
export interface VcpuWorkRequest {
  id: number;
  op: string;
  arg?: unknown;
}

/** What a vCPU thread posts back to the main thread. */
export type VcpuMessage =
  /** The thread's code is loaded and it waits for its vCPU (vcpu-prestart.ts). */
  | { type: 'loaded' }
  | { type: 'ready'; tid: number }
  | { type: 'done'; id: number; result?: unknown; error?: { code?: string; message: string } }
  | { type: 'guest-shutdown'; reason: 'guest-shutdown' | 'guest-reset' | 'guest-panic' }
  | { type: 'internal-error'; description: string }
  | { type: 'fatal'; message: string };
