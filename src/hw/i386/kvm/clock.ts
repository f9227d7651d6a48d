import type { CpuController } from '../../../system/cpus.js';
import type { VmChangeStateEntry, VmChangeStateNotifiers } from '../../../system/notifiers.js';
import type { RunState } from '../../../system/runstate.js';
import { traceEvent } from '../../../trace/control.js';
import { TsvmmError } from '../../../util/errors.js';

/**
 * The kvmclock device (QEMU's hw/i386/kvm/clock.c, in our own code): it
 * freezes the guest's paravirtual clock while the VM is stopped and carries
 * it across migration. On stop it reads the VM clock (KVM_GET_CLOCK); on
 * start it writes it back (KVM_SET_CLOCK) before any vCPU runs, then has
 * every vCPU thread issue KVM_KVMCLOCK_CTRL so the guest's watchdogs forgive
 * the gap.
 */

/** kvm_clock_data.flags bit: `realtime` is valid (GET) or is to be used (SET). */
export const KVM_CLOCK_REALTIME_FLAG = 4;

/**
 * What the guest clock does while the VM is stopped or saved:
 * `freeze` (QEMU's behaviour, the default) keeps it where the stop left it;
 * `realtime` advances it by the wall time that passed, on resume and on restore.
 */
export type KvmClockPolicy = 'freeze' | 'realtime';

/** The policies, for option parsing and help. */
export const KVMCLOCK_POLICIES: readonly KvmClockPolicy[] = ['freeze', 'realtime'];

/** What kvmclock needs from KVM; the KVM layer implements it, tests use doubles. */
export interface KvmClockBackend {
  /** KVM_GET_CLOCK on the VM fd; `realtime` is meaningful when `flags` has KVM_CLOCK_REALTIME. */
  getClock(): { clock: bigint; flags: number; realtime?: bigint };
  /**
   * KVM_SET_CLOCK on the VM fd. Without `realtime`: flags 0, the clock is
   * set exactly. With `realtime`: flags KVM_CLOCK_REALTIME, and KVM adds
   * the host's CLOCK_REALTIME elapsed since `realtime` (never going back).
   */
  setClock(clock: bigint, realtime?: bigint): void;
  /** KVM_CAP_ADJUST_CLOCK includes KVM_CLOCK_REALTIME: `setClock` may be given a realtime. */
  readonly hasRealtimeClock?: boolean;
  /** The host's CLOCK_REALTIME in ns (the policy `realtime` measures wall time with it). */
  hostRealtimeNs?(): bigint;
  /** KVM_CHECK_EXTENSION(KVM_CAP_KVMCLOCK_CTRL) is non-zero. */
  readonly hasKvmclockCtrl: boolean;
  /** KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK) includes KVM_CLOCK_TSC_STABLE: GET_CLOCK agrees with the guest's pvclock. */
  readonly clockIsReliableFromHost: boolean;
  /**
   * The guest's kvmclock as vCPU 0 computes it from its pvclock page at the
   * TSC of the last moment it ran: the TSC read at the stop, or after a
   * load (`restored`) the TSC from the stream; 0 if the guest has not
   * enabled kvmclock. Used when the saved clock is not reliable. (The TSC
   * now would not do: it kept counting through the pause, so a frozen
   * clock would take the pause in; QEMU reads the TSC saved at the stop.)
   */
  readGuestPvclockNs?(restored: boolean): bigint | Promise<bigint>;
  /** Reads every vCPU's TSC into its saved state (QEMU's kvm_synchronize_all_tsc). */
  synchronizeTscs?(): Promise<void>;
}

/** Fault injection: make the device behave as on a host lacking something. */
export interface KvmClockFaults {
  /** Act as if the host lacked KVM_CAP_KVMCLOCK_CTRL: no vCPU gets KVM_KVMCLOCK_CTRL. */
  readonly noKvmclockCtrl?: boolean;
  /** Act as if KVM_GET_CLOCK were unreliable (no KVM_CLOCK_TSC_STABLE): the start path reads the guest's pvclock. */
  readonly unreliableGetClock?: boolean;
  /** The first start after a migration stream was loaded skips KVM_SET_CLOCK (the clock is not restored). */
  readonly skipSetClockOnRestore?: boolean;
  /** Every start sets the clock this many ns earlier than it should (a clock set backwards). */
  readonly setClockBackwardsNs?: bigint;
}

