/**
 * Migration of a whole machine, QEMU's migration/migration.c in our own
 * code: `migrate` (the outgoing side, our "migration thread"), `-incoming`
 * and `migrate-incoming` (the destination), `migrate_cancel`,
 * `query-migrate` and the parameters, over what the machine offers
 * ({@link MigrationHost}). It implements the monitor's MigrationControl.
 *
 * Outgoing: setup → active → completion. Completion stops the VM with
 * `vmStopForceState('finish-migrate')` (kvmclock's handler runs there and
 * saves the clock), reads every device's state (vCPUs on their own
 * threads), writes the device sections, END, EOF and the vmdesc, and closes
 * the channel (for file:, fsync and rename); then status completed and run
 * state postmigrate. On a failure or a cancel the VM is started again if it
 * was running, as QEMU does.
 *
 * Without a dirty log, RAM is sent after the stop: a pass made while the
 * guest runs would be stale without knowing which pages changed during it.
 * With one (KVM dirty logging), pages are sent while the guest runs, in
 * passes until what is still dirty fits in the downtime limit at the
 * measured rate, and the rest after the stop.
 *
 * The outgoing side is an async task on the main thread that traces as
 * thread `migration` (withTraceThreadName): the lifecycle lives there, so
 * the completion's stop and the device capture run there. When guest RAM
 * is mapped memory (guestMemoryRam over GuestMemory), the stream's writer
 * runs on a worker thread, the migration thread (migration-worker.ts),
 * which reads, checks and encodes RAM for every pass and hands the bytes
 * back to be written to the channel here (WorkerStreamWriter), so the main
 * loop stays responsive during the passes. The header (while the worker
 * starts) and the completion (with the VM stopped: no round trip to the
 * worker unless many pages are left) are written from here. RAM in
 * buffers (test doubles) is written from the main thread. The worker is
 * ended whatever the outcome. Before the stop, the code the completion
 * runs is warmed up (warmUpDeviceSection, warmUpCompletion): run cold, it
 * was most of the downtime.
 *
 * Incoming: run state inmigrate; the stream is loaded and verified in full
 * (checksums, shape, every device) before any device state is applied;
 * then every device's state goes into KVM (vCPUs on their own threads),
 * and a main-loop bottom half `process_incoming_migration_bh` starts the
 * VM (or leaves it paused without autostart). A failure leaves the VM in
 * inmigrate, never run, and reports through `onIncomingFailed`.
 */

import type { JsonObject, JsonValue } from '../monitor/json-value.js';
import { QmpError } from '../monitor/qmp-error.js';
import type { QmpArgsSchema } from '../monitor/qmp-schema.js';
import type { MigrationControl } from '../monitor/vm-control.js';
import type { VmLifecycle } from '../system/cpus.js';
import type { RunState } from '../system/runstate.js';
import { traceEvent, withTraceThreadName } from '../trace/control.js';
import {
  checkCapabilityTransport,
  MIGRATION_CAPABILITIES,
  MigrationCapabilities,
  type MigrationCapabilityStatus,
} from './capabilities.js';
import {
  type IncomingChannel,
  type IncomingEndpoint,
  listenIncoming,
  type MigrationUri,
  type OutgoingChannel,
  openOutgoing,
  parseMigrationUri,
} from './channels.js';
import { MigrationChannelError } from './errors.js';
import { nativeRamLayout } from './guest-memory-ram.js';
import type { MapRamFromFile } from './mapped-ram.js';
import type { ByteSink } from './qemu-file.js';
import { PAGE_SIZE, type RamAccessor, type RamPageSelection, ramTotal } from './ram.js';
import { WorkerStreamWriter } from './ram-worker.js';
import {
  MIGRATION_PARAMETER_TYPES,
  MIGRATION_STATUS_VALUES,
  type MigrationEvent,
  MigrationStateMachine,
  type MigrationStatus,
  MULTIFD_COMPRESSION_VALUES,
  migrationIsRunning,
  migrationParametersView,
} from './state.js';
import {
  type DeviceSection,
  loadVmState,
  MigrationStreamWriter,
  type StreamStats,
  warmUpCompletion,
  warmUpDeviceSection,
} from './stream.js';

