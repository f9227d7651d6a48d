import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BOOT_GDT_ADDR,
  CODE_SELECTOR,
  GDT_ENTRIES,
  gdtEntry,
  IDENTITY_MAPPED_BYTES,
  LONG_MODE_EFER,
  longModeSregs,
  PML4_ADDR,
  segmentFromGdt,
  writeLongModeTables,
} from './long-mode.js';

/** A flat 1 MiB buffer standing in for low guest RAM. */
function lowMemory() {
  const bytes = Buffer.alloc(1 << 20);
  return {
    bytes,
    write(gpa: number, data: Uint8Array) {
      bytes.set(data, gpa);
    },
  };
}

/** Walks the 4-level tables as the MMU would for a 2 MiB page. */
function translate(mem: Buffer, cr3: number, va: bigint): bigint {
  const entry = (table: bigint, index: bigint) => mem.readBigUInt64LE(Number(table + index * 8n));
  const pml4e = entry(BigInt(cr3), (va >> 39n) & 511n);
  assert.equal(pml4e & 1n, 1n, 'PML4E present');
  const pdpte = entry(pml4e & ~0xfffn, (va >> 30n) & 511n);
  assert.equal(pdpte & 1n, 1n, 'PDPTE present');
  assert.equal(pdpte & 0x80n, 0n, 'PDPTE points at a page directory');
  const pde = entry(pdpte & ~0xfffn, (va >> 21n) & 511n);
  assert.equal(pde & 0x83n, 0x83n, 'PDE present, writable, 2 MiB page');
  return (pde & ~0x1fffffn & 0xfffffffffffffn) | (va & 0x1fffffn);
}

test('the page tables identity-map the low 4 GiB with 2 MiB pages', () => {
  const mem = lowMemory();
  writeLongModeTables(mem);
  for (const va of [0n, 0x10000n, 0x1fffffn, 0x200000n, 0x3fffffffn, 0x40000000n, 0xfee00000n]) {
    assert.equal(translate(mem.bytes, PML4_ADDR, va), va, `va ${va.toString(16)}`);
  }
  assert.equal(
    translate(mem.bytes, PML4_ADDR, BigInt(IDENTITY_MAPPED_BYTES) - 1n),
    BigInt(IDENTITY_MAPPED_BYTES) - 1n,
  );
});

test('the GDT holds flat 64-bit code and data descriptors', () => {
  const mem = lowMemory();
  writeLongModeTables(mem);
  assert.equal(mem.bytes.readBigUInt64LE(BOOT_GDT_ADDR + 8), 0x00af9b000000ffffn);
  assert.equal(mem.bytes.readBigUInt64LE(BOOT_GDT_ADDR + 16), 0x00cf93000000ffffn);
  assert.equal(gdtEntry(0xa09b, 0x12345678, 0xabcde), 0x12aa9b345678bcden);
});

test('segments decoded from the GDT match what long mode needs', () => {
  const cs = segmentFromGdt(CODE_SELECTOR, GDT_ENTRIES[1]!);
  assert.deepEqual(
    { ...cs },
    {
      base: 0n,
      limit: 0xffffffff,
      selector: 8,
      type: 11,
      present: 1,
      dpl: 0,
      db: 0,
      s: 1,
      l: 1,
      g: 1,
      avl: 0,
      unusable: 0,
    },
  );
  const ds = segmentFromGdt(0x10, GDT_ENTRIES[2]!);
  assert.equal(ds.type, 3);
  assert.equal(ds.db, 1);
  assert.equal(ds.l, 0);
});

test('longModeSregs sets paging, PAE, long mode and keeps the APIC base', () => {
  const blank = segmentFromGdt(0, 0n);
  const fresh = {
    cs: blank,
    ds: blank,
    es: blank,
    fs: blank,
    gs: blank,
    ss: blank,
    tr: blank,
    ldt: blank,
    gdt: { base: 0n, limit: 0xffff },
    idt: { base: 0n, limit: 0xffff },
    cr0: 0x60000010n,
    cr2: 0n,
    cr3: 0n,
    cr4: 0n,
    cr8: 0n,
    efer: 0n,
    apicBase: 0xfee00900n,
    interruptBitmap: [0n, 0n, 0n, 0n],
  };
  const s = longModeSregs(fresh);
  assert.equal(s.cr0 & 0x80000001n, 0x80000001n, 'PG and PE');
  assert.equal(s.cr4 & 0x20n, 0x20n, 'PAE');
  assert.equal(s.efer, LONG_MODE_EFER);
  assert.equal(s.cr3, BigInt(PML4_ADDR));
  assert.equal(s.apicBase, 0xfee00900n);
  assert.equal(s.cs.l, 1);
  assert.equal(s.ss.selector, 0x10);
});