/**
 * A VM clock and the host's CLOCK_REALTIME at the same moment, taken when
 * the clock is saved under the policy `realtime`. From KVM_GET_CLOCK when
 * the host reports KVM_CLOCK_REALTIME (one reading, `errorNs` 0); otherwise
 * the realtime is the midpoint of two host readings around KVM_GET_CLOCK and
 * `errorNs` is half their distance: the pair is exact to within it.
 */
export interface KvmClockRealtimePair {
  readonly clock: bigint;
  readonly realtime: bigint;
  readonly errorNs: bigint;
  readonly source: 'kvm' | 'host';
}

/** What the last start set, as the sanitizer and the timeline see it. */
export interface KvmClockStartRecord {
  /** The run state the VM started into (running). */
  readonly state: RunState;
  /** The clock KVM holds right after the SET, as computed here (what the guest should see from). */
  readonly clock: bigint;
  /** Host CLOCK_REALTIME at the SET. */
  readonly hostRealtime: bigint;
  /** The wall time added under the policy `realtime` (0 under freeze). */
  readonly advanceNs: bigint;
  /** How the advance was applied: none, by KVM (KVM_CLOCK_REALTIME), or computed here. */
  readonly realtimeMode: 'none' | 'kvm' | 'computed';
  /** KVM_SET_CLOCK was issued (false only under the fault skipSetClockOnRestore). */
  readonly setIssued: boolean;
  /** This start followed a load from a migration stream. */
  readonly restored: boolean;
  /** vCPUs that were sent KVM_KVMCLOCK_CTRL. */
  readonly ctrlSent: boolean;
  /** What KVM_KVMCLOCK_CTRL returned on each vCPU, by index (0 or -errno; empty when not sent). */
  readonly ctrlResults: readonly (number | undefined)[];
}

/** Callbacks into the kvmclock device's transitions (the sanitizer and the timeline use them). */
export interface KvmClockObserver {
  /** Called after the clock was saved at a stop. */
  stopped?(state: RunState, clock: bigint): void | Promise<void>;
  /** Called at a start before KVM_SET_CLOCK (the vCPUs are paused). */
  beforeStart?(state: RunState, restored: boolean): void | Promise<void>;
  /** Called at a start after KVM_SET_CLOCK and KVMCLOCK_CTRL, before the vCPUs resume. */
  started?(record: KvmClockStartRecord): void | Promise<void>;
}

/** Options of the kvmclock device. */
export interface KvmClockOptions {
  /** `x-mach-use-reliable-get-clock` (default true): send `clock_is_reliable` in the migration stream. */
  readonly useReliableGetClock?: boolean;
  /** `policy` (default freeze). */
  readonly policy?: KvmClockPolicy;
  readonly faults?: KvmClockFaults;
}

/** The fields kvmclock puts in the migration stream. */
export interface KvmClockSavedState {
  /** VMState field `clock`, u64. */
  readonly clock: bigint;
  /** Subsection `kvmclock/clock_is_reliable`, present only when the option is on. */
  readonly clockIsReliable?: boolean;
}

/** The device's VMState: its name and version, and the subsection's name. */
export const KVMCLOCK_VMSTATE = {
  name: 'kvmclock',
  version: 1,
  minimumVersion: 1,
  clockIsReliableSubsection: 'kvmclock/clock_is_reliable',
  /** tsvmm's own: the realtime pair, sent under the policy `realtime` when one was taken. */
  realtimeSubsection: 'kvmclock/realtime',
} as const;

/** The `runOnCpu` operation name under which each vCPU thread runs `doKvmclockCtrl`. */
export const KVMCLOCK_CTRL_OP = 'kvmclock_ctrl';

/** A clock ioctl failed; the VM's clock can no longer be trusted, so this is fatal. */
export class KvmClockError extends TsvmmError {}

const traceStateChange = traceEvent('kvmclock_vm_state_change');
const traceCtrl = traceEvent('kvmclock_ctrl');
const traceGetClock = traceEvent('kvmclock_get_clock');
const traceSetClock = traceEvent('kvmclock_set_clock');
const tracePvclockRead = traceEvent('kvmclock_pvclock_read');
const traceRealtime = traceEvent('kvmclock_realtime');

/** The host's CLOCK_REALTIME in ns from Node alone (ms resolution): used only where no backend gives one. */
function dateRealtimeNs(): bigint {
  return BigInt(Date.now()) * 1_000_000n;
}

