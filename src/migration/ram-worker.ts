/**
 * The main thread's side of the migration thread (migration-worker.ts):
 * {@link WorkerStreamWriter} has the interface of MigrationStreamWriter
 * (begin, sendRam, complete, stats) but the writer, and so the running
 * offsets and checksums of the stream, live in the worker, which reads
 * guest RAM through the slots' host addresses. The worker sends each
 * chunk of the stream here, where it goes to the channel's sink (its
 * bandwidth limit, cancel and errors stay as they are), and is answered.
 * The header (before the worker is ready) and the completion (with the VM
 * stopped) are written from here, each going on from where the other
 * side left the stream (StreamResumePoint). The stream is byte for byte
 * the one MigrationStreamWriter writes here.
 */
import { Worker } from 'node:worker_threads';
import { currentTraceConfig, type TraceConfig } from '../trace/control.js';
import { distUrl } from '../util/dist-path.js';
import type { NativeRamLayout } from './guest-memory-ram.js';
import type { ByteSink } from './qemu-file.js';
import type { RamAccessor, RamPageSelection } from './ram.js';
import {
  type DeviceSection,
  MigrationStreamWriter,
  type StreamResumePoint,
  type StreamStats,
} from './stream.js';

/** The worker's workerData: plain data only. */
export interface MigrationWorkerData {
  readonly trace: TraceConfig;
  readonly machineType: string;
  readonly vcpus: number;
  readonly ram: NativeRamLayout;
  readonly devices: readonly { idstr: string; instanceId: number; version: number }[];
  readonly chunkPages?: number;
}

/** A page selection as sent to the worker. */
export interface WireSelection {
  readonly block: string;
  readonly pages: Float64Array;
}

/** A command to the worker; each is answered by one `done` or `error`. */
export type WorkerCommand =
  | { op: 'begin'; seq: number; resume: StreamResumePoint }
  | { op: 'sendRam'; seq: number; selection?: WireSelection[] };

/** Messages to the worker. */
export type ToWorker =
  | WorkerCommand
  | { op: 'ack'; id: number; buffer?: ArrayBuffer }
  | { op: 'nack'; id: number; message: string };

/** Messages from the worker. */
export type ToMain =
  | { type: 'write'; id: number; buf: Uint8Array; stats: StreamStats }
  | { type: 'done'; seq: number; stats: StreamStats; resume: StreamResumePoint }
  | { type: 'error'; seq: number; message: string; stats: StreamStats };

/** Options of {@link WorkerStreamWriter}. */
export interface WorkerStreamWriterOptions {
  readonly sink: ByteSink;
  readonly machineType: string;
  readonly vcpus: number;
  readonly ram: NativeRamLayout;
  /**
   * The same RAM on this thread: the stream's header (block names and
   * sizes) is written from here, without waiting for the thread.
   */
  readonly ramHere: RamAccessor;
  readonly devices: readonly DeviceSection[];
  readonly chunkPages?: number;
}

const WORKER_URL = distUrl('migration/migration-worker.cjs');

/**
 * At most this many pages left dirty at the stop are sent from this thread
 * with the completion (1 MiB: well under a millisecond to read and encode);
 * more go through the worker first, as a pass, so the main loop does not
 * stall on them. Below it the stopped VM saves two round trips to the
 * worker (the command, then the answer after the write's own round trip):
 * 2-8 ms on a loaded PVM host, most of the downtime that was left.
 */
const COMPLETION_PAGES_HERE = 256;

function countPages(sel: readonly RamPageSelection[] | undefined): number {
  let n = 0;
  for (const s of sel ?? []) for (const _ of s.pages) n++;
  return n;
}

function toWire(sel: readonly RamPageSelection[] | undefined): WireSelection[] | undefined {
  return sel?.map((s) => ({ block: s.block, pages: Float64Array.from(s.pages) }));
}

function buffersOf(sel: WireSelection[] | undefined): ArrayBuffer[] {
  return (sel ?? []).map((s) => s.pages.buffer as ArrayBuffer);
}

/**
 * A MigrationStreamWriter on the migration thread. Call `close()` in every
 * case (success, failure, cancel): it ends the thread.
 */
export class WorkerStreamWriter {
  private readonly worker: Worker;
  private seq = 0;
  private readonly pending = new Map<
    number,
    { resolve: (s: StreamStats) => void; reject: (e: unknown) => void }
  >();
  private last: StreamStats = { bytes: 0, normalPages: 0, zeroPages: 0 };
  /** Where the worker left the stream at its last answer (each pass ends flushed). */
  private resume: StreamResumePoint | undefined;
  /** The completion's writer, once it runs here. */
  private tail: MigrationStreamWriter | undefined;
  private sinkFailed = false;
  private sinkError: unknown;
  private gone: Error | undefined;
  private readonly exited: Promise<void>;
  /** The thread's answer to `begin`: it has started and goes on from the header. */
  private started: Promise<StreamStats> | undefined;

