/**
 * The MigrationHost of an X86Machine: its RAM as one "pc.ram" block, its
 * devices (migration-devices.ts), its vCPU count and lifecycle, and what
 * the process around it provides (bottom halves, QMP events, autostart).
 */
import { guestMemoryRam } from '../../migration/guest-memory-ram.js';
import type { MigrationHost } from '../../migration/machine-migration.js';
import type { X86Machine } from './machine.js';
import { x86MigrationDevices } from './migration-devices.js';

/** QEMU's machine type name tsvmm's one x86 machine writes in its streams. */
export const X86_MACHINE_TYPE = 'pc';

/** What the process provides to a machine's migration. */
export type X86MigrationHostOptions = Pick<
  MigrationHost,
  'scheduleBottomHalf' | 'emitEvent' | 'autostart' | 'dirtyLog' | 'ramIsZeroed'
>;

/** The MigrationHost of `machine`. */
export function x86MigrationHost(
  machine: Pick<
    X86Machine,
    'vm' | 'memory' | 'vcpus' | 'lifecycle' | 'kvmclock' | 'serial' | 'tscAtStop' | 'restoredTsc'
  >,
  options: X86MigrationHostOptions,
): MigrationHost {
  return {
    machineType: X86_MACHINE_TYPE,
    vcpus: machine.vcpus.count,
    ram: guestMemoryRam(machine.memory),
    devices: x86MigrationDevices({
      vm: machine.vm,
      cpus: machine.vcpus,
      kvmclock: machine.kvmclock,
      serialState: machine.serial.state,
      tscAtStop: machine.tscAtStop,
      restoredTsc: machine.restoredTsc,
    }),
    lifecycle: machine.lifecycle,
    ...options,
  };
}
