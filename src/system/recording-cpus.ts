import type { CpuController } from './cpus.js';

/**
 * A test double of the vCPU layer for unit tests of our sequencing (not a
 * KVM stand-in): it records each call into a shared log, tracks whether the
 * vCPUs would be paused, and runs named operations from a table on the
 * calling thread, as if on the vCPU's own.
 */
export class RecordingCpus implements CpuController {
  /** Whether the vCPUs are paused (they start paused, as at prelaunch). */
  paused = true;
  readonly ops = new Map<string, (cpu: number, arg: unknown) => unknown>();

  constructor(
    readonly count: number,
    readonly log: string[] = [],
  ) {}

  async pauseAll(): Promise<void> {
    this.log.push('pauseAll');
    // A real pause waits for every thread's acknowledgement: yield once like one.
    await new Promise((r) => setImmediate(r));
    this.paused = true;
  }

  async resumeAll(): Promise<void> {
    this.log.push('resumeAll');
    this.paused = false;
  }

  async runOnCpu(cpu: number, op: string, arg?: unknown): Promise<unknown> {
    this.log.push(`runOnCpu ${cpu} ${op}`);
    await new Promise((r) => setImmediate(r));
    return this.ops.get(op)?.(cpu, arg);
  }

  asyncRunOnCpu(cpu: number, op: string, arg?: unknown): void {
    this.log.push(`asyncRunOnCpu ${cpu} ${op}`);
    setImmediate(() => this.ops.get(op)?.(cpu, arg));
  }

  async synchronizeState(): Promise<void> {
    this.log.push('synchronizeState');
  }
}
