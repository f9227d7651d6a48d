/**
 * The ACPI tables, read back the way a guest reads them: find the RSDP by
 * scanning low memory, follow XSDT and FADT, check every checksum, length
 * and alignment, and decode the MADT. The parser here is written apart from
 * the builder. A second test has Debian's iasl (acpica-tools) disassemble
 * each table and checks what it says.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { eisaId, pkgLength } from './aml.js';
import { ACPI_MAX_CPUS, ACPI_TABLES_BASE, ACPI_TABLES_END, buildAcpiTables } from './build.js';
import { AcpiTableError } from './sdt.js';

const MiB = 0x100000;

function sum(bytes: Buffer): number {
  return bytes.reduce((a, b) => (a + b) & 0xff, 0);
}

/** 1 MiB of low memory holding the tables where they belong. */
function lowMemory(cpuCount: number): Buffer {
  const mem = Buffer.alloc(MiB);
  const acpi = buildAcpiTables({ cpuCount });
  mem.set(acpi.bytes, acpi.base);
  return mem;
}

/** A table at `addr`: its signature, length, checksum verified, and its bytes. */
function table(mem: Buffer, addr: number, signature: string): Buffer {
  assert.equal(
    mem.toString('latin1', addr, addr + 4),
    signature,
    `signature at 0x${addr.toString(16)}`,
  );
  const length = mem.readUInt32LE(addr + 4);
  assert.ok(length >= 36, `${signature} length ${length} covers the header`);
  const bytes = mem.subarray(addr, addr + length);
  assert.equal(sum(bytes), 0, `${signature} checksum`);
  assert.equal(mem.toString('latin1', addr + 10, addr + 16), 'TSVMM ', `${signature} OEM id`);
  return bytes;
}

interface Madt {
  lapicAddr: number;
  flags: number;
  lapics: { uid: number; apicId: number; flags: number }[];
  ioapics: { id: number; addr: number; gsiBase: number }[];
  overrides: { bus: number; irq: number; gsi: number; flags: number }[];
  nmis: { uid: number; flags: number; lint: number }[];
  types: number[];
}

/** Follows RSDP -> XSDT -> FADT/DSDT/MADT as Linux does, checking each step. */
function walk(mem: Buffer) {
  // Linux scans 0xe0000..0xfffff on 16-byte boundaries for "RSD PTR ".
  let rsdp = -1;
  for (let a = 0xe0000; a < 0x100000; a += 16) {
    if (mem.toString('latin1', a, a + 8) === 'RSD PTR ') {
      rsdp = a;
      break;
    }
  }
  assert.ok(rsdp >= 0, 'RSDP found by the BIOS-area scan');
  assert.equal(sum(mem.subarray(rsdp, rsdp + 20)), 0, 'RSDP ACPI 1.0 checksum');
  assert.equal(mem[rsdp + 15], 2, 'RSDP revision 2 (ACPI 2.0+)');
  const rsdpLength = mem.readUInt32LE(rsdp + 20);
  assert.equal(rsdpLength, 36);
  assert.equal(sum(mem.subarray(rsdp, rsdp + rsdpLength)), 0, 'RSDP extended checksum');
  const xsdtAddr = Number(mem.readBigUInt64LE(rsdp + 24));
  const xsdt = table(mem, xsdtAddr, 'XSDT');
  const entries: number[] = [];
  for (let at = 36; at < xsdt.length; at += 8) entries.push(Number(xsdt.readBigUInt64LE(at)));
  assert.equal((xsdt.length - 36) % 8, 0, 'XSDT holds whole 64-bit pointers');
  const bySig = new Map<string, number>();
  for (const addr of entries) bySig.set(mem.toString('latin1', addr, addr + 4), addr);
  assert.deepEqual([...bySig.keys()].sort(), ['APIC', 'FACP']);

  const fadt = table(mem, bySig.get('FACP')!, 'FACP');
  assert.equal(fadt.length, 276, 'ACPI 6 FADT length');
  assert.equal(fadt[8], 6, 'FADT revision 6');
  const dsdtAddr = Number(fadt.readBigUInt64LE(140));
  assert.equal(fadt.readUInt32LE(40), dsdtAddr, 'DSDT and X_DSDT agree');
  const dsdt = table(mem, dsdtAddr, 'DSDT');

  const apic = table(mem, bySig.get('APIC')!, 'APIC');
  const madt: Madt = {
    lapicAddr: apic.readUInt32LE(36),
    flags: apic.readUInt32LE(40),
    lapics: [],
    ioapics: [],
    overrides: [],
    nmis: [],
    types: [],
  };
  for (let at = 44; at < apic.length; ) {
    const type = apic[at]!;
    const len = apic[at + 1]!;
    assert.ok(len >= 2 && at + len <= apic.length, `MADT entry at ${at} fits the table`);
    madt.types.push(type);
    if (type === 0) {
      assert.equal(len, 8);
      madt.lapics.push({
        uid: apic[at + 2]!,
        apicId: apic[at + 3]!,
        flags: apic.readUInt32LE(at + 4),
      });
    } else if (type === 1) {
      assert.equal(len, 12);
      madt.ioapics.push({
        id: apic[at + 2]!,
        addr: apic.readUInt32LE(at + 4),
        gsiBase: apic.readUInt32LE(at + 8),
      });
    } else if (type === 2) {
      assert.equal(len, 10);
      madt.overrides.push({
        bus: apic[at + 2]!,
        irq: apic[at + 3]!,
        gsi: apic.readUInt32LE(at + 4),
        flags: apic.readUInt16LE(at + 8),
      });
    } else if (type === 4) {
      assert.equal(len, 6);
      madt.nmis.push({ uid: apic[at + 2]!, flags: apic.readUInt16LE(at + 3), lint: apic[at + 5]! });
    }
    at += len;
  }
  return { rsdp, xsdtAddr, entries, fadt, dsdt, dsdtAddr, madt };
}

