/**
 * The MigrationHost of an X86Machine: its RAM as one "pc.ram" block, its
 * devices (migration-devices.ts), its vCPU count and lifecycle, and what
 * the process around it provides (bottom halves, QMP events, autostart).
 */
import { MigrationStreamError } from '../../migration/errors.js';
import { guestMemoryRam, PC_RAM_BLOCK } from '../../migration/guest-memory-ram.js';
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
    | 'vm'
    | 'memory'
    | 'vcpus'
    | 'lifecycle'
    | 'kvmclock'
    | 'serial'
    | 'tscAtStop'
    | 'restoredTsc'
    | 'flushCoalescedIo'
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
      flushSerial: () => machine.flushCoalescedIo(),
      tscAtStop: machine.tscAtStop,
      restoredTsc: machine.restoredTsc,
    }),
    lifecycle: machine.lifecycle,
    // A mapped-ram restore: the file's pages become guest RAM. The slots go
    // first and come back after, so KVM registers them over the new
    // mapping rather than following the change through its MMU notifier.
    mapRamFromFile: (blockId, fd, fileOffset, length) => {
      const { memory, vm } = machine;
      if (blockId !== PC_RAM_BLOCK || length !== memory.size) {
        throw new MigrationStreamError(
          'MIGRATION_SHAPE_MISMATCH',
          `RAM block '${blockId}' of ${length} bytes is not this machine's '${PC_RAM_BLOCK}' of ${memory.size}`,
        );
      }
      memory.unregister(vm);
      try {
        memory.mapFilePrivate(fd, fileOffset, 0, length);
      } finally {
        memory.register(vm);
      }
    },
    ...options,
  };
}
