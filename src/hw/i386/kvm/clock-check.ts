/**
 * The kvmclock sanitizer (`-global kvmclock.check=on`): at every
 * transition it reads each vCPU's pvclock area straight from guest memory
 * (its address from MSR_KVM_SYSTEM_TIME_NEW, read on the vCPU's thread),
 * computes the time the guest would see at that vCPU's TSC with the
 * version protocol, and checks what the guest may rely on:
 *
 * - `backwards`: a vCPU's time never goes back from one reading to the next;
 * - `cross-vcpu`: a vCPU read after another is not behind it by more than
 *   the tolerance (readings of one transition are taken in vCPU order);
 * - `guest-stopped-missing`: where the host has KVMCLOCK_CTRL, every vCPU
 *   with kvmclock on was sent it after a pause and KVM took it (returned 0),
 *   so its next page carries GUEST_STOPPED and the guest's watchdogs
 *   forgive the pause. Judged from the ioctl, not the page: a guest clears
 *   the flag as soon as it sees it, without changing the page's version, so
 *   a page read after the guest ran cannot tell "never set" from "seen";
 *   whether the first page was caught with the flag is only recorded
 *   (`guestStoppedSeen`);
 * - `clock-mismatch`: after a start, the guest's time is the clock
 *   kvmclock set, plus the time since (never less, never much more);
 * - `policy`: under freeze the clock is set to the value saved at the stop;
 *   under realtime it advances by no more than the wall time since the stop.
 *
 * Stop readings use the TSC read when kvmclock saved the clock (the last
 * moment the guest ran); start readings wait until KVM has rewritten the
 * page (its version changes when a vCPU enters the guest after the start).
 */
import type { RunState } from '../../../system/runstate.js';
import { traceEvent } from '../../../trace/control.js';
import type { KvmClockDevice, KvmClockObserver, KvmClockStartRecord } from './clock.js';
import {
  decodePvclock,
  PVCLOCK_GUEST_STOPPED,
  PVCLOCK_TIME_INFO_SIZE,
  type PvclockTimeInfo,
  pvclockNsAt,
  readPvclock,
} from './pvclock.js';

/** What the sanitizer reads from the machine. */
export interface PvclockAccess {
  readonly count: number;
  /** MSR_KVM_SYSTEM_TIME_NEW and MSR_IA32_TSC of vCPU `cpu`, read on its own thread. */
  readMsrs(cpu: number): Promise<{ systemTime: bigint; tsc: bigint }>;
  /** The 32 bytes of guest memory at `gpa` as they are now. */
  readGuest(gpa: bigint, length: number): Uint8Array;
  /** vCPU `cpu`'s TSC read when the clock was saved at this stop (or restored from a stream). */
  tscAtStop(cpu: number): bigint | undefined;
  /** Host CLOCK_REALTIME in ns. */
  hostRealtimeNs(): bigint;
  /** The host has KVM_CAP_KVMCLOCK_CTRL (the fact, whatever the fault injection says). */
  readonly hostHasCtrl: boolean;
}

/** Where a reading was taken. */
export type KvmClockTransition =
  | 'stop'
  | 'finish-migrate'
  | 'shutdown'
  | 'incoming'
  | 'start'
  | 'cont'
  | 'reset'
  | RunState;

/** One vCPU's pvclock as read at a transition. */
export interface KvmClockReading {
  readonly transition: KvmClockTransition;
  readonly cpu: number;
  /** Guest kvmclock ns at `tsc`. */
  readonly ns: bigint;
  readonly tsc: bigint;
  readonly version: number;
  readonly flags: number;
  readonly systemTime: bigint;
  readonly tscTimestamp: bigint;
  /** Host CLOCK_REALTIME when the reading was taken. */
  readonly hostRealtime: bigint;
  /** For start readings: whether KVM rewrote the page after the start before it was read. */
  readonly updated?: boolean;
  /** For start readings: GUEST_STOPPED seen in the first page KVM wrote after the start. */
  readonly guestStoppedSeen?: boolean;
}