for (const cpus of [1, 2, 4, 40, ACPI_MAX_CPUS]) {
  test(`ACPI tables for ${cpus} vCPUs: found by the RSDP scan, checksummed, and the MADT lists every vCPU`, () => {
    const mem = lowMemory(cpus);
    const w = walk(mem);
    const acpi = buildAcpiTables({ cpuCount: cpus });
    assert.equal(w.rsdp, acpi.rsdpAddr, 'the RSDP the scan finds is the one boot_params points at');
    for (const t of acpi.tables) {
      assert.equal(t.addr % 16, 0, `${t.signature} 16-byte aligned`);
      assert.ok(
        t.addr >= ACPI_TABLES_BASE && t.addr + t.length <= ACPI_TABLES_END,
        `${t.signature} inside the reserved block`,
      );
    }
    // No two tables overlap.
    const spans = acpi.tables
      .map((t) => [t.addr, t.addr + t.length] as const)
      .sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < spans.length; i++)
      assert.ok(spans[i]![0] >= spans[i - 1]![1], 'tables do not overlap');

    const flags = w.fadt.readUInt32LE(112);
    assert.ok(flags & (1 << 20), 'FADT: hardware-reduced ACPI');
    const boot = w.fadt.readUInt16LE(109);
    assert.ok(boot & (1 << 5), 'FADT: no CMOS RTC');
    assert.equal(boot & (1 << 1), 0, 'FADT: no i8042');

    const m = w.madt;
    assert.equal(m.lapicAddr, 0xfee00000);
    assert.equal(m.flags & 1, 1, 'PC-AT compatible: the in-kernel 8259s exist');
    assert.deepEqual(
      m.lapics,
      Array.from({ length: cpus }, (_, i) => ({ uid: i, apicId: i, flags: 1 })),
      'one enabled local APIC per vCPU, the BSP first',
    );
    assert.deepEqual(m.ioapics, [{ id: cpus, addr: 0xfec00000, gsiBase: 0 }]);
    assert.deepEqual(
      m.overrides,
      [{ bus: 0, irq: 0, gsi: 0, flags: 0 }],
      'IRQ 0 on GSI 0 (KVM default routing, as the MP table)',
    );
    assert.deepEqual(m.nmis, [{ uid: 0xff, flags: 0, lint: 1 }]);
    // The entries come sorted by type, local APICs first.
    assert.deepEqual(
      m.types,
      [...m.types].sort((a, b) => a - b),
    );
  });
}

test('the DSDT is one AML definition block naming COM1 with its ports and IRQ 4', () => {
  const { dsdt } = walk(lowMemory(2));
  const aml = dsdt.subarray(36);
  // Scope(\_SB) opens the block and spans it exactly.
  assert.equal(aml[0], 0x10, 'ScopeOp');
  const lead = aml[1]!;
  const size = (lead >> 6) + 1;
  let length = lead & (size === 1 ? 0x3f : 0x0f);
  for (let i = 1; i < size; i++) length |= aml[1 + i]! << (4 + 8 * (i - 1));
  assert.equal(1 + length, aml.length, 'the scope covers the whole AML body');
  const text = aml.toString('latin1');
  assert.ok(text.includes('\\_SB_'), 'scope \\_SB');
  assert.ok(text.includes('COM1'), 'device COM1');
  // Name(_HID, 0x0105D041) is EisaId("PNP0501").
  assert.ok(
    aml.includes(Buffer.from([0x08, ...Buffer.from('_HID'), 0x0c, 0x41, 0xd0, 0x05, 0x01])),
  );
  // IO(Decode16, 0x3f8, 0x3f8, 1, 8) and IRQNoFlags(){4}.
  assert.ok(
    aml.includes(
      Buffer.from([0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79]),
    ),
  );
});

