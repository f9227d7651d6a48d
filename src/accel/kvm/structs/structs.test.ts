import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { KvmStructError } from '../errors.js';
import * as cpuid from './cpuid.js';
import * as fpu from './fpu.js';
import { type AnyField, fieldSize, type StructCodec } from './layout.js';
import * as msrs from './msrs.js';
import * as regs from './regs.js';
import { KVM_EXIT_IO_OUT, KVM_RUN_FIELDS, KVM_RUN_SIZE, KvmRun, KvmRunOffset } from './run.js';
import * as vcpuState from './vcpu-state.js';
import * as vm from './vm.js';

const CODECS: [string, StructCodec<unknown>][] = [
  ['kvm_regs', regs.KVM_REGS],
  ['kvm_segment', regs.KVM_SEGMENT],
  ['kvm_dtable', regs.KVM_DTABLE],
  ['kvm_sregs', regs.KVM_SREGS],
  ['kvm_debugregs', regs.KVM_DEBUGREGS],
  ['kvm_fpu', fpu.KVM_FPU],
  ['kvm_xsave', fpu.KVM_XSAVE],
  ['kvm_xcr', fpu.KVM_XCR],
  ['kvm_xcrs', fpu.KVM_XCRS_RAW],
  ['kvm_msr_entry', msrs.KVM_MSR_ENTRY],
  ['kvm_cpuid_entry2', cpuid.KVM_CPUID_ENTRY2],
  ['kvm_lapic_state', vcpuState.KVM_LAPIC_STATE],
  ['kvm_vcpu_events', vcpuState.KVM_VCPU_EVENTS],
  ['kvm_mp_state', vcpuState.KVM_MP_STATE_STRUCT],
  ['kvm_userspace_memory_region', vm.KVM_USERSPACE_MEMORY_REGION],
  ['kvm_clock_data', vm.KVM_CLOCK_DATA],
  ['kvm_irqchip', vm.KVM_IRQCHIP],
  ['kvm_pit_channel_state', vm.KVM_PIT_CHANNEL_STATE],
  ['kvm_pit_state2', vm.KVM_PIT_STATE2],
  ['kvm_pit_config', vm.KVM_PIT_CONFIG],
  ['kvm_irq_level', vm.KVM_IRQ_LEVEL],
  ['kvm_dirty_log', vm.KVM_DIRTY_LOG],
  ['kvm_enable_cap', vm.KVM_ENABLE_CAP_STRUCT],
];

/** A value with a random, in-range content in every field of `codec`. */
function randomValue(codec: StructCodec<unknown>): unknown {
  const out: Record<string, unknown> = {};
  for (const [name, field] of codec.entries()) out[name] = randomField(field);
  return out;
}

function randomField(field: AnyField): unknown {
  const bytes = (n: number) => new Uint8Array(randomBytes(n));
  const u64 = () => randomBytes(8).readBigUInt64LE();
  switch (field.type) {
    case 'u8':
      return randomBytes(1)[0];
    case 'u16':
      return randomBytes(2).readUInt16LE();
    case 'u32':
      return randomBytes(4).readUInt32LE();
    case 's32':
      return randomBytes(4).readInt32LE();
    case 'u64':
      return u64();
    case 's64':
      return randomBytes(8).readBigInt64LE();
    case 'bytes':
      return bytes(field.length);
    case 'u64[]':
      return Array.from({ length: field.count }, u64);
    case 'struct':
      return randomValue(field.codec);
    case 'struct[]':
      return Array.from({ length: field.count }, () => randomValue(field.codec));
  }
}

for (const [name, codec] of CODECS) {
  test(`${name}: encode then decode gives back every field`, () => {
    for (let round = 0; round < 20; round++) {
      const value = randomValue(codec);
      const encoded = codec.encode(value);
      assert.equal(encoded.byteLength, codec.size);
      assert.deepEqual(codec.decode(encoded), value);
    }
  });

  test(`${name}: fields lie inside the struct and do not overlap`, () => {
    const owner = new Array<string | undefined>(codec.size);
    for (const [field, spec] of codec.entries()) {
      for (let i = spec.offset; i < spec.offset + fieldSize(spec); i++) {
        assert.ok(i < codec.size, `${field} ends past the struct`);
        assert.equal(owner[i], undefined, `${field} overlaps ${owner[i]}`);
        owner[i] = field;
      }
    }
  });
}

test('decode then encode keeps the described bytes and zeroes padding', () => {
  const raw = randomBytes(regs.KVM_SEGMENT_SIZE);
  const again = regs.KVM_SEGMENT.encode(regs.KVM_SEGMENT.decode(raw));
  assert.deepEqual(again.subarray(0, 23), raw.subarray(0, 23));
  assert.equal(again[23], 0, 'the padding byte is written as zero');
});