const U64_MAX = (1n << 64n) - 1n;

/** The kvmclock device of one VM. */
export class KvmClockDevice {
  /** The VM clock in ns, as last read from or written to KVM (or loaded from a stream). */
  private clockNs = 0n;
  /** The clock was saved for the current stop; later stops must not re-read it. */
  private valid = false;
  /** The last stop was into `paused` (not, say, finish-migrate). */
  private paused = false;
  /** `clockNs` came from a KVM whose GET_CLOCK agrees with the guest's pvclock. */
  private reliable = false;
  private entry: VmChangeStateEntry | undefined;
  private readonly useReliableGetClock: boolean;
  private readonly hasCtrl: boolean;
  private readonly hostReliable: boolean;
  private readonly faults: KvmClockFaults;
  /** The realtime pair of the current stop (or loaded from a stream), consumed at the next start. */
  private pair: KvmClockRealtimePair | undefined;
  /** A stream was loaded since the last start. */
  private loaded = false;
  private lastStartRecord: KvmClockStartRecord | undefined;
  private readonly observers: KvmClockObserver[] = [];
  /** `policy`: what the guest clock does while stopped. */
  readonly policy: KvmClockPolicy;

  constructor(
    private readonly kvm: KvmClockBackend,
    private readonly cpus: Pick<CpuController, 'count' | 'runOnCpu'>,
    options: KvmClockOptions = {},
  ) {
    this.useReliableGetClock = options.useReliableGetClock ?? true;
    this.hasCtrl = kvm.hasKvmclockCtrl && !options.faults?.noKvmclockCtrl;
    this.hostReliable = kvm.clockIsReliableFromHost && !options.faults?.unreliableGetClock;
    this.policy = options.policy ?? 'freeze';
    this.faults = options.faults ?? {};
  }

  /** Adds an observer of the device's transitions (called in the order added). */
  addObserver(observer: KvmClockObserver): void {
    this.observers.push(observer);
  }

  /** Reads the clock once and registers the change-state handler (priority 0). */
  realize(notifiers: VmChangeStateNotifiers): void {
    if (this.entry) return;
    this.updateClock();
    // A pair is taken at stops only: the time before the first start is not the guest's.
    this.pair = undefined;
    this.entry = notifiers.add({
      name: 'kvmclock',
      priority: 0,
      callback: (running, state) => this.kvmclockVmStateChange(running, state),
    });
  }

  /** Removes the change-state handler. */
  unrealize(notifiers: VmChangeStateNotifiers): void {
    if (this.entry) notifiers.remove(this.entry);
    this.entry = undefined;
  }

  /**
   * The change-state handler. Starting: restore the clock into KVM (from
   * the guest's pvclock page if the saved value is not reliable), then
   * KVM_KVMCLOCK_CTRL on every vCPU thread (queued on all, then awaited
   * together). Stopping:
   * save the clock once per stop.
   */
  async kvmclockVmStateChange(running: boolean, state: RunState): Promise<void> {
    traceStateChange.emit({ running, state });
    if (running) {
      const restored = this.loaded;
      this.loaded = false;
      for (const o of this.observers) await o.beforeStart?.(state, restored);
      if (!this.reliable) {
        const fromMemory = (await this.kvm.readGuestPvclockNs?.(restored)) ?? 0n;
        tracePvclockRead.emit({ ns: fromMemory });
        // The saved value cannot be trusted; the guest's own view can, if it has one.
        if (fromMemory !== 0n) this.clockNs = fromMemory;
      }
      this.valid = false;
      const record = this.restoreClock(state, restored);
      const ctrlResults: (number | undefined)[] = [];
      if (this.hasCtrl) {
        // Queued on every vCPU thread at once (in vCPU order) and all awaited
        // before the vCPUs resume: each thread still issues its own ioctl,
        // but the start waits one round trip instead of one per vCPU.
        const pending: Promise<unknown>[] = [];
        for (let cpu = 0; cpu < this.cpus.count; cpu++) {
          pending.push(this.cpus.runOnCpu(cpu, KVMCLOCK_CTRL_OP));
        }
        for (const ret of await Promise.all(pending)) {
          ctrlResults.push(typeof ret === 'number' ? ret : undefined);
        }
      }
      if (this.observers.length > 0) {
        const full = { ...record, ctrlSent: this.hasCtrl, ctrlResults };
        this.lastStartRecord = full;
        for (const o of this.observers) await o.started?.(full);
      }
      return;
    }
    if (this.valid) return;
    this.paused = state === 'paused';
    await this.kvm.synchronizeTscs?.();
    this.updateClock();
    // Stopped: keep this value, so that a save during this stop sends what the stop saw.
    this.valid = true;
    for (const o of this.observers) await o.stopped?.(state, this.clockNs);
  }