test('AML encodings: PkgLength counts its own bytes, EisaId packs letters and digits', () => {
  assert.deepEqual([...pkgLength(0)], [1]);
  assert.deepEqual([...pkgLength(0x3e)], [0x3f]);
  // 0x3f + 2 = 0x41 does not fit 6 bits: two bytes, low nibble 1, then 0x04.
  assert.deepEqual([...pkgLength(0x3f)], [0x41, 0x04]);
  assert.deepEqual([...pkgLength(0xffd)], [0x4f, 0xff]);
  assert.deepEqual([...pkgLength(0xffe)], [0x81, 0x00, 0x01]);
  assert.deepEqual([...eisaId('PNP0501')], [0x0c, 0x41, 0xd0, 0x05, 0x01]);
  assert.deepEqual([...eisaId('PNP0A03')], [0x0c, 0x41, 0xd0, 0x0a, 0x03]);
});

test('a vCPU count the MADT cannot describe is refused with a typed error', () => {
  for (const bad of [0, -1, 1.5, ACPI_MAX_CPUS + 1]) {
    assert.throws(
      () => buildAcpiTables({ cpuCount: bad }),
      (e) =>
        e instanceof AcpiTableError &&
        e.code === 'ACPI_CPU_COUNT' &&
        /between 1 and 254/.test(e.message),
    );
  }
  assert.throws(
    () => buildAcpiTables({ cpuCount: 2, base: 0xe0008 }),
    (e) => e instanceof AcpiTableError && e.code === 'ACPI_PLACEMENT',
  );
  assert.throws(
    () => buildAcpiTables({ cpuCount: 200, base: 0xe0000, limit: 0xe0400 }),
    (e) =>
      e instanceof AcpiTableError &&
      e.code === 'ACPI_PLACEMENT' &&
      /run past 0xe0400/.test(e.message),
  );
});

/**
 * iasl (Debian's acpica-tools; CI installs it) disassembles each table.
 * It must report no checksum or table error, decode the FADT as
 * hardware-reduced, list every vCPU's local APIC, the I/O APIC and the
 * override in the MADT, and turn the DSDT's AML back into COM1's ASL.
 */
test('iasl disassembles the tables without complaint and reads back the MADT entries', () => {
  const cpus = 4;
  const acpi = buildAcpiTables({ cpuCount: cpus });
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-acpi-'));
  try {
    const dsl = new Map<string, string>();
    for (const t of acpi.tables) {
      if (t.signature === 'RSD PTR ') continue;
      const file = join(dir, `${t.signature}.dat`);
      writeFileSync(file, acpi.bytes.subarray(t.addr - acpi.base, t.addr - acpi.base + t.length));
      const log = execFileSync('iasl', ['-d', file], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      assert.doesNotMatch(log, /checksum|error|warning/i, `iasl on ${t.signature}:\n${log}`);
      const text = readFileSync(join(dir, `${t.signature}.dsl`), 'utf8');
      assert.doesNotMatch(
        text,
        /Incorrect checksum|\*\*\*\* /,
        `${t.signature} disassembly flags a problem`,
      );
      dsl.set(t.signature, text);
    }
    const madt = dsl.get('APIC')!;
    const field = (name: string) =>
      [...madt.matchAll(new RegExp(`(?:\\]|^)\\s+${name} : ([0-9A-F]+)`, 'gm'))].map((m) =>
        Number.parseInt(m[1]!, 16),
      );
    assert.equal([...madt.matchAll(/\[Processor Local APIC\]/g)].length, cpus);
    assert.deepEqual(field('Local Apic ID'), [0, 1, 2, 3]);
    assert.deepEqual(field('Processor Enabled'), [1, 1, 1, 1]);
    assert.deepEqual(field('I/O Apic ID'), [cpus]);
    assert.deepEqual(field('Address'), [0xfec00000]);
    assert.match(
      madt,
      /\[Interrupt Source Override\][\s\S]*Source : 00[\s\S]*Interrupt : 00000000/,
    );
    assert.match(madt, /\[Local APIC NMI\][\s\S]*Interrupt Input LINT : 01/);
    assert.match(dsl.get('FACP')!, /Hardware Reduced \(V5\) : 1/);
    const dsdt = dsl.get('DSDT')!;
    assert.match(dsdt, /Device \(COM1\)/);
    assert.match(dsdt, /EisaId \("PNP0501"\)/);
    assert.match(dsdt, /IO \(Decode16,\s*0x03F8,\s*\/\/ Range Minimum\s*0x03F8/);
    assert.match(dsdt, /IRQNoFlags \(\)\s*\{4\}/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
