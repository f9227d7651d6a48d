import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import {
  CPU_MSRS,
  type CpuSavedState,
  type CpuStateVcpu,
  captureCpuState,
  MSR_IA32_TSC,
  MSR_IA32_TSC_DEADLINE,
  restoreCpuState,
} from './cpu-state.js';
import { KVM_FPU } from './structs/fpu.js';
import type { KvmMsrEntry } from './structs/msrs.js';
import { KVM_DEBUGREGS, KVM_REGS, KVM_SREGS } from './structs/regs.js';
import { KVM_VCPU_EVENTS } from './structs/vcpu-state.js';

// Unit tests of the order and bookkeeping of captureCpuState and
// restoreCpuState against a recording double of the KvmVcpu methods. They
// say nothing about what KVM accepts; the KVM-gated migration tests do.

/** A vCPU state with every byte random, decoded through the KVM codecs. */
function randomCpuState(opts: { fpu?: boolean } = {}): CpuSavedState {
  const state: CpuSavedState = {
    regs: KVM_REGS.decode(randomBytes(KVM_REGS.size)),
    sregs: KVM_SREGS.decode(randomBytes(KVM_SREGS.size)),
    msrs: CPU_MSRS.map((m) => ({ index: m.index, data: randomBytes(8).readBigUInt64LE() })),
    lapic: { regs: new Uint8Array(randomBytes(1024)) },
    events: KVM_VCPU_EVENTS.decode(randomBytes(KVM_VCPU_EVENTS.size)),
    mpState: { mpState: 3 },
    debugregs: KVM_DEBUGREGS.decode(randomBytes(KVM_DEBUGREGS.size)),
    xcrs: { flags: 0, xcrs: [{ xcr: 0, value: 7n }] },
  };
  if (opts.fpu) state.fpu = KVM_FPU.decode(randomBytes(KVM_FPU.size));
  else state.xsave = { region: new Uint8Array(randomBytes(4096)) };
  return state;
}

function recordingVcpu(
  state: CpuSavedState,
  opts: { unreadable?: number[]; refuse?: number } = {},
) {
  const log: string[] = [];
  const set: Record<string, unknown> = {};
  const msrsSet: KvmMsrEntry[][] = [];
  const got = <T>(name: string, value: T): T => {
    log.push(name);
    return value;
  };
  const put = (name: string, key: string, value: unknown): void => {
    log.push(name);
    set[key] = value;
  };
  const vcpu: CpuStateVcpu = {
    getRegs: () => got('getRegs', state.regs),
    setRegs: (v) => put('setRegs', 'regs', v),
    getSregs: () => got('getSregs', state.sregs),
    setSregs: (v) => put('setSregs', 'sregs', v),
    getFpu: () => got('getFpu', state.fpu!),
    setFpu: (v) => put('setFpu', 'fpu', v),
    getXsave: () => got('getXsave', state.xsave!),
    setXsave: (v) => put('setXsave', 'xsave', v),
    getXcrs: () => got('getXcrs', state.xcrs!),
    setXcrs: (v) => put('setXcrs', 'xcrs', v),
    getMsrs: (indices) => {
      log.push('getMsrs');
      // KVM stops at the first MSR it cannot read.
      const out: KvmMsrEntry[] = [];
      for (const index of indices) {
        if (opts.unreadable?.includes(index)) break;
        out.push(state.msrs.find((m) => m.index === index)!);
      }
      return out;
    },
    setMsrs: (entries) => {
      log.push(
        entries.some((e) => e.index === MSR_IA32_TSC_DEADLINE) ? 'setMsrs(deadline)' : 'setMsrs',
      );
      msrsSet.push([...entries]);
      const at = entries.findIndex((e) => e.index === opts.refuse);
      return at < 0 ? entries.length : at;
    },
    getLapic: () => got('getLapic', state.lapic),
    setLapic: (v) => put('setLapic', 'lapic', v),
    getVcpuEvents: () => got('getVcpuEvents', state.events),
    setVcpuEvents: (v) => put('setVcpuEvents', 'events', v),
    getMpState: () => got('getMpState', state.mpState),
    setMpState: (v) => put('setMpState', 'mpState', v),
    getDebugregs: () => got('getDebugregs', state.debugregs),
    setDebugregs: (v) => put('setDebugregs', 'debugregs', v),
  };
  return { vcpu, log, set, msrsSet };
}

test('ordering unit test (recording double): restoreCpuState sets sregs, regs, xsave, xcrs, MSRs, LAPIC, TSC deadline, events, mp state, debugregs', () => {
  const state = randomCpuState();
  const r = recordingVcpu(state);
  restoreCpuState(r.vcpu, state);
  assert.deepEqual(r.log, [
    'setSregs',
    'setRegs',
    'setXsave',
    'setXcrs',
    'setMsrs',
    'setLapic',
    'setMsrs(deadline)',
    'setVcpuEvents',
    'setMpState',
    'setDebugregs',
  ]);
  const [first, deadline] = r.msrsSet;
  assert.ok(
    first!.some((m) => m.index === MSR_IA32_TSC),
    'the TSC goes with the MSRs before the LAPIC',
  );
  assert.ok(!first!.some((m) => m.index === MSR_IA32_TSC_DEADLINE));
  assert.deepEqual(
    deadline!.map((m) => m.index),
    [MSR_IA32_TSC_DEADLINE],
  );
  assert.equal(r.set.sregs, state.sregs);
  assert.equal(r.set.lapic, state.lapic);
});

test('ordering unit test (recording double): legacy FPU state is restored where there is no XSAVE area', () => {
  const state = randomCpuState({ fpu: true });
  delete state.xcrs;
  const r = recordingVcpu(state);
  restoreCpuState(r.vcpu, state);
  assert.deepEqual(r.log.slice(0, 4), ['setSregs', 'setRegs', 'setFpu', 'setMsrs']);
});

test('captureCpuState reads every part once and skips an MSR this host cannot read', () => {
  const state = randomCpuState();
  const tscAux = 0xc0000103;
  const r = recordingVcpu(state, { unreadable: [tscAux] });
  const got = captureCpuState(r.vcpu);
  assert.deepEqual(r.log, [
    'getRegs',
    'getSregs',
    'getXsave',
    'getXcrs',
    'getMsrs',
    'getMsrs',
    'getLapic',
    'getVcpuEvents',
    'getMpState',
    'getDebugregs',
  ]);
  assert.deepEqual(
    got.msrs.map((m) => m.index),
    CPU_MSRS.map((m) => m.index).filter((i) => i !== tscAux),
  );
  assert.equal(got.fpu, undefined);
  assert.equal(got.xsave, state.xsave);
  assert.deepEqual(structuredClone(got), got, 'plain data: it survives structured clone');
});

test('captureCpuState takes the legacy FPU state and no XCRs where the host lacks them', () => {
  const state = randomCpuState({ fpu: true });
  const r = recordingVcpu(state);
  const got = captureCpuState(r.vcpu, { xsave: false, xcrs: false });
  assert.ok(r.log.includes('getFpu') && !r.log.includes('getXsave') && !r.log.includes('getXcrs'));
  assert.equal(got.fpu, state.fpu);
  assert.equal(got.xcrs, undefined);
});

test('restoreCpuState names an MSR the destination refuses', () => {
  const state = randomCpuState();
  const r = recordingVcpu(state, { refuse: 0xc0000103 });
  assert.throws(() => restoreCpuState(r.vcpu, state), {
    code: 'CPU_STATE_MSR_REFUSED',
    message: /MSR 0xc0000103/,
  });
});
