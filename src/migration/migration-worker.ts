/**
 * The migration thread: a worker that owns the outgoing stream's writer
 * ({@link MigrationStreamWriter}) for a migration whose RAM another thread
 * can view (guestMemoryRam over mapped guest memory). It reads, checks and
 * encodes RAM here, off the main thread, and hands each full chunk of the
 * stream to the main thread, which writes it to the channel and answers.
 * The main thread writes the header before this thread is ready, and the
 * completion, from where the last pass left the stream (each pass ends
 * flushed, and its answer says where: StreamResumePoint).
 * Its only inputs are plain data: see {@link MigrationWorkerData} and
 * {@link ToWorker}; {@link WorkerStreamWriter} is the main thread's side.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { installTraceConfig } from '../trace/control.js';
import { nativeGuestRam } from './guest-memory-ram.js';
import type { ByteSink } from './qemu-file.js';
import type { RamPageSelection } from './ram.js';
import type {
  MigrationWorkerData,
  ToMain,
  ToWorker,
  WireSelection,
  WorkerCommand,
} from './ram-worker.js';
import { deviceStub, MigrationStreamWriter, type StreamStats } from './stream.js';

const port = parentPort;
if (!port) throw new Error('migration-worker runs only as a worker thread');
const data = workerData as MigrationWorkerData;
installTraceConfig(data.trace, 'migration');

let writer: MigrationStreamWriter | undefined;
let nextWrite = 1;
const waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();

const post = (m: ToMain, transfer?: ArrayBuffer[]) => port.postMessage(m, transfer);

function stats(): StreamStats {
  return writer ? writer.stats : { bytes: 0, normalPages: 0, zeroPages: 0 };
}

/** Chunk buffers the main thread has sent back with its acks. */
const returned: Uint8Array[] = [];
/** More than the writer has in use at once (one filling, one or two queued). */
const RETURNED_KEPT = 4;

/**
 * Every chunk goes to the main thread; the write is done once it answers.
 * The chunk's memory moves there (no copy) and comes back with the answer,
 * for the writer to fill again: a fresh 1 MiB buffer per chunk cost a copy
 * and, on its first touch, 256 page faults, the top of this thread's
 * profile.
 */
const sink: ByteSink = {
  takesBuffers: true,
  write(buf: Uint8Array): Promise<void> {
    const id = nextWrite++;
    return new Promise<void>((resolve, reject) => {
      waiting.set(id, { resolve, reject });
      post({ type: 'write', id, buf, stats: stats() }, [buf.buffer as ArrayBuffer]);
    });
  },
  reclaim: () => returned.pop(),
};

function selection(sel: readonly WireSelection[] | undefined): RamPageSelection[] | undefined {
  return sel?.map((s) => ({ block: s.block, pages: s.pages }));
}

async function run(m: WorkerCommand): Promise<MigrationStreamWriter> {
  if (m.op === 'begin') {
    // The main thread wrote the header; this writer goes on from there.
    // Set before any await: the commands that follow are already queued.
    writer = new MigrationStreamWriter({
      sink,
      machineType: data.machineType,
      vcpus: data.vcpus,
      ram: nativeGuestRam(data.ram),
      // Stand-ins: their count sets the stream's section ids.
      devices: data.devices.map((d) => deviceStub(d.idstr, d.instanceId, d.version)),
      resume: m.resume,
      ...(data.chunkPages !== undefined ? { chunkPages: data.chunkPages } : {}),
    });
    return writer;
  }
  if (!writer) throw new Error(`${m.op} before begin`);
  await writer.sendRam(selection(m.selection));
  return writer;
}

port.on('message', (m: ToWorker) => {
  if (m.op === 'ack' || m.op === 'nack') {
    const w = waiting.get(m.id);
    waiting.delete(m.id);
    if (m.op === 'ack' && m.buffer && returned.length < RETURNED_KEPT) {
      returned.push(new Uint8Array(m.buffer));
    }
    if (m.op === 'ack') w?.resolve();
    else w?.reject(new Error(m.message));
    return;
  }
  run(m).then(
    (w) => post({ type: 'done', seq: m.seq, stats: w.stats, resume: w.resumePoint() }),
    (err: unknown) =>
      post({
        type: 'error',
        seq: m.seq,
        message: err instanceof Error ? err.message : String(err),
        stats: stats(),
      }),
  );
});
