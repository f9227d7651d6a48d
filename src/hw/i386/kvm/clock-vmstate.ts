/**
 * kvmclock's migration state (QEMU's kvmclock_vmsd, version 1): the field
 * `clock` (u64 ns), and the subsection `kvmclock/clock_is_reliable` (bool),
 * sent when `x-mach-use-reliable-get-clock` is on. The hooks are the
 * device's own: pre-save re-reads the clock unless the VM was paused by the
 * user, pre-load marks the clock unreliable (a stream without the
 * subsection makes the destination read the guest's pvclock instead). No
 * post-load: the clock reaches KVM in the running=true handler when the
 * destination starts.
 */
import type { DeviceSection } from '../../../migration/stream.js';
import { type VMStateDescription, vmsField } from '../../../migration/vmstate.js';
import { KVMCLOCK_VMSTATE, type KvmClockDevice } from './clock.js';

/** vmstate "kvmclock" over the device itself. */
export const KVMCLOCK_VMSD: VMStateDescription<KvmClockDevice> = {
  name: KVMCLOCK_VMSTATE.name,
  version: KVMCLOCK_VMSTATE.version,
  minimumVersion: KVMCLOCK_VMSTATE.minimumVersion,
  fields: [
    vmsField.uint64(
      'clock',
      (d: KvmClockDevice) => d.clock,
      (d, v) => {
        d.clock = v;
      },
    ),
  ],
  subsections: [
    {
      name: KVMCLOCK_VMSTATE.clockIsReliableSubsection,
      version: 1,
      needed: (d) => d.sendsClockIsReliable,
      fields: [
        vmsField.bool(
          'clock_is_reliable',
          (d: KvmClockDevice) => d.clockIsReliable,
          (d, v) => {
            d.clockIsReliable = v;
          },
        ),
      ],
    },
  ],
  preSave: (d) => d.preSave(),
  preLoad: (d) => d.preLoad(),
};

/** The "kvmclock" device section (instance 0). */
export function kvmclockSection(device: KvmClockDevice): DeviceSection<KvmClockDevice> {
  return { idstr: KVMCLOCK_VMSTATE.name, instanceId: 0, vmsd: KVMCLOCK_VMSD, state: device };
}
