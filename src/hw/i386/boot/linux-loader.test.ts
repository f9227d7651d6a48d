import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { defaultGuestCacheDir } from '../../../tools/guest-image/main.js';
import { BOOT_GDT_ADDR, BOOT_IDT_ADDR, PD_ADDR, PML4_ADDR } from '../long-mode.js';
import { BOOT_PARAMS_SIZE, E820_RESERVED } from './boot-params.js';
import { type BzImage, parseKernelImage, XLF_KERNEL_64 } from './kernel-image.js';
import {
  BOOT_PARAMS_ADDR,
  CMDLINE_ADDR,
  KERNEL_LOAD_ADDR,
  type LinuxLoadOptions,
  loadLinux,
} from './linux-loader.js';
import { SparseMemory } from './sparse-memory.js';
import { syntheticBzImage, syntheticElf } from './synthetic-kernels.js';

const MiB = 0x100000;
const GiB = 0x40000000;
const PAGE = 4096;

function u32(mem: SparseMemory, gpa: number): number {
  return new DataView(mem.read(gpa, 4).buffer).getUint32(0, true);
}

/** The initrd-sized pattern the tests load, to find it again in guest memory. */
function initrdOf(size: number): Uint8Array {
  return Uint8Array.from({ length: size }, (_, i) => (i * 13 + 5) & 0xff);
}

function refusedWith(
  mem: SparseMemory,
  options: LinuxLoadOptions,
  code: string,
  message: RegExp,
): void {
  assert.throws(
    () => loadLinux(mem, options),
    (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.equal((err as { code?: string }).code, code);
      assert.match(err.message, message);
      return true;
    },
  );
  assert.equal(mem.writes, 0, 'nothing is written when the load is refused');
}

