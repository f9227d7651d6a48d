import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
  type KvmCpuidEntry2,
} from '../../accel/kvm/structs/cpuid.js';
import { TsvmmError } from '../../util/errors.js';
import {
  buildGuestCpuid,
  CPUID_1_ECX_HYPERVISOR,
  CPUID_1_ECX_TSC_DEADLINE,
  CPUID_1_ECX_X2APIC,
  CPUID_1_EDX_HTT,
  KVM_FEATURE,
} from './cpuid.js';

const SIG = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

function leaf(fn: number, index: number, flags: number, regs: number[]): KvmCpuidEntry2 {
  const [eax = 0, ebx = 0, ecx = 0, edx = 0] = regs;
  return { function: fn, index, flags, eax, ebx, ecx, edx };
}

/**
 * KVM_GET_SUPPORTED_CPUID as an Intel Ice Lake server host returns it
 * (values of the shape KVM reports: the host's topology in leaves 1, 4 and
 * 0xB, the hypervisor and TSC-deadline bits clear, the KVM leaves with
 * KVM's feature set).
 */
const HOST_FEATURES = 0x0103fefb;
function intelHost(): KvmCpuidEntry2[] {
  return [
    leaf(0x0, 0, 0, [0x1b, 0x756e6547, 0x6c65746e, 0x49656e69]),
    leaf(0x1, 0, 0, [0x000606a6, 0x2c400800, 0x76fefbff, 0x1f8bfbff]),
    leaf(0x4, 0, SIG, [0xfc004121, 0x02c0003f, 0x0000003f, 0]),
    leaf(0x4, 1, SIG, [0xfc004122, 0x01c0003f, 0x0000003f, 0]),
    leaf(0x4, 2, SIG, [0xfc004143, 0x04c0003f, 0x000007ff, 0]),
    leaf(0x4, 3, SIG, [0xfc3fc163, 0x02c0003f, 0x0000ffff, 4]),
    leaf(0x4, 4, SIG, [0, 0, 0, 0]),
    leaf(0x7, 0, SIG, [0, 0xf3bfb7ef, 0x40417f5e, 0xbc000410]),
    leaf(0xb, 0, SIG, [1, 2, 0x100, 0x2c]),
    leaf(0xb, 1, SIG, [6, 64, 0x201, 0x2c]),
    leaf(0xb, 2, SIG, [0, 0, 2, 0x2c]),
    leaf(0xd, 0, SIG, [0x2e7, 0x2e8, 0xa88, 0]),
    leaf(0xd, 1, SIG, [0xf, 0, 0, 0]),
    leaf(0xd, 2, SIG, [0x100, 0x240, 0, 0]),
    leaf(0x40000000, 0, 0, [0x40000001, 0x4b4d564b, 0x564b4d56, 0x4d]),
    leaf(0x40000001, 0, 0, [HOST_FEATURES, 0, 0, 0]),
    leaf(0x80000000, 0, 0, [0x80000008, 0, 0, 0]),
    leaf(0x80000001, 0, 0, [0, 0, 0x00000121, 0x2c100800]),
    leaf(0x80000008, 0, 0, [0x00003030, 0x00000200, 0, 0]),
  ];
}

/** What CPUID(fn, index) returns in the guest, by KVM's lookup rules. */
function cpuid(entries: readonly KvmCpuidEntry2[], fn: number, index = 0): KvmCpuidEntry2 {
  const found = entries.find(
    (e) => e.function === fn && ((e.flags & SIG) === 0 || e.index === index),
  );
  assert.ok(found, `leaf 0x${fn.toString(16)} subleaf ${index} present`);
  return found;
}

function allCpus(count: number, supported = intelHost()): KvmCpuidEntry2[][] {
  return Array.from({ length: count }, (_, cpuIndex) =>
    buildGuestCpuid(supported, { cpuIndex, cpuCount: count }),
  );
}

test('leaf 1 has the hypervisor bit on every vCPU', () => {
  for (const table of allCpus(4)) {
    assert.notEqual(cpuid(table, 1).ecx & CPUID_1_ECX_HYPERVISOR, 0);
  }
});

