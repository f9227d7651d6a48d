import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { KvmFpu } from '../../accel/kvm/structs/fpu.js';
import {
  bootMsrs,
  FPU_RESET_FCW,
  initFpu,
  initLapicLints,
  MXCSR_RESET,
  withPcLintWiring,
} from './vcpu-init.js';

test('LINT0 becomes ExtINT and LINT1 NMI, unmasked, and nothing else changes', () => {
  const regs = new Uint8Array(1024).fill(0xaa);
  const view = new DataView(regs.buffer);
  view.setUint32(0x350, 0x10000, true); // masked, fixed mode: KVM's reset value
  view.setUint32(0x360, 0x10000, true);
  const wired = withPcLintWiring(regs);
  const out = new DataView(wired.buffer);
  assert.equal(out.getUint32(0x350, true), 0x700);
  assert.equal(out.getUint32(0x360, true), 0x400);
  for (let i = 0; i < 1024; i++) {
    if (i >= 0x350 && i < 0x354) continue;
    if (i >= 0x360 && i < 0x364) continue;
    assert.equal(wired[i], regs[i], `byte ${i.toString(16)} untouched`);
  }
  assert.equal(view.getUint32(0x350, true), 0x10000, 'input not mutated');
});

test('initFpu and initLapicLints read, change and write back through the vCPU', () => {
  const calls: string[] = [];
  let fpu: KvmFpu = {
    fpr: new Uint8Array(128),
    fcw: 0x40,
    fsw: 0,
    ftwx: 0,
    lastOpcode: 0,
    lastIp: 0n,
    lastDp: 0n,
    xmm: new Uint8Array(256),
    mxcsr: 0,
  };
  let lapic: { regs: Uint8Array } = { regs: new Uint8Array(1024) };
  const vcpu = {
    getFpu: () => {
      calls.push('getFpu');
      return fpu;
    },
    setFpu: (f: KvmFpu) => {
      calls.push('setFpu');
      fpu = f;
    },
    getLapic: () => {
      calls.push('getLapic');
      return lapic;
    },
    setLapic: (l: { regs: Uint8Array }) => {
      calls.push('setLapic');
      lapic = l;
    },
  };
  initFpu(vcpu);
  initLapicLints(vcpu);
  assert.deepEqual(calls, ['getFpu', 'setFpu', 'getLapic', 'setLapic']);
  assert.equal(fpu.fcw, FPU_RESET_FCW);
  assert.equal(fpu.mxcsr, MXCSR_RESET);
  assert.equal(new DataView(lapic.regs.buffer).getUint32(0x350, true), 0x700);
});

test('boot MSRs enable fast strings and write-back MTRRs, each MSR once', () => {
  const msrs = bootMsrs();
  assert.equal(new Set(msrs.map((m) => m.index)).size, msrs.length);
  assert.equal(msrs.find((m) => m.index === 0x1a0)?.data, 1n);
  assert.equal(msrs.find((m) => m.index === 0x2ff)?.data, 0x806n);
});
