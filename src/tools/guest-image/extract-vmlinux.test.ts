import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { parseKernelImage } from '../../hw/i386/boot/kernel-image.js';
import { VmlinuxError } from './errors.js';
import { extractVmlinux, findKernelPayload, payloadCompression } from './extract-vmlinux.js';
import {
  lz4CliDecompress,
  lz4LegacyCompress,
  makeBzImage,
  makeElfKernel,
  randomBytes,
  u32le,
} from './test-fixtures.js';

function vmlinuxCode(code: string, message?: RegExp): (e: unknown) => boolean {
  return (e) =>
    e instanceof VmlinuxError && e.code === code && (!message || message.test(e.message));
}

/** An ELF kernel with enough code to compress into something. */
const ELF = makeElfKernel(Buffer.concat([randomBytes(3000, 21), Buffer.alloc(5000, 0xcc)]));

test('a gzip payload is found through the setup header and decompressed to the ELF', () => {
  // setup_sects 0 means 4 sectors; 2 means 2.
  for (const setupSects of [0, 2, 31]) {
    const bz = makeBzImage(gzipSync(ELF), { setupSects });
    const payload = findKernelPayload(bz);
    assert.equal(payload.compression, 'gzip');
    assert.equal(payload.fileOffset, ((setupSects || 4) + 1) * 512 + 0x3c4);
    const vmlinux = extractVmlinux(bz);
    assert.ok(Buffer.from(vmlinux).equals(ELF));
    const parsed = parseKernelImage(vmlinux);
    assert.equal(parsed.kind, 'elf');
  }
});

test('an LZ4 payload, as the kernel builds it (lz4 -l, then the size), is decompressed', () => {
  const payload = Buffer.concat([lz4LegacyCompress(ELF, 9), u32le(ELF.length)]);
  const bz = makeBzImage(payload, { payloadOffset: 0x1000 });
  assert.equal(findKernelPayload(bz).compression, 'lz4');
  assert.ok(Buffer.from(extractVmlinux(bz)).equals(ELF));
});