describe('loadLinux with a bzImage', () => {
  test('kernel at 1 MiB, entry +0x200, command line and zero page where documented', () => {
    const mem = new SparseMemory(512 * MiB);
    const kernel = syntheticBzImage();
    const initrd = initrdOf(3 * MiB + 123);
    const boot = loadLinux(mem, { kernel, initrd, cmdline: 'console=ttyS0 probe.tick_ms=100' });

    assert.equal(boot.kind, 'bzimage');
    assert.equal(boot.entry, 0x100200n);
    assert.equal(boot.bootParamsAddr, 0x7000);
    assert.equal(boot.cmdlineAddr, 0x20000);
    // The kernel runs from pref_address (16 MiB) and needs init_size there.
    assert.deepEqual(boot.kernelRange, { start: MiB, end: 0x1000000 + 0x3378000 });

    const pm = (parseKernelImage(kernel) as BzImage).protectedMode;
    assert.deepEqual(mem.read(MiB, pm.byteLength), pm);
    assert.equal(
      Buffer.from(mem.read(0x20000, 32)).toString('latin1'),
      'console=ttyS0 probe.tick_ms=100\0',
    );

    // boot_params at 0x7000, fields at their documented offsets.
    assert.equal(u32(mem, 0x7000 + 0x202), 0x53726448);
    assert.equal(u32(mem, 0x7000 + 0x228), 0x20000);
    assert.equal(mem.read(0x7000 + 0x210, 1)[0], 0xff);
    assert.equal(u32(mem, 0x7000 + 0x218), boot.initrd!.addr);
    assert.equal(u32(mem, 0x7000 + 0x21c), 3 * MiB + 123);
    assert.equal(u32(mem, 0x7000 + 0x214), MiB);
    assert.equal(mem.read(0x7000 + 0x1e8, 1)[0], 3);

    // The initrd: page-aligned, as high as RAM allows, after the kernel.
    const { addr, size } = boot.initrd!;
    assert.equal(addr % PAGE, 0);
    assert.ok(addr + size <= 512 * MiB);
    assert.ok(512 * MiB - (addr + size) < PAGE, 'placed at the top of RAM');
    assert.ok(addr >= boot.kernelRange.end);
    assert.deepEqual(mem.read(addr, size), initrd);
  });

  test('the initrd stays below initrd_addr_max', () => {
    const mem = new SparseMemory(4 * GiB);
    const kernel = syntheticBzImage({ initrdAddrMax: 0x37ffffff });
    const boot = loadLinux(mem, { kernel, initrd: initrdOf(2 * MiB), cmdline: '' });
    assert.equal(boot.initrd!.addr + boot.initrd!.size, 0x38000000);
  });

  test('with split RAM the initrd stays below the end of low RAM', () => {
    const mem = new SparseMemory(8 * GiB);
    const kernel = syntheticBzImage({ initrdAddrMax: 0xffffffff });
    const boot = loadLinux(mem, { kernel, initrd: initrdOf(5 * MiB + 1), cmdline: '' });
    const end = boot.initrd!.addr + boot.initrd!.size;
    assert.ok(end <= 3 * GiB && 3 * GiB - end < PAGE, `initrd ends at 0x${end.toString(16)}`);
    // The zero page carries the full 8 GiB map: 5 GiB above 4 GiB.
    const last = 0x7000 + 0x2d0 + 3 * 20;
    const view = new DataView(mem.read(last, 20).buffer);
    assert.equal(view.getBigUint64(0, true), BigInt(4 * GiB));
    assert.equal(view.getBigUint64(8, true), BigInt(5 * GiB));
  });

  test('the initrd steps below a reserved range, which e820 reports', () => {
    const mem = new SparseMemory(512 * MiB);
    const reserved = [{ start: 512 * MiB - 64 * PAGE, size: 16 * PAGE }];
    const boot = loadLinux(mem, {
      kernel: syntheticBzImage(),
      initrd: initrdOf(MiB),
      cmdline: '',
      reserved,
    });
    assert.equal(boot.initrd!.addr + boot.initrd!.size, reserved[0]!.start);
    const entries = mem.read(0x7000 + 0x1e8, 1)[0]!;
    const at = 0x7000 + 0x2d0 + 3 * 20;
    assert.equal(entries, 5);
    assert.equal(u32(mem, at), reserved[0]!.start);
    assert.equal(u32(mem, at + 16), E820_RESERVED);
  });

  test('a non-relocatable kernel is reserved from pref_address', () => {
    const mem = new SparseMemory(512 * MiB);
    const boot = loadLinux(mem, {
      kernel: syntheticBzImage({ relocatable: false, prefAddress: 0x2000000, initSize: 8 * MiB }),
      cmdline: '',
    });
    assert.deepEqual(boot.kernelRange, { start: MiB, end: 0x2000000 + 8 * MiB });
    assert.equal(boot.initrd, undefined);
    assert.equal(u32(mem, 0x7000 + 0x218), 0);
  });

  test('a command line of exactly cmdline_size bytes fits; one more is refused naming the limit', () => {
    const kernel = syntheticBzImage({ cmdlineSize: 255 });
    const mem = new SparseMemory(512 * MiB);
    loadLinux(mem, { kernel, cmdline: 'x'.repeat(255) });
    assert.equal(mem.read(0x20000 + 255, 1)[0], 0);
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel, cmdline: 'x'.repeat(256) },
      'KERNEL_CMDLINE_TOO_LONG',
      /is 256 bytes but this kernel takes at most 255 \(cmdline_size\)/,
    );
  });

  test('a command line with a NUL is refused', () => {
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel: syntheticBzImage(), cmdline: 'a\0b' },
      'KERNEL_CMDLINE_INVALID',
      /NUL byte/,
    );
  });

  test('an initrd that does not fit above the kernel is refused with the sizes', () => {
    refusedWith(
      new SparseMemory(128 * MiB),
      { kernel: syntheticBzImage(), initrd: new Uint8Array(64 * MiB), cmdline: '' },
      'INITRD_TOO_LARGE',
      /the initrd is 67108864 bytes \(64 MiB\) but only 63471616 bytes \(60.5 MiB\) are free between the kernel's end 0x4378000 and 0x8000000/,
    );
  });

  test('a kernel whose init_size does not fit in RAM is refused', () => {
    refusedWith(
      new SparseMemory(64 * MiB),
      { kernel: syntheticBzImage(), cmdline: '' },
      'KERNEL_TOO_LARGE_FOR_RAM',
      /from 0x100000 to 0x4378000 \(67.5 MiB\).*RAM below 4 GiB ends at 0x4000000 \(the VM has 64 MiB\); give the VM more memory with -m/,
    );
  });

  test('a reserved range over the zero page or the kernel is refused', () => {
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel: syntheticBzImage(), cmdline: '', reserved: [{ start: 0x7800, size: 0x100 }] },
      'BOOT_LAYOUT_CONFLICT',
      /reserves 0x7800\.\.0x7900, where the loader puts boot_params/,
    );
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel: syntheticBzImage(), cmdline: '', reserved: [{ start: 0x2000000, size: 0x1000 }] },
      'BOOT_LAYOUT_CONFLICT',
      /where the loader puts the kernel/,
    );
  });

  test('a file that is not a kernel is refused before anything is written', () => {
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel: new Uint8Array(8192).fill(0x90), cmdline: '' },
      'KERNEL_IMAGE_INVALID',
      /not a Linux kernel/,
    );
  });
});