/** A broken promise about the guest's clock. */
export interface KvmClockViolation {
  readonly kind: 'backwards' | 'cross-vcpu' | 'guest-stopped-missing' | 'clock-mismatch' | 'policy';
  readonly transition: KvmClockTransition;
  /** The vCPU concerned, or -1 for the VM clock. */
  readonly cpu: number;
  readonly detail: string;
}

export interface KvmClockSanitizerOptions {
  /**
   * How far one vCPU may be behind another read after it, and how far a
   * start may differ from what was set (default 100 µs). pvclock promises
   * no more: each vCPU extrapolates its own page.
   */
  readonly toleranceNs?: bigint;
  /** How long a start waits for KVM to rewrite every page (default 2 s). */
  readonly updateWaitMs?: number;
  /** Report violations (check=on); without it readings are only recorded (for the timeline). */
  readonly report: boolean;
  onViolation?(v: KvmClockViolation): void;
  onReading?(r: KvmClockReading): void;
}

const traceReading = traceEvent('kvmclock_reading');
const traceViolation = traceEvent('kvmclock_violation');

interface PendingStart {
  readonly transition: KvmClockTransition;
  /** Per vCPU: the page address and version before the start, or undefined if kvmclock is off. */
  readonly before: ({ gpa: bigint; version: number } | undefined)[];
  record?: KvmClockStartRecord;
}

/** The sanitizer of one machine's kvmclock. */
export class KvmClockSanitizer implements KvmClockObserver {
  private readonly last: (KvmClockReading | undefined)[] = [];
  private readonly violationsSeen: KvmClockViolation[] = [];
  private pending: PendingStart | undefined;
  /** The clock saved at the last stop (or loaded) and the host realtime then. */
  private stopClock: { clock: bigint; realtime: bigint } | undefined;
  private readonly tolerance: bigint;
  private readonly updateWaitMs: number;

  constructor(
    private readonly access: PvclockAccess,
    private readonly device: KvmClockDevice,
    private readonly options: KvmClockSanitizerOptions,
  ) {
    this.tolerance = options.toleranceNs ?? 100_000n;
    this.updateWaitMs = options.updateWaitMs ?? 2000;
    device.addObserver(this);
  }

  /** Each vCPU's last reading (undefined where none was taken yet). */
  get readings(): readonly (KvmClockReading | undefined)[] {
    return Array.from({ length: this.access.count }, (_, cpu) => this.last[cpu]);
  }

  /** Every violation found so far. */
  get violations(): readonly KvmClockViolation[] {
    return this.violationsSeen;
  }

  /** kvmclock saved the clock at a stop: read every vCPU at the TSC of that moment. */
  async stopped(state: RunState, clock: bigint): Promise<void> {
    const transition: KvmClockTransition = state === 'paused' ? 'stop' : state;
    await this.readRound(transition, (cpu) => this.access.tscAtStop(cpu));
    // The realtime KVM paired with the saved clock, where there is one: the
    // host time read here, after the readings, is later than the clock.
    this.stopClock = {
      clock,
      realtime: this.device.realtimePair?.realtime ?? this.access.hostRealtimeNs(),
    };
  }

  /** A start is about to set the clock: note each page's version (and, after a load, read where the source left it). */
  async beforeStart(_state: RunState, restored: boolean): Promise<void> {
    const transition: KvmClockTransition = restored
      ? 'incoming'
      : this.stopClock === undefined
        ? 'start'
        : 'cont';
    if (restored) {
      await this.readRound('incoming', (cpu) => this.access.tscAtStop(cpu));
      this.stopClock = {
        clock: this.device.clock,
        realtime: this.device.realtimePair?.realtime ?? this.access.hostRealtimeNs(),
      };
    }
    const before: PendingStart['before'] = [];
    for (let cpu = 0; cpu < this.access.count; cpu++) {
      const { systemTime } = await this.access.readMsrs(cpu);
      if ((systemTime & 1n) === 0n) {
        before.push(undefined);
        continue;
      }
      const gpa = systemTime & ~1n;
      before.push({ gpa, version: this.page(gpa).version });
    }
    this.pending = { transition, before };
  }