  /**
   * The start's KVM_SET_CLOCK. Under freeze: the saved clock, exactly (the
   * seed's path, unchanged). Under realtime with a pair: the saved clock
   * advanced by the wall time since the pair, by KVM where the host offers
   * KVM_CLOCK_REALTIME (it reads its realtime inside the ioctl), otherwise
   * computed here from CLOCK_REALTIME just before the ioctl.
   */
  private restoreClock(
    state: RunState,
    restored: boolean,
  ): Omit<KvmClockStartRecord, 'ctrlSent' | 'ctrlResults'> {
    const back = this.faults.setClockBackwardsNs ?? 0n;
    const skip = restored && this.faults.skipSetClockOnRestore === true;
    const base = this.clockNs > back ? this.clockNs - back : 0n;
    const pair = this.policy === 'realtime' ? this.pair : undefined;
    this.pair = undefined;
    const now = pair !== undefined || this.observers.length > 0 ? this.realtimeNow() : 0n;
    if (pair === undefined) {
      if (skip) traceSetClock.emit({ clock: base, skipped: 1 });
      else this.setClock(base);
      return {
        state,
        clock: base,
        hostRealtime: now,
        advanceNs: 0n,
        realtimeMode: 'none',
        setIssued: !skip,
        restored,
      };
    }
    // Never backwards: a host clock stepped back since the pair adds nothing.
    const advance = now > pair.realtime ? now - pair.realtime : 0n;
    const mode = this.kvm.hasRealtimeClock ? 'kvm' : 'computed';
    traceRealtime.emit({
      clock: base,
      realtime: pair.realtime,
      now,
      advance,
      error: pair.errorNs,
      source: pair.source,
      mode,
    });
    if (skip) traceSetClock.emit({ clock: base, skipped: 1 });
    else if (mode === 'kvm') this.setClock(base, pair.realtime);
    else this.setClock(base + advance);
    return {
      state,
      clock: base + advance,
      hostRealtime: now,
      advanceNs: advance,
      realtimeMode: mode,
      setIssued: !skip,
      restored,
    };
  }

  private realtimeNow(): bigint {
    return this.kvm.hostRealtimeNs?.() ?? dateRealtimeNs();
  }

  /** Migration pre-save: re-read the clock unless the VM was stopped by the user (paused). */
  preSave(): void {
    if (!this.paused) this.updateClock();
  }

  /** Migration pre-load: a stream without the subsection means the clock is not known to be reliable. */
  preLoad(): void {
    this.reliable = false;
    this.pair = undefined;
    this.loaded = true;
  }

  /** The fields to send, in stream order. */
  saveState(): KvmClockSavedState {
    return this.useReliableGetClock
      ? { clock: this.clockNs, clockIsReliable: this.reliable }
      : { clock: this.clockNs };
  }

  /** Takes the fields read from a stream (call `preLoad` first). No post-load: the next start restores. */
  loadState(saved: KvmClockSavedState): void {
    this.clock = saved.clock;
    if (saved.clockIsReliable !== undefined) this.reliable = saved.clockIsReliable;
  }

  /** The realtime pair of this stop (taken only under the policy `realtime`), or loaded from a stream. */
  get realtimePair(): KvmClockRealtimePair | undefined {
    return this.pair;
  }

  /** Sets the pair read from a stream (the subsection's fields arrive together). */
  set realtimePair(pair: KvmClockRealtimePair | undefined) {
    this.pair = pair;
  }

  /** What the last start set (recorded only while an observer is attached). */
  get lastStart(): KvmClockStartRecord | undefined {
    return this.lastStartRecord;
  }

  /** Whether `kvmclock/clock_is_reliable` is sent (`x-mach-use-reliable-get-clock`). */
  get sendsClockIsReliable(): boolean {
    return this.useReliableGetClock;
  }

  /** The saved VM clock in ns (VMState field `clock`, u64). */
  get clock(): bigint {
    return this.clockNs;
  }