describe('loadLinux with an ELF', () => {
  const text = Uint8Array.from({ length: 0x3000 }, (_, i) => (i * 3) & 0xff);
  const data = Uint8Array.from({ length: 0x80 }, () => 0x5a);
  const high = 0xffffffff80000000n;
  const elf = syntheticElf({
    entry: high + 0x1000040n,
    segments: [
      { paddr: 0x1000000, vaddr: high + 0x1000000n, data: text },
      { paddr: 0x1004000, vaddr: high + 0x1004000n, data, memsz: 0x3000 },
    ],
  });

  test('segments at their physical addresses, bss zeroed, entry translated', () => {
    const mem = new SparseMemory(512 * MiB);
    // Leftovers from an earlier boot where the bss goes.
    mem.write(0x1004080, new Uint8Array(0x2f80).fill(0xee));
    mem.writes = 0;
    const boot = loadLinux(mem, { kernel: elf, initrd: initrdOf(PAGE), cmdline: 'probe.cpus=4' });
    assert.equal(boot.kind, 'elf');
    assert.equal(boot.entry, 0x1000040n);
    assert.deepEqual(boot.kernelRange, { start: 0x1000000, end: 0x1007000 });
    assert.deepEqual(mem.read(0x1000000, text.byteLength), text);
    assert.deepEqual(mem.read(0x1004000, 0x80), data);
    assert.ok(
      mem.read(0x1004080, 0x2f80).every((b) => b === 0),
      'bss is zeroed',
    );
    // The synthesised header and the command line.
    assert.equal(u32(mem, 0x7000 + 0x202), 0x53726448);
    assert.equal(u32(mem, 0x7000 + 0x228), 0x20000);
    assert.equal(u32(mem, 0x7000 + 0x238), 2047);
    assert.equal(Buffer.from(mem.read(0x20000, 13)).toString('latin1'), 'probe.cpus=4\0');
    assert.equal(boot.initrd!.addr + PAGE, 512 * MiB);
  });

  test('an ELF command line is limited to 2047 bytes', () => {
    refusedWith(
      new SparseMemory(512 * MiB),
      { kernel: elf, cmdline: 'y'.repeat(2048) },
      'KERNEL_CMDLINE_TOO_LONG',
      /at most 2047/,
    );
  });

  test('a segment past the end of RAM is refused', () => {
    refusedWith(
      new SparseMemory(16 * MiB),
      { kernel: elf, cmdline: '' },
      'KERNEL_TOO_LARGE_FOR_RAM',
      /to 0x1007000/,
    );
  });
});