  /** kvmclock set the clock and sent KVMCLOCK_CTRL: check the policy now, the guest's view after the resume. */
  started(record: KvmClockStartRecord): void {
    if (this.pending) this.pending.record = record;
    const stop = this.stopClock;
    if (stop === undefined || this.pending?.transition === 'start') return;
    const transition = this.pending?.transition ?? 'cont';
    const advance = record.clock - stop.clock;
    if (this.device.policy === 'freeze') {
      if (advance > this.tolerance || advance < -this.tolerance) {
        this.violate({
          kind: 'policy',
          transition,
          cpu: -1,
          detail: `policy freeze: the clock was set ${advance} ns from the ${stop.clock} ns saved at the stop`,
        });
      }
    } else {
      // KVM reads its realtime inside KVM_SET_CLOCK, after the record's
      // hostRealtime was taken: the wall time up to now bounds what it added.
      const wall = this.access.hostRealtimeNs() - stop.realtime;
      if (advance < -this.tolerance || advance > wall + this.tolerance) {
        this.violate({
          kind: 'policy',
          transition,
          cpu: -1,
          detail: `policy realtime: the clock advanced ${advance} ns across a stop of ${wall} ns wall time`,
        });
      }
    }
  }

  /**
   * After the vCPUs resumed: waits (polling guest memory, not the vCPUs)
   * until KVM has rewritten each page, notes GUEST_STOPPED in that first
   * page, then reads every vCPU at its TSC and checks the start.
   */
  async afterResume(): Promise<void> {
    const pending = this.pending;
    this.pending = undefined;
    if (pending === undefined) return;
    const fresh: (PvclockTimeInfo | undefined)[] = pending.before.map(() => undefined);
    const deadline = Date.now() + this.updateWaitMs;
    // A tight loop: the guest clears GUEST_STOPPED soon after it sees it,
    // so the page must be caught right after KVM wrote it.
    for (;;) {
      let waiting = false;
      pending.before.forEach((b, cpu) => {
        if (b === undefined || fresh[cpu] !== undefined) return;
        const info = this.page(b.gpa);
        if (info.version !== b.version && (info.version & 1) === 0) fresh[cpu] = info;
        else waiting = true;
      });
      if (!waiting || Date.now() > deadline) break;
      await new Promise((r) => setImmediate(r));
    }
    // A page KVM rewrote only after the wait gave up (a vCPU that waited
    // long for a host CPU) still shows the clock the guest runs on: it is
    // checked against the start too. Its first flags were not seen, so
    // GUEST_STOPPED is judged only on pages caught by the wait.
    const readings = await this.readRound(
      pending.transition,
      () => undefined,
      (cpu, info) => {
        const before = pending.before[cpu];
        const caught = fresh[cpu];
        if (caught !== undefined) {
          return {
            updated: true,
            guestStoppedSeen: (caught.flags & PVCLOCK_GUEST_STOPPED) !== 0,
          };
        }
        return { updated: before !== undefined && info.version !== before.version };
      },
    );
    const record = pending.record;
    if (record === undefined) return;
    const now = this.access.hostRealtimeNs();
    for (const r of readings) {
      if (r === undefined || !r.updated) continue;
      if (pending.before[r.cpu] === undefined) continue;
      // The first start follows no pause: nothing to forgive.
      if (pending.transition !== 'start' && this.access.hostHasCtrl) {
        const ret = record.ctrlResults[r.cpu];
        if (!record.ctrlSent || (ret !== undefined && ret !== 0)) {
          this.violate({
            kind: 'guest-stopped-missing',
            transition: pending.transition,
            cpu: r.cpu,
            detail: record.ctrlSent
              ? `KVM_KVMCLOCK_CTRL on vCPU ${r.cpu} returned ${ret}: its guest is not told of the pause`
              : `the host has KVMCLOCK_CTRL but vCPU ${r.cpu} was not sent it after the pause`,
          });
        }
      }
      const elapsed = now > record.hostRealtime ? now - record.hostRealtime : 0n;
      const low = record.clock - this.tolerance;
      const high = record.clock + elapsed + elapsed / 20n + this.tolerance;
      if (r.ns < low || r.ns > high) {
        this.violate({
          kind: 'clock-mismatch',
          transition: pending.transition,
          cpu: r.cpu,
          detail: `vCPU ${r.cpu} sees ${r.ns} ns after the start; kvmclock set ${record.clock} ns ${elapsed} ns before (expected ${low}..${high})${record.setIssued ? '' : '; KVM_SET_CLOCK was skipped'}`,
        });
      }
    }
  }