  set clock(ns: bigint) {
    if (ns < 0n || ns > U64_MAX) {
      throw new RangeError(`kvmclock clock ${ns} does not fit in a u64`);
    }
    this.clockNs = ns;
  }

  /** Whether the saved clock came from a reliable KVM_GET_CLOCK (subsection field). */
  get clockIsReliable(): boolean {
    return this.reliable;
  }

  set clockIsReliable(value: boolean) {
    this.reliable = value;
  }

  /** Whether the clock was saved for the current stop. */
  get clockValid(): boolean {
    return this.valid;
  }

  /** Whether the last stop was into `paused`. */
  get runstatePaused(): boolean {
    return this.paused;
  }

  /** Whether vCPUs get KVM_KVMCLOCK_CTRL (the host has it and no fault masks it). */
  get usesKvmclockCtrl(): boolean {
    return this.hasCtrl;
  }

  private updateClock(): void {
    let data: { clock: bigint; flags: number; realtime?: bigint };
    // Under freeze nothing but GET_CLOCK happens here (the seed's path).
    const before = this.policy === 'realtime' ? this.realtimeNow() : 0n;
    try {
      data = this.kvm.getClock();
    } catch (err) {
      throw new KvmClockError(
        'KVMCLOCK_GET_CLOCK_FAILED',
        `KVM_GET_CLOCK failed (${describe(err)}): the guest clock cannot be saved; the VM must be stopped`,
        { cause: err },
      );
    }
    this.clockNs = data.clock;
    if (this.policy === 'realtime') {
      if ((data.flags & KVM_CLOCK_REALTIME_FLAG) !== 0 && data.realtime !== undefined) {
        this.pair = { clock: data.clock, realtime: data.realtime, errorNs: 0n, source: 'kvm' };
      } else {
        const after = this.realtimeNow();
        this.pair = {
          clock: data.clock,
          realtime: (before + after) / 2n,
          errorNs: (after - before + 1n) / 2n,
          source: 'host',
        };
      }
    }
    // GET_CLOCK agrees with the guest's pvclock only where the host reports TSC_STABLE support.
    this.reliable = this.hostReliable;
    traceGetClock.emit({ clock: data.clock, flags: data.flags, reliable: this.reliable });
  }

  private setClock(ns: bigint, realtime?: bigint): void {
    if (realtime === undefined) traceSetClock.emit({ clock: ns });
    else traceSetClock.emit({ clock: ns, realtime });
    try {
      if (realtime === undefined) this.kvm.setClock(ns);
      else this.kvm.setClock(ns, realtime);
    } catch (err) {
      throw new KvmClockError(
        'KVMCLOCK_SET_CLOCK_FAILED',
        `KVM_SET_CLOCK to ${ns} ns failed (${describe(err)}): the guest would run with a wrong clock, so the VM must not start`,
        { cause: err },
      );
    }
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

const EINVAL = 22;

/**
 * The vCPU side, run on each vCPU's own thread for `KVMCLOCK_CTRL_OP`:
 * issues KVM_KVMCLOCK_CTRL so the guest sees GUEST_STOPPED. EINVAL means the
 * guest has not enabled kvmclock yet, which is fine; any other errno is
 * logged (the guest may then report a soft lockup) but not fatal. Returns 0
 * or -errno. An error that carries no errno is a bug and is rethrown.
 */
export function doKvmclockCtrl(
  vcpu: { kvmclockCtrl(): void },
  cpu: number,
  log: (message: string) => void = (m) => process.stderr.write(`tsvmm: ${m}\n`),
): number {
  let ret = 0;
  try {
    vcpu.kvmclockCtrl();
  } catch (err) {
    const errno = errnoOf(err);
    if (errno === undefined) throw err;
    ret = -errno;
    if (errno !== EINVAL) {
      log(
        `KVM_KVMCLOCK_CTRL on vCPU ${cpu} failed (${describe(err)}, errno ${errno}); the guest may report a soft lockup for this pause`,
      );
    }
  }
  traceCtrl.emit({ cpu, ret });
  return ret;
}

function errnoOf(err: unknown): number | undefined {
  if (typeof err !== 'object' || err === null || !('errno' in err)) return undefined;
  const errno = (err as { errno: unknown }).errno;
  // Node reports errno negated (uv style), the FFI layer may report it positive.
  return typeof errno === 'number' && errno !== 0 ? Math.abs(errno) : undefined;
}