test('each of 4 vCPUs gets its own initial APIC id in leaves 1 and 0xB', () => {
  allCpus(4).forEach((table, cpu) => {
    const l1 = cpuid(table, 1);
    assert.equal(l1.ebx >>> 24, cpu, 'leaf 1 EBX[31:24]');
    assert.equal((l1.ebx >>> 16) & 0xff, 1, 'one logical processor per package');
    assert.equal(l1.ebx & 0xffff, 0x0800, 'CLFLUSH size and brand kept');
    assert.equal(l1.edx & CPUID_1_EDX_HTT, 0, 'HTT off with one thread per package');
    for (const index of [0, 1, 2]) {
      assert.equal(cpuid(table, 0xb, index).edx, cpu, `leaf 0xB subleaf ${index} x2APIC id`);
    }
  });
});

test('leaf 0xB describes one thread, one core per package, then ends', () => {
  const table = buildGuestCpuid(intelHost(), { cpuIndex: 2, cpuCount: 4 });
  const smt = cpuid(table, 0xb, 0);
  const core = cpuid(table, 0xb, 1);
  const end = cpuid(table, 0xb, 2);
  assert.deepEqual(
    [smt.eax & 0x1f, smt.ebx & 0xffff, (smt.ecx >> 8) & 0xff, smt.ecx & 0xff],
    [0, 1, 1, 0],
  );
  assert.deepEqual(
    [core.eax & 0x1f, core.ebx & 0xffff, (core.ecx >> 8) & 0xff, core.ecx & 0xff],
    [0, 1, 2, 1],
  );
  assert.deepEqual([end.ebx, (end.ecx >> 8) & 0xff, end.ecx & 0xff], [0, 0, 2]);
  for (const e of table.filter((x) => x.function === 0xb)) assert.equal(e.flags & SIG, SIG);
});

test('leaf 4 keeps the caches but reports one core, caches not shared', () => {
  const host = intelHost();
  const table = buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 4 });
  for (const index of [0, 1, 2, 3]) {
    const got = cpuid(table, 4, index);
    const was = cpuid(host, 4, index);
    assert.equal(got.eax >>> 26, 0, 'cores per package - 1');
    assert.equal((got.eax >>> 14) & 0xfff, 0, 'logical processors sharing - 1');
    assert.equal(got.eax & 0x3fff, was.eax & 0x3fff, 'cache type and level kept');
    assert.deepEqual([got.ebx, got.ecx, got.edx], [was.ebx, was.ecx, was.edx]);
  }
  assert.deepEqual(cpuid(table, 4, 4), cpuid(host, 4, 4), 'the terminating subleaf is left alone');
});

test('x2APIC follows what KVM supports', () => {
  const withX2apic = intelHost();
  assert.notEqual(
    cpuid(buildGuestCpuid(withX2apic, { cpuIndex: 0, cpuCount: 1 }), 1).ecx & CPUID_1_ECX_X2APIC,
    0,
  );
  const without = intelHost().map((e) =>
    e.function === 1 ? { ...e, ecx: e.ecx & ~CPUID_1_ECX_X2APIC } : e,
  );
  assert.equal(
    cpuid(buildGuestCpuid(without, { cpuIndex: 0, cpuCount: 1 }), 1).ecx & CPUID_1_ECX_X2APIC,
    0,
  );
});

test('the TSC-deadline bit is set only when asked', () => {
  const host = intelHost();
  assert.equal(
    cpuid(buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 1 }), 1).ecx & CPUID_1_ECX_TSC_DEADLINE,
    0,
  );
  const on = buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 1, tscDeadlineTimer: true });
  assert.notEqual(cpuid(on, 1).ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
});

