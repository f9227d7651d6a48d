import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  CPU_FEATURES,
  CpuFeatureError,
  canonicalFeatureName,
  closestFeatureName,
  cpuHelpText,
  hiddenFlagsKvmDoesNotList,
  lookupFeature,
} from './cpu-features.js';

test('flag names fold case, "_" and "." as QEMU does, and aliases map to one flag', () => {
  assert.equal(lookupFeature('SSE4.1'), 'sse4-1');
  assert.equal(lookupFeature('sse4_2'), 'sse4-2');
  assert.equal(lookupFeature('lahf_lm'), 'lahf-lm');
  assert.equal(lookupFeature('sse3'), 'pni');
  assert.equal(canonicalFeatureName('TSC_Deadline'), 'tsc-deadline');
});

test('each flag names bits of one register, and no two flags share a bit', () => {
  const seen = new Map<string, string>();
  for (const [name, bits] of CPU_FEATURES) {
    assert.ok(bits.mask !== 0, `${name} has bits`);
    for (let bit = 0; bit < 32; bit++) {
      if (((bits.mask >>> bit) & 1) === 0) continue;
      const key = `${bits.leaf}.${bits.subleaf}.${bits.reg}.${bit}`;
      assert.equal(seen.get(key), undefined, `${name} and ${seen.get(key)} share ${key}`);
      seen.set(key, name);
    }
  }
  // Spot checks against the CPUID layout.
  assert.deepEqual(CPU_FEATURES.get('cx16'), { leaf: 1, subleaf: 0, reg: 'ecx', mask: 1 << 13 });
  assert.deepEqual(CPU_FEATURES.get('xsave'), { leaf: 1, subleaf: 0, reg: 'ecx', mask: 1 << 26 });
  assert.deepEqual(CPU_FEATURES.get('avx2'), { leaf: 7, subleaf: 0, reg: 'ebx', mask: 1 << 5 });
  assert.deepEqual(CPU_FEATURES.get('xsaves'), { leaf: 0xd, subleaf: 1, reg: 'eax', mask: 1 << 3 });
  assert.deepEqual(CPU_FEATURES.get('lm'), {
    leaf: 0x80000001,
    subleaf: 0,
    reg: 'edx',
    mask: 1 << 29,
  });
  assert.deepEqual(CPU_FEATURES.get('invtsc'), {
    leaf: 0x80000007,
    subleaf: 0,
    reg: 'edx',
    mask: 1 << 8,
  });
  assert.deepEqual(CPU_FEATURES.get('kvmclock'), {
    leaf: 0x40000001,
    subleaf: 0,
    reg: 'eax',
    mask: 0b1001,
  });
});

test('an unknown flag is a typed error naming it and the closest known flag', () => {
  assert.throws(
    () => lookupFeature('cx61'),
    (e: unknown) =>
      e instanceof CpuFeatureError &&
      e.code === 'CPU_FEATURE_UNKNOWN' &&
      /'cx61' is unknown; did you mean 'cx16'\?/.test(e.message),
  );
  assert.equal(closestFeatureName('x2apc'), 'x2apic');
  assert.equal(closestFeatureName('kvm-clock'), 'kvmclock');
  assert.equal(closestFeatureName('completely-different'), undefined);
});

test('-cpu help lists every flag once', () => {
  const text = cpuHelpText();
  const listed = text.split('Recognized CPUID flags:')[1]!.split(/\s+/).filter(Boolean);
  assert.deepEqual([...listed].sort(), [...CPU_FEATURES.keys()].sort());
});

test('flags switched off that KVM does not list are named (what PVM shows the guest anyway)', () => {
  // KVM_GET_SUPPORTED_CPUID as PVM-backed KVM gave it on our hosts: leaf 1
  // ECX with only cx16, x2apic, tsc-deadline and hypervisor.
  const pvmLeaf1 = { function: 1, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0x81202000, edx: 0 };
  const settings = [
    { name: 'cx16', on: false },
    { name: 'xsave', on: false },
    { name: 'popcnt', on: false },
    { name: 'pcid', on: false },
    { name: 'pcid', on: true }, // the last setting wins: pcid is not hidden
    { name: 'x2apic', on: false },
    { name: 'avx2', on: false }, // leaf 7 absent from the table
  ];
  assert.deepEqual(hiddenFlagsKvmDoesNotList(settings, [pvmLeaf1]), ['xsave', 'popcnt', 'avx2']);
  assert.deepEqual(hiddenFlagsKvmDoesNotList([{ name: 'cx16', on: false }], [pvmLeaf1]), []);
  assert.throws(
    () => hiddenFlagsKvmDoesNotList([{ name: 'cx61', on: false }], [pvmLeaf1]),
    CpuFeatureError,
  );
});
