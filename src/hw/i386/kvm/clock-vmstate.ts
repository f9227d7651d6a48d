/**
 * kvmclock's migration state (QEMU's kvmclock_vmsd, version 1): the field
 * `clock` (u64 ns), and the subsection `kvmclock/clock_is_reliable` (bool),
 * sent when `x-mach-use-reliable-get-clock` is on. tsvmm adds the
 * subsection `kvmclock/realtime` (u64 `clock`, u64 `realtime` ns of host
 * CLOCK_REALTIME, u64 `error_ns`), sent only under the policy `realtime`:
 * subsections are how a device's state grows without a new version, and
 * QEMU's analyze-migration.py reads them from the stream's JSON description.
 * QEMU itself would refuse a stream with it (an unknown subsection), so
 * the default policy never sends it. The hooks are the
 * device's own: pre-save re-reads the clock unless the VM was paused by the
 * user, pre-load marks the clock unreliable (a stream without the
 * subsection makes the destination read the guest's pvclock instead). No
 * post-load: the clock reaches KVM in the running=true handler when the
 * destination starts.
 */
import type { DeviceSection } from '../../../migration/stream.js';
import { type VMStateDescription, vmsField } from '../../../migration/vmstate.js';
import { KVMCLOCK_VMSTATE, type KvmClockDevice, type KvmClockRealtimePair } from './clock.js';

/** The pair being read from a stream, field by field (the setters run in wire order). */
function stagedPair(d: KvmClockDevice): KvmClockRealtimePair {
  return d.realtimePair ?? { clock: 0n, realtime: 0n, errorNs: 0n, source: 'host' };
}

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
    {
      name: KVMCLOCK_VMSTATE.realtimeSubsection,
      version: 1,
      needed: (d) => d.policy === 'realtime' && d.realtimePair !== undefined,
      fields: [
        vmsField.uint64(
          'clock',
          (d: KvmClockDevice) => d.realtimePair!.clock,
          (d, v) => {
            d.realtimePair = { ...stagedPair(d), clock: v };
          },
        ),
        vmsField.uint64(
          'realtime',
          (d: KvmClockDevice) => d.realtimePair!.realtime,
          (d, v) => {
            d.realtimePair = { ...stagedPair(d), realtime: v };
          },
        ),
        vmsField.uint64(
          'error_ns',
          (d: KvmClockDevice) => d.realtimePair!.errorNs,
          (d, v) => {
            d.realtimePair = { ...stagedPair(d), errorNs: v, source: v === 0n ? 'kvm' : 'host' };
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
