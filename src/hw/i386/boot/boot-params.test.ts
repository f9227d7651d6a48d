import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { pcRamLayout } from '../../../accel/kvm/memory/layout.js';
import {
  BOOT_PARAMS_SIZE,
  buildBootParams,
  E820_RAM,
  E820_RESERVED,
  type E820Entry,
  e820Map,
} from './boot-params.js';
import { syntheticBzImage } from './synthetic-kernels.js';

const MiB = 0x100000;
const GiB = 0x40000000;
const PAGE = 4096;

function e820Of(size: number, reserved = [] as { start: number; size: number }[]): E820Entry[] {
  return e820Map(pcRamLayout(size), reserved);
}

/** The e820 table read back from a zero page at its documented offsets. */
function readE820(page: Uint8Array): E820Entry[] {
  const view = new DataView(page.buffer, page.byteOffset);
  const out: E820Entry[] = [];
  for (let i = 0; i < page[0x1e8]!; i++) {
    const at = 0x2d0 + i * 20;
    out.push({
      addr: Number(view.getBigUint64(at, true)),
      size: Number(view.getBigUint64(at + 8, true)),
      type: view.getUint32(at + 16, true),
    });
  }
  return out;
}

describe('e820 map', () => {
  test('512 MiB: RAM below the EBDA, legacy area reserved, RAM from 1 MiB', () => {
    assert.deepEqual(e820Of(512 * MiB), [
      { addr: 0, size: 0x9fc00, type: E820_RAM },
      { addr: 0x9fc00, size: 0x100000 - 0x9fc00, type: E820_RESERVED },
      { addr: MiB, size: 511 * MiB, type: E820_RAM },
    ]);
  });

  test('4 GiB: low RAM ends at 3 GiB, the rest starts at 4 GiB', () => {
    assert.deepEqual(e820Of(4 * GiB), [
      { addr: 0, size: 0x9fc00, type: E820_RAM },
      { addr: 0x9fc00, size: 0x60400, type: E820_RESERVED },
      { addr: MiB, size: 3 * GiB - MiB, type: E820_RAM },
      { addr: 4 * GiB, size: GiB, type: E820_RAM },
    ]);
  });

  test('8 GiB: 5 GiB of RAM above 4 GiB', () => {
    const map = e820Of(8 * GiB);
    assert.deepEqual(map.at(-1), { addr: 4 * GiB, size: 5 * GiB, type: E820_RAM });
    const ram = map.filter((e) => e.type === E820_RAM).reduce((sum, e) => sum + e.size, 0);
    assert.equal(ram, 8 * GiB - (MiB - 0x9fc00));
  });

  test('a reserved range inside RAM splits it; one in the legacy area merges into it', () => {
    const map = e820Of(512 * MiB, [
      { start: 0x9fc00, size: 0x400 }, // an MP table at the EBDA
      { start: 0x1000_0000, size: 0x2000 },
    ]);
    assert.deepEqual(map, [
      { addr: 0, size: 0x9fc00, type: E820_RAM },
      { addr: 0x9fc00, size: 0x60400, type: E820_RESERVED },
      { addr: MiB, size: 0x1000_0000 - MiB, type: E820_RAM },
      { addr: 0x1000_0000, size: 0x2000, type: E820_RESERVED },
      { addr: 0x1000_2000, size: 512 * MiB - 0x1000_2000, type: E820_RAM },
    ]);
  });

  test('a reserved range outside RAM (the PCI hole) is listed as reserved', () => {
    const map = e820Of(4 * GiB, [{ start: 0xfec00000, size: 0x1000 }]);
    assert.deepEqual(map[3], { addr: 0xfec00000, size: 0x1000, type: E820_RESERVED });
    assert.equal(map.length, 5);
  });

  test('more entries than the zero page holds are refused', () => {
    const many = Array.from({ length: 80 }, (_, i) => ({
      start: 2 * MiB + i * 2 * PAGE,
      size: PAGE,
    }));
    assert.throws(() => e820Of(512 * MiB, many), { code: 'E820_TABLE_FULL' });
  });
});

