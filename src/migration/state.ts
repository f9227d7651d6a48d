import { MigrationParameterError, MigrationStateError } from './errors.js';
import { PAGE_SIZE } from './ram.js';

/** QEMU's MigrationStatus values, as query-migrate and the MIGRATION event spell them. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover-setup'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

/**
 * The statuses QEMU 7.2's QAPI MigrationStatus enum accepts (migrate-continue's
 * `state`); postcopy-recover-setup came later.
 */
export const MIGRATION_STATUS_VALUES: readonly MigrationStatus[] = [
  'none',
  'setup',
  'cancelling',
  'cancelled',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'completed',
  'failed',
  'colo',
  'pre-switchover',
  'device',
  'wait-unplug',
];

/**
 * The status changes a migration makes, as QEMU's migration code performs
 * them (migrate_set_state calls in migration.c). A finished migration
 * (completed, failed, cancelled) may start again with setup.
 */
const TRANSITIONS: Readonly<Record<MigrationStatus, readonly MigrationStatus[]>> = {
  none: ['setup'],
  setup: ['active', 'failed', 'cancelling', 'wait-unplug'],
  'wait-unplug': ['active', 'failed', 'cancelling'],
  active: ['completed', 'failed', 'cancelling', 'pre-switchover', 'device', 'postcopy-active'],
  'pre-switchover': ['device', 'failed', 'cancelling'],
  device: ['completed', 'failed', 'cancelling', 'postcopy-active'],
  'postcopy-active': ['completed', 'failed', 'postcopy-paused'],
  'postcopy-paused': ['postcopy-recover-setup', 'failed'],
  'postcopy-recover-setup': ['postcopy-recover', 'postcopy-paused', 'failed'],
  'postcopy-recover': ['postcopy-active', 'postcopy-paused', 'failed'],
  colo: ['completed', 'failed'],
  cancelling: ['cancelled', 'failed'],
  completed: ['setup'],
  failed: ['setup'],
  cancelled: ['setup'],
};

/** Whether a migration in this status is still under way (QEMU's migration_is_running). */
export function migrationIsRunning(status: MigrationStatus): boolean {
  return !['none', 'completed', 'failed', 'cancelled'].includes(status);
}

/** The parameters migrate-set-parameters changes here, in QMP spelling. */
export interface MigrationParameters {
  /** Longest pause allowed at completion, in milliseconds. */
  'downtime-limit': number;
  /** Bytes per second for precopy; 0 means no limit. */
  'max-bandwidth': number;
}

/** QEMU's defaults: 300 ms (DEFAULT_MIGRATE_SET_DOWNTIME) and 128 MiB/s (MAX_THROTTLE). */
export const DEFAULT_MIGRATION_PARAMETERS: Readonly<MigrationParameters> = {
  'downtime-limit': 300,
  'max-bandwidth': 128 << 20,
};

/** QEMU's ceiling for downtime-limit: 2000 seconds, in milliseconds. */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;

/** A migration parameter's QMP type, as qmp-schema spells it. */
type ParameterType = 'uint8' | 'uint32' | 'uint64' | 'bool' | 'StrOrNull' | 'multifd-compression';

/**
 * QEMU 7.2's migration parameters other than the two tsvmm uses, with the
 * value query-migrate-parameters shows for each (QEMU's default) and what
 * tsvmm lacks for it to mean anything. migrate-set-parameters accepts each
 * at that value only (a change to what is already in effect); any other
 * value is refused, never stored without an effect.
 */
const INERT_PARAMETERS: Readonly<
  Record<string, { type: ParameterType; value: string | number | boolean; lacks: string }>