  constructor(private readonly opts: WorkerStreamWriterOptions) {
    const data: MigrationWorkerData = {
      trace: currentTraceConfig(),
      machineType: opts.machineType,
      vcpus: opts.vcpus,
      ram: opts.ram,
      devices: opts.devices.map((d) => ({
        idstr: d.idstr,
        instanceId: d.instanceId,
        version: d.vmsd.version,
      })),
      ...(opts.chunkPages !== undefined ? { chunkPages: opts.chunkPages } : {}),
    };
    this.worker = new Worker(WORKER_URL, { workerData: data, name: 'migration' });
    this.worker.on('message', (m: ToMain) => this.onMessage(m));
    this.worker.on('error', (err) => this.end(err));
    this.exited = new Promise<void>((resolve) => {
      this.worker.once('exit', (code) => {
        this.end(new Error(`the migration thread exited (code ${code})`));
        resolve();
      });
    });
  }

  /** Bytes and pages so far, as of the worker's last message or the completion here. */
  get stats(): StreamStats {
    return this.tail?.stats ?? this.last;
  }

  /**
   * The header, the configuration and the RAM block list, written from this
   * thread: they need no guest RAM, so the first bytes go out while the
   * migration thread is still starting (a new isolate, its modules: tens
   * of milliseconds); that thread then goes on with the same stream. It
   * resolves once those bytes are written, not when the thread is ready:
   * sendRam() waits for that.
   */
  async begin(): Promise<void> {
    const { opts } = this;
    const head = new MigrationStreamWriter({
      sink: opts.sink,
      machineType: opts.machineType,
      vcpus: opts.vcpus,
      ram: opts.ramHere,
      devices: opts.devices,
    });
    await head.begin();
    await head.flush();
    this.last = head.stats;
    this.started = this.command({ op: 'begin', seq: 0, resume: head.resumePoint() });
    // Its failure is reported by the next command, which waits for it.
    this.started.catch(() => undefined);
  }

  async sendRam(selection?: readonly RamPageSelection[]): Promise<void> {
    const wire = toWire(selection);
    const sent = this.command(
      { op: 'sendRam', seq: 0, ...(wire ? { selection: wire } : {}) },
      buffersOf(wire),
    );
    // Both are answered in order; the begin's failure is the one to report.
    await Promise.all([this.whenStarted(), sent]);
  }

  private whenStarted(): Promise<unknown> {
    if (!this.started) return Promise.reject(new Error('sendRam() or complete() before begin()'));
    return this.started;
  }

  /**
   * The completion (the VM is stopped), written from this thread where the
   * devices are: the last dirty pages (through the worker first when there
   * are many: {@link COMPLETION_PAGES_HERE}), the RAM END section, every
   * device's section, the stream-end record, EOF and the vmdesc.
   */
  async complete(selection?: readonly RamPageSelection[]): Promise<StreamStats> {
    await this.whenStarted();
    let here = selection;
    if (countPages(selection) > COMPLETION_PAGES_HERE) {
      await this.sendRam(selection);
      here = undefined;
    }
    const { opts } = this;
    if (!this.resume)
      throw new Error('complete(): the migration thread reported no stream position');
    this.tail = new MigrationStreamWriter({
      sink: opts.sink,
      machineType: opts.machineType,
      vcpus: opts.vcpus,
      ram: opts.ramHere,
      devices: opts.devices,
      resume: this.resume,
      ...(opts.chunkPages !== undefined ? { chunkPages: opts.chunkPages } : {}),
    });
    return this.tail.complete(here);
  }

  /** Ends the migration thread and waits until it has exited. */
  async close(): Promise<void> {
    await this.worker.terminate();
    await this.exited;
  }

  private command(cmd: WorkerCommand, transfer: ArrayBuffer[] = []): Promise<StreamStats> {
    if (this.gone) return Promise.reject(this.gone);
    const seq = ++this.seq;
    return new Promise<StreamStats>((resolve, reject) => {
      this.pending.set(seq, { resolve, reject });
      this.worker.postMessage({ ...cmd, seq }, transfer);
    });
  }

  private onMessage(m: ToMain): void {
    this.last = m.stats;
    if (m.type === 'write') {
      this.write(m.id, m.buf);
      return;
    }
    const p = this.pending.get(m.seq);
    this.pending.delete(m.seq);
    if (m.type === 'done') this.resume = m.resume;
    if (m.type === 'done') p?.resolve(m.stats);
    // A failed sink write is reported as the sink's own error, as on the main thread.
    else p?.reject(this.sinkFailed ? this.sinkError : new Error(m.message));
  }

  private write(id: number, buf: Uint8Array): void {
    const post = (m: ToWorker, transfer: ArrayBuffer[] = []) => {
      if (!this.gone) this.worker.postMessage(m, transfer);
    };
    let done: Promise<void> | void;
    try {
      done = this.opts.sink.write(buf);
    } catch (err) {
      done = Promise.reject(err);
    }
    Promise.resolve(done).then(
      // The sink is done with the chunk: its memory goes back to be filled again.
      () => post({ op: 'ack', id, buffer: buf.buffer as ArrayBuffer }, [buf.buffer as ArrayBuffer]),
      (err: unknown) => {
        if (!this.sinkFailed) {
          this.sinkFailed = true;
          this.sinkError = err;
        }
        post({ op: 'nack', id, message: err instanceof Error ? err.message : String(err) });
      },
    );
  }

  private end(err: Error): void {
    this.gone ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}