/**
 * A device as migration sees it: its section, and how its state object is
 * filled from the hardware before a save and pushed back after a load,
 * when those are more than the vmstate hooks can do (a trip to a vCPU
 * thread, an ioctl on the VM fd).
 */
export interface MigratableDevice {
  readonly section: DeviceSection;
  /** Fills `section.state` from the hardware; the VM is stopped. */
  capture?(): void | Promise<void>;
  /**
   * Work a save can do before the stop, while the guest runs (a warm-up of
   * the section's encoder); it must touch neither the hardware nor
   * `section.state`.
   */
  prepareSave?(): void | Promise<void>;
  /** Pushes `section.state` into the hardware after the whole stream was verified and applied. */
  restore?(): void | Promise<void>;
}

/** KVM dirty logging of guest RAM, for sending RAM while the guest runs. */
export interface DirtyLog {
  /** Starts logging (KVM_MEM_LOG_DIRTY_PAGES on every slot). */
  start(): void | Promise<void>;
  /** The pages written since start() or the last sync (KVM_GET_DIRTY_LOG, which clears them). */
  sync(): readonly RamPageSelection[] | Promise<readonly RamPageSelection[]>;
  /** Stops logging. */
  stop(): void | Promise<void>;
}

/** What migration needs from the machine. */
export interface MigrationHost {
  /** QEMU's machine type name, written in the stream's configuration ("pc"). */
  readonly machineType: string;
  readonly vcpus: number;
  /** Guest RAM (guestMemoryRam(machine.memory): one block "pc.ram"). */
  readonly ram: RamAccessor;
  /** Every device with migration state, in stream order. */
  readonly devices: readonly MigratableDevice[];
  readonly lifecycle: Pick<VmLifecycle, 'runstate' | 'vmStart' | 'vmStopForceState'>;
  /** Runs `fn` in a main-loop bottom half named `name` (MainLoop.newBottomHalf(...).schedule()). */
  scheduleBottomHalf(name: string, fn: () => void | Promise<void>): void;
  /** Publishes a QMP event (MIGRATION, MIGRATION_PASS). */
  emitEvent(event: MigrationEvent): void;
  /** QEMU's autostart: whether a completed incoming migration starts the VM (false under -S or after `stop`). */
  autostart(): boolean;
  /** Present where the host can log dirty pages; then RAM goes out while the guest runs. */
  readonly dirtyLog?: DirtyLog;
  /** Guest RAM is fresh and all zero (a new VM waiting for -incoming). */
  readonly ramIsZeroed?: boolean;
  /**
   * Maps a RAM block's pages from a mapped-ram file over guest RAM
   * (MAP_PRIVATE), for a mapped-ram restore; absent, the pages are read.
   */
  readonly mapRamFromFile?: MapRamFromFile;
}

/** Where the progress line goes: a terminal gets one. */
export interface ProgressStream {
  readonly isTTY?: boolean;
  write(text: string): unknown;
}

/** Options of {@link MachineMigration}. */
export interface MachineMigrationOptions {
  /**
   * Called when an incoming migration fails (and exit-on-error was not
   * turned off): the CLI exits non-zero. The VM has not run and must not.
   */
  onIncomingFailed?: (error: Error) => void;
  /** Operator messages ("load of migration failed: ..."); stderr by default. */
  log?: (message: string) => void;
  /** The progress line of a long save; stderr by default, shown only on a terminal. */
  progress?: ProgressStream | null;
  /** Milliseconds; Date.now by default. */
  now?: () => number;
}

const traceThread = traceEvent('migration_thread');
const traceCompletion = traceEvent('migration_completion');
const traceIncoming = traceEvent('process_incoming_migration');
const traceSetState = traceEvent('migrate_set_state');

/** The bottom half that finishes an incoming migration, QEMU's name for it. */
export const PROCESS_INCOMING_MIGRATION_BH = 'process_incoming_migration_bh';

/** Precopy passes before the completion is forced even if the guest dirties faster than we send. */
const MAX_PASSES = 30;
/** How often the counters and the progress line are refreshed. */
const PROGRESS_MS = 250;
/** A save shorter than this prints no progress line. */
const PROGRESS_AFTER_MS = 1000;

