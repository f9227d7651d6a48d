/**
 * vCPU threads started before their VM exists. A Node worker takes a good
 * part of tsvmm's start-up to come up (a new V8 isolate, Node's own
 * bootstrap, then its bundle and koffi loaded into it), and on the main
 * thread the same time goes into loading tsvmm and setting up KVM. Starting
 * the workers first lets both run at once: each one loads its code and
 * then waits for the message that names its vCPU (vcpu-thread.ts).
 *
 * This module imports nothing of tsvmm's but the path helper, so the entry
 * point can call it before it loads the rest.
 */
import { Worker, type WorkerOptions } from 'node:worker_threads';
import { distUrl } from '../../util/dist-path.js';

/** The vCPU thread's script. */
export const VCPU_THREAD_URL = distUrl('accel/kvm/vcpu-thread.cjs');

interface Prestarted {
  worker: Worker;
  /** Set if the worker ended (or failed to load) before it was taken. */
  ended: boolean;
  /** Settles once the worker has loaded its code, or ended. */
  settled: Promise<void>;
}

const pool: Prestarted[] = [];

/**
 * V8's young generation of a vCPU thread, in MB: 3 is V8's smallest (two
 * 1 MiB semi-spaces and the new large-object space, on x64 without pointer
 * compression). By default it grows to 2 MiB semi-spaces once the exit loop
 * has allocated a while: about 1.3 MB more per vCPU thread, measured on a
 * PVM-backed host (4 vCPUs, idle probe OS: 61.1 MB anonymous, 55.8 MB with
 * this limit), while the port-I/O exit rate did not move beyond the
 * noise: a scavenge costs what is live, and little lives between exits.
 */
export const VCPU_YOUNG_GENERATION_MB = 3;

/** How every vCPU worker is started. */
function vcpuWorkerOptions(index: number): WorkerOptions {
  return {
    name: `vcpu${index}`,
    resourceLimits: { maxYoungGenerationSizeMb: VCPU_YOUNG_GENERATION_MB },
  };
}

/**
 * Starts `count` vCPU worker threads that wait for their vCPU. They do not
 * keep the process alive: a run that ends before it builds a VM (a usage
 * error, no /dev/kvm) exits as if they were not there.
 */
export function prestartVcpuWorkers(count: number): void {
  for (let i = 0; i < count; i++) {
    const index = pool.length;
    const worker = new Worker(VCPU_THREAD_URL, vcpuWorkerOptions(index));
    worker.unref();
    let settle!: () => void;
    const entry: Prestarted = {
      worker,
      ended: false,
      settled: new Promise((resolve) => {
        settle = resolve;
      }),
    };
    worker.once('message', settle);
    // A failure is reported when a VM asks for the thread: it then starts
    // a fresh one, which fails the same way in full view.
    worker.once('error', () => {
      entry.ended = true;
      settle();
    });
    worker.once('exit', () => {
      entry.ended = true;
      settle();
    });
    pool.push(entry);
  }
}

/**
 * A vCPU worker to hand its first message to: a prestarted one if one is
 * left (it keeps the process alive from now on), else a new one.
 */
export function takeVcpuWorker(index: number): Worker {
  for (;;) {
    const entry = pool.shift();
    if (!entry) return new Worker(VCPU_THREAD_URL, vcpuWorkerOptions(index));
    if (entry.ended) continue;
    entry.worker.removeAllListeners('message');
    entry.worker.removeAllListeners('error');
    entry.worker.removeAllListeners('exit');
    entry.worker.ref();
    return entry.worker;
  }
}

/**
 * How many vCPUs a command line asks for, read without the option parser
 * (which the entry point has not loaded yet): `-smp N`, `-smp cpus=N,...`,
 * `--smp=N`. 0 where the run builds no VM (`-help`, `-version`, a `help`
 * argument). A wrong guess only costs time: the real count comes from the
 * parser, and missing threads are started then, extra ones never used.
 */
export function vcpuCountHint(argv: readonly string[]): number {
  let count = 1;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (/^--?(h|help|version)$/.test(arg) || arg === 'help' || arg === '?') return 0;
    let value: string | undefined;
    const inline = /^--?smp=(.*)$/.exec(arg);
    if (inline) value = inline[1];
    else if (/^--?smp$/.test(arg)) value = argv[i + 1];
    if (value === undefined) continue;
    const m = /^(?:cpus=)?(\d+)/.exec(value) ?? /(?:^|,)cpus=(\d+)/.exec(value);
    if (m) count = Number(m[1]);
  }
  return Math.max(1, Math.min(count, 64));
}

/**
 * Waits, at most `timeoutMs`, until no prestarted worker that was never
 * taken is still loading. The process must not end before: ending it
 * terminates the workers, and one terminated inside koffi's set-up aborts
 * the whole process (koffi's napi_throw is fatal once the thread is being
 * torn down: seen as exit status 134 and a native stack after a usage
 * error, in about 1 run in 150 on a loaded 2-core host). False if the
 * bound passed first.
 */
export async function prestartedWorkersSettled(timeoutMs: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<false>((resolve) => {
    timer = setTimeout(resolve, timeoutMs, false);
  });
  const settled = Promise.all(pool.map((e) => e.settled)).then(() => true as const);
  try {
    return await Promise.race([settled, deadline]);
  } finally {
    clearTimeout(timer);
  }
}
