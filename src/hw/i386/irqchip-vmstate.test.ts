import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import type { KvmIrqchip, KvmPitState2 } from '../../accel/kvm/structs/vm.js';
import { roundTripThroughFile } from '../../migration/test-roundtrip.js';
import {
  captureIrqchipState,
  type IrqchipVm,
  irqchipDeviceSections,
  irqchipSections,
  restoreIrqchipState,
} from './irqchip-vmstate.js';

// Plain-data VM doubles: they hold chip state as KVM would hand it out.
function chipVm(seed: boolean) {
  const chips = new Map<number, Uint8Array>();
  for (const id of [0, 1, 2])
    chips.set(id, seed ? new Uint8Array(randomBytes(512)) : new Uint8Array(512));
  let pit: KvmPitState2 = {
    channels: [0, 1, 2].map((i) => ({
      count: seed ? 0x1234 + i : 0,
      latchedCount: seed ? 7 : 0,
      countLatched: 0,
      statusLatched: 1,
      status: 0,
      readState: 3,
      writeState: 3,
      writeLatch: 0,
      rwMode: 3,
      mode: seed ? 2 : 0,
      bcd: 0,
      gate: 1,
      countLoadTime: seed ? 123_456_789n * BigInt(i + 1) : 0n,
    })),
    flags: seed ? 1 : 0,
  };
  const calls: string[] = [];
  const vm: IrqchipVm = {
    getIrqchip: (chipId: number): KvmIrqchip => ({ chipId, chip: chips.get(chipId)!.slice() }),
    setIrqchip: (c: KvmIrqchip) => {
      calls.push(`set ${c.chipId}`);
      chips.set(c.chipId, c.chip.slice());
    },
    getPit2: () => structuredClone(pit),
    setPit2: (p: KvmPitState2) => {
      calls.push('set pit');
      pit = structuredClone(p);
    },
  };
  return { vm, chips, pit: () => pit, calls };
}

test('irqchip vmstate round trip through a file: both PICs, the IOAPIC and the PIT, byte for byte', async () => {
  const src = chipVm(true);
  const srcState = irqchipSections();
  captureIrqchipState(src.vm, srcState);
  const dstState = irqchipSections();
  const loaded = await roundTripThroughFile(
    irqchipDeviceSections(srcState),
    irqchipDeviceSections(dstState),
  );
  const dst = chipVm(false);
  restoreIrqchipState(dst.vm, dstState);
  assert.deepEqual(dst.calls, ['set 0', 'set 1', 'set 2', 'set pit']);
  for (const id of [0, 1, 2]) assert.deepEqual(dst.chips.get(id), src.chips.get(id), `chip ${id}`);
  assert.deepEqual(dst.pit(), src.pit());
  assert.deepEqual(
    loaded.vmdesc.devices
      .filter((d) => d.name.startsWith('kvm-'))
      .map((d) => `${d.name}#${d.instance_id}`),
    ['kvm-i8259#0', 'kvm-i8259#1', 'kvm-ioapic#0', 'kvm-pit#0'],
  );
});

test('irqchip vmstate: saving before the chips were read is refused, naming the chip', async () => {
  await assert.rejects(
    roundTripThroughFile(irqchipDeviceSections(irqchipSections()), []),
    /irqchip 0: its state was not read/,
  );
});