describe('boot_params', () => {
  test('a bzImage zero page: header copied, loader fields set at their offsets', () => {
    const file = syntheticBzImage();
    const e820 = e820Of(512 * MiB);
    const page = buildBootParams({
      setupHeader: file.subarray(0x1f1, 0x26c),
      loadAddr: MiB,
      cmdlineAddr: 0x20000,
      initrd: { addr: 0x1f000000, size: 0x123456 },
      e820,
      acpiRsdpAddr: 0xe0000,
    });
    const view = new DataView(page.buffer);
    assert.equal(page.byteLength, BOOT_PARAMS_SIZE);
    // Header fields the loader only reads come through unchanged.
    assert.equal(view.getUint32(0x202, true), 0x53726448);
    assert.equal(view.getUint16(0x206, true), 0x020f);
    assert.equal(view.getUint32(0x22c, true), 0x7fffffff);
    assert.equal(view.getUint32(0x238, true), 2047);
    assert.equal(view.getUint32(0x260, true), 0x3378000);
    assert.equal(view.getUint16(0x1fe, true), 0xaa55);
    // Fields the loader writes.
    assert.equal(view.getUint16(0x1fa, true), 0xffff, 'vid_mode normal');
    assert.equal(page[0x00f], 0, 'orig_video_isVGA');
    assert.equal(page[0x210], 0xff, 'type_of_loader');
    assert.equal(page[0x211], 0x81, 'loadflags LOADED_HIGH | CAN_USE_HEAP');
    assert.equal(view.getUint32(0x214, true), MiB, 'code32_start');
    assert.equal(view.getUint16(0x224, true), 0xfe00, 'heap_end_ptr');
    assert.equal(view.getUint32(0x228, true), 0x20000, 'cmd_line_ptr');
    assert.equal(view.getUint32(0x0c8, true), 0, 'ext_cmd_line_ptr');
    assert.equal(view.getUint32(0x218, true), 0x1f000000, 'ramdisk_image');
    assert.equal(view.getUint32(0x21c, true), 0x123456, 'ramdisk_size');
    assert.equal(view.getUint32(0x0c0, true), 0, 'ext_ramdisk_image');
    assert.equal(view.getBigUint64(0x070, true), 0xe0000n, 'acpi_rsdp_addr');
    assert.equal(view.getBigUint64(0x250, true), 0n, 'setup_data');
    assert.equal(page[0x1ef], 0, 'sentinel clear');
    assert.deepEqual(readE820(page), e820);
  });

  test('addresses above 4 GiB go into the ext_ fields', () => {
    const page = buildBootParams({
      cmdlineAddr: 0x1_0002_0000,
      initrd: { addr: 0x2_0000_1000, size: 0x1_0000_0010 },
      e820: [],
    });
    const view = new DataView(page.buffer);
    assert.equal(view.getUint32(0x228, true), 0x20000);
    assert.equal(view.getUint32(0x0c8, true), 1);
    assert.equal(view.getUint32(0x218, true), 0x1000);
    assert.equal(view.getUint32(0x0c0, true), 2);
    assert.equal(view.getUint32(0x21c, true), 0x10);
    assert.equal(view.getUint32(0x0c4, true), 1);
  });

  test('an ELF kernel gets a minimal 2.15 header', () => {
    const e820 = e820Of(8 * GiB);
    const page = buildBootParams({ cmdlineAddr: 0x20000, e820 });
    const view = new DataView(page.buffer);
    assert.equal(view.getUint16(0x1fe, true), 0xaa55);
    assert.equal(view.getUint32(0x202, true), 0x53726448);
    assert.equal(view.getUint16(0x206, true), 0x020f);
    assert.equal(view.getUint32(0x238, true), 2047);
    assert.equal(view.getUint32(0x22c, true), 0x7fffffff);
    assert.equal(page[0x210], 0xff);
    assert.equal(view.getUint32(0x218, true), 0, 'no initrd');
    assert.equal(view.getUint32(0x214, true), 0, 'no code32_start');
    assert.deepEqual(readE820(page), e820);
  });
});
