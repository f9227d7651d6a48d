import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  buildMpTable,
  MPTABLE_BIOS_BASE,
  MPTABLE_EBDA_BASE,
  mpTableBase,
  mpTableSize,
} from './mptable.js';

/** What the parser below reads out of a table; written apart from the builder. */
interface Parsed {
  configAddr: number;
  specRev: number;
  oem: string;
  product: string;
  lapicAddr: number;
  entryTypes: number[];
  cpus: { apicId: number; version: number; flags: number; signature: number; features: number }[];
  buses: { id: number; type: string }[];
  ioapics: { id: number; version: number; flags: number; addr: number }[];
  ioInts: { type: number; flags: number; bus: number; irq: number; apic: number; pin: number }[];
  localInts: {
    type: number;
    flags: number;
    bus: number;
    irq: number;
    apic: number;
    lint: number;
  }[];
}

function sum(bytes: Buffer): number {
  return bytes.reduce((a, b) => (a + b) & 0xff, 0);
}

/**
 * Finds "_MP_" the way Linux's smp_scan_config does (16-byte steps in the
 * searched window) in a 1 MiB image of low memory, checks both checksums
 * and decodes every entry by its type byte.
 */
function parse(mem: Buffer, windowStart: number, windowLength: number): Parsed {
  let fp = -1;
  for (let a = windowStart; a < windowStart + windowLength; a += 16) {
    if (mem.toString('latin1', a, a + 4) === '_MP_' && mem[a + 8] === 1) {
      assert.equal(sum(mem.subarray(a, a + 16)), 0, 'floating pointer checksum');
      fp = a;
      break;
    }
  }
  assert.ok(fp >= 0, 'floating pointer found in the searched window');
  assert.equal(mem[fp + 11], 0, 'feature byte 1: configuration table present');
  const configAddr = mem.readUInt32LE(fp + 4);
  const c = configAddr;
  assert.equal(mem.toString('latin1', c, c + 4), 'PCMP');
  const length = mem.readUInt16LE(c + 4);
  assert.equal(sum(mem.subarray(c, c + length)), 0, 'configuration table checksum');
  const count = mem.readUInt16LE(c + 34);
  const parsed: Parsed = {
    configAddr,
    specRev: mem[fp + 9]!,
    oem: mem.toString('latin1', c + 8, c + 16),
    product: mem.toString('latin1', c + 16, c + 28),
    lapicAddr: mem.readUInt32LE(c + 36),
    entryTypes: [],
    cpus: [],
    buses: [],
    ioapics: [],
    ioInts: [],
    localInts: [],
  };
  assert.equal(mem[c + 6], 4, 'configuration table spec revision');
  let at = c + 44;
  for (let i = 0; i < count; i++) {
    const type = mem[at]!;
    parsed.entryTypes.push(type);
    if (type === 0) {
      parsed.cpus.push({
        apicId: mem[at + 1]!,
        version: mem[at + 2]!,
        flags: mem[at + 3]!,
        signature: mem.readUInt32LE(at + 4),
        features: mem.readUInt32LE(at + 8),
      });
      at += 20;
      continue;
    }
    if (type === 1)
      parsed.buses.push({ id: mem[at + 1]!, type: mem.toString('latin1', at + 2, at + 8) });
    else if (type === 2)
      parsed.ioapics.push({
        id: mem[at + 1]!,
        version: mem[at + 2]!,
        flags: mem[at + 3]!,
        addr: mem.readUInt32LE(at + 4),
      });
    else if (type === 3 || type === 4) {
      const e = {
        type: mem[at + 1]!,
        flags: mem.readUInt16LE(at + 2),
        bus: mem[at + 4]!,
        irq: mem[at + 5]!,
        apic: mem[at + 6]!,
      };
      if (type === 3) parsed.ioInts.push({ ...e, pin: mem[at + 7]! });
      else parsed.localInts.push({ ...e, lint: mem[at + 7]! });
    } else assert.fail(`unknown entry type ${type}`);
    at += 8;
  }
  assert.equal(at, c + length, 'entries fill the base table exactly');
  return parsed;
}

function place(cpuCount: number, base: number, opts = {}): { mem: Buffer; table: Uint8Array } {
  const mem = Buffer.alloc(1 << 20);
  const table = buildMpTable(cpuCount, base, opts);
  mem.set(table, base);
  return { mem, table };
}

test('both checksums sum to zero and the floating pointer points at PCMP', () => {
  const { mem, table } = place(4, MPTABLE_EBDA_BASE);
  const t = Buffer.from(table);
  assert.equal(t.toString('latin1', 0, 4), '_MP_');
  assert.equal(sum(t.subarray(0, 16)), 0);
  assert.equal(t.readUInt32LE(4), MPTABLE_EBDA_BASE + 16);
  assert.equal(t[9], 4, 'spec revision 1.4');
  assert.equal(sum(t.subarray(16)), 0);
  assert.equal(t.length, mpTableSize(4));
  const p = parse(mem, MPTABLE_EBDA_BASE, 0x400);
  assert.equal(p.specRev, 4);
  assert.equal(p.oem, 'TSVMM   ');
  assert.equal(p.lapicAddr, 0xfee00000);
});