test('a field is written little-endian at its offset', () => {
  const value = regs.KVM_REGS.zero();
  value.rip = 0x1122334455667788n;
  value.rflags = 2n;
  const buf = regs.KVM_REGS.encode(value);
  assert.equal(buf.readBigUInt64LE(128), 0x1122334455667788n);
  assert.equal(buf[128], 0x88);
  assert.equal(buf.readBigUInt64LE(136), 2n);
  const sregs = regs.KVM_SREGS.zero();
  sregs.cs.selector = 8;
  sregs.efer = 0x500n;
  sregs.gdt.limit = 0xffff;
  const sbuf = regs.KVM_SREGS.encode(sregs);
  assert.equal(sbuf.readUInt16LE(12), 8);
  assert.equal(sbuf.readBigUInt64LE(264), 0x500n);
  assert.equal(sbuf.readUInt16LE(200), 0xffff);
});

test('encode refuses values that do not fit their C field', () => {
  const regsValue = regs.KVM_REGS.zero();
  assert.throws(
    () => regs.KVM_REGS.encode({ ...regsValue, rax: -1n }),
    (e: unknown) =>
      e instanceof KvmStructError && e.code === 'KVM_STRUCT_INVALID' && /rax/.test(e.message),
  );
  assert.throws(() => regs.KVM_REGS.encode({ ...regsValue, rax: 1n << 64n }), KvmStructError);
  const seg = regs.KVM_SEGMENT.zero();
  assert.throws(() => regs.KVM_SEGMENT.encode({ ...seg, type: 256 }), /kvm_segment\.type/);
  assert.throws(() => regs.KVM_SEGMENT.encode({ ...seg, limit: 1.5 }), KvmStructError);
  const lapic = { regs: new Uint8Array(1023) };
  assert.throws(() => vcpuState.KVM_LAPIC_STATE.encode(lapic), /1024 bytes/);
  const pit = vm.KVM_PIT_STATE2.zero();
  assert.throws(
    () => vm.KVM_PIT_STATE2.encode({ ...pit, channels: pit.channels.slice(0, 2) }),
    /3 structs/,
  );
  assert.throws(() => regs.KVM_REGS.decode(new Uint8Array(100)), /144 bytes/);
});

test('encode into a larger buffer at an offset clears only its own bytes', () => {
  const buf = Buffer.alloc(64, 0xee);
  msrs.KVM_MSR_ENTRY.encode({ index: 0x10, data: 5n }, buf, 16);
  assert.equal(buf[15], 0xee);
  assert.equal(buf.readUInt32LE(16), 0x10);
  assert.equal(buf.readUInt32LE(20), 0, 'reserved is zeroed');
  assert.equal(buf.readBigUInt64LE(24), 5n);
  assert.equal(buf[32], 0xee);
});

test('kvm_msrs round trip with a variable number of entries', () => {
  const entries = [
    { index: 0x10, data: 123456789n },
    { index: 0x4b564d01, data: 0x1001n },
    { index: 0xc0000080, data: 0x500n },
  ];
  const buf = msrs.encodeKvmMsrs(entries);
  assert.equal(buf.byteLength, 8 + 3 * 16);
  assert.equal(buf.readUInt32LE(0), 3);
  assert.deepEqual(msrs.decodeKvmMsrs(buf), entries);
  assert.deepEqual(msrs.decodeKvmMsrs(buf, 2), entries.slice(0, 2));
  assert.throws(() => msrs.decodeKvmMsrs(buf, 4), KvmStructError);
  assert.deepEqual(msrs.decodeKvmMsrs(msrs.encodeKvmMsrs([])), []);
});

test('kvm_msr_list round trip', () => {
  const indices = [0x10, 0x174, 0xc0000080, 0x4b564d00];
  const buf = msrs.encodeKvmMsrList(indices);
  assert.equal(buf.byteLength, 4 + 16);
  assert.deepEqual(msrs.decodeKvmMsrList(buf), indices);
  const empty = msrs.allocKvmMsrList(0);
  assert.equal(empty.byteLength, 4);
  buf.writeUInt32LE(99, 0);
  assert.throws(() => msrs.decodeKvmMsrList(buf), KvmStructError);
});

test('kvm_cpuid2 round trip', () => {
  const entries = [
    {
      function: 0,
      index: 0,
      flags: 0,
      eax: 0xd,
      ebx: 0x756e6547,
      ecx: 0x6c65746e,
      edx: 0x49656e69,
    },
    { function: 0x40000001, index: 0, flags: 0, eax: 1 << 3, ebx: 0, ecx: 0, edx: 0 },
    {
      function: 7,
      index: 1,
      flags: cpuid.KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
      eax: 1,
      ebx: 2,
      ecx: 3,
      edx: 4,
    },
  ];
  const buf = cpuid.encodeKvmCpuid2(entries);
  assert.equal(buf.byteLength, 8 + 3 * 40);
  assert.deepEqual(cpuid.decodeKvmCpuid2(buf), entries);
  const room = cpuid.allocKvmCpuid2(5);
  assert.equal(room.readUInt32LE(0), 5);
  assert.equal(room.byteLength, 8 + 5 * 40);
});