> = {
  'announce-initial': { type: 'uint64', value: 50, lacks: 'network devices to announce' },
  'announce-max': { type: 'uint64', value: 550, lacks: 'network devices to announce' },
  'announce-rounds': { type: 'uint64', value: 5, lacks: 'network devices to announce' },
  'announce-step': { type: 'uint64', value: 100, lacks: 'network devices to announce' },
  'compress-level': { type: 'uint8', value: 1, lacks: 'page compression' },
  'compress-threads': { type: 'uint8', value: 8, lacks: 'page compression' },
  'compress-wait-thread': { type: 'bool', value: true, lacks: 'page compression' },
  'decompress-threads': { type: 'uint8', value: 2, lacks: 'page compression' },
  'throttle-trigger-threshold': { type: 'uint8', value: 50, lacks: 'vCPU throttling' },
  'cpu-throttle-initial': { type: 'uint8', value: 20, lacks: 'vCPU throttling' },
  'cpu-throttle-increment': { type: 'uint8', value: 10, lacks: 'vCPU throttling' },
  'cpu-throttle-tailslow': { type: 'bool', value: false, lacks: 'vCPU throttling' },
  'tls-creds': { type: 'StrOrNull', value: '', lacks: 'TLS on migration channels' },
  'tls-hostname': { type: 'StrOrNull', value: '', lacks: 'TLS on migration channels' },
  'tls-authz': { type: 'StrOrNull', value: '', lacks: 'TLS on migration channels' },
  'x-checkpoint-delay': { type: 'uint32', value: 20000, lacks: 'COLO checkpoints' },
  'block-incremental': { type: 'bool', value: false, lacks: 'block migration' },
  'multifd-channels': { type: 'uint8', value: 2, lacks: 'multifd' },
  'xbzrle-cache-size': { type: 'uint64', value: 64 << 20, lacks: 'XBZRLE' },
  'max-postcopy-bandwidth': { type: 'uint64', value: 0, lacks: 'postcopy' },
  'max-cpu-throttle': { type: 'uint8', value: 99, lacks: 'vCPU throttling' },
  'multifd-compression': { type: 'multifd-compression', value: 'none', lacks: 'multifd' },
  'multifd-zlib-level': { type: 'uint8', value: 1, lacks: 'multifd' },
  'multifd-zstd-level': { type: 'uint8', value: 1, lacks: 'multifd' },
};

/** The parameters that take effect here. */
export const SUPPORTED_MIGRATION_PARAMETERS = ['downtime-limit', 'max-bandwidth'] as const;

/**
 * migrate-set-parameters' members in QAPI's types (for the QMP schema):
 * every parameter QEMU 7.2 has, so a wrong type gets QEMU's wording.
 * `block-bitmap-mapping` is listed so that it is refused with a reason.
 */
export const MIGRATION_PARAMETER_TYPES: Readonly<Record<string, ParameterType | 'any'>> = {
  'downtime-limit': 'uint64',
  'max-bandwidth': 'uint64',
  ...Object.fromEntries(Object.entries(INERT_PARAMETERS).map(([k, v]) => [k, v.type])),
  'block-bitmap-mapping': 'any',
};

/** QEMU 7.2's MultiFDCompression values (zstd where QEMU is built with it, as Debian's is). */
export const MULTIFD_COMPRESSION_VALUES = ['none', 'zlib', 'zstd'] as const;

/**
 * Checks migrate-set-parameters arguments without applying any of them
 * (QEMU validates the whole set first, so a bad value changes nothing).
 * Returns the values of the parameters that take effect.
 */
export function validateMigrationParameters(
  args: Record<string, unknown>,
): Partial<MigrationParameters> {
  const out: Partial<MigrationParameters> = {};
  for (const [key, value] of Object.entries(args)) {
    const integer = typeof value === 'number' && Number.isSafeInteger(value);
    switch (key) {
      case 'downtime-limit':
        if (!integer || value < 0 || value > MAX_DOWNTIME_LIMIT_MS) {
          throw new MigrationParameterError(
            `'downtime-limit' must be an integer from 0 to ${MAX_DOWNTIME_LIMIT_MS} milliseconds, ` +
              `not ${JSON.stringify(value)}`,
          );
        }
        out['downtime-limit'] = value;
        break;
      case 'max-bandwidth':
        // QEMU allows up to SIZE_MAX; JSON numbers are exact to 2^53.
        if (!integer || value < 0) {
          throw new MigrationParameterError(
            `'max-bandwidth' must be an integer number of bytes per second from 0 to ` +
              `${Number.MAX_SAFE_INTEGER}, not ${JSON.stringify(value)}`,
          );
        }
        out['max-bandwidth'] = value;
        break;
      default:
        checkInertParameter(key, value);
    }
  }
  return out;
}

/** A parameter without effect here may only be "set" to the value it has. */
function checkInertParameter(key: string, value: unknown): void {
  const supported = SUPPORTED_MIGRATION_PARAMETERS.join(', ');
  const inert = INERT_PARAMETERS[key];
  if (inert === undefined) {
    const what =
      key === 'block-bitmap-mapping'
        ? 'tsvmm has no block dirty bitmaps to migrate'
        : 'tsvmm does not know it';
    throw new MigrationParameterError(
      `migrate-set-parameters cannot set '${key}': ${what}; parameters with an effect: ${supported}`,
    );
  }
  // QEMU's null for a TLS parameter means "back to the empty string".
  const given = inert.type === 'StrOrNull' && value === null ? '' : value;
  if (given === inert.value) return;
  throw new MigrationParameterError(
    `migrate-set-parameters cannot set '${key}' to ${JSON.stringify(value)}: tsvmm has no ` +
      `${inert.lacks}, so '${key}' keeps its default ${JSON.stringify(inert.value)}; ` +
      `parameters with an effect: ${supported}`,
  );
}