test('leaf 0x40000000 carries the "KVMKVMKVM" signature and max leaf 0x40000001', () => {
  const table = buildGuestCpuid(intelHost(), { cpuIndex: 0, cpuCount: 2 });
  const sig = cpuid(table, 0x40000000);
  assert.equal(sig.eax, 0x40000001);
  const bytes = Buffer.alloc(12);
  bytes.writeUInt32LE(sig.ebx, 0);
  bytes.writeUInt32LE(sig.ecx, 4);
  bytes.writeUInt32LE(sig.edx, 8);
  assert.deepEqual(bytes, Buffer.from('KVMKVMKVM\0\0\0', 'latin1'));
  assert.equal(table.filter((e) => e.function === 0x40000000).length, 1);
  assert.equal(table.filter((e) => e.function === 0x40000001).length, 1);
});

test('leaf 0x40000001 passes the clocksource bits and drops what needs VMM help', () => {
  const kvm = cpuid(buildGuestCpuid(intelHost(), { cpuIndex: 0, cpuCount: 1 }), 0x40000001);
  for (const bit of [
    KVM_FEATURE.CLOCKSOURCE,
    KVM_FEATURE.CLOCKSOURCE2,
    KVM_FEATURE.CLOCKSOURCE_STABLE_BIT,
    KVM_FEATURE.NOP_IO_DELAY,
    KVM_FEATURE.PV_UNHALT,
  ]) {
    assert.notEqual(kvm.eax & bit, 0, `bit 0x${bit.toString(16)} kept`);
  }
  for (const bit of [
    KVM_FEATURE.MSI_EXT_DEST_ID,
    KVM_FEATURE.HC_MAP_GPA_RANGE,
    KVM_FEATURE.MIGRATION_CONTROL,
  ]) {
    assert.equal(kvm.eax & bit, 0, `bit 0x${bit.toString(16)} dropped`);
  }
  assert.equal(kvm.eax & ~HOST_FEATURES, 0, 'nothing the host lacks');
  assert.deepEqual([kvm.ebx, kvm.ecx, kvm.edx], [0, 0, 0]);
});

test('kvmFeatures narrows leaf 0x40000001 but never adds what the host lacks', () => {
  const host = intelHost().map((e) =>
    e.function === 0x40000001 ? { ...e, eax: KVM_FEATURE.CLOCKSOURCE2 } : e,
  );
  const wanted = KVM_FEATURE.CLOCKSOURCE | KVM_FEATURE.CLOCKSOURCE2;
  const kvm = cpuid(
    buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 1, kvmFeatures: wanted }),
    0x40000001,
  );
  assert.equal(kvm.eax, KVM_FEATURE.CLOCKSOURCE2);
});

test('without a host leaf 0x40000001 the clocksource baseline is given', () => {
  const host = intelHost().filter((e) => e.function < 0x40000000 || e.function > 0x400000ff);
  const table = buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 1 });
  const kvm = cpuid(table, 0x40000001);
  assert.equal(
    kvm.eax,
    KVM_FEATURE.CLOCKSOURCE | KVM_FEATURE.NOP_IO_DELAY | KVM_FEATURE.CLOCKSOURCE2,
  );
  assert.equal(cpuid(table, 0x40000000).eax, 0x40000001);
});

test('the input table is not changed and no entry is shared with it', () => {
  const host = intelHost();
  const before = structuredClone(host);
  const out = buildGuestCpuid(host, { cpuIndex: 3, cpuCount: 4 });
  assert.deepEqual(host, before);
  for (const e of out) assert.ok(!host.includes(e), 'fresh objects out');
});

test('every (function, index) appears once and other leaves pass through', () => {
  const host = intelHost();
  const out = buildGuestCpuid(host, { cpuIndex: 1, cpuCount: 4 });
  const keys = out.map((e) => `${e.function}:${e.flags & SIG ? e.index : 0}`);
  assert.equal(new Set(keys).size, keys.length);
  for (const fn of [0, 7, 0xd, 0x80000000]) {
    assert.deepEqual(cpuid(out, fn), cpuid(host, fn));
  }
  assert.equal(cpuid(out, 0x80000008).ecx & 0xf0ff, 0);
});

