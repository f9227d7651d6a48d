import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { openIncoming, withOutgoing } from './channels.js';
import { BufferSink, bufferSource, StreamWriter } from './qemu-file.js';
import { createBufferRam, PAGE_SIZE, type RamBlock, RamPageWriter } from './ram.js';
import {
  type DeviceSection,
  encodeDeviceSection,
  loadVmState,
  MigrationStreamWriter,
  QEMU_VM_FILE_MAGIC,
  saveVmState,
  type VMDesc,
  warmUpDeviceSection,
} from './stream.js';
import { allTypes, type FixtureMachine, fixtureMachine, refusal } from './test-fixtures.js';
import { vmsField } from './vmstate.js';

const MACHINE = 'pc-i440fx-tsvmm';
const dir = mkdtempSync(join(tmpdir(), 'tsvmm-stream-'));
after(() => rmSync(dir, { recursive: true, force: true }));

async function saveToBuffer(
  m: FixtureMachine,
  vcpus = m.cpus.length,
  chunkPages = 64,
): Promise<Buffer> {
  const sink = new BufferSink();
  await saveVmState({
    sink,
    machineType: MACHINE,
    vcpus,
    ram: m.ram,
    devices: m.devices,
    chunkPages,
  });
  return sink.bytes();
}

function load(data: Uint8Array, m: FixtureMachine, machineType = MACHINE, ramIsZeroed = false) {
  return loadVmState({
    source: bufferSource(data),
    machineType,
    ramIsZeroed,
    vcpus: m.cpus.length,
    ram: m.ram,
    devices: m.devices,
  });
}

/** The destination's devices are exactly as created: no setter or hook ran. */
function assertUntouched(m: FixtureMachine): void {
  assert.deepEqual(m.all, allTypes(false));
  assert.equal(m.clock.clock, 0n);
  assert.equal(m.clock.reliable, true, 'preLoad of kvmclock must not have run');
  for (const c of m.cpus) assert.equal(c.rip, 0n);
}

function assertSameMachine(dst: FixtureMachine, src: FixtureMachine): void {
  assert.deepEqual({ ...dst.all, log: [] }, { ...src.all, absent: 7, log: [] });
  assert.deepEqual(dst.clock, src.clock);
  assert.deepEqual(dst.cpus, src.cpus);
  for (const [id, mem] of src.ram.memory) {
    assert.ok(Buffer.from(dst.ram.memory.get(id)!).equals(mem), `RAM block ${id} differs`);
  }
}

