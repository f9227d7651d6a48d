import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type BzImage, type ElfKernel, parseKernelImage } from './kernel-image.js';
import { pvhNote, syntheticBzImage, syntheticElf } from './synthetic-kernels.js';

function refused(bytes: Uint8Array, message: RegExp): void {
  assert.throws(
    () => parseKernelImage(bytes),
    (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.equal((err as { code?: string }).code, 'KERNEL_IMAGE_INVALID');
      assert.equal(err.name, 'KernelImageError');
      assert.match(err.message, message);
      return true;
    },
  );
}

describe('bzImage', () => {
  test('a protocol 2.15 bzImage is parsed from its setup header', () => {
    const file = syntheticBzImage({ kernelVersion: '6.1.0-test (me@here) #1 SMP' });
    const image = parseKernelImage(file) as BzImage;
    assert.equal(image.kind, 'bzimage');
    assert.deepEqual(image.header, {
      setupSects: 4,
      version: 0x020f,
      loadflags: 0x01,
      syssize: 0x4000,
      initrdAddrMax: 0x7fffffff,
      kernelAlignment: 0x200000,
      relocatable: true,
      minAlignment: 21,
      xloadflags: 0x7f,
      cmdlineSize: 2047,
      payloadOffset: 0x300,
      payloadLength: 0x4000 - 0x400,
      prefAddress: 0x1000000,
      initSize: 0x3378000,
      kernelVersion: '6.1.0-test (me@here) #1 SMP',
    });
    assert.equal(image.payloadCompression, 'zstd');
    // The protected-mode kernel is everything after (4 + 1) * 512 bytes.
    assert.equal(image.protectedMode.byteLength, 0x4000);
    assert.deepEqual(
      image.protectedMode.subarray(0, 0x300),
      file.subarray(5 * 512, 5 * 512 + 0x300),
    );
    // The setup header runs from 0x1f1 to 0x202 + byte[0x201].
    assert.equal(image.setupHeaderBytes.byteLength, 0x26c - 0x1f1);
    assert.deepEqual(image.setupHeaderBytes, file.subarray(0x1f1, 0x26c));
  });

  test('setup_sects 0 means 4 sectors', () => {
    const image = parseKernelImage(syntheticBzImage({ setupSects: 0 })) as BzImage;
    assert.equal(image.header.setupSects, 4);
    assert.equal(image.protectedMode.byteLength, 0x4000);
  });

  test('a larger setup area moves the protected-mode kernel', () => {
    const file = syntheticBzImage({ setupSects: 39 });
    const image = parseKernelImage(file) as BzImage;
    assert.equal(image.protectedMode.byteOffset - file.byteOffset, 40 * 512);
  });

  test('a file too short for any header is refused', () => {
    refused(
      new Uint8Array(100),
      /not a Linux kernel: no 'HdrS' setup header \(the file is only 100 bytes\) and no ELF magic/,
    );
  });

  test('a file with neither HdrS nor ELF magic is refused', () => {
    refused(
      new Uint8Array(64 * 1024),
      /not a Linux kernel: no 'HdrS' setup header at 0x202 and no ELF magic/,
    );
    refused(Buffer.from('#!/bin/sh\necho this is not a kernel\n'.repeat(40)), /not a Linux kernel/);
  });

  test('a header without the 0xaa55 boot flag is refused', () => {
    refused(syntheticBzImage({ bootFlag: 0 }), /boot_flag at 0x1fe is not 0xaa55/);
  });

  test('boot protocol older than 2.12 is refused', () => {
    refused(
      syntheticBzImage({ version: 0x020b }),
      /boot protocol 2\.11; the 64-bit entry needs 2\.12/,
    );
  });

  test('a zImage (LOADED_HIGH clear) is refused', () => {
    refused(syntheticBzImage({ loadflags: 0 }), /LOADED_HIGH is clear/);
  });

  test('a kernel without the 64-bit entry is refused', () => {
    refused(
      syntheticBzImage({ xloadflags: 0x02 }),
      /no 64-bit entry point \(XLF_KERNEL_64 is clear\)/,
    );
  });

  test('a file cut inside its setup area is refused', () => {
    refused(syntheticBzImage({ truncateTo: 0x400 }), /truncated bzImage: the file is 1024 bytes/);
  });

  test('a file cut inside its protected-mode kernel is refused', () => {
    refused(
      syntheticBzImage({ truncateTo: 5 * 512 + 0x2000 }),
      /protected-mode kernel is 8192 bytes but its header \(syssize\) says 16384/,
    );
  });

  test('a payload running past the kernel is refused', () => {
    refused(
      syntheticBzImage({ payloadLength: 0x4000 }),
      /truncated bzImage: its payload \(offset 768, 16384 bytes\)/,
    );
  });

  test('init_size 0 is refused', () => {
    refused(syntheticBzImage({ initSize: 0 }), /init_size 0/);
  });
});

