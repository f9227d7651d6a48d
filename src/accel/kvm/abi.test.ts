// Cross-checks every struct layout, ioctl number and constant tsvmm uses
// against the C headers of this machine: the test writes a C program from
// our own tables, compiles it with gcc against <linux/kvm.h>, runs it and
// compares each printed value with ours.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Errno } from './errno.js';
import * as ffi from './ffi.js';
import {
  KVM_API_VERSION,
  KVM_CAP,
  KVM_CLOCK_HOST_TSC,
  KVM_CLOCK_REALTIME,
  KVM_CLOCK_TSC_STABLE,
  KVM_EXIT,
  KVM_INTERNAL_ERROR,
  KVM_IOCTLS,
  KVM_SYSTEM_EVENT,
  KVMIO,
} from './ioctls.js';
import * as coalesced from './structs/coalesced-mmio.js';
import * as cpuid from './structs/cpuid.js';
import * as fpu from './structs/fpu.js';
import { type AnyField, cMemberName, fieldSize, type StructCodec } from './structs/layout.js';
import * as msrs from './structs/msrs.js';
import * as regs from './structs/regs.js';
import { KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_RUN_FIELDS, KVM_RUN_SIZE } from './structs/run.js';
import * as vcpuState from './structs/vcpu-state.js';
import * as vm from './structs/vm.js';

/** One value to compare: a C expression and what tsvmm says it is. */
interface Check {
  key: string;
  cExpr: string;
  expected: number | bigint;
}

const CODECS: StructCodec<unknown>[] = [
  regs.KVM_REGS,
  regs.KVM_SEGMENT,
  regs.KVM_DTABLE,
  regs.KVM_SREGS,
  regs.KVM_DEBUGREGS,
  fpu.KVM_FPU,
  fpu.KVM_XSAVE,
  fpu.KVM_XCR,
  fpu.KVM_XCRS_RAW,
  msrs.KVM_MSR_ENTRY,
  msrs.KVM_MSRS_HEADER,
  msrs.KVM_MSR_LIST_HEADER,
  cpuid.KVM_CPUID_ENTRY2,
  cpuid.KVM_CPUID2_HEADER,
  vcpuState.KVM_LAPIC_STATE,
  vcpuState.KVM_VCPU_EVENTS,
  vcpuState.KVM_MP_STATE_STRUCT,
  vcpuState.KVM_SIGNAL_MASK_HEADER,
  vm.KVM_USERSPACE_MEMORY_REGION,
  vm.KVM_CLOCK_DATA,
  vm.KVM_IRQCHIP,
  vm.KVM_PIT_CHANNEL_STATE,
  vm.KVM_PIT_STATE2,
  vm.KVM_PIT_CONFIG,
  vm.KVM_IRQ_LEVEL,
  vm.KVM_DIRTY_LOG,
  vm.KVM_ENABLE_CAP_STRUCT,
  coalesced.KVM_COALESCED_MMIO_ZONE,
  coalesced.KVM_COALESCED_MMIO,
  coalesced.KVM_COALESCED_MMIO_RING_HEADER,
];

function structChecks(codec: StructCodec<unknown>): Check[] {
  const root = codec.cType;
  assert.ok(root, 'top-level codecs name their C struct');
  const checks: Check[] = [
    { key: `sizeof(${root})`, cExpr: `sizeof(${root})`, expected: codec.size },
  ];
  walk(codec, root, '', 0, checks);
  return checks;
}

function walk(
  codec: StructCodec<unknown>,
  root: string,
  prefix: string,
  base: number,
  out: Check[],
) {
  for (const [name, field] of codec.entries()) {
    const path = `${prefix}${cMemberName(name, field)}`;
    const offset = base + field.offset;
    out.push({
      key: `offsetof(${root}, ${path})`,
      cExpr: `offsetof(${root}, ${path})`,
      expected: offset,
    });
    out.push({
      key: `sizeof(${root}.${path})`,
      cExpr: `sizeof(((${root} *)0)->${path})`,
      expected: fieldSize(field),
    });
    if (isScalar(field)) {
      out.push({
        key: `signed(${root}.${path})`,
        cExpr: `((__typeof__(((${root} *)0)->${path}))-1 < 0)`,
        expected: field.type === 's32' || field.type === 's64' ? 1 : 0,
      });
    }
    if (field.type === 'struct') walk(field.codec, root, `${path}.`, offset, out);
    if (field.type === 'struct[]') {
      for (let i = 0; i < field.count; i++) {
        walk(field.codec, root, `${path}[${i}].`, offset + i * field.codec.size, out);
      }
    }
  }
}

