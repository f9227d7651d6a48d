import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { CPU_MSRS, type CpuSavedState } from '../../accel/kvm/cpu-state.js';
import { KVM_FPU } from '../../accel/kvm/structs/fpu.js';
import { KVM_DEBUGREGS, KVM_REGS, KVM_SREGS } from '../../accel/kvm/structs/regs.js';
import { KVM_VCPU_EVENTS } from '../../accel/kvm/structs/vcpu-state.js';
import { roundTripThroughFile } from '../../migration/test-roundtrip.js';
import { CPU_VMSTATE, cpuMigrationState, cpuSection, warmUpCpuSection } from './cpu-vmstate.js';

function randomState(opts: { fpu?: boolean; missingMsrs?: number[] } = {}): CpuSavedState {
  const state: CpuSavedState = {
    regs: KVM_REGS.decode(randomBytes(KVM_REGS.size)),
    sregs: KVM_SREGS.decode(randomBytes(KVM_SREGS.size)),
    msrs: CPU_MSRS.filter((m) => !opts.missingMsrs?.includes(m.index)).map((m) => ({
      index: m.index,
      data: randomBytes(8).readBigUInt64LE(),
    })),
    lapic: { regs: new Uint8Array(randomBytes(1024)) },
    events: KVM_VCPU_EVENTS.decode(randomBytes(KVM_VCPU_EVENTS.size)),
    mpState: { mpState: 5 },
    debugregs: KVM_DEBUGREGS.decode(randomBytes(KVM_DEBUGREGS.size)),
  };
  if (opts.fpu) state.fpu = KVM_FPU.decode(randomBytes(KVM_FPU.size));
  else {
    state.xsave = { region: new Uint8Array(randomBytes(4096)) };
    state.xcrs = { flags: 0, xcrs: [{ xcr: 0, value: 0x207n }] };
  }
  return state;
}

test('cpu vmstate round trip through a file: 4 vCPUs, every register, MSR and struct intact', async () => {
  const src = [0, 1, 2, 3].map((i) => {
    const s = cpuMigrationState(i);
    s.saved = randomState({ fpu: i === 3, missingMsrs: i === 2 ? [0xc0000103, 0x3b] : [] });
    return s;
  });
  const dst = [0, 1, 2, 3].map((i) => cpuMigrationState(i));
  const loaded = await roundTripThroughFile(src.map(cpuSection), dst.map(cpuSection), { vcpus: 4 });
  for (const i of [0, 1, 2, 3]) assert.deepEqual(dst[i]!.saved, src[i]!.saved, `vCPU ${i}`);
  const cpus = loaded.vmdesc.devices.filter((d) => d.name === 'cpu');
  assert.deepEqual(
    cpus.map((d) => d.instance_id),
    [0, 1, 2, 3],
  );
  assert.deepEqual(
    cpus.map((d) => d.subsections?.map((s) => s.vmsd_name)),
    [['cpu/xsave', 'cpu/xcrs'], ['cpu/xsave', 'cpu/xcrs'], ['cpu/xsave', 'cpu/xcrs'], ['cpu/fpu']],
  );
  const names = cpus[0]!.fields.map((f) => f.name);
  for (const n of [
    'regs',
    'rip',
    'rflags',
    'msr_tsc',
    'msr_kvm_system_time',
    'msr_kvm_wall_clock',
    'lapic',
  ]) {
    assert.ok(names.includes(n), n);
  }
});

test('cpu vmstate: a save before the state was captured names the vCPU', async () => {
  await assert.rejects(
    roundTripThroughFile([cpuSection(cpuMigrationState(0))], []),
    /vCPU 0: its state was not read/,
  );
  assert.equal(CPU_VMSTATE.name, 'cpu');
});

test('the warm-up before a save encodes a stand-in vCPU and needs no captured state', async () => {
  await warmUpCpuSection();
});