describe('ELF', () => {
  const text = Uint8Array.from({ length: 0x1800 }, (_, i) => (i * 7) & 0xff);
  const data = Uint8Array.from({ length: 0x100 }, () => 0xab);

  test('a plain ELF is loaded at its physical addresses, entry as given', () => {
    const file = syntheticElf({
      entry: 0x200010n,
      segments: [
        { paddr: 0x300000, data, memsz: 0x2000 },
        { paddr: 0x200000, data: text },
        { type: 4, paddr: 0, data: pvhNote(0x200000) },
      ],
    });
    const image = parseKernelImage(file) as ElfKernel;
    assert.equal(image.kind, 'elf');
    assert.equal(image.entry, 0x200010);
    assert.equal(image.pvhEntry, 0x200000);
    assert.deepEqual(
      image.segments.map((s) => [s.paddr, s.data.byteLength, s.memsz]),
      [
        [0x200000, 0x1800, 0x1800],
        [0x300000, 0x100, 0x2000],
      ],
    );
    assert.deepEqual(image.segments[0]!.data, text);
  });

  test('a vmlinux-style ELF: physical entry kept, virtual entry translated', () => {
    const high = 0xffffffff81000000n;
    const segments = [
      { paddr: 0x1000000, vaddr: high, data: text },
      { paddr: 0x1002000, vaddr: high + 0x2000n, data, memsz: 0x1000 },
    ];
    // vmlinux's e_entry is phys_startup_64, already physical.
    assert.equal(
      (parseKernelImage(syntheticElf({ entry: 0x1000040n, segments })) as ElfKernel).entry,
      0x1000040,
    );
    // A virtual entry goes through its segment's vaddr-to-paddr offset.
    assert.equal(
      (parseKernelImage(syntheticElf({ entry: high + 0x2010n, segments })) as ElfKernel).entry,
      0x1002010,
    );
    const image = parseKernelImage(syntheticElf({ entry: 0x1000040n, segments })) as ElfKernel;
    assert.equal(image.segments[0]!.vaddr, high);
    assert.equal(image.pvhEntry, undefined);
  });

  const ok = { entry: 0x200000n, segments: [{ paddr: 0x200000, data: text }] };

  test('a 32-bit ELF is refused', () => {
    refused(syntheticElf({ ...ok, elfClass: 1 }), /32-bit \(ELFCLASS32\)/);
  });

  test('an ELF for another machine is refused', () => {
    refused(syntheticElf({ ...ok, machine: 183 }), /for machine 183, not x86-64/);
  });

  test('a shared object is refused', () => {
    refused(syntheticElf({ ...ok, type: 3 }), /type 3, not an executable/);
  });

  test('an ELF shorter than its header is refused', () => {
    refused(syntheticElf({ ...ok, truncateTo: 40 }), /truncated ELF kernel: the file is 40 bytes/);
  });

  test('an ELF whose segment data is cut off is refused', () => {
    refused(
      syntheticElf({ ...ok, truncateTo: 64 + 56 + 0x100 }),
      /truncated ELF kernel: program header 0 wants 6144 bytes/,
    );
  });

  test('a segment below 1 MiB is refused', () => {
    refused(
      syntheticElf({ entry: 0x10000n, segments: [{ paddr: 0x10000, data: text }] }),
      /loads at physical 0x10000, below 1 MiB/,
    );
  });

  test('a segment past 4 GiB is refused', () => {
    refused(
      syntheticElf({ entry: 0xfffff000n, segments: [{ paddr: 0xfffff000, data: text }] }),
      /reaches past 4 GiB/,
    );
  });

  test('overlapping segments are refused', () => {
    refused(
      syntheticElf({
        entry: 0x200000n,
        segments: [
          { paddr: 0x200000, data: text },
          { paddr: 0x201000, data },
        ],
      }),
      /segments overlap: 0x200000\+6144 and 0x201000/,
    );
  });

  test('an entry outside every segment is refused', () => {
    refused(
      syntheticElf({ ...ok, entry: 0x900000n }),
      /entry point 0x900000 lies in no loaded segment/,
    );
  });

  test('a segment with more file bytes than memory bytes is refused', () => {
    refused(
      syntheticElf({ entry: 0x200000n, segments: [{ paddr: 0x200000, data: text, memsz: 16 }] }),
      /more file bytes \(6144\) than memory bytes \(16\)/,
    );
  });

  test('an ELF without PT_LOAD is refused', () => {
    refused(
      syntheticElf({
        entry: 0x200000n,
        segments: [{ type: 4, paddr: 0x200000, data: pvhNote(1) }],
      }),
      /no PT_LOAD segment/,
    );
  });
});