test('a vCPU index or count out of range is refused with a stable code', () => {
  for (const opts of [
    { cpuIndex: 0, cpuCount: 0 },
    { cpuIndex: 4, cpuCount: 4 },
    { cpuIndex: -1, cpuCount: 4 },
    { cpuIndex: 0, cpuCount: 256 },
    { cpuIndex: 0.5, cpuCount: 2 },
  ]) {
    assert.throws(() => buildGuestCpuid(intelHost(), opts), { code: 'CPUID_INVALID_TOPOLOGY' });
  }
  const last = buildGuestCpuid(intelHost(), { cpuIndex: 254, cpuCount: 255 });
  assert.equal(cpuid(last, 1).ebx >>> 24, 254);
});

test('-cpu flags switched off clear their bits in every vCPU and change nothing else', () => {
  const host = intelHost();
  const features = [
    { name: 'cx16', on: false },
    { name: 'xsave', on: false },
    { name: 'avx2', on: false },
    { name: 'xsaves', on: false },
    { name: 'kvmclock', on: false },
    { name: 'hypervisor', on: false },
  ];
  for (let cpu = 0; cpu < 4; cpu++) {
    const plain = buildGuestCpuid(host, { cpuIndex: cpu, cpuCount: 4 });
    const masked = buildGuestCpuid(host, { cpuIndex: cpu, cpuCount: 4, features });
    assert.ok(cpuid(plain, 1).ecx & (1 << 13), 'the host has cx16');
    assert.equal(
      cpuid(masked, 1).ecx,
      (cpuid(plain, 1).ecx & ~((1 << 13) | (1 << 26) | CPUID_1_ECX_HYPERVISOR)) >>> 0,
    );
    assert.equal(cpuid(masked, 7).ebx, (cpuid(plain, 7).ebx & ~(1 << 5)) >>> 0);
    assert.equal(cpuid(masked, 0xd, 1).eax, (cpuid(plain, 0xd, 1).eax & ~(1 << 3)) >>> 0);
    assert.equal(
      cpuid(masked, 0x40000001).eax,
      (cpuid(plain, 0x40000001).eax & ~(KVM_FEATURE.CLOCKSOURCE | KVM_FEATURE.CLOCKSOURCE2)) >>> 0,
    );
    // Every other register of every leaf is as without flags.
    const untouched = (t: KvmCpuidEntry2[]) =>
      t.map((e) => ({
        ...e,
        ...(e.function === 1 ? { ecx: 0 } : {}),
        ...(e.function === 7 ? { ebx: 0 } : {}),
        ...(e.function === 0xd && e.index === 1 ? { eax: 0 } : {}),
        ...(e.function === 0x40000001 ? { eax: 0 } : {}),
      }));
    assert.deepEqual(untouched(masked), untouched(plain));
  }
});

test('-cpu flags switched on must be offered by KVM or the VMM; a later setting wins', () => {
  const host = intelHost();
  // TSC deadline is offered by the VMM when KVM emulates it, not by KVM's table.
  const withDeadline = buildGuestCpuid(host, {
    cpuIndex: 0,
    cpuCount: 1,
    tscDeadlineTimer: true,
    features: [{ name: 'tsc-deadline', on: true }],
  });
  assert.ok(cpuid(withDeadline, 1).ecx & CPUID_1_ECX_TSC_DEADLINE);
  for (const name of ['tsc-deadline', 'svm']) {
    assert.throws(
      () => buildGuestCpuid(host, { cpuIndex: 0, cpuCount: 1, features: [{ name, on: true }] }),
      (e: unknown) =>
        e instanceof TsvmmError &&
        e.code === 'CPU_FEATURE_UNSUPPORTED' &&
        e.message.includes(`'${name}'`),
    );
  }
  const again = buildGuestCpuid(host, {
    cpuIndex: 0,
    cpuCount: 1,
    features: [
      { name: 'cx16', on: false },
      { name: 'cx16', on: true },
      { name: 'x2apic', on: false },
    ],
  });
  assert.ok(cpuid(again, 1).ecx & (1 << 13), 'cx16 back on');
  assert.equal(cpuid(again, 1).ecx & CPUID_1_ECX_X2APIC, 0, 'x2apic off');
});
