import { AsyncLocalStorage } from 'node:async_hooks';
import { isMainThread, threadId } from 'node:worker_threads';
import { TsvmmError } from '../util/errors.js';
import { TRACE_EVENT_NAMES, type TraceEventName } from './events.js';
import { globMatch, isGlobPattern } from './glob.js';
import { formatBacktrace, formatTraceLine, type TraceFields, writeRecord } from './log.js';

/**
 * Trace control: which events are on, where records go, and the QMP view of
 * both (QEMU's trace/control.c, in our own code).
 *
 * Every thread installs the same `TraceConfig` (plain data: hand it to a
 * worker in `workerData` and call `installTraceConfig` there). The on/off bits
 * live in a SharedArrayBuffer, so a change made by QMP on the main thread is
 * seen by every vCPU thread at its next event; all threads write to the same
 * fd with one write(2) per record, so records interleave in time order.
 */

/** One `-trace` pattern: turn matching events on (or off, for a leading `-`). */
export interface TraceRule {
  readonly pattern: string;
  readonly enable: boolean;
  /** Print the JS call stack after each record of the matching events. */
  readonly backtrace?: boolean;
}

/** Tracing set-up shared by every thread; plain data, transferable to workers. */
export interface TraceConfig {
  /** One byte per event of `TRACE_EVENT_NAMES` (bit 0 on, bit 1 backtrace), then the global backtrace flag. */
  readonly states: SharedArrayBuffer;
  /** Where records go: 2 for stderr, or the fd of the `-D` file. */
  readonly fd: number;
  readonly pid: number;
  /** Wall-clock ns minus `process.hrtime.bigint()` on the creating thread: one clock for all threads. */
  readonly wallOffsetNs: bigint;
}

/** The options `createTraceConfig` takes. */
export interface TraceConfigOptions {
  readonly rules?: readonly TraceRule[];
  readonly fd?: number;
  /** `-trace-backtrace`: a backtrace after every record. */
  readonly backtrace?: boolean;
}

/** A trace pattern that QMP asked about matched no known event. */
export class TraceEventNotFoundError extends TsvmmError {
  constructor(pattern: string) {
    super(
      'TRACE_EVENT_NOT_FOUND',
      `no trace event matches '${pattern}': list the known events with trace-event-get-state name='*'`,
    );
  }
}

const ENABLED = 1;
const BACKTRACE = 2;
const GLOBAL_BACKTRACE_CELL = TRACE_EVENT_NAMES.length;

/**
 * Builds a trace configuration from ordered rules (later rules override
 * earlier ones). `warnings` names non-wildcard patterns that match no event;
 * like QEMU, the command line only warns about them.
 */
export function createTraceConfig(options: TraceConfigOptions = {}): {
  config: TraceConfig;
  warnings: string[];
} {
  const states = new SharedArrayBuffer(TRACE_EVENT_NAMES.length + 1);
  const cellsOf = new Uint8Array(states);
  const warnings: string[] = [];
  for (const rule of options.rules ?? []) {
    let found = false;
    TRACE_EVENT_NAMES.forEach((name, id) => {
      if (!globMatch(rule.pattern, name)) return;
      found = true;
      cellsOf[id] = rule.enable ? ENABLED | (rule.backtrace ? BACKTRACE : 0) : 0;
    });
    if (!found && !isGlobPattern(rule.pattern)) {
      warnings.push(`trace event '${rule.pattern}' does not exist`);
    }
  }
  cellsOf[GLOBAL_BACKTRACE_CELL] = options.backtrace ? 1 : 0;
  const wallOffsetNs = BigInt(Date.now()) * 1_000_000n - process.hrtime.bigint();
  return {
    config: { states, fd: options.fd ?? 2, pid: process.pid, wallOffsetNs },
    warnings,
  };
}

let active: TraceConfig = createTraceConfig().config;
let cells = new Uint8Array(active.states);
let threadName = isMainThread ? 'main' : `worker${threadId}`;

/**
 * Makes `config` this thread's tracing set-up, and optionally names the
 * thread (`main`, `vcpu0`, `migration`, ...) as its records will show it.
 */
export function installTraceConfig(config: TraceConfig, name?: string): void {
  active = config;
  cells = new Uint8Array(config.states);
  if (name !== undefined) threadName = name;
}