function isScalar(field: AnyField): boolean {
  return ['u8', 'u16', 'u32', 's32', 'u64', 's64'].includes(field.type);
}

function constant(name: string, expected: number | bigint): Check {
  return { key: name, cExpr: name, expected };
}

function allChecks(): Check[] {
  const checks: Check[] = CODECS.flatMap(structChecks);
  // Flexible arrays start right after the headers we encode.
  checks.push(
    {
      key: 'offsetof(kvm_msrs.entries)',
      cExpr: 'offsetof(struct kvm_msrs, entries)',
      expected: msrs.KVM_MSRS_HEADER_SIZE,
    },
    {
      key: 'offsetof(kvm_coalesced_mmio_ring.coalesced_mmio)',
      cExpr: 'offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio)',
      expected: coalesced.KVM_COALESCED_MMIO_RING_HEADER_SIZE,
    },
    {
      key: 'offsetof(kvm_msr_list.indices)',
      cExpr: 'offsetof(struct kvm_msr_list, indices)',
      expected: msrs.KVM_MSR_LIST_HEADER_SIZE,
    },
    {
      key: 'offsetof(kvm_cpuid2.entries)',
      cExpr: 'offsetof(struct kvm_cpuid2, entries)',
      expected: cpuid.KVM_CPUID2_HEADER_SIZE,
    },
    {
      key: 'offsetof(kvm_signal_mask.sigset)',
      cExpr: 'offsetof(struct kvm_signal_mask, sigset)',
      expected: vcpuState.KVM_SIGNAL_MASK_HEADER_SIZE,
    },
    { key: 'sizeof(kvm_run)', cExpr: 'sizeof(struct kvm_run)', expected: KVM_RUN_SIZE },
  );
  for (const [name, f] of Object.entries(KVM_RUN_FIELDS)) {
    checks.push(
      {
        key: `offsetof(kvm_run, ${name})`,
        cExpr: `offsetof(struct kvm_run, ${f.c})`,
        expected: f.offset,
      },
      {
        key: `sizeof(kvm_run.${name})`,
        cExpr: `sizeof(((struct kvm_run *)0)->${f.c})`,
        expected: f.size,
      },
    );
  }
  for (const [name, value] of Object.entries(KVM_IOCTLS)) checks.push(constant(name, value));
  for (const [name, value] of Object.entries(KVM_CAP))
    checks.push(constant(`KVM_CAP_${name}`, value));
  for (const [name, value] of Object.entries(KVM_EXIT))
    checks.push(constant(`KVM_EXIT_${name}`, value));
  for (const [name, value] of Object.entries(KVM_INTERNAL_ERROR)) {
    checks.push(constant(`KVM_INTERNAL_ERROR_${name}`, value));
  }
  for (const [name, value] of Object.entries(KVM_SYSTEM_EVENT)) {
    checks.push(constant(`KVM_SYSTEM_EVENT_${name}`, value));
  }
  for (const [name, value] of Object.entries(vcpuState.KVM_MP_STATE)) {
    checks.push(constant(`KVM_MP_STATE_${name}`, value));
  }
  for (const [name, value] of Object.entries(Errno)) checks.push(constant(name, value));
  const named: Record<string, number> = {
    KVMIO,
    KVM_API_VERSION,
    KVM_CLOCK_TSC_STABLE,
    KVM_CLOCK_REALTIME,
    KVM_CLOCK_HOST_TSC,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_MAX_XCRS: fpu.KVM_MAX_XCRS,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX: cpuid.KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_VCPUEVENT_VALID_NMI_PENDING: vcpuState.KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR: vcpuState.KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    KVM_VCPUEVENT_VALID_SHADOW: vcpuState.KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SMM: vcpuState.KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_PAYLOAD: vcpuState.KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT: vcpuState.KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
    KVM_MEM_LOG_DIRTY_PAGES: vm.KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY: vm.KVM_MEM_READONLY,
    KVM_IRQCHIP_PIC_MASTER: vm.KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE: vm.KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC: vm.KVM_IRQCHIP_IOAPIC,
    KVM_PIT_FLAGS_HPET_LEGACY: vm.KVM_PIT_FLAGS_HPET_LEGACY,
    KVM_PIT_FLAGS_SPEAKER_DATA_ON: vm.KVM_PIT_FLAGS_SPEAKER_DATA_ON,
    KVM_PIT_SPEAKER_DUMMY: vm.KVM_PIT_SPEAKER_DUMMY,
    O_RDONLY: ffi.O_RDONLY,
    O_RDWR: ffi.O_RDWR,
    O_CLOEXEC: ffi.O_CLOEXEC,
    PROT_NONE: ffi.PROT_NONE,
    PROT_READ: ffi.PROT_READ,
    PROT_WRITE: ffi.PROT_WRITE,
    MAP_SHARED: ffi.MAP_SHARED,
    MAP_PRIVATE: ffi.MAP_PRIVATE,
    MAP_FIXED: ffi.MAP_FIXED,
    MAP_ANONYMOUS: ffi.MAP_ANONYMOUS,
    MAP_NORESERVE: ffi.MAP_NORESERVE,
    MADV_DONTNEED: ffi.MADV_DONTNEED,
    MADV_DONTFORK: ffi.MADV_DONTFORK,
    MADV_MERGEABLE: ffi.MADV_MERGEABLE,
    MADV_HUGEPAGE: ffi.MADV_HUGEPAGE,
    SIG_BLOCK: ffi.SIG_BLOCK,
    SIG_UNBLOCK: ffi.SIG_UNBLOCK,
    SIG_SETMASK: ffi.SIG_SETMASK,
    SIGINT: ffi.SIGINT,
    SIGUSR1: ffi.SIGUSR1,
    SIGUSR2: ffi.SIGUSR2,
    SIGTERM: ffi.SIGTERM,
    __SIGRTMIN: ffi.SIGRTMIN_KERNEL,
  };
  for (const [name, value] of Object.entries(named)) checks.push(constant(name, value));
  checks.push(
    { key: 'sizeof(sigset_t)', cExpr: 'sizeof(sigset_t)', expected: ffi.SIGSET_BYTES },
    { key: 'MAP_FAILED', cExpr: '(uintptr_t)MAP_FAILED', expected: ffi.MAP_FAILED },
  );
  return checks;
}