test('one enabled processor entry per vCPU, APIC id = index, BSP only on 0', () => {
  for (const n of [1, 2, 4, 40]) {
    const p = parse(place(n, MPTABLE_EBDA_BASE).mem, MPTABLE_EBDA_BASE, 0x400);
    assert.equal(p.cpus.length, n);
    p.cpus.forEach((cpu, i) => {
      assert.equal(cpu.apicId, i);
      assert.equal(cpu.flags & 1, 1, 'enabled');
      assert.equal(cpu.flags & 2, i === 0 ? 2 : 0, 'BSP flag');
      assert.equal(cpu.version, 0x14);
    });
  }
});

test('CPU signature and features come from CPUID leaf 1 when given', () => {
  const p = parse(
    place(2, MPTABLE_EBDA_BASE, { cpuSignature: 0x000606a6, cpuFeatures: 0x1f8bfbff }).mem,
    MPTABLE_EBDA_BASE,
    0x400,
  );
  for (const cpu of p.cpus) {
    assert.equal(cpu.signature, 0x6a6, 'stepping, model, family');
    assert.equal(cpu.features, 0x1f8bfbff);
  }
});

test('entries are sorted by type: processors, ISA bus, I/O APIC, interrupts', () => {
  const p = parse(place(3, MPTABLE_EBDA_BASE).mem, MPTABLE_EBDA_BASE, 0x400);
  const sorted = [...p.entryTypes].sort((a, b) => a - b);
  assert.deepEqual(p.entryTypes, sorted);
  assert.deepEqual(p.buses, [{ id: 0, type: 'ISA   ' }]);
  assert.deepEqual(p.ioapics, [{ id: 3, version: 0x11, flags: 1, addr: 0xfec00000 }]);
});

test('ISA IRQs 0..15 go to the same I/O APIC pins, as KVM routes GSIs by default', () => {
  const p = parse(place(2, MPTABLE_EBDA_BASE).mem, MPTABLE_EBDA_BASE, 0x400);
  assert.equal(p.ioInts.length, 16);
  p.ioInts.forEach((e, i) => {
    assert.deepEqual(e, { type: 0, flags: 0, bus: 0, irq: i, apic: 2, pin: i });
  });
});

test('with QEMU-style routing IRQ 0 is on pin 2 and IRQ 2 is left out', () => {
  const p = parse(place(2, MPTABLE_EBDA_BASE, { pitIoapicPin: 2 }).mem, MPTABLE_EBDA_BASE, 0x400);
  const pins = new Map(p.ioInts.map((e) => [e.irq, e.pin]));
  assert.equal(pins.get(0), 2);
  assert.equal(pins.has(2), false);
  assert.equal(pins.get(4), 4, 'COM1');
  assert.equal(p.ioInts.length, 15);
});

test('ExtINT on LINT0 and NMI on LINT1 of every local APIC', () => {
  const p = parse(place(2, MPTABLE_EBDA_BASE).mem, MPTABLE_EBDA_BASE, 0x400);
  assert.deepEqual(p.localInts, [
    { type: 3, flags: 0, bus: 0, irq: 0, apic: 0xff, lint: 0 },
    { type: 1, flags: 0, bus: 0, irq: 0, apic: 0xff, lint: 1 },
  ]);
});

test('the vCPU count must be 1..254', () => {
  for (const n of [0, 255, 1.5, -1]) {
    assert.throws(() => buildMpTable(n, MPTABLE_BIOS_BASE), { code: 'MPTABLE_CPU_COUNT' });
  }
  const p = parse(place(254, MPTABLE_BIOS_BASE).mem, MPTABLE_BIOS_BASE, 0x10000);
  assert.equal(p.cpus.length, 254);
  assert.equal(p.ioapics[0]?.id, 254);
});

test('a table at 0x9fc00 must end by 0xa0000; mpTableBase moves large ones to 0xf0000', () => {
  assert.equal(mpTableBase(40), MPTABLE_EBDA_BASE);
  assert.ok(MPTABLE_EBDA_BASE + mpTableSize(40) <= 0xa0000);
  assert.throws(() => buildMpTable(41, MPTABLE_EBDA_BASE), { code: 'MPTABLE_PLACEMENT' });
  assert.equal(mpTableBase(41), MPTABLE_BIOS_BASE);
  assert.doesNotThrow(() => buildMpTable(41, mpTableBase(41)));
  assert.throws(() => buildMpTable(1, 0x9fff0), { code: 'MPTABLE_PLACEMENT' });
});

test('a table where the guest does not search, or misaligned, is refused', () => {
  assert.throws(() => buildMpTable(1, 0x80000), { code: 'MPTABLE_PLACEMENT' });
  assert.throws(() => buildMpTable(1, MPTABLE_EBDA_BASE + 8), { code: 'MPTABLE_PLACEMENT' });
});

test('the same input gives the same bytes', () => {
  assert.deepEqual(buildMpTable(4, MPTABLE_EBDA_BASE), buildMpTable(4, MPTABLE_EBDA_BASE));
});