test('the loader leaves the long-mode tables alone', () => {
  const used = [
    [BOOT_PARAMS_ADDR, BOOT_PARAMS_ADDR + BOOT_PARAMS_SIZE],
    [CMDLINE_ADDR, CMDLINE_ADDR + 2048],
  ];
  const tables = [
    [BOOT_GDT_ADDR, BOOT_IDT_ADDR + 8],
    [PML4_ADDR, PD_ADDR + 4 * PAGE],
  ];
  for (const [a, b] of used) {
    for (const [c, d] of tables)
      assert.ok(b! <= c! || d! <= a!, `0x${a!.toString(16)} overlaps 0x${c!.toString(16)}`);
  }
  assert.equal(KERNEL_LOAD_ADDR, MiB);
});

/** A real kernel, where this host has one: the guest cache or /boot. */
function findRealKernel(): { path?: string; reason: string } {
  // The guest builder's cache ($TSVMM_GUEST_CACHE or ~/.cache/tsvmm/guest).
  const candidates: string[] = [join(defaultGuestCacheDir(), 'vmlinuz')];
  if (existsSync('/boot')) {
    for (const name of readdirSync('/boot').sort()) {
      if (name.startsWith('vmlinuz-')) candidates.push(join('/boot', name));
    }
  }
  const unreadable: string[] = [];
  for (const path of candidates) {
    if (!existsSync(path)) continue;
    try {
      readFileSync(path, { flag: 'r' }).subarray(0, 1);
      return { path, reason: '' };
    } catch (err) {
      unreadable.push(`${path} (${(err as NodeJS.ErrnoException).code})`);
    }
  }
  const tried = candidates.join(', ');
  return {
    reason: unreadable.length
      ? `no readable kernel: ${unreadable.join(', ')}`
      : `no kernel found (looked at ${tried}); build the guest image or set TSVMM_GUEST_CACHE`,
  };
}

test('a real Debian kernel parses and loads', (t) => {
  const found = findRealKernel();
  if (!found.path) {
    process.stderr.write(`tsvmm: ${t.name}: NOT RUN: ${found.reason}\n`);
    t.skip(found.reason);
    return;
  }
  const kernel = readFileSync(found.path);
  const image = parseKernelImage(kernel);
  assert.equal(image.kind, 'bzimage', `${found.path} is a bzImage`);
  const { header } = image as BzImage;
  assert.ok(header.version >= 0x020c, `protocol 0x${header.version.toString(16)}`);
  assert.ok(header.xloadflags & XLF_KERNEL_64, 'XLF_KERNEL_64');
  assert.ok(header.relocatable, 'relocatable');
  assert.ok(header.initSize > 0);
  t.diagnostic(
    `${found.path}: ${header.kernelVersion ?? '?'}; protocol ${header.version.toString(16)}, init_size 0x${header.initSize.toString(16)}, pref_address 0x${header.prefAddress.toString(16)}, ${(image as BzImage).payloadCompression} payload`,
  );

  const mem = new SparseMemory(512 * MiB);
  const boot = loadLinux(mem, { kernel, initrd: initrdOf(4 * MiB), cmdline: 'console=ttyS0' });
  assert.equal(boot.entry, 0x100200n);
  assert.ok(boot.initrd!.addr >= boot.kernelRange.end);
  // The zero page starts from the image's own setup header.
  const headerEnd = 0x202 + kernel[0x201]!;
  assert.deepEqual(
    mem.read(0x7000 + 0x1f4, 0x210 - 0x1f4),
    Uint8Array.from(kernel.subarray(0x1f4, 0x210)),
  );
  assert.deepEqual(
    mem.read(0x7000 + 0x22c, headerEnd - 0x22c),
    Uint8Array.from(kernel.subarray(0x22c, headerEnd)),
  );
});
