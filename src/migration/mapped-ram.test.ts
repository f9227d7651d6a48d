import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import { checkCapabilityTransport, MigrationCapabilities } from './capabilities.js';
import { openIncoming, withOutgoing } from './channels.js';
import { MigrationCapabilityError } from './errors.js';
import { guestMemoryRam } from './guest-memory-ram.js';
import {
  countPresent,
  MAPPED_RAM_ALIGNMENT,
  MAPPED_RAM_HEADER_SIZE,
  MAPPED_RAM_HEADER_VERSION,
  mappedRamBitmapBytes,
  pagePresent,
} from './mapped-ram.js';
import { BufferSink, bufferSource } from './qemu-file.js';
import { PAGE_SIZE, RAM_SAVE_FLAG_MEM_SIZE, type RamAccessor } from './ram.js';
import { type DeviceSection, type LoadResult, loadVmState, saveVmState } from './stream.js';
import { allTypes, type FixtureMachine, fixtureMachine, refusal } from './test-fixtures.js';

const MACHINE = 'pc';
const dir = mkdtempSync(join(tmpdir(), 'tsvmm-mapped-ram-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let seq = 0;

async function saveMapped(
  ram: RamAccessor,
  devices: DeviceSection[],
  vcpus: number,
  offset = 0,
): Promise<string> {
  const path = join(dir, `vm-${++seq}.state`);
  const uri = offset ? `file:${path},offset=${offset}` : `file:${path}`;
  await withOutgoing(uri, (sink) =>
    saveVmState({ sink, machineType: MACHINE, vcpus, ram, devices, mappedRam: true }),
  );
  return path;
}

function loadFrom(
  path: string,
  m: { ram: RamAccessor; devices: DeviceSection[]; vcpus: number },
  extra: {
    mappedRam?: boolean;
    mapRam?: (id: string, fd: number, off: number, len: number) => void;
    offset?: number;
  } = {},
): Promise<LoadResult> {
  const offset = extra.offset ?? 0;
  return (async () => {
    const ch = await openIncoming(offset ? `file:${path},offset=${offset}` : `file:${path}`);
    try {
      return await loadVmState({
        source: ch.source,
        machineType: MACHINE,
        vcpus: m.vcpus,
        ram: m.ram,
        devices: m.devices,
        mappedRam: extra.mappedRam ?? true,
        fileOffset: offset,
        ...(extra.mapRam ? { mapRam: extra.mapRam } : {}),
      });
    } finally {
      await ch.close();
    }
  })();
}

/** The parts of one block's record in the START section, read by hand from the file. */
interface BlockOnDisk {
  id: string;
  size: number;
  version: number;
  pageSize: number;
  bitmapOffset: number;
  pagesOffset: number;
  bitmap: Buffer;
}

/** Finds the MEM_SIZE record (after the 'ram' START header) and parses the block list by hand. */
function parseBlocks(file: Buffer, total: number, start = 0): BlockOnDisk[] {
  const startHeader = Buffer.concat([
    Buffer.from([0x01, 0, 0, 0, 1, 3]),
    Buffer.from('ram'),
    Buffer.from([0, 0, 0, 0, 0, 0, 0, 4]),
  ]);
  let at = file.indexOf(startHeader, start);
  assert.ok(at > 0, "the 'ram' START section");
  at += startHeader.length;
  assert.equal(Number(file.readBigUInt64BE(at)), total + RAM_SAVE_FLAG_MEM_SIZE);
  at += 8;
  const blocks: BlockOnDisk[] = [];
  let left = total;
  while (left > 0) {
    const len = file[at]!;
    const id = file.subarray(at + 1, at + 1 + len).toString();
    at += 1 + len;
    const size = Number(file.readBigUInt64BE(at));
    at += 8;
    const version = file.readUInt32BE(at);
    const pageSize = Number(file.readBigUInt64BE(at + 4));
    const bitmapOffset = Number(file.readBigUInt64BE(at + 12));
    const pagesOffset = Number(file.readBigUInt64BE(at + 20));
    at += MAPPED_RAM_HEADER_SIZE;
    const bitmap = file.subarray(
      bitmapOffset,
      bitmapOffset + mappedRamBitmapBytes(size / PAGE_SIZE),
    );
    blocks.push({ id, size, version, pageSize, bitmapOffset, pagesOffset, bitmap });
    at = pagesOffset + size;
    left -= size;
  }
  return blocks;
}

function isZero(b: Uint8Array): boolean {
  return b.every((x) => x === 0);
}

function assertSameMachine(dst: FixtureMachine, src: FixtureMachine): void {
  assert.deepEqual({ ...dst.all, log: [] }, { ...src.all, absent: 7, log: [] });
  assert.deepEqual(dst.clock, src.clock);
  assert.deepEqual(dst.cpus, src.cpus);
  for (const [id, mem] of src.ram.memory) {
    assert.ok(Buffer.from(dst.ram.memory.get(id)!).equals(mem), `RAM block ${id} differs`);
  }
}

function assertUntouched(m: FixtureMachine): void {
  assert.deepEqual(m.all, allTypes(false));
  assert.equal(m.clock.clock, 0n);
  for (const c of m.cpus) assert.equal(c.rip, 0n);
  for (const [id, mem] of m.ram.memory) assert.ok(isZero(mem), `RAM block ${id} was written`);
}

describe('mapped-ram layout', () => {
  test("each block: QEMU's header, the bitmap after it, pages at 1 MiB-aligned fixed offsets, zero pages as holes", async () => {
    const src = fixtureMachine(true, { ramPages: 1024 });
    const path = await saveMapped(src.ram, src.devices, src.cpus.length);
    const file = readFileSync(path);
    const total = 1024 * PAGE_SIZE + 16 * PAGE_SIZE;
    const blocks = parseBlocks(file, total);
    assert.deepEqual(
      blocks.map((b) => [b.id, b.size]),
      [
        ['pc.ram', 1024 * PAGE_SIZE],
        ['vga.vram', 16 * PAGE_SIZE],
      ],
    );
    let present = 0;
    for (const b of blocks) {
      assert.equal(b.version, MAPPED_RAM_HEADER_VERSION);
      assert.equal(b.pageSize, PAGE_SIZE);
      assert.equal(b.pagesOffset % MAPPED_RAM_ALIGNMENT, 0, 'pages region 1 MiB aligned');
      assert.ok(b.pagesOffset >= b.bitmapOffset + b.bitmap.length);
      const mem = src.ram.memory.get(b.id)!;
      for (let n = 0; n < b.size / PAGE_SIZE; n++) {
        const page = mem.subarray(n * PAGE_SIZE, (n + 1) * PAGE_SIZE);
        const onDisk = file.subarray(
          b.pagesOffset + n * PAGE_SIZE,
          b.pagesOffset + (n + 1) * PAGE_SIZE,
        );
        assert.equal(pagePresent(b.bitmap, n), !isZero(page), `${b.id} page ${n}: bitmap`);
        assert.ok(Buffer.from(page).equals(onDisk), `${b.id} page ${n} at its fixed offset`);
        if (!isZero(page)) present++;
      }
      // Bits past the last page stay clear.
      for (let n = b.size / PAGE_SIZE; n < b.bitmap.length * 8; n++)
        assert.ok(!pagePresent(b.bitmap, n));
    }
    // Zero pages and the padding are holes: far fewer blocks than bytes.
    const st = statSync(path);
    const allocated = st.blocks * 512;
    assert.ok(
      allocated < present * PAGE_SIZE + 512 * 1024,
      `sparse: ${allocated} bytes allocated for ${present} pages in a ${st.size}-byte file`,
    );
    // The configuration names the capability, as QEMU's does.
    const vmdesc = JSON.parse(file.subarray(file.indexOf('{', file.lastIndexOf(0))).toString()) as {
      configuration: { subsections?: { vmsd_name: string }[] };
    };
    assert.equal(vmdesc.configuration.subsections?.[0]?.vmsd_name, 'configuration/capabilities');
    const cfg = file.subarray(8, 8 + 1 + 4 + 2 + 1 + 1 + 26 + 4 + 4 + 1 + 10);
    assert.ok(cfg.includes(Buffer.from('configuration/capabilities')));
    assert.ok(cfg.includes(Buffer.from('mapped-ram')));
  });

  test('read back through our reader (pages copied): the same machine; the counts of present and zero pages', async () => {
    const src = fixtureMachine(true, { ramPages: 1024 });
    const path = await saveMapped(src.ram, src.devices, src.cpus.length);
    const dst = fixtureMachine(false, { ramPages: 1024 });
    const result = await loadFrom(path, { ...dst, vcpus: dst.cpus.length });
    assert.equal(result.mappedRam, 'copied');
    assertSameMachine(dst, src);
    // pc.ram: 2 pages of 4 are not zero; vga.vram: 3 of 16.
    assert.equal(result.normalPages, 512 + 3);
    assert.equal(result.zeroPages, 512 + 13);
    // From a buffer image of the file too (no fd: the copy path).
    const again = fixtureMachine(false, { ramPages: 1024 });
    await loadVmState({
      source: bufferSource(readFileSync(path)),
      machineType: MACHINE,
      vcpus: again.cpus.length,
      ram: again.ram,
      devices: again.devices,
      mappedRam: true,
    });
    assertSameMachine(again, src);
  });

  test('a stream at file:PATH,offset=N: absolute offsets, still aligned, loads back', async () => {
    const src = fixtureMachine(true, { ramPages: 256 });
    const offset = 12_288;
    const path = await saveMapped(src.ram, src.devices, src.cpus.length, offset);
    const file = readFileSync(path);
    assert.ok(isZero(file.subarray(0, offset)));
    for (const b of parseBlocks(file, 272 * PAGE_SIZE, offset)) {
      assert.equal(b.pagesOffset % MAPPED_RAM_ALIGNMENT, 0);
    }
    const dst = fixtureMachine(false, { ramPages: 256 });
    await loadFrom(path, { ...dst, vcpus: dst.cpus.length }, { offset });
    assertSameMachine(dst, src);
  });

  test('the mapping path: guest RAM mapped MAP_PRIVATE from the file; holes read zero; writes never reach the file', async () => {
    const size = 8 * MAPPED_RAM_ALIGNMENT;
    const srcMem = GuestMemory.create(size, { layout: 'flat' });
    const dstMem = GuestMemory.create(size, { layout: 'flat' });
    try {
      // Some pages random, some with one byte, most never touched (zero).
      const pattern = Buffer.alloc(size);
      for (let n = 0; n < size / PAGE_SIZE; n += 7) {
        const page = pattern.subarray(n * PAGE_SIZE, (n + 1) * PAGE_SIZE);
        if (n % 3 === 0) randomFillSync(page);
        else page[n % PAGE_SIZE] = 0xa5;
        srcMem.write(n * PAGE_SIZE, page);
      }
      const srcDevices = fixtureMachine(true);
      const path = await saveMapped(guestMemoryRam(srcMem), srcDevices.devices, 2);
      const before = readFileSync(path);

      const dst = fixtureMachine(false);
      // Something the load must replace (the destination had a guest loaded, say).
      dstMem.fill(PAGE_SIZE, PAGE_SIZE, 0xee);
      const maps: [string, number, number][] = [];
      const result = await loadFrom(
        path,
        { ram: guestMemoryRam(dstMem), devices: dst.devices, vcpus: 2 },
        {
          mapRam: (id, fd, off, len) => {
            maps.push([id, off, len]);
            dstMem.mapFilePrivate(fd, off, 0, len);
          },
        },
      );
      assert.equal(result.mappedRam, 'mapped');
      const [block] = parseBlocks(before, size);
      assert.deepEqual(maps, [['pc.ram', block!.pagesOffset, size]]);
      assert.ok(dstMem.fileBacked);
      assert.ok(Buffer.from(dstMem.read(0, size)).equals(pattern), 'RAM is the saved RAM');
      assert.deepEqual(dst.cpus, srcDevices.cpus);
      // pagemap is not asked about file-backed RAM: a page not faulted in is not zero.
      const ram = guestMemoryRam(dstMem);
      assert.equal(ram.blocks[0]!.unpopulatedPages?.(0, 16), undefined);

      // The guest writes: a private copy; the file stays as it was.
      dstMem.fill(0, size, 0x11);
      assert.equal(dstMem.readU8(size - 1), 0x11);
      assert.ok(readFileSync(path).equals(before), 'the file is unchanged');

      // And a normal save of the restored RAM reads every page (no pagemap shortcut).
      const again = GuestMemory.create(size, { layout: 'flat' });
      try {
        const sink = new BufferSink();
        await saveVmState({ sink, machineType: MACHINE, vcpus: 2, ram, devices: dst.devices });
        const reload = fixtureMachine(false);
        await loadVmState({
          source: bufferSource(sink.bytes()),
          machineType: MACHINE,
          vcpus: 2,
          ram: guestMemoryRam(again),
          devices: reload.devices,
        });
        assert.equal(again.readU8(0), 0x11);
        assert.equal(again.readU8(size - 1), 0x11);
      } finally {
        again.close();
      }
    } finally {
      srcMem.close();
      dstMem.close();
    }
  });
});

test('countPresent counts the bits of the pages, whatever the bitmap length and alignment', () => {
  for (const pages of [1, 7, 8, 31, 32, 33, 100, 1000, 4097]) {
    for (const off of [0, 1, 4]) {
      const buf = new Uint8Array(off + mappedRamBitmapBytes(pages));
      randomFillSync(buf);
      const bitmap = buf.subarray(off);
      let want = 0;
      for (let i = 0; i < pages; i++) if (pagePresent(bitmap, i)) want++;
      const entry = { id: 'b', size: pages * PAGE_SIZE, bitmapOffset: 0, pagesOffset: 0, bitmap };
      assert.equal(countPresent(entry), want, `${pages} pages at offset ${off}`);
    }
  }
});

describe('mapped-ram refusals: nothing applied, RAM never mapped', () => {
  async function saved() {
    const src = fixtureMachine(true, { ramPages: 512 });
    const path = await saveMapped(src.ram, src.devices, src.cpus.length);
    return { src, path, file: readFileSync(path) };
  }

  async function refuse(path: string, extra: { mappedRam?: boolean } = {}) {
    const dst = fixtureMachine(false, { ramPages: 512 });
    let mapped = 0;
    const err = await refusal(
      loadFrom(path, { ...dst, vcpus: dst.cpus.length }, { ...extra, mapRam: () => void mapped++ }),
      'the file',
    );
    assert.equal(mapped, 0, 'RAM was not mapped');
    assert.equal(err.ramTouched, false);
    assertUntouched(dst);
    return err;
  }

  test('a file cut inside a pages region, and one cut in the device state: MIGRATION_TRUNCATED', async () => {
    const { file, path } = await saved();
    const [pc] = parseBlocks(file, 528 * PAGE_SIZE);
    for (const cut of [pc!.pagesOffset + 100 * PAGE_SIZE, file.length - 200]) {
      const p = join(dir, `cut-${cut}.state`);
      writeFileSync(p, file);
      truncateSync(p, cut);
      assert.equal((await refuse(p)).code, 'MIGRATION_TRUNCATED');
    }
    void path;
  });

  test('a bit flipped in a bitmap or in a block header: refused before any state is applied', async () => {
    const { file } = await saved();
    const [pc, vram] = parseBlocks(file, 528 * PAGE_SIZE);
    const cases: [number, string][] = [
      [pc!.bitmapOffset + 3, 'MIGRATION_CHECKSUM'],
      [vram!.bitmapOffset, 'MIGRATION_CHECKSUM'],
      // bitmap_offset's low byte: it no longer follows the header.
      [pc!.bitmapOffset - 9, 'MIGRATION_MALFORMED'],
      // the header's version.
      [pc!.bitmapOffset - MAPPED_RAM_HEADER_SIZE + 3, 'MIGRATION_VERSION'],
    ];
    for (const [at, code] of cases) {
      const bad = Buffer.from(file);
      bad[at]! ^= 0x01;
      const p = join(dir, `flip-${at}.state`);
      writeFileSync(p, bad);
      assert.equal((await refuse(p)).code, code, `flip at ${at}`);
    }
  });

  test("the capability must match at both ends (QEMU's check), with its wording", async () => {
    const { path } = await saved();
    const err = await refuse(path, { mappedRam: false });
    assert.equal(err.code, 'MIGRATION_CAPABILITY_MISMATCH');
    assert.match(err.message, /Capability mapped-ram is off, but received capability is on/);
    assert.match(err.message, /migrate-set-capabilities before migrate-incoming/);

    const src = fixtureMachine(true);
    const plain = join(dir, 'plain.state');
    await withOutgoing(`file:${plain}`, (sink) =>
      saveVmState({ sink, machineType: MACHINE, vcpus: 2, ram: src.ram, devices: src.devices }),
    );
    const dst = fixtureMachine(false);
    const err2 = await refusal(
      loadFrom(plain, { ...dst, vcpus: 2 }, { mappedRam: true }),
      'the file',
    );
    assert.equal(err2.code, 'MIGRATION_CAPABILITY_MISMATCH');
    assert.match(err2.message, /Capability mapped-ram is on, but received capability is off/);
    assertUntouched(dst);
  });

  test('the writer needs a seekable sink; the capability needs a file: URI', async () => {
    const src = fixtureMachine(true);
    await assert.rejects(
      saveVmState({
        sink: new BufferSink(),
        machineType: MACHINE,
        vcpus: 2,
        ram: src.ram,
        devices: src.devices,
        mappedRam: true,
      }),
      /seekable sink/,
    );
    const caps = new MigrationCapabilities();
    caps.set([{ capability: 'mapped-ram', state: true }]);
    assert.ok(caps.has('mapped-ram'));
    checkCapabilityTransport(caps, 'file', 'file:/x');
    for (const uri of ['tcp:127.0.0.1:4444', 'unix:/tmp/s', 'exec:cat']) {
      assert.throws(
        () => checkCapabilityTransport(caps, uri.slice(0, uri.indexOf(':')), uri),
        (e: unknown) =>
          e instanceof MigrationCapabilityError &&
          e.code === 'MIGRATION_CAPABILITY_NEEDS_FILE' &&
          /requires seekable transport/.test(e.message),
      );
    }
  });
});