test('payloads we do not decode are refused, naming the format and what to do', () => {
  const cases: Array<[string, number[]]> = [
    ['xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
    ['zstd', [0x28, 0xb5, 0x2f, 0xfd]],
    ['bzip2', [0x42, 0x5a, 0x68, 0x39]],
    ['lzma', [0x5d, 0x00, 0x00, 0x80]],
    ['lzo', [0x89, 0x4c, 0x5a, 0x4f]],
  ];
  for (const [name, magic] of cases) {
    const bz = makeBzImage(Buffer.concat([Buffer.from(magic), randomBytes(200, 22)]));
    assert.equal(payloadCompression(findKernelPayload(bz).data), name);
    assert.throws(
      () => extractVmlinux(bz),
      vmlinuxCode(
        'VMLINUX_UNSUPPORTED_COMPRESSION',
        new RegExp(
          `payload is ${name}-compressed.*CONFIG_KERNEL_GZIP or CONFIG_KERNEL_LZ4.*pass the bzImage`,
        ),
      ),
      name,
    );
  }
  assert.throws(
    () => extractVmlinux(makeBzImage(Buffer.from('ABCDEFGH'))),
    vmlinuxCode(
      'VMLINUX_UNSUPPORTED_COMPRESSION',
      /unknown format \(it starts with 414243444546\)/,
    ),
  );
});

test('damaged payloads, non-ELF results and files that are not bzImages are typed errors', () => {
  const gz = gzipSync(ELF);
  assert.throws(
    () => extractVmlinux(makeBzImage(gz.subarray(0, gz.length - 100))),
    vmlinuxCode('VMLINUX_CORRUPT_PAYLOAD', /gzip payload does not decompress/),
  );
  const lz = Buffer.concat([lz4LegacyCompress(ELF), u32le(ELF.length)]);
  assert.throws(
    () => extractVmlinux(makeBzImage(lz.subarray(0, lz.length - 50))),
    vmlinuxCode('VMLINUX_CORRUPT_PAYLOAD', /LZ4 payload does not decompress \(truncated/),
  );
  assert.throws(
    () => extractVmlinux(makeBzImage(gzipSync(Buffer.from('no ELF in here')))),
    vmlinuxCode('VMLINUX_NOT_ELF', /decompressed to 14 bytes that are not a bootable ELF64/),
  );
  const elf32 = Buffer.from(ELF);
  elf32[4] = 1;
  assert.throws(
    () => extractVmlinux(makeBzImage(gzipSync(elf32))),
    vmlinuxCode('VMLINUX_NOT_ELF', /32-bit/),
  );
  assert.throws(
    () => extractVmlinux(Buffer.from('stand-in kernel')),
    vmlinuxCode('VMLINUX_NOT_BZIMAGE', /no 'HdrS' setup header/),
  );
  assert.throws(() => extractVmlinux(ELF), vmlinuxCode('VMLINUX_NOT_BZIMAGE', /already an ELF/));
  const noPayload = makeBzImage(Buffer.alloc(0));
  assert.throws(
    () => extractVmlinux(noPayload),
    vmlinuxCode('VMLINUX_NOT_BZIMAGE', /payload_length 0/),
  );
});

/** Where build-guest leaves Debian's kernel, if it has run here. */
function cachedDebianKernel(): string | undefined {
  const dirs = [process.env.TSVMM_GUEST_CACHE, join(homedir(), '.cache', 'tsvmm', 'guest')];
  for (const dir of dirs) {
    if (dir && existsSync(join(dir, 'vmlinuz'))) return join(dir, 'vmlinuz');
  }
  return undefined;
}

test("Debian's cloud kernel: vmlinux comes out of the bzImage and parses as an ELF kernel", (t) => {
  const path = cachedDebianKernel();
  if (!path) {
    t.skip(
      'no cached Debian kernel ($TSVMM_GUEST_CACHE/vmlinuz or ~/.cache/tsvmm/guest/vmlinuz): run `node scripts/build-guest.mjs` once (downloads ~28 MB)',
    );
    return;
  }
  const bz = readFileSync(path);
  const image = parseKernelImage(bz);
  assert.equal(image.kind, 'bzimage');
  if (image.kind !== 'bzimage') return;
  const payload = findKernelPayload(bz);
  const started = performance.now();
  const vmlinux = extractVmlinux(bz);
  const ms = performance.now() - started;
  t.diagnostic(
    `${path}: ${image.header.kernelVersion ?? 'no version string'}; ${payload.compression} payload of ${payload.data.length} bytes at file offset ${payload.fileOffset} -> ${vmlinux.length} bytes in ${ms.toFixed(0)} ms`,
  );
  assert.ok(ms < 10_000, `extraction took ${ms} ms`);

  const elf = parseKernelImage(vmlinux);
  assert.equal(elf.kind, 'elf');
  if (elf.kind !== 'elf') return;
  t.diagnostic(
    `entry 0x${elf.entry.toString(16)}${elf.pvhEntry === undefined ? '' : `, PVH entry 0x${elf.pvhEntry.toString(16)}`}`,
  );
  for (const s of elf.segments) {
    t.diagnostic(
      `PT_LOAD paddr 0x${s.paddr.toString(16)} vaddr 0x${s.vaddr.toString(16)} filesz 0x${s.data.length.toString(16)} memsz 0x${s.memsz.toString(16)}`,
    );
  }
  const first = elf.segments[0]!;
  const last = elf.segments[elf.segments.length - 1]!;
  // The kernel is linked at its preferred address, and starts there.
  assert.equal(first.paddr, image.header.prefAddress);
  assert.equal(elf.entry, image.header.prefAddress);
  assert.equal(first.paddr % image.header.kernelAlignment, 0);
  // Its image fits in what the bzImage asks the loader to reserve.
  assert.ok(last.paddr + last.memsz - first.paddr <= image.header.initSize);
  // Text and data in the kernel's high mapping (0xffffffff80000000 + paddr);
  // the per-CPU segment is linked at virtual 0.
  for (const s of elf.segments) {
    assert.ok(s.vaddr === 0n || s.vaddr === 0xffff_ffff_8000_0000n + BigInt(s.paddr));
  }
  // The same bytes as Debian's lz4 command makes of the payload, when it is
  // installed. lz4 fails on the kernel's size trailer: leave it out.
  if (payload.compression === 'lz4') {
    const reference = lz4CliDecompress(payload.data.subarray(0, -4));
    if (reference) {
      assert.ok(reference.equals(vmlinux), 'lz4 -dc agrees');
      t.diagnostic('the same bytes as lz4 -dc of the payload');
    } else t.diagnostic('lz4 is not installed: no cross-check against lz4 -dc');
  }
});
