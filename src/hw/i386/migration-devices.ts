/**
 * The x86 machine's migratable devices, in stream order: one "cpu" per
 * vCPU, the in-kernel PICs, IOAPIC and PIT, the COM1 UART, and kvmclock.
 * vCPU state is read and written on each vCPU's own thread through the
 * vCPU ops `get_cpu_state` and `set_cpu_state`; the chips through the VM fd.
 */
import type { CpuSavedState } from '../../accel/kvm/cpu-state.js';
import type { MigratableDevice } from '../../migration/machine-migration.js';
import type { CpuController } from '../../system/cpus.js';
import { serialMigrationState, serialSection } from '../char/serial-vmstate.js';
import { cpuMigrationState, cpuSection, warmUpCpuSection } from './cpu-vmstate.js';
import {
  captureIrqchipState,
  type IrqchipVm,
  irqchipDeviceSections,
  irqchipSections,
  restoreIrqchipState,
} from './irqchip-vmstate.js';
import type { KvmClockDevice } from './kvm/clock.js';
import { kvmclockSection } from './kvm/clock-vmstate.js';

/** The vCPU op names the vCPU threads must offer (vcpu-ops.ts). */
export const GET_CPU_STATE_OP = 'get_cpu_state';
export const SET_CPU_STATE_OP = 'set_cpu_state';

/** The machine's parts migration reads and writes. */
export interface X86MigrationParts {
  readonly vm: IrqchipVm;
  readonly cpus: Pick<CpuController, 'count' | 'runOnCpu'>;
  readonly kvmclock: KvmClockDevice;
  /** The UART's shared state (createSerialState()). */
  readonly serialState: SharedArrayBuffer;
  /** Serves UART writes still queued (the coalesced ring) before its state is read. */
  readonly flushSerial?: () => void;
  /** Each vCPU's TSC read when the clock was saved at this stop; saved in its place. */
  readonly tscAtStop?: readonly (bigint | undefined)[];
  /** Filled with each vCPU's TSC as loaded (the kvmclock sanitizer reads the source's last moment at it). */
  readonly restoredTsc?: (bigint | undefined)[];
}

const MSR_IA32_TSC = 0x10;

/**
 * `saved` with its TSC replaced by the one read when kvmclock saved the
 * clock, so the destination's TSC and kvmclock resume from one moment.
 */
export function withTscAt(saved: CpuSavedState, tsc: bigint | undefined): CpuSavedState {
  if (tsc === undefined) return saved;
  return {
    ...saved,
    msrs: saved.msrs.map((m) => (m.index === MSR_IA32_TSC ? { ...m, data: tsc } : m)),
  };
}

/** The devices list of an X86Machine for MigrationHost.devices. */
export function x86MigrationDevices(parts: X86MigrationParts): MigratableDevice[] {
  const devices: MigratableDevice[] = [];
  for (let cpu = 0; cpu < parts.cpus.count; cpu++) {
    const state = cpuMigrationState(cpu);
    devices.push({
      section: cpuSection(state),
      capture: async () => {
        const saved = (await parts.cpus.runOnCpu(cpu, GET_CPU_STATE_OP)) as CpuSavedState;
        state.saved = withTscAt(saved, parts.tscAtStop?.[cpu]);
      },
      // The encoder is the same for every vCPU: the first one warms it.
      ...(cpu === 0 ? { prepareSave: warmUpCpuSection } : {}),
      restore: async () => {
        if (parts.restoredTsc) {
          parts.restoredTsc[cpu] = state.saved?.msrs.find((m) => m.index === MSR_IA32_TSC)?.data;
        }
        await parts.cpus.runOnCpu(cpu, SET_CPU_STATE_OP, state.saved);
      },
    });
  }
  const chips = irqchipSections();
  const [first, ...rest] = irqchipDeviceSections(chips);
  // The four chip sections are read and written together, with the first.
  devices.push({
    section: first!,
    capture: () => captureIrqchipState(parts.vm, chips),
    restore: () => restoreIrqchipState(parts.vm, chips),
  });
  for (const section of rest) devices.push({ section });
  devices.push({
    section: serialSection(serialMigrationState(parts.serialState)),
    capture: () => parts.flushSerial?.(),
  });
  devices.push({ section: kvmclockSection(parts.kvmclock) });
  return devices;
}