describe('migration stream', () => {
  test('a machine saved to a file: channel loads back equal, hooks in QEMU order', async () => {
    const src = fixtureMachine(true);
    const path = join(dir, 'roundtrip.qevm');
    const stats = await withOutgoing(`file:${path}`, (sink) =>
      saveVmState({ sink, machineType: MACHINE, vcpus: 2, ram: src.ram, devices: src.devices }),
    );
    assert.equal(src.all.log.join(','), 'preSave');
    const dst = fixtureMachine(false);
    const ch = await openIncoming(`file:${path}`);
    const res = await loadVmState({
      source: ch.source,
      machineType: MACHINE,
      vcpus: 2,
      ram: dst.ram,
      devices: dst.devices,
    });
    await ch.close();
    assertSameMachine(dst, src);
    // 'absent' subsection was not needed: the destination keeps its own value.
    assert.equal(dst.all.absent, 7);
    assert.deepEqual(dst.all.log, ['preLoad', 'extra.preLoad', 'extra.postLoad', 'postLoad v2']);
    assert.equal(res.bytes, stats.bytes);
    assert.equal(res.normalPages, stats.normalPages);
    assert.equal(res.zeroPages, stats.zeroPages);
    assert.equal(stats.normalPages + stats.zeroPages, 512 + 16);
  });

  test('the file is a QEVM v3 stream with a configuration section and a vmdesc JSON listing every device', async () => {
    const src = fixtureMachine(true);
    const data = await saveToBuffer(src);
    assert.equal(data.readUInt32BE(0), QEMU_VM_FILE_MAGIC);
    assert.equal(data.subarray(0, 4).toString('latin1'), 'QEVM');
    assert.equal(data.readUInt32BE(4), 3);
    assert.equal(data[8], 0x07, 'QEMU_VM_CONFIGURATION');
    assert.equal(data.readUInt32BE(9), MACHINE.length);
    assert.equal(data.subarray(13, 13 + MACHINE.length).toString(), MACHINE);
    // The JSON after EOF, found the way analyze-migration.py finds it.
    const nul = data.lastIndexOf(0);
    const start = data.indexOf('{', nul);
    assert.equal(data[start - 5], 0x06, 'QEMU_VM_VMDESCRIPTION');
    const len = data.readUInt32BE(start - 4);
    assert.equal(start + len, data.length);
    const desc = JSON.parse(data.subarray(start, start + len).toString()) as VMDesc;
    assert.equal(desc.page_size, 4096);
    assert.deepEqual(desc.configuration.fields[1], {
      name: 'name',
      type: 'buffer',
      size: MACHINE.length,
    });
    const names = desc.devices.map((d) => `${d.name}/${d.instance_id}`);
    for (const d of src.devices) assert.ok(names.includes(`${d.idstr}/${d.instanceId}`), d.idstr);
    for (const d of ['tsvmm-machine/0', 'tsvmm-integrity/0', 'tsvmm-stream-end/0']) {
      assert.ok(names.includes(d), d);
    }
    const all = desc.devices.find((d) => d.name === 'test-all-types')!;
    assert.deepEqual(
      all.fields.find((f) => f.name === 'regs'),
      {
        name: 'regs',
        array_len: 4,
        type: 'uint32',
        size: 4,
      },
    );
    assert.deepEqual(
      all.subsections?.map((s) => s.vmsd_name),
      ['test-all-types/extra'],
      'only the subsections that were sent are described',
    );
  });

  test('zero pages take 9 bytes each (header with CONTINUE, one fill byte)', async () => {
    const zeros = createBufferRam([{ id: 'pc.ram', size: 4096 * PAGE_SIZE }]);
    const sink = new BufferSink();
    const stats = await saveVmState({
      sink,
      machineType: MACHINE,
      vcpus: 1,
      ram: zeros,
      devices: [],
    });
    assert.equal(stats.zeroPages, 4096);
    assert.equal(stats.normalPages, 0);
    const size = sink.bytes().length;
    assert.ok(size < 4096 * 9 + 4096, `16 MiB of zero RAM took ${size} bytes`);
    const dst = createBufferRam([{ id: 'pc.ram', size: 4096 * PAGE_SIZE }]);
    dst.memory.get('pc.ram')!.fill(0xff);
    await loadVmState({
      source: bufferSource(sink.bytes()),
      machineType: MACHINE,
      vcpus: 1,
      ram: dst,
      devices: [],
    });
    assert.ok(
      dst.memory.get('pc.ram')!.every((b) => b === 0),
      'zero pages overwrite stale data',
    );
  });

  test('runs of zero pages are the records one zero page at a time gives, across chunk and section ends', async () => {
    // 1 MiB chunks hold 116,508 records of 9 bytes: 130,000 pages cross one.
    const pages = 130_000;
    const zeros = createBufferRam([{ id: 'pc.ram', size: pages * PAGE_SIZE }]);
    const block = zeros.blocks[0]!;
    const whole = new BufferSink();
    await saveVmState({
      sink: whole,
      machineType: MACHINE,
      vcpus: 1,
      ram: zeros,
      devices: [],
      chunkPages: 1000,
    });
    // The same records written page by page, the way QEMU writes them.
    const sink = new BufferSink();
    const w = new StreamWriter(sink);
    const pw = new RamPageWriter(w, { normalPages: 0, zeroPages: 0 });
    const page = new Uint8Array(PAGE_SIZE);
    const byRun = new BufferSink();
    const wr = new StreamWriter(byRun);
    const rw = new RamPageWriter(wr, { normalPages: 0, zeroPages: 0 });
    for (const [from, n] of [
      [0, 1],
      [1, 116_600],
      [116_601, 3],
    ] as const) {
      for (let i = from; i < from + n; i++) pw.page(block, i * PAGE_SIZE, page);
      rw.zeroRun(block, from * PAGE_SIZE, n);
    }
    rw.newSection();
    pw.newSection();
    pw.page(block, 7 * PAGE_SIZE, page);
    rw.zeroRun(block, 7 * PAGE_SIZE, 1);
    await w.flush();
    await wr.flush();
    assert.ok(byRun.bytes().equals(sink.bytes()));
    assert.equal(rw.counters.zeroPages, 116_605);
    // And the whole stream loads back as zero RAM.
    const dst = createBufferRam([{ id: 'pc.ram', size: pages * PAGE_SIZE }]);
    dst.memory.get('pc.ram')!.fill(1);
    const stats = await loadVmState({
      source: bufferSource(whole.bytes()),
      machineType: MACHINE,
      vcpus: 1,
      ram: dst,
      devices: [],
    });
    assert.equal(stats.zeroPages, pages);
    assert.ok(dst.memory.get('pc.ram')!.every((b) => b === 0));
  });

  test('page record runs across 4 GiB and 8 GiB are the be64 and 0 byte of each page', async () => {
    const one = new BufferSink();
    const w1 = new StreamWriter(one);
    const run = new BufferSink();
    const w2 = new StreamWriter(run);
    for (const [first, n] of [
      [0x10_0000 - 5, 10],
      [0x20_0000 - 1, 3],
      [0x7_fff_fff0, 40],
    ] as const) {
      for (let p = first; p < first + n; p++) {
        w1.u64n(p * PAGE_SIZE + 0x22);
        w1.u8(0);
      }
      w2.pageRecordRun(first, n, 0x22);
    }
    await w1.flush();
    await w2.flush();
    assert.ok(run.bytes().equals(one.bytes()));
    assert.throws(() => w2.pageRecordRun(0, 1, 0x100), RangeError);
  });

  test('a stream truncated anywhere is refused with MIGRATION_TRUNCATED and no device state applied', async () => {
    const data = await saveToBuffer(fixtureMachine(true, { ramPages: 32 }));
    const offsets = new Set<number>([0, 1, 3, 4, 7, 8]);
    for (let i = 0; i < 600; i++) offsets.add(i);
    for (let i = 600; i < data.length - 2000; i += 173) offsets.add(i);
    for (let i = Math.max(0, data.length - 2000); i < data.length; i++) offsets.add(i);
    for (const cut of offsets) {
      const dst = fixtureMachine(false, { ramPages: 32 });
      const err = await refusal(load(data.subarray(0, cut), dst));
      assert.equal(err.code, 'MIGRATION_TRUNCATED', `cut at ${cut}: ${err.message}`);
      assertUntouched(dst);
    }
  });

  test('a single flipped bit anywhere is refused and no device state is applied', async () => {
    const data = await saveToBuffer(fixtureMachine(true, { ramPages: 32 }));
    const offsets = new Set<number>();
    for (let i = 0; i < 600; i++) offsets.add(i);
    for (let i = 600; i < data.length - 2500; i += 61) offsets.add(i);
    for (let i = Math.max(0, data.length - 2500); i < data.length; i++) offsets.add(i);
    const codes = new Set<string>();
    for (const off of offsets) {
      const bad = Buffer.from(data);
      bad[off]! ^= 1 << (off % 8);
      const dst = fixtureMachine(false, { ramPages: 32 });
      const err = await refusal(load(bad, dst));
      codes.add(err.code);
      assertUntouched(dst);
    }
    assert.ok(codes.has('MIGRATION_CHECKSUM'), [...codes].join());
  });

  test('a damaged RAM page is caught by its chunk checksum before it reaches guest memory', async () => {
    const src = fixtureMachine(true, { ramPages: 256 });
    const data = await saveToBuffer(src, 2, 16);
    // The last random page of pc.ram: find its bytes in the stream.
    const page = src.ram.memory.get('pc.ram')!.subarray(253 * PAGE_SIZE, 254 * PAGE_SIZE);
    const at = data.indexOf(Buffer.from(page));
    assert.ok(at > 0);
    data[at + 100]! ^= 0x10;
    const dst = fixtureMachine(false, { ramPages: 256 });
    const err = await refusal(load(data, dst));
    assert.equal(err.code, 'MIGRATION_CHECKSUM');
    assert.equal(err.ramTouched, true, 'earlier verified chunks were written');
    assert.ok(
      dst.ram.memory
        .get('pc.ram')!
        .subarray(253 * PAGE_SIZE)
        .every((b) => b === 0),
    );
    assertUntouched(dst);
  });

  test('a file that is not QEVM is refused with MIGRATION_BAD_MAGIC', async () => {
    const dst = fixtureMachine(false);
    const err = await refusal(
      load(Buffer.from('\x7fELF\x02\x01\x01\x00 this is not a migration stream'), dst),
    );
    assert.equal(err.code, 'MIGRATION_BAD_MAGIC');
    assert.match(err.message, /QEVM/);
    assertUntouched(dst);
  });

  test('a QEVM file of version 2 is refused with MIGRATION_VERSION', async () => {
    const data = await saveToBuffer(fixtureMachine(true));
    data.writeUInt32BE(2, 4);
    const dst = fixtureMachine(false);
    const err = await refusal(load(data, dst));
    assert.equal(err.code, 'MIGRATION_VERSION');
    assert.match(err.message, /version 2/);
  });

  test("another program's QEVM stream (no tsvmm sections) is refused as foreign", async () => {
    // What QEMU writes first: configuration, then START 'ram'.
    const b = Buffer.alloc(64);
    let o = b.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
    o = b.writeUInt32BE(3, o);
    o = b.writeUInt8(7, o);
    o = b.writeUInt32BE(MACHINE.length, o);
    o += b.write(MACHINE, o);
    o = b.writeUInt8(1, o);
    o = b.writeUInt32BE(2, o);
    o = b.writeUInt8(3, o);
    o += b.write('ram', o);
    const err = await refusal(load(b, fixtureMachine(false)));
    assert.equal(err.code, 'MIGRATION_FOREIGN');
  });

  test('a different RAM size is refused naming both sizes', async () => {
    const data = await saveToBuffer(fixtureMachine(true, { ramPages: 64 }));
    const dst = fixtureMachine(false, { ramPages: 128 });
    const err = await refusal(load(data, dst));
    assert.equal(err.code, 'MIGRATION_SHAPE_MISMATCH');
    assert.match(err.message, /RAM size mismatch.*327680 bytes.*589824/);
    assert.equal(err.ramTouched, false);
    assertUntouched(dst);
  });

  test('a different vCPU count is refused naming both counts, before any RAM is written', async () => {
    const data = await saveToBuffer(fixtureMachine(true, { vcpus: 4 }));
    const dst = fixtureMachine(false, { vcpus: 2 });
    const err = await refusal(load(data, dst));
    assert.equal(err.code, 'MIGRATION_SHAPE_MISMATCH');
    assert.match(
      err.message,
      /vCPU count mismatch: the stream has 4 vCPU\(s\), this machine has 2/,
    );
    assert.equal(err.ramTouched, false);
  });

  test('a different machine type, an unknown section and a missing device are refused', async () => {
    const src = fixtureMachine(true);
    const data = await saveToBuffer(src);
    const typeErr = await refusal(load(data, fixtureMachine(false), 'q35'));
    assert.equal(typeErr.code, 'MIGRATION_SHAPE_MISMATCH');
    assert.match(typeErr.message, /'pc-i440fx-tsvmm'.*'q35'/);

    const fewer = fixtureMachine(false);
    const noClock: FixtureMachine = {
      ...fewer,
      devices: fewer.devices.filter((d) => d.idstr !== 'kvmclock'),
    };
    const unknown = await refusal(load(data, noClock));
    assert.equal(unknown.code, 'MIGRATION_SHAPE_MISMATCH');
    assert.match(unknown.message, /'kvmclock' instance 0/);

    const more = fixtureMachine(false);
    const extra: DeviceSection = {
      idstr: 'serial',
      instanceId: 0,
      vmsd: { name: 'serial', version: 1, fields: [] },
      state: {},
    };
    const missing = await refusal(load(data, { ...more, devices: [...more.devices, extra] }));
    assert.equal(missing.code, 'MIGRATION_SHAPE_MISMATCH');
    assert.match(missing.message, /no state for 'serial' instance 0/);
    assertUntouched(more);
  });

  test('precopy passes: pages sent again later win, and the END carries the last dirty pages', async () => {
    const src = fixtureMachine(true, { ramPages: 64 });
    const sink = new BufferSink();
    const w = new MigrationStreamWriter({
      sink,
      machineType: MACHINE,
      vcpus: 2,
      ram: src.ram,
      devices: src.devices,
      chunkPages: 8,
    });
    await w.begin();
    await w.sendRam();
    const mem = src.ram.memory.get('pc.ram')!;
    mem.fill(0xaa, 5 * PAGE_SIZE, 6 * PAGE_SIZE);
    mem.fill(0x00, 9 * PAGE_SIZE, 10 * PAGE_SIZE);
    await w.sendRam([{ block: 'pc.ram', pages: [5, 9] }]);
    mem.fill(0xbb, 40 * PAGE_SIZE, 42 * PAGE_SIZE);
    src.cpus[0]!.rip = 0x1234n;
    const stats = await w.complete([{ block: 'pc.ram', pages: [40, 41] }]);
    assert.equal(stats.normalPages + stats.zeroPages, 64 + 16 + 4);
    for (const ramIsZeroed of [false, true]) {
      // Page 9 was random in the first pass and zero in the second: even
      // on fresh RAM the zero page must overwrite what this load wrote.
      const dst = fixtureMachine(false, { ramPages: 64 });
      await load(sink.bytes(), dst, MACHINE, ramIsZeroed);
      assertSameMachine(dst, src);
    }
  });

  test('a device preSave failure aborts the file: channel and leaves no file behind', async () => {
    const src = fixtureMachine(true);
    const path = join(dir, 'failing.qevm');
    const broken: DeviceSection = {
      idstr: 'broken',
      instanceId: 0,
      vmsd: {
        name: 'broken',
        version: 1,
        fields: [],
        preSave: () => {
          throw new Error('device busy');
        },
      },
      state: {},
    };
    await assert.rejects(
      withOutgoing(`file:${path}`, (sink) =>
        saveVmState({
          sink,
          machineType: MACHINE,
          vcpus: 2,
          ram: src.ram,
          devices: [...src.devices, broken],
        }),
      ),
      /device busy/,
    );
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.includes('failing')),
      [],
      'neither the final file nor a temporary one',
    );
  });

  test("a writer that goes on from another one's header writes the same stream as one writer", async () => {
    const src = fixtureMachine(true, { ramPages: 64 });
    const shape = { machineType: MACHINE, vcpus: 2, ram: src.ram, devices: src.devices };
    const last = [{ block: 'pc.ram', pages: [3, 40] }];
    const one = new BufferSink();
    const w = new MigrationStreamWriter({ ...shape, sink: one, chunkPages: 8 });
    await w.begin();
    await w.sendRam();
    const whole = await w.complete(last);

    const two = new BufferSink();
    const head = new MigrationStreamWriter({ ...shape, sink: two });
    await head.begin();
    assert.throws(() => head.resumePoint(), /flush\(\) first/, 'bytes still buffered');
    await head.flush();
    const rest = new MigrationStreamWriter({
      ...shape,
      sink: two,
      chunkPages: 8,
      resume: head.resumePoint(),
    });
    await assert.rejects(rest.begin(), /begin\(\) called twice/);
    await rest.sendRam();
    assert.deepEqual(await rest.complete(last), whole);
    assert.ok(two.bytes().equals(one.bytes()), 'byte for byte');
  });

  test('each pass reaches the sink whole, its last partial chunk too', async () => {
    const src = fixtureMachine(true, { ramPages: 64 });
    let written = 0;
    const w = new MigrationStreamWriter({
      sink: {
        write: (b: Uint8Array) => {
          written += b.length;
        },
      },
      machineType: MACHINE,
      vcpus: 2,
      ram: src.ram,
      devices: src.devices,
    });
    await w.begin();
    await w.sendRam();
    assert.equal(written, w.stats.bytes, 'nothing of the first pass left in the buffer');
    await w.sendRam([{ block: 'pc.ram', pages: [7] }]);
    assert.equal(written, w.stats.bytes);
  });

  test('a warm-up encode drops its bytes, skips preSave and reports a state it cannot encode', async () => {
    let preSaves = 0;
    const device: DeviceSection<{ v: number }> = {
      idstr: 'warm',
      instanceId: 0,
      vmsd: {
        name: 'warm',
        version: 1,
        fields: [
          vmsField.uint32(
            'v',
            (st: { v: number }) => st.v,
            () => undefined,
          ),
        ],
        preSave: () => {
          preSaves++;
        },
      },
      state: { v: 7 },
    };
    assert.equal(await warmUpDeviceSection(device), true);
    assert.equal(preSaves, 0);
    const unset: DeviceSection<{ v: number | undefined }> = {
      ...device,
      vmsd: {
        name: 'warm',
        version: 1,
        fields: [
          vmsField.uint32(
            'v',
            (st: { v: number | undefined }) => {
              if (st.v === undefined) throw new Error('not captured');
              return st.v;
            },
            () => undefined,
          ),
        ],
      },
      state: { v: undefined },
    };
    assert.equal(await warmUpDeviceSection(unset), false);
    // The real encode still runs the hook.
    await encodeDeviceSection(device);
    assert.equal(preSaves, 1);
  });

  test('saving the same machine twice gives the same bytes', async () => {
    const m = fixtureMachine(true, { ramPages: 8 });
    const a = await saveToBuffer(m);
    const path = join(dir, 'det.qevm');
    await withOutgoing(`file:${path}`, (sink) =>
      saveVmState({
        sink,
        machineType: MACHINE,
        vcpus: 2,
        ram: m.ram,
        devices: m.devices,
        chunkPages: 64,
      }),
    );
    assert.ok(readFileSync(path).equals(a));
  });
});

