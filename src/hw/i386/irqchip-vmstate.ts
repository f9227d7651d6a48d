/**
 * Migration sections of KVM's in-kernel interrupt controllers and timer:
 * "kvm-i8259" (instance 0 = master PIC, 1 = slave PIC), "kvm-ioapic" and
 * "kvm-pit", named as QEMU names its KVM devices. The chips' state is the
 * kernel's own (the 512-byte kvm_irqchip union for each chip, struct
 * kvm_pit_state2 for the PIT), carried as raw bytes: a monitor saves and
 * restores it without looking inside, and the kernel checks it on
 * KVM_SET_IRQCHIP / KVM_SET_PIT2.
 *
 * The sections carry plain data; {@link captureIrqchipState} fills it from
 * the VM fd before a save and {@link restoreIrqchipState} writes it back
 * after a verified load.
 */

import {
  KVM_IRQCHIP_IOAPIC,
  KVM_IRQCHIP_PIC_MASTER,
  KVM_IRQCHIP_PIC_SLAVE,
  KVM_IRQCHIP_STATE_BYTES,
  KVM_PIT_STATE2,
  type KvmPitState2,
} from '../../accel/kvm/structs/vm.js';
import type { KvmVm } from '../../accel/kvm/vm.js';
import type { DeviceSection } from '../../migration/stream.js';
import { type VMStateDescription, vmsField } from '../../migration/vmstate.js';
import { TsvmmError } from '../../util/errors.js';

/** One chip's saved state: KVM_GET_IRQCHIP's 512 bytes for that chip id. */
export interface IrqchipMigrationState {
  /** KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC. */
  readonly chipId: number;
  chip: Uint8Array | undefined;
}

/** The PIT's saved state. */
export interface PitMigrationState {
  pit: KvmPitState2 | undefined;
}

/** The in-kernel chips' state objects, one per section. */
export interface IrqchipSections {
  readonly picMaster: IrqchipMigrationState;
  readonly picSlave: IrqchipMigrationState;
  readonly ioapic: IrqchipMigrationState;
  readonly pit: PitMigrationState;
}

/** The chip state was written before it was read: a bug in the caller's sequence. */
export class IrqchipMigrationError extends TsvmmError {}

function chipBytes(s: IrqchipMigrationState): Uint8Array {
  if (!s.chip) {
    throw new IrqchipMigrationError(
      'IRQCHIP_STATE_NOT_CAPTURED',
      `irqchip ${s.chipId}: its state was not read (KVM_GET_IRQCHIP) before the save`,
    );
  }
  return s.chip;
}

function chipVmstate(name: string): VMStateDescription<IrqchipMigrationState> {
  return {
    name,
    version: 1,
    fields: [
      vmsField.uint32(
        'chip_id',
        (s: IrqchipMigrationState) => s.chipId,
        (s, v) => {
          // A master's state must not land in the slave: the instance says which chip it is.
          if (v !== s.chipId) {
            throw new IrqchipMigrationError(
              'IRQCHIP_STATE_MISMATCH',
              `section '${name}' holds chip ${v} where chip ${s.chipId} was expected`,
            );
          }
        },
      ),
      vmsField.buffer('kvm_irqchip_state', KVM_IRQCHIP_STATE_BYTES, chipBytes, (s, v) => {
        s.chip = v;
      }),
    ],
  };
}

/** vmstate "kvm-i8259": one PIC of the in-kernel pair. */
export const I8259_VMSTATE = chipVmstate('kvm-i8259');
/** vmstate "kvm-ioapic": the in-kernel IOAPIC. */
export const IOAPIC_VMSTATE = chipVmstate('kvm-ioapic');

/** vmstate "kvm-pit": struct kvm_pit_state2 (three channels and the flags). */
export const PIT_VMSTATE: VMStateDescription<PitMigrationState> = {
  name: 'kvm-pit',
  version: 1,
  fields: [
    vmsField.buffer(
      'kvm_pit_state2',
      KVM_PIT_STATE2.size,
      (s: PitMigrationState) => {
        if (!s.pit) {
          throw new IrqchipMigrationError(
            'IRQCHIP_STATE_NOT_CAPTURED',
            'the PIT state was not read (KVM_GET_PIT2) before the save',
          );
        }
        return new Uint8Array(KVM_PIT_STATE2.encode(s.pit));
      },
      (s, v) => {
        s.pit = KVM_PIT_STATE2.decode(v);
      },
    ),
  ],
};

/** Empty state objects for the four sections. */
export function irqchipSections(): IrqchipSections {
  return {
    picMaster: { chipId: KVM_IRQCHIP_PIC_MASTER, chip: undefined },
    picSlave: { chipId: KVM_IRQCHIP_PIC_SLAVE, chip: undefined },
    ioapic: { chipId: KVM_IRQCHIP_IOAPIC, chip: undefined },
    pit: { pit: undefined },
  };
}

/** The four device sections, in the order they go into the stream. */
export function irqchipDeviceSections(s: IrqchipSections): DeviceSection[] {
  return [
    { idstr: 'kvm-i8259', instanceId: 0, vmsd: I8259_VMSTATE, state: s.picMaster },
    { idstr: 'kvm-i8259', instanceId: 1, vmsd: I8259_VMSTATE, state: s.picSlave },
    { idstr: 'kvm-ioapic', instanceId: 0, vmsd: IOAPIC_VMSTATE, state: s.ioapic },
    { idstr: 'kvm-pit', instanceId: 0, vmsd: PIT_VMSTATE, state: s.pit },
  ];
}

/** The VM fd methods these sections use. */
export type IrqchipVm = Pick<KvmVm, 'getIrqchip' | 'setIrqchip' | 'getPit2' | 'setPit2'>;

/** Reads the PICs, the IOAPIC and the PIT from the VM fd (the VM is stopped). */
export function captureIrqchipState(vm: IrqchipVm, s: IrqchipSections): void {
  for (const chip of [s.picMaster, s.picSlave, s.ioapic]) {
    chip.chip = vm.getIrqchip(chip.chipId).chip;
  }
  s.pit.pit = vm.getPit2();
}

/** Writes loaded state back through the VM fd, before any vCPU runs. */
export function restoreIrqchipState(vm: IrqchipVm, s: IrqchipSections): void {
  for (const chip of [s.picMaster, s.picSlave, s.ioapic]) {
    vm.setIrqchip({ chipId: chip.chipId, chip: chipBytes(chip) });
  }
  if (!s.pit.pit) {
    throw new IrqchipMigrationError('IRQCHIP_STATE_NOT_LOADED', 'no PIT state was loaded');
  }
  vm.setPit2(s.pit.pit);
}
