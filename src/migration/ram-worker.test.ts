import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import { guestMemoryRam, nativeRamLayout } from './guest-memory-ram.js';
import type { ByteSink } from './qemu-file.js';
import { PAGE_SIZE, type RamPageSelection } from './ram.js';
import { WorkerStreamWriter } from './ram-worker.js';
import { MigrationStreamWriter, type StreamStats } from './stream.js';
import { fixtureMachine } from './test-fixtures.js';

const GiB = 2 ** 30;
const threads = () => readdirSync('/proc/self/task').length;

function collect(): ByteSink & { bytes(): Buffer } {
  const parts: Buffer[] = [];
  return {
    write: (b) => void parts.push(Buffer.from(b)),
    bytes: () => Buffer.concat(parts),
  };
}

test('the migration thread writes the same stream as MigrationStreamWriter, over both pc slots, then ends', async () => {
  // 5 GiB in the pc layout: 3.5 GiB below the PCI hole, 1.5 GiB above 4 GiB; mostly never touched.
  const mem = GuestMemory.create(5 * GiB);
  try {
    await readFile('/proc/self/stat');
    const before = threads();
    const low = mem.slots.find((s) => s.gpa === 0)!;
    const high = mem.slots.find((s) => s.gpa >= 4 * GiB)!;
    const page = new Uint8Array(PAGE_SIZE);
    for (const gpa of [0, 0x7000, low.size - PAGE_SIZE, high.gpa, high.gpa + 0x100000]) {
      mem.write(gpa, randomFillSync(page));
    }
    mem.write(0x9000, new Uint8Array(PAGE_SIZE)); // populated, all zero
    mem.write(high.gpa + 0x3fff, Uint8Array.of(1));
    const ram = guestMemoryRam(mem);
    const layout = nativeRamLayout(ram);
    assert.ok(layout, 'GuestMemory RAM can be viewed from another thread');
    const { devices } = fixtureMachine(true);
    const lowPages = low.size / PAGE_SIZE;
    const dirty: RamPageSelection[] = [
      {
        block: 'pc.ram',
        pages: [0, 7, 8, 9, lowPages - 1, lowPages, lowPages + 3, lowPages + 300],
      },
    ];
    // A few pages left at the stop are sent with the completion from the
    // main thread; many go through the worker first: the same stream.
    const few: RamPageSelection[] = [{ block: 'pc.ram', pages: new Set([1, lowPages + 3]) }];
    const many: RamPageSelection[] = [
      { block: 'pc.ram', pages: Array.from({ length: 600 }, (_, i) => lowPages - 300 + i) },
    ];
    const shape = { machineType: 'pc', vcpus: 2, devices, chunkPages: 100 };

    for (const last of [few, many]) {
      const a = collect();
      const here = new MigrationStreamWriter({ ...shape, sink: a, ram });
      await here.begin();
      await here.sendRam();
      await here.sendRam(dirty);
      const statsHere = await here.complete(last);

      const b = collect();
      const there: WorkerStreamWriter = new WorkerStreamWriter({
        ...shape,
        sink: b,
        ram: layout,
        ramHere: ram,
      });
      try {
        await there.begin();
        await there.sendRam();
        assert.ok(threads() > before, 'the worker runs');
        await there.sendRam(dirty);
        const statsThere: StreamStats = await there.complete(last);
        assert.deepEqual(statsThere, statsHere);
        assert.deepEqual(there.stats, statsHere);
      } finally {
        await there.close();
      }
      assert.equal(threads(), before, 'the worker has ended');
      assert.ok(a.bytes().equals(b.bytes()), `the same ${a.bytes().length} bytes`);
    }
  } finally {
    mem.close();
  }
});

test('a sink error reaches the caller as the sink threw it', async () => {
  const mem = GuestMemory.create(1024 * PAGE_SIZE, { layout: 'flat' });
  try {
    mem.write(0, randomFillSync(new Uint8Array(1024 * PAGE_SIZE)));
    const ram = guestMemoryRam(mem);
    const layout = nativeRamLayout(ram)!;
    const failure = Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
    let writes = 0;
    const sink: ByteSink = {
      write: () => {
        if (++writes > 1) throw failure;
      },
    };
    const w = new WorkerStreamWriter({
      sink,
      machineType: 'pc',
      vcpus: 1,
      ram: layout,
      ramHere: ram,
      devices: [],
      chunkPages: 4,
    });
    try {
      await w.begin();
      await assert.rejects(w.sendRam(), (err) => err === failure);
    } finally {
      await w.close();
    }
  } finally {
    mem.close();
  }
});