describe('pages a RAM block reports unpopulated', () => {
  const PAGES = 600;

  /**
   * One buffer block with data in pages 0-2, 100 and 450; pages from
   * `unpopulatedFrom` on that hold no data are reported unpopulated. Reads
   * are recorded as [first page, pages], and answers can be replaced.
   */
  function ramWithMap(unpopulatedFrom = 50) {
    const ram = createBufferRam([{ id: 'pc.ram', size: PAGES * PAGE_SIZE }]);
    const mem = ram.memory.get('pc.ram')!;
    for (const p of [0, 1, 2, 100, 450]) mem.fill(p + 1, p * PAGE_SIZE, p * PAGE_SIZE + 99);
    const inner = ram.blocks[0]!;
    const reads: [number, number][] = [];
    const asked: [number, number][] = [];
    const state = {
      reads,
      asked,
      answer: (first: number, count: number): Uint8Array | undefined => {
        const out = new Uint8Array(count);
        for (let i = 0; i < count; i++) {
          const p = first + i;
          out[i] = p >= unpopulatedFrom && ![100, 450].includes(p) ? 1 : 0;
        }
        return out;
      },
    };
    const block = {
      id: inner.id,
      size: inner.size,
      read(offset: number, len: number) {
        reads.push([offset / PAGE_SIZE, len / PAGE_SIZE]);
        return inner.read(offset, len);
      },
      write: inner.write,
      unpopulatedPages(first: number, count: number) {
        asked.push([first, count]);
        return state.answer(first, count);
      },
    };
    const plain = { blocks: [inner] };
    return { ram: { blocks: [block] }, plain, mem, state };
  }

  function readPages(reads: readonly [number, number][]): Set<number> {
    const s = new Set<number>();
    for (const [first, n] of reads) for (let p = first; p < first + n; p++) s.add(p);
    return s;
  }

  async function save(ram: { blocks: readonly RamBlock[] }): Promise<Buffer> {
    const sink = new BufferSink();
    await saveVmState({ sink, machineType: MACHINE, vcpus: 1, ram, devices: [], chunkPages: 64 });
    return sink.bytes();
  }

  test('a save sends them as zero pages without reading them: the same bytes', async () => {
    const { ram, plain, state } = ramWithMap();
    const bytes = await save(ram);
    assert.ok(bytes.equals(await save(plain)));
    // Asked once for the whole block, and only the populated pages were read.
    assert.deepEqual(state.asked, [[0, PAGES]]);
    const read = readPages(state.reads);
    assert.equal(read.size, 52);
    for (let p = 0; p < PAGES; p++) assert.equal(read.has(p), p < 50 || p === 100 || p === 450);
  });

  test('an answer is used in its own pass only; chosen pages are asked about in long runs', async () => {
    const { ram, mem, state } = ramWithMap();
    const sink = new BufferSink();
    const w = new MigrationStreamWriter({
      sink,
      machineType: MACHINE,
      vcpus: 1,
      ram,
      devices: [],
      chunkPages: 64,
    });
    await w.begin();
    await w.sendRam();
    assert.equal(state.asked.length, 1);
    // The guest writes page 300; the second pass must read it.
    mem.fill(0x5a, 300 * PAGE_SIZE, 301 * PAGE_SIZE);
    state.answer = (first, count) =>
      new Uint8Array(count).fill(1).map((_, i) => (first + i === 300 ? 0 : 1));
    state.reads.length = 0;
    await w.sendRam();
    assert.deepEqual(state.asked[1], [0, PAGES]);
    assert.ok(readPages(state.reads).has(300));
    assert.equal(readPages(state.reads).size, 1);
    // A short run of chosen pages is read without asking; a long one is asked about.
    state.asked.length = 0;
    state.reads.length = 0;
    await w.sendRam([{ block: 'pc.ram', pages: [5, 6, 7] }]);
    assert.deepEqual(state.asked, []);
    const long = Array.from({ length: 40 }, (_, i) => 280 + i);
    await w.sendRam([{ block: 'pc.ram', pages: long }]);
    assert.deepEqual(state.asked, [[280, 40]]);
    assert.ok(readPages(state.reads).has(300));
    assert.ok(!readPages(state.reads).has(301));
    const stats = await w.complete();
    // Pages 0-2, 100 and 450; then 300 in each of the passes that sent it.
    assert.equal(stats.normalPages, 5 + 1 + 1);
  });

  function loadInto(ram: { blocks: readonly RamBlock[] }, data: Uint8Array) {
    return loadVmState({
      source: bufferSource(data),
      machineType: MACHINE,
      vcpus: 1,
      ram,
      devices: [],
    });
  }

  test('a load leaves them unread, and checks and zeroes the others the stream says are zero', async () => {
    const zeros = createBufferRam([{ id: 'pc.ram', size: PAGES * PAGE_SIZE }]);
    const data = await save(zeros);
    const { ram, mem, state } = ramWithMap();
    const stats = await loadInto(ram, data);
    assert.equal(stats.zeroPages, PAGES);
    assert.ok(
      mem.every((b) => b === 0),
      'the pages that held data are zero',
    );
    const read = readPages(state.reads);
    for (let p = 0; p < PAGES; p++) {
      assert.equal(read.has(p), p < 50 || p === 100 || p === 450, `page ${p} read or not`);
    }
    // Asked once, for the window that holds the whole block.
    assert.deepEqual(state.asked, [[0, PAGES]]);
  });

  test('a block that tells zero pages itself (isZero) is asked instead of read, with the same result', async () => {
    const zeros = createBufferRam([{ id: 'pc.ram', size: PAGES * PAGE_SIZE }]);
    const data = await save(zeros);
    const { ram, mem, state } = ramWithMap();
    const checked: [number, number][] = [];
    const block = ram.blocks[0]!;
    const withIsZero = {
      blocks: [
        {
          ...block,
          isZero(offset: number, len: number) {
            checked.push([offset / PAGE_SIZE, len / PAGE_SIZE]);
            return mem.subarray(offset, offset + len).every((b) => b === 0);
          },
        },
      ],
    };
    await loadInto(withIsZero, data);
    assert.ok(
      mem.every((b) => b === 0),
      'the pages that held data are zero',
    );
    assert.deepEqual(state.reads, [], 'nothing read');
    const asked = new Set(checked.filter(([, n]) => n === 1).map(([p]) => p));
    for (const p of [0, 1, 2, 100, 450]) assert.ok(asked.has(p), `page ${p} checked alone`);
  });

  test('a page this load wrote and later receives as zero is zeroed, though reported unpopulated', async () => {
    const src = createBufferRam([{ id: 'pc.ram', size: PAGES * PAGE_SIZE }]);
    const srcMem = src.memory.get('pc.ram')!;
    srcMem.fill(0x77, 300 * PAGE_SIZE, 302 * PAGE_SIZE);
    const sink = new BufferSink();
    const w = new MigrationStreamWriter({
      sink,
      machineType: MACHINE,
      vcpus: 1,
      ram: src,
      devices: [],
      chunkPages: 64,
    });
    await w.begin();
    await w.sendRam();
    srcMem.fill(0, 300 * PAGE_SIZE, 301 * PAGE_SIZE);
    await w.complete([{ block: 'pc.ram', pages: [300] }]);
    const { ram, mem } = ramWithMap();
    await loadInto(ram, sink.bytes());
    assert.ok(Buffer.from(mem).equals(srcMem));
  });

  test('a block that cannot answer, or answers wrongly, is read and not asked again', async () => {
    for (const answer of [() => undefined, () => new Uint8Array(3)]) {
      const { ram, plain, state } = ramWithMap();
      state.answer = answer;
      assert.ok((await save(ram)).equals(await save(plain)));
      assert.equal(state.asked.length, 1);
      assert.equal(readPages(state.reads).size, PAGES);
    }
  });
});