/** migrate-set-parameters' members: every parameter QEMU 7.2 has, all optional. */
const PARAMETER_SCHEMA: QmpArgsSchema = Object.fromEntries(
  Object.entries(MIGRATION_PARAMETER_TYPES).map(([name, type]) => [
    `*${name}`,
    type === 'multifd-compression' ? { enum: MULTIFD_COMPRESSION_VALUES } : type,
  ]),
);

/**
 * The sink between the stream writer and the channel: it counts bytes,
 * applies max-bandwidth while the guest runs (never during the stopped
 * completion, like QEMU), and turns a cancel into a write error so the
 * writer stops at its next write.
 */
class ControlledSink implements ByteSink {
  bytes = 0;
  limited = true;
  cancelled = false;
  private windowStart = 0;
  private windowBytes = 0;

  constructor(
    private readonly inner: ByteSink,
    private readonly bandwidth: () => number,
    private readonly now: () => number,
    private readonly where: string,
  ) {
    this.windowStart = now();
  }

  get fileOffset(): number | undefined {
    return this.inner.fileOffset;
  }

  async write(buf: Uint8Array): Promise<void> {
    if (this.cancelled) throw cancelledError(this.where);
    await this.inner.write(buf);
    await this.account(buf.length);
  }

  /** A seekable channel only (file:): a hole; it counts as no bytes written. */
  async skip(n: number): Promise<void> {
    if (this.cancelled) throw cancelledError(this.where);
    if (!this.inner.skip) throw new Error('skip(): the channel is not seekable');
    await this.inner.skip(n);
  }

  /** A seekable channel only (file:): bytes at a position (mapped-ram pages). */
  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    if (this.cancelled) throw cancelledError(this.where);
    if (!this.inner.writeAt) throw new Error('writeAt(): the channel is not seekable');
    await this.inner.writeAt(buf, position);
    await this.account(buf.length);
  }

  private async account(n: number): Promise<void> {
    this.bytes += n;
    this.windowBytes += n;
    const limit = this.bandwidth();
    if (!this.limited || limit <= 0) return;
    const due = (this.windowBytes / limit) * 1000;
    const elapsed = this.now() - this.windowStart;
    if (due > elapsed) await new Promise((r) => setTimeout(r, due - elapsed));
    if (this.cancelled) throw cancelledError(this.where);
  }

  /** Starts a new rate window (after the limit or the phase changed). */
  resetWindow(): void {
    this.windowStart = this.now();
    this.windowBytes = 0;
  }
}

