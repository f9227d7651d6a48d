/**
 * The process side of kvmclock's policy, sanitizer and timeline: the
 * sanitizer's options (violations become a trace event, a QMP event
 * `KVMCLOCK_VIOLATION` and a line on stderr), the timeline's marks, and
 * the QMP command `query-kvmclock`.
 */
import type {
  KvmClockDevice,
  KvmClockObserver,
  KvmClockStartRecord,
} from '../hw/i386/kvm/clock.js';
import type {
  KvmClockReading,
  KvmClockSanitizer,
  KvmClockSanitizerOptions,
  KvmClockViolation,
} from '../hw/i386/kvm/clock-check.js';
import { KvmClockTimeline, type TimelineMarkKind } from '../hw/i386/kvm/clock-timeline.js';
import type { JsonObject, JsonValue } from '../monitor/json-value.js';
import type { QmpCommandRegistry } from '../monitor/qmp-registry.js';
import type { RunState } from '../system/runstate.js';

/** A JSON integer: a number where it is exact, else its decimal string. */
function int(v: bigint): JsonValue {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(v)
    : v.toString();
}

/** Host CLOCK_REALTIME ns as QEMU's event timestamps split it, but to the ns. */
function hostTime(ns: bigint): JsonObject {
  return { seconds: Number(ns / 1_000_000_000n), nanoseconds: Number(ns % 1_000_000_000n) };
}

/** The sanitizer's options for the process: report to the callback, feed the timeline. */
export function sanitizerOptions(options: {
  check: boolean;
  timeline: KvmClockTimeline | undefined;
  onViolation: (v: KvmClockViolation) => void;
}): KvmClockSanitizerOptions | undefined {
  if (!options.check && options.timeline === undefined) return undefined;
  const timeline = options.timeline;
  return {
    report: options.check,
    onViolation: options.onViolation,
    ...(timeline
      ? { onReading: (r: KvmClockReading) => timeline.sample(r.cpu, r.hostRealtime, r.ns) }
      : {}),
  };
}

/** The QMP event's data for a violation. */
export function violationEventData(v: KvmClockViolation): JsonObject {
  return { kind: v.kind, transition: v.transition, 'cpu-index': v.cpu, detail: v.detail };
}

/** The stderr line for a violation. */
export function violationLine(v: KvmClockViolation): string {
  return `tsvmm: kvmclock violation (${v.kind}) at ${v.transition}: ${v.detail}\n`;
}

/** Marks the timeline at each kvmclock transition: stop/migrate at the save, start/cont/incoming at the set, then CTRL. */
export function timelineObserver(
  timeline: KvmClockTimeline,
  realtimeNs: () => bigint,
): KvmClockObserver {
  let started = false;
  return {
    stopped: (state: RunState) => {
      // quit is marked at SHUTDOWN, which also comes when the VM was not running.
      if (state === 'shutdown') return;
      timeline.mark(state === 'finish-migrate' ? 'migrate' : 'stop', realtimeNs());
    },
    started: (record: KvmClockStartRecord) => {
      const kind: TimelineMarkKind = record.restored ? 'incoming' : started ? 'cont' : 'start';
      started = true;
      timeline.mark(kind, record.hostRealtime);
      if (record.ctrlSent) timeline.mark('CTRL', realtimeNs());
    },
  };
}

/** Creates the timeline for `-kvmclock timeline=FILE`, if asked. */
export function createTimeline(path: string | undefined): KvmClockTimeline | undefined {
  return path === undefined ? undefined : new KvmClockTimeline();
}

/**
 * Registers `query-kvmclock`: the policy, whether the sanitizer checks,
 * the realtime pair and the last start, each vCPU's last reading (ns,
 * TSC, version, flags) and the violations found.
 */
export function registerKvmclockCommands(
  registry: QmpCommandRegistry,
  device: KvmClockDevice,
  sanitizer: KvmClockSanitizer | undefined,
  check: boolean,
): void {
  registry.register({
    name: 'query-kvmclock',
    handler: (): JsonObject => {
      const result: JsonObject = {
        policy: device.policy,
        check,
        clock: int(device.clock),
        'clock-is-reliable': device.clockIsReliable,
      };
      const pair = device.realtimePair;
      if (pair !== undefined) {
        result['realtime-pair'] = {
          clock: int(pair.clock),
          realtime: hostTime(pair.realtime),
          'error-ns': int(pair.errorNs),
          source: pair.source,
        };
      }
      const start = device.lastStart;
      if (start !== undefined) {
        result['last-start'] = {
          clock: int(start.clock),
          'host-time': hostTime(start.hostRealtime),
          'advance-ns': int(start.advanceNs),
          'realtime-mode': start.realtimeMode,
          restored: start.restored,
          'ctrl-sent': start.ctrlSent,
        };
      }
      if (sanitizer !== undefined) {
        result.vcpus = sanitizer.readings.map((r, cpu): JsonObject => {
          if (r === undefined) return { 'cpu-index': cpu };
          const entry: JsonObject = {
            'cpu-index': cpu,
            transition: r.transition,
            ns: int(r.ns),
            tsc: int(r.tsc),
            version: r.version,
            flags: r.flags,
            'host-time': hostTime(r.hostRealtime),
          };
          if (r.guestStoppedSeen !== undefined) entry['guest-stopped-seen'] = r.guestStoppedSeen;
          if (r.updated !== undefined) entry.updated = r.updated;
          return entry;
        });
        result.violations = sanitizer.violations.map(violationEventData);
      }
      return result;
    },
  });
}