function cProgram(checks: Check[]): string {
  const lines = checks.map(
    (c, i) => `  printf("%d %llu\\n", ${i}, (unsigned long long)(${c.cExpr}));`,
  );
  return [
    '#define _GNU_SOURCE',
    '#include <errno.h>',
    '#include <fcntl.h>',
    '#include <signal.h>',
    '#include <stddef.h>',
    '#include <stdint.h>',
    '#include <stdio.h>',
    '#include <sys/mman.h>',
    '#include <linux/kvm.h>',
    'int main(void) {',
    ...lines,
    '  return 0;',
    '}',
    '',
  ].join('\n');
}

function requireGcc(): void {
  const probe = spawnSync('gcc', ['--version'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    assert.fail(
      'gcc is needed for the KVM ABI cross-check and was not found: install it (apt-get install gcc) and run the test again',
    );
  }
}

test('every struct layout, ioctl number and constant matches <linux/kvm.h> as compiled by gcc', () => {
  requireGcc();
  const checks = allChecks();
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-abi-'));
  try {
    writeFileSync(join(dir, 'abi.c'), cProgram(checks));
    execFileSync(
      'gcc',
      ['-std=gnu11', '-Wall', '-Werror', '-o', join(dir, 'abi'), join(dir, 'abi.c')],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    const output = execFileSync(join(dir, 'abi'), { encoding: 'utf8' });
    const actual = new Map<number, bigint>();
    for (const line of output.trim().split('\n')) {
      const [index, value] = line.split(' ');
      actual.set(Number(index), BigInt(value!));
    }
    assert.equal(actual.size, checks.length, 'the C program printed one line per check');
    const mismatches = checks
      .map((c, i) => ({ c, got: actual.get(i)! }))
      .filter(({ c, got }) => got !== BigInt(c.expected))
      .map(({ c, got }) => `${c.key}: tsvmm says ${c.expected}, the headers say ${got}`);
    assert.deepEqual(mismatches, [], `ABI mismatches:\n${mismatches.join('\n')}`);
    // The number of checks shows the test covers what it claims.
    assert.ok(checks.length > 500, `only ${checks.length} checks`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('ioctl numbers quoted in the KVM-from-Node notes agree with ours', () => {
  assert.equal(KVM_IOCTLS.KVM_GET_CLOCK, 0x8030ae7c);
  assert.equal(KVM_IOCTLS.KVM_SET_CLOCK, 0x4030ae7b);
  assert.equal(KVM_IOCTLS.KVM_KVMCLOCK_CTRL, 0xaead);
  assert.equal(KVM_IOCTLS.KVM_SET_USER_MEMORY_REGION, 0x4020ae46);
});
