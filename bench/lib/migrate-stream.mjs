// bench/lib/migrate-stream.mjs: tsvmm's migration stream alone, with no VM:
// guest RAM in a GuestMemory (the same anonymous mapping a VM would use),
// saved with saveVmState through the real file: channel (temporary name,
// fsync, rename, directory fsync) and loaded back with loadVmState into a
// fresh GuestMemory, then compared byte for byte. The devices are the
// migration test fixtures (a vCPU, a clock, every field type).
import { randomFillSync } from 'node:crypto';
import { rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { GuestMemory } from '../../dist/accel/kvm/memory/guest-memory.js';
import { openIncoming, openOutgoing } from '../../dist/migration/channels.js';
import { guestMemoryRam } from '../../dist/migration/guest-memory-ram.js';
import { loadVmState, saveVmState } from '../../dist/migration/stream.js';
import { fixtureMachine } from '../../dist/migration/test-fixtures.js';
import { BenchError, withTimeout } from './common.mjs';

const PAGE = 4096;
const PIECE = 256 << 20; // views and fills in pieces of this size

/** Calls `fn(view, offset)` for each piece of guest RAM, in order. */
function eachPiece(memory, fn) {
  for (const slot of memory.slots) {
    for (let at = 0; at < slot.size; at += PIECE) {
      const len = Math.min(PIECE, slot.size - at);
      fn(memory.view(slot.gpa + at, len), slot.hostOffset + at);
    }
  }
}

/**
 * Fills guest RAM as `content` says:
 * - `zero`: left as mapped, all zero (an idle guest);
 * - `half`: every even page a pattern (each 32-bit word its byte offset
 *   XOR 0x5a5a5a5a, never all zero), every odd page zero;
 * - `random256`: the first 256 MiB random bytes, the rest zero.
 * Returns the non-zero bytes written.
 */
function fill(memory, content) {
  if (content === 'zero') return 0;
  if (content === 'random256') {
    const want = Math.min(256 << 20, memory.size);
    let done = 0;
    eachPiece(memory, (view) => {
      if (done >= want) return;
      const n = Math.min(view.length, want - done);
      for (let at = 0; at < n; at += 64 << 20) randomFillSync(view, at, Math.min(64 << 20, n - at));
      done += n;
    });
    return want;
  }
  if (content === 'half') {
    // One template piece with the pattern on even pages, then copied with each
    // page's first word made unique.
    const template = new Uint8Array(PIECE);
    const words = new Uint32Array(template.buffer);
    for (let p = 0; p < PIECE / PAGE; p += 2) {
      const base = (p * PAGE) / 4;
      for (let i = 0; i < PAGE / 4; i++) words[base + i] = ((base + i) * 4) ^ 0x5a5a5a5a;
    }
    let nonZero = 0;
    eachPiece(memory, (view, offset) => {
      view.set(template.subarray(0, view.length));
      const dv = new DataView(view.buffer, view.byteOffset, view.byteLength);
      for (let p = 0; p < view.length / PAGE; p += 2) {
        dv.setUint32(p * PAGE, ((offset / PAGE + p) ^ 0xa5a5a5a5) >>> 0 || 1, true);
        nonZero += PAGE;
      }
    });
    return nonZero;
  }
  throw new Error(`unknown content ${content}`);
}

/** Whether two GuestMemory hold the same bytes (memcmp per piece). */
function sameContents(a, b) {
  for (const slot of a.slots) {
    for (let at = 0; at < slot.size; at += PIECE) {
      const len = Math.min(PIECE, slot.size - at);
      if (Buffer.compare(a.view(slot.gpa + at, len), b.view(slot.gpa + at, len)) !== 0)
        return false;
    }
  }
  return true;
}

const msSince = (t0) => Number(process.hrtime.bigint() - t0) / 1e6;

/**
 * One case: fill a GuestMemory of `size` bytes once, then `runs` times save
 * it to `dir/state` through file:, load it into a fresh GuestMemory and
 * compare. Each run gives the times (save: open to close, i.e. with fsync
 * and rename; sync: the close alone; load: open to the end of
 * loadVmState), the file size and the page counts. The state file is
 * removed after each run.
 */
export async function streamCase({ size, content, dir, runs, timeoutMs }) {
  const src = GuestMemory.create(size);
  try {
    const nonZero = fill(src, content);
    const results = [];
    for (let i = 0; i < runs; i++)
      results.push(await streamRound(src, { size, content, dir, timeoutMs }));
    return { nonZero, runs: results };
  } finally {
    src.close();
  }
}

async function streamRound(src, { size, content, dir, timeoutMs }) {
  const path = join(dir, 'state');
  let dst;
  try {
    const save = fixtureMachine(true, { vcpus: 1, ramPages: 1 });
    const shape = { machineType: 'pc', vcpus: 1 };

    const t0 = process.hrtime.bigint();
    const out = await openOutgoing(`file:${path}`);
    let saved;
    let streamMs;
    try {
      saved = await withTimeout(
        saveVmState({ ...shape, sink: out.sink, ram: guestMemoryRam(src), devices: save.devices }),
        timeoutMs,
        `stream save of ${size} bytes`,
      );
      streamMs = msSince(t0);
    } catch (e) {
      await out.abort();
      throw e;
    }
    const t1 = process.hrtime.bigint();
    await withTimeout(out.close(), timeoutMs, 'file: close (fsync, rename)');
    const syncMs = msSince(t1);
    const saveMs = msSince(t0);
    const fileBytes = statSync(path).size;

    dst = GuestMemory.create(size);
    const load = fixtureMachine(false, { vcpus: 1, ramPages: 1 });
    const t2 = process.hrtime.bigint();
    const inc = await openIncoming(`file:${path}`);
    let loaded;
    try {
      loaded = await withTimeout(
        loadVmState({
          ...shape,
          source: inc.source,
          ram: guestMemoryRam(dst),
          devices: load.devices,
          ramIsZeroed: true,
        }),
        timeoutMs,
        `stream load of ${size} bytes`,
      );
    } finally {
      await inc.close();
    }
    const loadMs = msSince(t2);
    rmSync(path, { force: true });

    if (!sameContents(src, dst)) {
      throw new BenchError(
        `stream-only ${size} bytes (${content}): the loaded RAM differs from the saved RAM`,
      );
    }
    if (load.clock.clock !== save.clock.clock || load.cpus[0].rip !== save.cpus[0].rip) {
      throw new BenchError(
        `stream-only ${size} bytes (${content}): the loaded device state differs`,
      );
    }
    return {
      saveMs,
      streamMs,
      syncMs,
      loadMs,
      fileBytes,
      normalPages: saved.normalPages,
      zeroPages: saved.zeroPages,
      loadedNormal: loaded.normalPages,
    };
  } finally {
    rmSync(path, { force: true });
    dst?.close();
  }
}