/** This thread's tracing set-up, to hand to a new worker. */
export function currentTraceConfig(): TraceConfig {
  return active;
}

/** Names this thread in trace records. */
export function setTraceThreadName(name: string): void {
  threadName = name;
}

/** The logical thread an async task runs as (see withTraceThreadName). */
const logicalThread = new AsyncLocalStorage<string>();

/**
 * Runs `fn`, and every callback and promise continuation it starts, as
 * the logical thread `name`: their trace records carry `thread=<name>`
 * instead of this thread's own name. The outgoing migration's steps on
 * the main thread (its completion: the stop into finish-migrate and the
 * device capture, which need the lifecycle) are traced as `migration` this
 * way, like the RAM passes its worker thread (migration-worker.ts) runs.
 */
export function withTraceThreadName<T>(name: string, fn: () => T): T {
  return logicalThread.run(name, fn);
}

/** The name this thread's records carry (the logical thread's, inside withTraceThreadName). */
export function traceThreadName(): string {
  return logicalThread.getStore() ?? threadName;
}

/** One trace point. Get it once per module with `traceEvent(name)`. */
export class TraceEvent {
  constructor(
    readonly name: TraceEventName,
    readonly id: number,
  ) {}

  /** Whether the event is on; check it first where building the fields costs something. */
  get enabled(): boolean {
    return (cells[this.id]! & ENABLED) !== 0;
  }

  /** Writes one record if the event is on; costs one byte read if it is off. */
  emit(fields?: TraceFields): void {
    const state = cells[this.id]!;
    if ((state & ENABLED) === 0) return;
    const wallNs = process.hrtime.bigint() + active.wallOffsetNs;
    const thread = logicalThread.getStore() ?? threadName;
    let text = `${formatTraceLine(active.pid, wallNs, this.name, fields, thread)}\n`;
    if ((state & BACKTRACE) !== 0 || cells[GLOBAL_BACKTRACE_CELL] !== 0) {
      text += captureBacktrace();
    }
    writeRecord(active.fd, text);
  }
}

function captureBacktrace(): string {
  const holder: { stack?: string } = {};
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 64;
  // Cut the frames inside the tracer: the stack starts at the caller of emit().
  Error.captureStackTrace(holder, TraceEvent.prototype.emit);
  Error.stackTraceLimit = limit;
  return formatBacktrace(holder.stack);
}

const events = new Map<TraceEventName, TraceEvent>();

/** The trace point for a catalogued event name. */
export function traceEvent(name: TraceEventName): TraceEvent {
  let ev = events.get(name);
  if (!ev) {
    ev = new TraceEvent(name, TRACE_EVENT_NAMES.indexOf(name));
    events.set(name, ev);
  }
  return ev;
}

/** QMP's TraceEventInfo: every catalogued event is dynamic, so never 'unavailable'. */
export interface TraceEventInfo {
  readonly name: string;
  readonly state: 'enabled' | 'disabled';
  readonly vcpu: false;
}

/**
 * `trace-event-get-state`: the events matching `pattern`, in catalogue
 * order. An exact name that is not an event is an error; a wildcard pattern
 * may match nothing.
 */
export function traceEventGetState(pattern: string): TraceEventInfo[] {
  const found: TraceEventInfo[] = [];
  TRACE_EVENT_NAMES.forEach((name, id) => {
    if (!globMatch(pattern, name)) return;
    found.push({ name, state: (cells[id]! & ENABLED) !== 0 ? 'enabled' : 'disabled', vcpu: false });
  });
  if (found.length === 0 && !isGlobPattern(pattern)) throw new TraceEventNotFoundError(pattern);
  return found;
}

/**
 * `trace-event-set-state`: turns every event matching `pattern` on or off,
 * on every thread, and returns how many it changed the state of (or kept).
 * A pattern that matches no event is an error, so a typo cannot pass
 * silently.
 */
export function traceEventSetState(pattern: string, enable: boolean): number {
  let count = 0;
  TRACE_EVENT_NAMES.forEach((name, id) => {
    if (!globMatch(pattern, name)) return;
    count++;
    // Keep the backtrace bit: it belongs to the -trace option, not to on/off.
    cells[id] = enable ? cells[id]! | ENABLED : cells[id]! & ~ENABLED;
  });
  if (count === 0) throw new TraceEventNotFoundError(pattern);
  return count;
}