test('kvm_xcrs keeps only nr_xcrs entries and refuses more than 16', () => {
  const xcrs = { flags: 0, xcrs: [{ xcr: 0, value: 7n }] };
  const buf = fpu.encodeKvmXcrs(xcrs);
  assert.equal(buf.byteLength, fpu.KVM_XCRS_SIZE);
  assert.equal(buf.readUInt32LE(0), 1);
  assert.deepEqual(fpu.decodeKvmXcrs(buf), xcrs);
  const tooMany = Array.from({ length: 17 }, (_, i) => ({ xcr: i, value: 0n }));
  assert.throws(() => fpu.encodeKvmXcrs({ flags: 0, xcrs: tooMany }), KvmStructError);
});

test('kvm_signal_mask carries the kernel 8-byte sigset with len 8', () => {
  const glibcSet = new Uint8Array(128);
  glibcSet[1] = 0x08; // signal 12 (SIGUSR2) is bit 11
  glibcSet[100] = 0xff; // beyond the kernel's 64 signals: dropped
  const buf = vcpuState.encodeKvmSignalMask(glibcSet);
  assert.equal(buf.byteLength, 12);
  assert.equal(buf.readUInt32LE(0), 8);
  assert.deepEqual([...vcpuState.decodeKvmSignalMask(buf)], [0, 0x08, 0, 0, 0, 0, 0, 0]);
  assert.throws(() => vcpuState.encodeKvmSignalMask(new Uint8Array(4)), KvmStructError);
});

test('decoded byte arrays are copies, not views of the buffer', () => {
  const buf = vcpuState.KVM_LAPIC_STATE.encode({ regs: new Uint8Array(1024).fill(1) });
  const decoded = vcpuState.KVM_LAPIC_STATE.decode(buf);
  buf.fill(9);
  assert.equal(decoded.regs[0], 1);
});

test('KvmRun reads exit fields at their kvm_run offsets', () => {
  const page = Buffer.alloc(4096);
  page.writeUInt32LE(2, KvmRunOffset.exitReason);
  page.writeUInt8(KVM_EXIT_IO_OUT, KvmRunOffset.ioDirection);
  page.writeUInt8(1, KvmRunOffset.ioSize);
  page.writeUInt16LE(0x3f8, KvmRunOffset.ioPort);
  page.writeUInt32LE(3, KvmRunOffset.ioCount);
  page.writeBigUInt64LE(4096n - 16n, KvmRunOffset.ioDataOffset);
  page.write('abc', 4096 - 16, 'latin1');
  const run = new KvmRun(page);
  assert.equal(run.exitReason, 2);
  assert.deepEqual(run.io(), { direction: 1, size: 1, port: 0x3f8, count: 3, dataOffset: 4080 });
  assert.equal(Buffer.from(run.ioData()).toString('latin1'), 'abc');
  run.ioData()[0] = 0x7a; // IN data is written in place
  assert.equal(page[4080], 0x7a);

  run.immediateExit = 1;
  assert.equal(page[1], 1);
  assert.equal(run.immediateExit, 1);

  page.writeBigUInt64LE(0xfee00000n, KvmRunOffset.mmioPhysAddr);
  page.writeUInt32LE(4, KvmRunOffset.mmioLen);
  page.writeUInt8(1, KvmRunOffset.mmioIsWrite);
  const mmio = run.mmio();
  assert.equal(mmio.physAddr, 0xfee00000n);
  assert.equal(mmio.len, 4);
  assert.equal(mmio.isWrite, true);
  assert.equal(mmio.data.byteLength, 8);

  page.writeUInt32LE(1, KvmRunOffset.internalSuberror);
  page.writeUInt32LE(2, KvmRunOffset.internalNdata);
  page.writeBigUInt64LE(7n, KvmRunOffset.internalData);
  page.writeBigUInt64LE(8n, KvmRunOffset.internalData + 8);
  assert.deepEqual(run.internalError(), { suberror: 1, ndata: 2, data: [7n, 8n] });

  page.writeUInt32LE(2, KvmRunOffset.systemEventType);
  page.writeUInt32LE(0, KvmRunOffset.systemEventNdata);
  assert.deepEqual(run.systemEvent(), { type: 2, ndata: 0, data: [] });

  page.writeBigUInt64LE(0x80000021n, KvmRunOffset.failEntryReason);
  page.writeUInt32LE(3, KvmRunOffset.failEntryCpu);
  assert.deepEqual(run.failEntry(), { hardwareEntryFailureReason: 0x80000021n, cpu: 3 });
});

test('KvmRun refuses I/O data outside the mapping and any use after detach', () => {
  const page = Buffer.alloc(KVM_RUN_SIZE);
  page.writeUInt8(4, KVM_RUN_FIELDS.ioSize.offset);
  page.writeUInt32LE(1, KVM_RUN_FIELDS.ioCount.offset);
  page.writeUInt32LE(KVM_RUN_SIZE - 2, KVM_RUN_FIELDS.ioDataOffset.offset);
  const run = new KvmRun(page);
  assert.throws(() => run.ioData(), KvmStructError);
  run.detach();
  assert.throws(
    () => run.exitReason,
    (e: unknown) => (e as { code?: string }).code === 'KVM_HANDLE_CLOSED',
  );
  assert.throws(() => new KvmRun(Buffer.alloc(100)), KvmStructError);
});
