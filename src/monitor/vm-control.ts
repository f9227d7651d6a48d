import type { JsonObject } from './json-value.js';
import { QmpError } from './qmp-error.js';
import type { QmpArgsSchema } from './qmp-schema.js';

/** One vCPU as query-cpus-fast reports it. */
export interface VmCpuInfo {
  cpuIndex: number;
  /** The host thread id (gettid) of the vCPU thread. */
  threadId: number;
  /** The vCPU's QOM path, QEMU's spelling: `/machine/unattached/device[0]`. */
  qomPath: string;
  target: 'x86_64';
  /** Topology ids, those that are known. */
  props?: {
    nodeId?: number;
    socketId?: number;
    dieId?: number;
    clusterId?: number;
    moduleId?: number;
    coreId?: number;
    threadId?: number;
  };
}

/** A trace event and its state, as trace-event-get-state reports it. */
export interface VmTraceEventInfo {
  name: string;
  /** `unavailable`: compiled out or not traceable here; cannot be enabled. */
  state: 'enabled' | 'disabled' | 'unavailable';
  /** Whether the event is per-vCPU (QEMU's "vcpu" property). */
  vcpu?: boolean;
}

/**
 * What the monitor needs from the VM. The lead implements it over the run
 * state machine and lifecycle (src/system); the monitor implements QEMU's
 * command semantics on top of it (which states `cont` refuses, what `stop`
 * does during an incoming migration), so implementations stay thin.
 *
 * Events are not part of it: the lifecycle broadcasts STOP, RESUME,
 * SHUTDOWN and RESET itself through `QmpServer.broadcast`.
 */
export interface VmControl {
  /** The run state: `running` is true only in state `running`. */
  status(): { running: boolean; status: string };
  /** QEMU's vm_stop(RUN_STATE_PAUSED): no-op unless running; emits STOP. */
  stop(): Promise<void>;
  /** QEMU's vm_start(): to running, vCPUs resumed; emits RESUME. */
  cont(): Promise<void>;
  /**
   * QEMU's `autostart`: whether the VM starts by itself once an incoming
   * migration completes. `stop` clears it and `cont` sets it while the
   * state is `inmigrate`, instead of stopping or starting anything.
   */
  setAutostart(enabled: boolean): void;
  /**
   * Shut down and exit 0: SHUTDOWN event (guest false, reason
   * host-qmp-quit), no STOP. Called after the reply to `quit` has been
   * written; the implementation should close the QMP server (which flushes
   * clients) before exiting.
   */
  quit(): void;
  /** Reset the guest; emits RESET (guest false, reason host-qmp-system-reset). */
  systemReset(): Promise<void>;
  /** The `-name` given, if any. */
  readonly name?: string;
  cpus(): VmCpuInfo[];
  /**
   * A register dump of vCPU `cpuIndex` (HMP `info registers`), read on the
   * vCPU's own thread; absent where there are no vCPUs to read.
   */
  cpuRegisters?(cpuIndex: number): Promise<string>;
  /** The local APIC of vCPU `cpuIndex` (HMP `info lapic`), read on its thread. */
  cpuLapic?(cpuIndex: number): Promise<string>;
  readonly kvm: { enabled: boolean; present: boolean };
  readonly traceEvents: {
    /** Events whose names match `pattern`, a glob with `*` and `?` (an exact name matches itself). */
    list(pattern: string): VmTraceEventInfo[];
    /** Enables or disables every available event matching `pattern`. */
    set(pattern: string, enable: boolean): void;
  };
}

/**
 * What the monitor needs from migration. When the lead passes one to
 * `registerStandardCommands`, migrate, migrate-incoming, query-migrate,
 * migrate_cancel, migrate-continue, migrate-set-parameters,
 * query-migrate-parameters, migrate-set-capabilities and
 * query-migrate-capabilities are registered; without it they do not exist (CommandNotFound), rather than
 * existing and failing.
 *
 * Methods throw {@link QmpError} (or any Error, answered as GenericError)
 * to refuse; argument types are checked before they are called.
 */
export interface MigrationControl {
  /** Start an outgoing migration to `uri`; resolves when it has started (QMP's migrate returns at once). */
  migrate(uri: string, options: { detach?: boolean; resume?: boolean }): Promise<void>;
  /** Start listening for an incoming migration (after `-incoming defer`). */
  migrateIncoming(uri: string, options: { exitOnError?: boolean }): Promise<void>;
  /** query-migrate's MigrationInfo (`{"status": "completed", ...}`, `{}` before any). */
  queryMigrate(): JsonObject;
  /** migrate_cancel. */
  cancel(): Promise<void>;
  /** The members migrate-set-parameters accepts, all optional (`'*downtime-limit': 'int'`). */
  readonly parameterSchema: QmpArgsSchema;
  /** Apply validated parameters. */
  setParameters(params: JsonObject): void;
  /** query-migrate-parameters' MigrationParameters. */
  queryParameters(): JsonObject;
  /** The capability names migrate-set-capabilities accepts (QEMU's enum: others get its error). */
  readonly capabilityNames: readonly string[];
  /**
   * migrate-set-capabilities with a list whose names are in
   * `capabilityNames`; refuses the whole list, changing nothing, if any
   * entry cannot be honoured or a migration is running.
   */
  setCapabilities(list: readonly { capability: string; state: boolean }[]): void;
  /** query-migrate-capabilities: every capability with its state. */
  queryCapabilities(): { capability: string; state: boolean }[];
  /** The MigrationStatus names migrate-continue's `state` accepts. */
  readonly statusNames: readonly string[];
  /** migrate-continue with a `state` from `statusNames`. */
  migrateContinue(state: string): void;
}

/**
 * QEMU's qmp_stop: during an incoming migration only clear autostart,
 * otherwise stop (a no-op when not running).
 */
export async function stopCommand(vm: VmControl): Promise<void> {
  if (vm.status().status === 'inmigrate') {
    vm.setAutostart(false);
    return;
  }
  await vm.stop();
}

/**
 * QEMU's qmp_cont: refuse where the VM cannot simply continue, ignore a
 * suspended VM, during an incoming migration only set autostart, and
 * otherwise start (from prelaunch, paused, postmigrate, io-error, ...;
 * `VmControl.cont` must do nothing when already running, as vm_start does).
 */
export async function contCommand(vm: VmControl): Promise<void> {
  const { status } = vm.status();
  switch (status) {
    case 'internal-error':
    case 'shutdown':
      throw new QmpError('GenericError', 'Resetting the Virtual Machine is required');
    case 'suspended':
      return;
    case 'finish-migrate':
      throw new QmpError('GenericError', 'Migration is not finalized yet');
    case 'colo':
      throw new QmpError('GenericError', 'COLO checkpoint in progress');
    case 'inmigrate':
      vm.setAutostart(true);
      return;
    default:
      await vm.cont();
  }
}

/** Whether a trace event name is a pattern (QEMU: it contains `*`). */
export function isTracePattern(name: string): boolean {
  return name.includes('*');
}