  /** A reset is about to put every vCPU back to its power-on state: read where the guest got to. */
  async reset(): Promise<void> {
    this.pending = undefined;
    await this.readRound('reset', () => undefined);
  }

  private page(gpa: bigint): PvclockTimeInfo {
    return decodePvclock(this.access.readGuest(gpa, PVCLOCK_TIME_INFO_SIZE));
  }

  /** Reads every vCPU with kvmclock on, in order, and checks each against its last and the one before it. */
  private async readRound(
    transition: KvmClockTransition,
    tscOf: (cpu: number) => bigint | undefined,
    extra: (cpu: number, info: PvclockTimeInfo) => Partial<KvmClockReading> = () => ({}),
  ): Promise<(KvmClockReading | undefined)[]> {
    const round: (KvmClockReading | undefined)[] = [];
    let previous: KvmClockReading | undefined;
    for (let cpu = 0; cpu < this.access.count; cpu++) {
      const msrs = await this.access.readMsrs(cpu);
      const hostRealtime = this.access.hostRealtimeNs();
      if ((msrs.systemTime & 1n) === 0n) {
        round.push(undefined);
        continue;
      }
      const gpa = msrs.systemTime & ~1n;
      const info = readPvclock(() => this.access.readGuest(gpa, PVCLOCK_TIME_INFO_SIZE));
      const tsc = tscOf(cpu) ?? msrs.tsc;
      if (tsc < info.tscTimestamp) {
        // The page is newer than the TSC of the stop: the guest cannot have seen it yet.
        round.push(undefined);
        continue;
      }
      const reading: KvmClockReading = {
        transition,
        cpu,
        ns: pvclockNsAt(info, tsc),
        tsc,
        version: info.version,
        flags: info.flags,
        systemTime: info.systemTime,
        tscTimestamp: info.tscTimestamp,
        hostRealtime,
        ...extra(cpu, info),
      };
      traceReading.emit({
        transition,
        cpu,
        ns: reading.ns,
        tsc,
        version: info.version,
        flags: info.flags,
      });
      const last = this.last[cpu];
      if (last !== undefined && reading.ns < last.ns) {
        this.violate({
          kind: 'backwards',
          transition,
          cpu,
          detail: `vCPU ${cpu}'s kvmclock went back ${last.ns - reading.ns} ns: ${last.ns} at ${last.transition}, ${reading.ns} at ${transition}`,
        });
      }
      if (previous !== undefined && reading.ns + this.tolerance < previous.ns) {
        this.violate({
          kind: 'cross-vcpu',
          transition,
          cpu,
          detail: `vCPU ${cpu} read ${previous.ns - reading.ns} ns behind vCPU ${previous.cpu}, read before it (tolerance ${this.tolerance} ns)`,
        });
      }
      this.last[cpu] = reading;
      previous = reading;
      round.push(reading);
      this.options.onReading?.(reading);
    }
    return round;
  }

  private violate(v: KvmClockViolation): void {
    if (!this.options.report) return;
    this.violationsSeen.push(v);
    traceViolation.emit({ kind: v.kind, transition: v.transition, cpu: v.cpu });
    this.options.onViolation?.(v);
  }
}
