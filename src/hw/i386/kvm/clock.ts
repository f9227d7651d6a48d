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

/** What kvmclock needs from KVM; the KVM layer implements it, tests use doubles. */
export interface KvmClockBackend {
  /** KVM_GET_CLOCK on the VM fd. */
  getClock(): { clock: bigint; flags: number };
  /** KVM_SET_CLOCK on the VM fd, flags 0 (sets the clock exactly). */
  setClock(clock: bigint): void;
  /** KVM_CHECK_EXTENSION(KVM_CAP_KVMCLOCK_CTRL) is non-zero. */
  readonly hasKvmclockCtrl: boolean;
  /** KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK) includes KVM_CLOCK_TSC_STABLE: GET_CLOCK agrees with the guest's pvclock. */
  readonly clockIsReliableFromHost: boolean;
  /**
   * The guest's kvmclock as vCPU 0 would compute it from its pvclock page
   * at its current TSC (after synchronising vCPU 0's MSRs), or 0 if the
   * guest has not enabled kvmclock. Used when the saved clock is not reliable.
   */
  readGuestPvclockNs?(): bigint | Promise<bigint>;
  /** Reads every vCPU's TSC into its saved state (QEMU's kvm_synchronize_all_tsc). */
  synchronizeTscs?(): Promise<void>;
}

/** Fault injection: make the device behave as on a host lacking something. */
export interface KvmClockFaults {
  /** Act as if the host lacked KVM_CAP_KVMCLOCK_CTRL: no vCPU gets KVM_KVMCLOCK_CTRL. */
  readonly noKvmclockCtrl?: boolean;
  /** Act as if KVM_GET_CLOCK were unreliable (no KVM_CLOCK_TSC_STABLE): the start path reads the guest's pvclock. */
  readonly unreliableGetClock?: boolean;
}

/** Options of the kvmclock device. */
export interface KvmClockOptions {
  /** `x-mach-use-reliable-get-clock` (default true): send `clock_is_reliable` in the migration stream. */
  readonly useReliableGetClock?: boolean;
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

  constructor(
    private readonly kvm: KvmClockBackend,
    private readonly cpus: Pick<CpuController, 'count' | 'runOnCpu'>,
    options: KvmClockOptions = {},
  ) {
    this.useReliableGetClock = options.useReliableGetClock ?? true;
    this.hasCtrl = kvm.hasKvmclockCtrl && !options.faults?.noKvmclockCtrl;
    this.hostReliable = kvm.clockIsReliableFromHost && !options.faults?.unreliableGetClock;
  }

  /** Reads the clock once and registers the change-state handler (priority 0). */
  realize(notifiers: VmChangeStateNotifiers): void {
    if (this.entry) return;
    this.updateClock();
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
   * KVM_KVMCLOCK_CTRL on every vCPU thread, one after the other. Stopping:
   * save the clock once per stop.
   */
  async kvmclockVmStateChange(running: boolean, state: RunState): Promise<void> {
    traceStateChange.emit({ running, state });
    if (running) {
      if (!this.reliable) {
        const fromMemory = (await this.kvm.readGuestPvclockNs?.()) ?? 0n;
        tracePvclockRead.emit({ ns: fromMemory });
        // The saved value cannot be trusted; the guest's own view can, if it has one.
        if (fromMemory !== 0n) this.clockNs = fromMemory;
      }
      this.valid = false;
      this.setClock(this.clockNs);
      if (!this.hasCtrl) return;
      for (let cpu = 0; cpu < this.cpus.count; cpu++) {
        await this.cpus.runOnCpu(cpu, KVMCLOCK_CTRL_OP);
      }
      return;
    }
    if (this.valid) return;
    this.paused = state === 'paused';
    await this.kvm.synchronizeTscs?.();
    this.updateClock();
    // Stopped: keep this value, so that a save during this stop sends what the stop saw.
    this.valid = true;
  }

  /** Migration pre-save: re-read the clock unless the VM was stopped by the user (paused). */
  preSave(): void {
    if (!this.paused) this.updateClock();
  }

  /** Migration pre-load: a stream without the subsection means the clock is not known to be reliable. */
  preLoad(): void {
    this.reliable = false;
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
    let data: { clock: bigint; flags: number };
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
    // GET_CLOCK agrees with the guest's pvclock only where the host reports TSC_STABLE support.
    this.reliable = this.hostReliable;
    traceGetClock.emit({ clock: data.clock, flags: data.flags, reliable: this.reliable });
  }

  private setClock(ns: bigint): void {
    traceSetClock.emit({ clock: ns });
    try {
      this.kvm.setClock(ns);
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