/** query-migrate-parameters: QEMU 7.2's parameters, those without effect here at their defaults. */
export function migrationParametersView(
  params: Readonly<MigrationParameters>,
): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  for (const [key, { value }] of Object.entries(INERT_PARAMETERS)) out[key] = value;
  out['downtime-limit'] = params['downtime-limit'];
  out['max-bandwidth'] = params['max-bandwidth'];
  return out;
}

/** query-migrate's "ram" object (QAPI MigrationStats). */
export interface MigrationRamInfo {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
}

/** query-migrate's return value (QAPI MigrationInfo); fields appear as QEMU shows them per status. */
export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationRamInfo;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
}

/** The QMP events a migration emits. */
export type MigrationEvent =
  | { event: 'MIGRATION'; data: { status: MigrationStatus } }
  | { event: 'MIGRATION_PASS'; data: { pass: number } };

/** Progress figures the migration thread reports as it goes. */
export interface MigrationProgress {
  /** Stream bytes the channel accepted so far. */
  transferred?: number;
  /** Bytes of RAM still dirty. */
  remaining?: number;
  normalPages?: number;
  zeroPages?: number;
  /** Bytes sent while the VM was stopped (completion). */
  downtimeBytes?: number;
}

/**
 * One migration's status, counters and parameters (QEMU's MigrationState),
 * for query-migrate, migrate-set-parameters and the MIGRATION events.
 * Status changes are compare-and-set, like migrate_set_state: a change
 * from a status that is no longer current is ignored, so a cancel racing
 * with a completion resolves one way only.
 */
export class MigrationStateMachine {
  private current: MigrationStatus = 'none';
  private params: MigrationParameters = { ...DEFAULT_MIGRATION_PARAMETERS };
  private error: string | undefined;
  private startTime = 0;
  private setupTime = 0;
  private totalTime = 0;
  private downtimeMs = 0;
  private downtimeStart = 0;
  private total = 0;
  private transferred = 0;
  private remaining = 0;
  private normal = 0;
  private zero = 0;
  private downtimeBytes = 0;
  private syncCount = 0;
  private mbps = 0;
  private pagesPerSecond = 0;
  private rateMark = { time: 0, bytes: 0, pages: 0 };

  constructor(
    private readonly opts: {
      /** Milliseconds; Date.now by default. */
      now?: () => number;
      onEvent?: (e: MigrationEvent) => void;
    } = {},
  ) {}

  private now(): number {
    return (this.opts.now ?? Date.now)();
  }

  get status(): MigrationStatus {
    return this.current;
  }

  get parameters(): Readonly<MigrationParameters> {
    return this.params;
  }

  /** The failure reason, once failed. */
  get errorDesc(): string | undefined {
    return this.error;
  }

  /** migrate-set-parameters: all values are checked before any is applied. */
  setParameters(args: Record<string, unknown>): void {
    Object.assign(this.params, validateMigrationParameters(args));
  }

  /**
   * Changes status from `from` to `to` if `from` is current; returns
   * whether it did. A change QEMU never makes throws MigrationStateError.
   */
  setStatus(from: MigrationStatus, to: MigrationStatus): boolean {
    if (!TRANSITIONS[from].includes(to)) {
      throw new MigrationStateError(`a migration cannot go from '${from}' to '${to}'`);
    }
    if (this.current !== from) return false;
    this.current = to;
    this.opts.onEvent?.({ event: 'MIGRATION', data: { status: to } });
    return true;
  }

  /** Starts a migration: counters reset, status setup. `ramBytes` is the guest RAM size. */
  start(ramBytes: number): void {
    if (migrationIsRunning(this.current)) {
      throw new MigrationStateError(
        `a migration is already in progress (status '${this.current}')`,
      );
    }
    this.error = undefined;
    this.startTime = this.now();
    this.setupTime = this.totalTime = this.downtimeMs = this.downtimeStart = 0;
    this.total = ramBytes;
    this.remaining = ramBytes;
    this.transferred = this.normal = this.zero = this.downtimeBytes = this.syncCount = 0;
    this.mbps = this.pagesPerSecond = 0;
    this.rateMark = { time: this.startTime, bytes: 0, pages: 0 };
    this.setStatus(this.current, 'setup');
  }