function cancelledError(where: string): MigrationChannelError {
  return new MigrationChannelError(
    'MIGRATION_CANCELLED',
    `the migration to ${where} was cancelled`,
  );
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The stream writer of an outgoing migration: MigrationStreamWriter here, or on the migration thread. */
type OutgoingWriter = Pick<MigrationStreamWriter, 'stats' | 'begin' | 'sendRam' | 'complete'>;

/** One outgoing migration's mutable state, shared by its task and migrate_cancel. */
interface OutgoingJob {
  cancelled: boolean;
  /** Once the channel is closing, the migration has in effect completed: a cancel is too late. */
  closing: boolean;
  channel: OutgoingChannel | undefined;
  sink: ControlledSink | undefined;
  done: Promise<void>;
  /** While paused in pre-switchover: ends the pause (migrate-continue, or a cancel). */
  releasePause: (() => void) | undefined;
}

/** The union of two page selections, per block, pages ascending. */
function mergeSelections(
  a: readonly RamPageSelection[],
  b: readonly RamPageSelection[],
): RamPageSelection[] {
  const byBlock = new Map<string, Set<number>>();
  for (const sel of [...a, ...b]) {
    const set = byBlock.get(sel.block) ?? new Set<number>();
    byBlock.set(sel.block, set);
    for (const p of sel.pages) set.add(p);
  }
  return [...byBlock].map(([block, pages]) => ({
    block,
    pages: [...pages].sort((x, y) => x - y),
  }));
}

function pageCount(sel: readonly RamPageSelection[]): number {
  let n = 0;
  for (const s of sel) for (const _ of s.pages) n++;
  return n;
}

function toJson(value: unknown): JsonValue {
  // query-migrate's object holds only numbers, strings and nested objects.
  return JSON.parse(JSON.stringify(value)) as JsonValue;
}

/** A capability entry whose name the QMP schema has checked against MIGRATION_CAPABILITIES. */
function checkedCapability(entry: {
  capability: string;
  state: boolean;
}): MigrationCapabilityStatus {
  const capability = MIGRATION_CAPABILITIES.find((c) => c === entry.capability);
  if (capability === undefined) {
    throw new QmpError(
      'GenericError',
      `Parameter 'capability' does not accept value '${entry.capability}'`,
    );
  }
  return { capability, state: entry.state };
}

/** Outgoing and incoming migration of one machine; the monitor's MigrationControl. */
export class MachineMigration implements MigrationControl {
  readonly parameterSchema = PARAMETER_SCHEMA;
  readonly capabilityNames: readonly string[] = MIGRATION_CAPABILITIES;
  readonly statusNames: readonly string[] = MIGRATION_STATUS_VALUES;
  private readonly state: MigrationStateMachine;
  private readonly capabilities = new MigrationCapabilities();
  private readonly log: (message: string) => void;
  private readonly now: () => number;
  private outgoing: OutgoingJob | undefined;
  private incomingStarted = false;
  private incomingEndpoint: IncomingEndpoint | undefined;
  private incomingDone: Promise<void> | undefined;

  constructor(
    private readonly host: MigrationHost,
    private readonly options: MachineMigrationOptions = {},
  ) {
    this.now = options.now ?? Date.now;
    this.log = options.log ?? ((m) => process.stderr.write(`tsvmm: ${m}\n`));
    this.state = new MigrationStateMachine({
      now: this.now,
      onEvent: (e) => {
        if (e.event === 'MIGRATION') traceSetState.emit({ new_state: e.data.status });
        // QEMU sends MIGRATION and MIGRATION_PASS only with the events capability on.
        if (this.capabilities.has('events')) host.emitEvent(e);
      },
    });
  }

  /** The current migration status. */
  get status(): MigrationStatus {
    return this.state.status;
  }

  /** Resolves when the outgoing or incoming migration under way (if any) has finished its work. */
  async whenIdle(): Promise<void> {
    await this.outgoing?.done;
    await this.incomingDone;
  }

  // ------------------------------------------------------------ outgoing

  /**
   * QMP `migrate`: checks the URI and starts the migration task; resolves
   * once it has started (status setup), as QMP's migrate returns at once.
   */
  async migrate(uri: string, options: { detach?: boolean; resume?: boolean } = {}): Promise<void> {
    if (options.resume) {
      throw new QmpError(
        'GenericError',
        "'resume' is for postcopy recovery, which tsvmm does not do",
      );
    }
    if (this.host.lifecycle.runstate.check('inmigrate')) {
      throw new QmpError('GenericError', 'Guest is waiting for an incoming migration');
    }
    if (migrationIsRunning(this.state.status)) {
      throw new QmpError('GenericError', "There's a migration process in progress");
    }
    const target = parseMigrationUri(uri);
    checkCapabilityTransport(this.capabilities, target.kind, uri);
    this.state.start(ramTotal(this.host.ram));
    const job: OutgoingJob = {
      cancelled: false,
      closing: false,
      channel: undefined,
      sink: undefined,
      done: Promise.resolve(),
      releasePause: undefined,
    };
    this.outgoing = job;
    // Everything the task does, and the lifecycle calls it makes, traces as thread=migration.
    job.done = withTraceThreadName('migration', () => this.runOutgoing(job, target));
  }

  /** QMP `migrate_cancel`: a no-op unless an outgoing migration is under way and not yet closing. */
  async cancel(): Promise<void> {
    const job = this.outgoing;
    if (!job || job.closing || !migrationIsRunning(this.state.status)) return;
    if (!this.state.cancel()) return;
    job.cancelled = true;
    if (job.sink) job.sink.cancelled = true;
    // A source paused in pre-switchover stops waiting and goes on to cancelled.
    job.releasePause?.();
    // Break a write that is blocked (a pipe nobody reads): the task sees the error and finishes.
    await job.channel?.abort().catch(() => undefined);
  }

  private async runOutgoing(job: OutgoingJob, target: MigrationUri): Promise<void> {
    const { host } = this;
    const { lifecycle } = host;
    let stoppedFrom: RunState | undefined;
    let dirtyLogging = false;
    let worker: WorkerStreamWriter | undefined;
    const progress = this.progressReporter();
    traceThread.emit({ phase: 'start' });
    try {
      // RAM other threads can view is read, encoded and checksummed on the
      // migration thread (a worker); RAM in buffers, here. The worker is
      // spawned first: its start-up (a new isolate, its modules) is most of
      // the setup, so the file is opened and dirty logging started meanwhile.
      // mapped-ram: written from here, each page at its offset straight
      // from guest RAM (no worker, no copy), in one pass once stopped.
      const mappedRam = this.capabilities.has('mapped-ram');
      const layout = mappedRam ? undefined : nativeRamLayout(host.ram);
      const dirtyLog = mappedRam ? undefined : host.dirtyLog;
      let sinkRef: ByteSink | undefined;
      const shape = {
        sink: { write: (buf: Uint8Array) => sinkRef!.write(buf) },
        ram: host.ram,
        machineType: host.machineType,
        vcpus: host.vcpus,
        devices: host.devices.map((d) => d.section),
      };
      // The open goes to libuv's thread pool first, so the worker's
      // creation (synchronous here, 0.4-2 ms) overlaps it.
      const opening = openOutgoing(target);
      try {
        if (layout) worker = new WorkerStreamWriter({ ...shape, ram: layout, ramHere: host.ram });
      } catch (err) {
        await opening.then((c) => c.abort()).catch(() => undefined);
        throw err;
      }
      const channel = await opening;
      job.channel = channel;
      if (job.cancelled) throw cancelledError(target.kind);
      const sink = new ControlledSink(
        channel.sink,
        () => this.state.parameters['max-bandwidth'],
        this.now,
        target.kind === 'file' ? target.path : target.kind,
      );
      sinkRef = sink;
      job.sink = sink;
      sink.cancelled = job.cancelled;
      const writer: OutgoingWriter =
        worker ??
        new MigrationStreamWriter({
          ...shape,
          sink,
          ram: host.ram,
          ...(mappedRam ? { mappedRam } : {}),
        });
      progress.start(writer, sink);
      if (dirtyLog) {
        // Part of the setup, as QEMU's ram_save_setup: pages written from
        // here on are logged, so the first pass may read them stale.
        await dirtyLog.start();
        dirtyLogging = true;
      }
      await writer.begin();
      this.state.activate();
      traceThread.emit({ phase: 'active' });
      // While the migration thread starts (or the first pass runs): what
      // the stopped VM would otherwise wait for.
      for (const d of host.devices) {
        if (d.prepareSave) await d.prepareSave();
        else await warmUpDeviceSection(d.section);
      }
      await warmUpCompletion(shape);

      let finalPages: readonly RamPageSelection[] | undefined;
      if (dirtyLog) {
        finalPages = await this.precopy(job, writer, sink, progress);
        // The passes' bytes go to disk while the guest still runs: the
        // fsync at close then has only the stopped part to write, and the
        // downtime does not wait for the whole of RAM to reach the disk.
        await channel.flush?.();
      } else {
        // One pass over all of RAM, made once the guest is stopped (see the module comment).
        this.state.pass();
      }

      // Completion (QEMU's migration_completion): stop, then everything else.
      this.checkCancelled(job, target);
      traceCompletion.emit({ state: 'stop' });
      this.state.stopForCompletion();
      stoppedFrom = lifecycle.runstate.current;
      await lifecycle.vmStopForceState('finish-migrate');
      await this.maybePause(job, target);
      sink.limited = false;
      const downtimeStart = sink.bytes;
      // Independent reads (each vCPU on its own thread, the irqchip here):
      // asked for all at once, so the stopped VM waits one round trip, and
      // the RAM's last part (the dirty log's last read, or the one pass of
      // RAM without a log) is taken while the vCPU threads answer.
      const captured = Promise.all(host.devices.map(async (d) => d.capture?.()));
      const ram = (async () => {
        if (dirtyLog) {
          finalPages = mergeSelections(finalPages ?? [], await dirtyLog.sync());
          progress.pass(pageCount(finalPages));
        } else {
          progress.pass(ramTotal(host.ram) / PAGE_SIZE);
          await writer.sendRam();
        }
      })();
      await Promise.all([captured, ram]);
      this.checkCancelled(job, target);
      traceCompletion.emit({ state: 'devices' });
      const stats = await writer.complete(finalPages);
      this.checkCancelled(job, target);
      job.closing = true;
      await channel.close();
      progress.stop(stats, sink);
      this.state.progress({
        transferred: sink.bytes,
        normalPages: stats.normalPages,
        zeroPages: stats.zeroPages,
        downtimeBytes: sink.bytes - downtimeStart,
      });
      this.state.complete();
      lifecycle.runstate.set('postmigrate');
      traceThread.emit({ phase: 'completed' });
    } catch (err) {
      progress.stop(undefined, job.sink);
      await job.channel?.abort().catch(() => undefined);
      if (job.cancelled) {
        this.state.cancelled();
        traceThread.emit({ phase: 'cancelled' });
      } else {
        this.state.fail(describe(err));
        traceThread.emit({ phase: 'failed' });
        this.log(`migration failed: ${describe(err)}`);
      }
      await this.resumeAfterFailure(stoppedFrom);
    } finally {
      await worker?.close().catch(() => undefined);
      if (dirtyLogging) await Promise.resolve(host.dirtyLog?.stop()).catch(() => undefined);
    }
  }

  /**
   * Passes over RAM while the guest runs: all of it, then what was dirtied
   * meanwhile, until that fits in the downtime limit at the rate measured
   * in the last pass. Returns the pages still to send after the stop.
   */
  private async precopy(
    job: OutgoingJob,
    writer: OutgoingWriter,
    sink: ControlledSink,
    progress: ProgressReporter,
  ): Promise<readonly RamPageSelection[]> {
    const dirtyLog = this.host.dirtyLog!;
    let selection: readonly RamPageSelection[] | undefined;
    let pages = ramTotal(this.host.ram) / PAGE_SIZE;
    for (let pass = 1; ; pass++) {
      this.state.pass();
      progress.pass(pages);
      const t0 = this.now();
      const b0 = sink.bytes;
      sink.resetWindow();
      await writer.sendRam(selection);
      const ms = Math.max(1, this.now() - t0);
      const bytesPerMs = (sink.bytes - b0) / ms;
      if (job.cancelled) return [];
      selection = await dirtyLog.sync();
      pages = pageCount(selection);
      const remaining = pages * PAGE_SIZE;
      this.state.progress({ remaining });
      const fits = remaining <= bytesPerMs * this.state.parameters['downtime-limit'];
      if (fits || pass >= MAX_PASSES) return selection;
    }
  }

  /**
   * QEMU's migration_maybe_pause: with pause-before-switchover on, the
   * stopped source waits in `pre-switchover` until migrate-continue (or a
   * cancel), then goes on in `device` to send the device state.
   */
  private async maybePause(job: OutgoingJob, target: MigrationUri): Promise<void> {
    if (!this.capabilities.has('pause-before-switchover')) return;
    this.checkCancelled(job, target);
    const released = new Promise<void>((resolve) => {
      job.releasePause = resolve;
    });
    if (this.state.setStatus('active', 'pre-switchover')) {
      traceCompletion.emit({ state: 'pre-switchover' });
      await released;
    }
    job.releasePause = undefined;
    if (!this.state.setStatus('pre-switchover', 'device')) {
      this.checkCancelled(job, target);
      throw new MigrationChannelError(
        'MIGRATION_CANCELLED',
        `the migration left pre-switchover as '${this.state.status}', not 'device'`,
      );
    }
  }

  /**
   * QMP `migrate-continue`: `state` must be the current status (QEMU's
   * check); in pre-switchover the paused source goes on. Otherwise it does
   * nothing, as QEMU's extra semaphore post has no effect.
   */
  migrateContinue(state: string): void {
    const current = this.state.status;
    if (current !== state) {
      throw new QmpError('GenericError', `Migration not in expected state: ${current}`);
    }
    this.outgoing?.releasePause?.();
  }

  private checkCancelled(job: OutgoingJob, target: MigrationUri): void {
    if (job.cancelled) throw cancelledError(target.kind);
  }

  /**
   * QEMU's migration_iteration_finish for failed and cancelled: a VM that
   * was running when completion stopped it runs again; one that was not
   * goes back to the state it had.
   */
  private async resumeAfterFailure(stoppedFrom: RunState | undefined): Promise<void> {
    if (stoppedFrom === undefined) return;
    const { lifecycle } = this.host;
    try {
      if (stoppedFrom === 'running') await lifecycle.vmStart();
      else if (lifecycle.runstate.check('finish-migrate')) lifecycle.runstate.set(stoppedFrom);
    } catch (err) {
      this.log(`could not resume the VM after the failed migration: ${describe(err)}`);
    }
  }

  // ------------------------------------------------------------ incoming

  /**
   * The CLI's `-incoming URI`: run state inmigrate, then (unless URI is
   * `defer`, which waits for QMP migrate-incoming) start listening.
   */
  async startIncoming(uri: string): Promise<void> {
    this.host.lifecycle.runstate.set('inmigrate');
    if (uri === 'defer') return;
    await this.migrateIncoming(uri, {});
  }

  /**
   * QMP `migrate-incoming`: only in run state inmigrate, once. Listens on
   * (or opens) `uri` and loads the stream in the background; resolves once
   * listening, so a tcp:HOST:0 port is known to query-migrate callers.
   */
  async migrateIncoming(uri: string, options: { exitOnError?: boolean } = {}): Promise<void> {
    if (!this.host.lifecycle.runstate.check('inmigrate')) {
      throw new QmpError('GenericError', "'-incoming' was not specified on the command line");
    }
    if (this.incomingStarted) {
      throw new QmpError('GenericError', 'The incoming migration has already been started');
    }
    const target = parseMigrationUri(uri);
    checkCapabilityTransport(this.capabilities, target.kind, uri);
    this.incomingStarted = true;
    let endpoint: IncomingEndpoint;
    try {
      endpoint = await listenIncoming(target);
    } catch (err) {
      this.incomingStarted = false;
      throw err;
    }
    this.incomingEndpoint = endpoint;
    this.state.start(ramTotal(this.host.ram));
    this.incomingDone = this.runIncoming(endpoint, options.exitOnError ?? true);
  }

  /** The resolved incoming URI (with the port chosen for tcp:HOST:0), once listening. */
  get incomingUri(): MigrationUri | undefined {
    return this.incomingEndpoint?.uri;
  }

  private async runIncoming(endpoint: IncomingEndpoint, exitOnError: boolean): Promise<void> {
    const { host } = this;
    let channel: IncomingChannel | undefined;
    traceIncoming.emit({ phase: 'start' });
    // QEMU reads the destination's own capabilities, set before migrate-incoming.
    const mappedRam = this.capabilities.has('mapped-ram');
    const uri = endpoint.uri;
    try {
      channel = await endpoint.accept();
      this.state.activate();
      const result = await loadVmState({
        ...(mappedRam
          ? {
              mappedRam,
              fileOffset: uri.kind === 'file' ? uri.offset : 0,
              ...(host.mapRamFromFile ? { mapRam: host.mapRamFromFile } : {}),
            }
          : {}),
        source: channel.source,
        machineType: host.machineType,
        vcpus: host.vcpus,
        ram: host.ram,
        devices: host.devices.map((d) => d.section),
        ramIsZeroed: host.ramIsZeroed ?? false,
        onProgress: (s: StreamStats) =>
          this.state.progress({
            transferred: s.bytes,
            normalPages: s.normalPages,
            zeroPages: s.zeroPages,
          }),
      });
      this.state.progress({
        transferred: result.bytes,
        normalPages: result.normalPages,
        zeroPages: result.zeroPages,
        remaining: 0,
      });
      traceIncoming.emit({
        phase: 'loaded',
        ...(result.mappedRam ? { ram: result.mappedRam } : {}),
      });
      // Verified and applied to the section states: now into KVM, before anything runs.
      for (const d of host.devices) await d.restore?.();
      host.scheduleBottomHalf(PROCESS_INCOMING_MIGRATION_BH, () =>
        this.processIncomingMigrationBh(),
      );
    } catch (err) {
      const error = err instanceof Error ? err : new Error(String(err));
      this.state.fail(error.message);
      traceIncoming.emit({ phase: 'failed' });
      this.log(`load of migration failed: ${error.message}`);
      if (exitOnError) this.options.onIncomingFailed?.(error);
    } finally {
      await channel?.close().catch(() => undefined);
      await endpoint.close().catch(() => undefined);
    }
  }

  /** QEMU's process_incoming_migration_bh: start the VM (or pause it), then status completed. */
  private async processIncomingMigrationBh(): Promise<void> {
    const { lifecycle } = this.host;
    traceIncoming.emit({ phase: 'bh' });
    if (this.host.autostart()) await lifecycle.vmStart();
    else lifecycle.runstate.set('paused');
    this.state.complete();
  }

  // ------------------------------------------------------- query, params

  /** query-migrate. */
  queryMigrate(): JsonObject {
    return toJson(this.state.query()) as JsonObject;
  }

  /** migrate-set-parameters (validated as a whole before any value applies). */
  setParameters(params: JsonObject): void {
    this.state.setParameters(params);
    this.outgoing?.sink?.resetWindow();
  }

  /** query-migrate-parameters: QEMU 7.2's set; those without effect here show their defaults. */
  queryParameters(): JsonObject {
    return migrationParametersView(this.state.parameters);
  }

  /**
   * migrate-set-capabilities: refused while an outgoing migration runs
   * (QEMU's check), and as a whole when any capability turned on is one
   * tsvmm cannot honour.
   */
  setCapabilities(list: readonly { capability: string; state: boolean }[]): void {
    if (this.outgoing !== undefined && migrationIsRunning(this.state.status)) {
      throw new QmpError('GenericError', "There's a migration process in progress");
    }
    this.capabilities.set(list.map(checkedCapability));
  }

  /** query-migrate-capabilities: every capability QEMU 7.2 lists, with its state. */
  queryCapabilities(): MigrationCapabilityStatus[] {
    return this.capabilities.query();
  }

  /** Cancels what is under way and stops listening; for the process's cleanup and tests. */
  async close(): Promise<void> {
    await this.cancel();
    await this.incomingEndpoint?.close().catch(() => undefined);
    await this.whenIdle();
  }

  private progressReporter(): ProgressReporter {
    const out = this.options.progress === undefined ? process.stderr : this.options.progress;
    return new ProgressReporter(this.state, out, this.now);
  }
}

/**
 * Feeds query-migrate's counters while a save runs, and on a terminal
 * shows one self-overwriting line for a save that takes more than a second.
 */
class ProgressReporter {
  private timer: NodeJS.Timeout | undefined;
  private startedAt = 0;
  private shown = false;
  private passPages = 0;
  private passStartPages = 0;
  private writer: OutgoingWriter | undefined;
  private sink: ControlledSink | undefined;

  constructor(
    private readonly state: MigrationStateMachine,
    private readonly out: ProgressStream | null,
    private readonly now: () => number,
  ) {}

  start(writer: OutgoingWriter, sink: ControlledSink): void {
    this.writer = writer;
    this.sink = sink;
    this.startedAt = this.now();
    this.timer = setInterval(() => this.tick(), PROGRESS_MS);
    this.timer.unref();
  }

  /** A new pass over `pages` pages begins. */
  pass(pages: number): void {
    const s = this.writer?.stats;
    this.passStartPages = s ? s.normalPages + s.zeroPages : 0;
    this.passPages = pages;
  }

  stop(stats: StreamStats | undefined, sink: ControlledSink | undefined): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (stats && sink) this.tick();
    if (this.shown) this.out?.write('\n');
    this.shown = false;
  }

  private tick(): void {
    const s = this.writer?.stats;
    if (!s || !this.sink) return;
    const sent = s.normalPages + s.zeroPages - this.passStartPages;
    const remaining = Math.max(0, this.passPages - sent) * PAGE_SIZE;
    this.state.progress({
      transferred: this.sink.bytes,
      normalPages: s.normalPages,
      zeroPages: s.zeroPages,
      remaining,
    });
    const elapsed = this.now() - this.startedAt;
    if (!this.out?.isTTY || elapsed < PROGRESS_AFTER_MS) return;
    const mib = (n: number) => (n / 2 ** 20).toFixed(0);
    const total = this.passPages * PAGE_SIZE;
    const pct = total > 0 ? Math.min(100, Math.floor(((total - remaining) * 100) / total)) : 100;
    const rate = (this.sink.bytes / 2 ** 20 / (elapsed / 1000)).toFixed(0);
    this.out.write(
      `\rmigration: ${mib(total - remaining)} of ${mib(total)} MiB of RAM (${pct}%), ` +
        `${mib(this.sink.bytes)} MiB written, ${rate} MiB/s\u001b[K`,
    );
    this.shown = true;
  }
}