  /** Setup is over: status active, setup-time recorded. */
  activate(): boolean {
    this.setupTime = this.now() - this.startTime;
    this.rateMark = { time: this.now(), bytes: this.transferred, pages: this.normal + this.zero };
    return this.setStatus('setup', 'active');
  }

  /** Counts a pass over dirty memory and emits MIGRATION_PASS. */
  pass(): number {
    this.syncCount++;
    this.opts.onEvent?.({ event: 'MIGRATION_PASS', data: { pass: this.syncCount } });
    return this.syncCount;
  }

  /** Updates the counters; throughput is measured between updates at least 100 ms apart. */
  progress(p: MigrationProgress): void {
    if (p.transferred !== undefined) this.transferred = p.transferred;
    if (p.remaining !== undefined) this.remaining = p.remaining;
    if (p.normalPages !== undefined) this.normal = p.normalPages;
    if (p.zeroPages !== undefined) this.zero = p.zeroPages;
    if (p.downtimeBytes !== undefined) this.downtimeBytes = p.downtimeBytes;
    const t = this.now();
    const dt = t - this.rateMark.time;
    if (dt >= 100) {
      const bytes = this.transferred - this.rateMark.bytes;
      const pages = this.normal + this.zero - this.rateMark.pages;
      this.mbps = (bytes * 8) / dt / 1000;
      this.pagesPerSecond = (pages * 1000) / dt;
      this.rateMark = { time: t, bytes: this.transferred, pages: this.normal + this.zero };
    }
  }

  /** The VM was stopped for completion: downtime starts counting. */
  stopForCompletion(): void {
    this.downtimeStart = this.now();
  }

  /** Completion succeeded: completed, with total-time, downtime and the average throughput. */
  complete(): boolean {
    const end = this.now();
    this.totalTime = end - this.startTime;
    if (this.downtimeStart) this.downtimeMs = end - this.downtimeStart;
    this.remaining = 0;
    const transferTime = this.totalTime - this.setupTime;
    if (transferTime > 0) this.mbps = (this.transferred * 8) / transferTime / 1000;
    return this.setStatus(this.current, 'completed');
  }

  /** The migration failed: status failed with error-desc, from whatever running status. */
  fail(reason: string): boolean {
    if (!migrationIsRunning(this.current)) return false;
    this.error = reason;
    this.totalTime = this.now() - this.startTime;
    return this.setStatus(this.current, 'failed');
  }

  /** migrate_cancel: a running migration goes to cancelling; false if none is running. */
  cancel(): boolean {
    const s = this.current;
    if (!migrationIsRunning(s) || s === 'cancelling') return false;
    if (!TRANSITIONS[s].includes('cancelling')) return false;
    return this.setStatus(s, 'cancelling');
  }

  /** The migration thread acknowledged the cancel. */
  cancelled(): boolean {
    return this.setStatus('cancelling', 'cancelled');
  }

  /** query-migrate, with the fields QEMU shows for the current status. */
  query(): MigrationInfo {
    const s = this.current;
    const info: MigrationInfo = {};
    if (s === 'none') return info;
    info.status = s;
    const withTimes = s === 'completed' || (migrationIsRunning(s) && s !== 'setup');
    if (withTimes) {
      info['setup-time'] = this.setupTime;
      info['total-time'] = s === 'completed' ? this.totalTime : this.now() - this.startTime;
      if (s === 'completed') info.downtime = this.downtimeMs;
      else info['expected-downtime'] = this.expectedDowntime();
      info.ram = this.ramInfo();
    }
    if (this.error !== undefined) info['error-desc'] = this.error;
    return info;
  }

  private expectedDowntime(): number {
    // Bytes per millisecond at the measured rate; the limit until one exists.
    const bytesPerMs = this.mbps * 125; // Mbit/s to bytes/ms
    return bytesPerMs > 0 ? Math.round(this.remaining / bytesPerMs) : this.params['downtime-limit'];
  }

  private ramInfo(): MigrationRamInfo {
    return {
      transferred: this.transferred,
      remaining: this.remaining,
      total: this.total,
      duplicate: this.zero,
      normal: this.normal,
      'normal-bytes': this.normal * PAGE_SIZE,
      'dirty-pages-rate': 0,
      mbps: this.mbps,
      'dirty-sync-count': this.syncCount,
      'postcopy-requests': 0,
      'page-size': PAGE_SIZE,
      'multifd-bytes': 0,
      'pages-per-second': this.pagesPerSecond,
      'precopy-bytes': this.transferred - this.downtimeBytes,
      'downtime-bytes': this.downtimeBytes,
      'postcopy-bytes': 0,
      'dirty-sync-missed-zero-copy': 0,
    };
  }
}
