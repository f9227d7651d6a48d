#!/usr/bin/env node
// bench/migration-thread: how fast the migration thread puts guest RAM on a
// socket, against the socket alone. No KVM needed: guest RAM is a
// GuestMemory mapping of --size with --data of random bytes spread through
// it (the rest zero, as in an idle guest), and the migration thread
// (src/migration/migration-worker.ts) writes one full pass of it, as the
// first pass of a live migration does, to a unix socket that another
// process reads and drops. The reference is the same channel (unix:, its
// sink on the main thread) given the same number of bytes, 1 MiB at a time,
// without the stream: what the stream and the thread cost beyond the copy
// to the kernel.
// Each run is a fresh process, as each migration of a VM is the first of
// its thread.
//
// Usage: npm run bench -- migration-thread [--runs N] [--size 512M] [--data 128M]
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseMemorySize } from '../dist/accel/kvm/memory/parse-size.js';
import {
  BenchError,
  makeTempDir,
  median,
  root,
  runBench,
  spawnTracked,
  stopChild,
  table,
} from './lib/common.mjs';

const MiB = 1 << 20;

/** A size as `-m` takes it (tsvmm's own parser), or a BenchError naming the option. */
function sizeOption(text, what) {
  try {
    return parseMemorySize(text);
  } catch (err) {
    throw new BenchError(`--${what}: ${err.message}`);
  }
}

/** A process that reads every connection on `path` to its end and drops the bytes. */
async function startDrain(path) {
  const code = `const s=require('node:net').createServer((c)=>c.resume());s.listen(${JSON.stringify(path)},()=>console.log('listening'))`;
  const child = spawnTracked(process.execPath, ['-e', code], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve, reject) => {
    child.stdout.once('data', resolve);
    child.once('exit', () => reject(new BenchError('the draining process exited')));
  });
  return child;
}

/** One run in this process (`--child KIND`): prints `{ ms, bytes }` as JSON. */
async function child(kind, sock, size, data) {
  const { GuestMemory } = await import('../dist/accel/kvm/memory/guest-memory.js');
  const { guestMemoryRam, nativeRamLayout } = await import('../dist/migration/guest-memory-ram.js');
  const { WorkerStreamWriter } = await import('../dist/migration/ram-worker.js');
  const { openOutgoing } = await import('../dist/migration/channels.js');
  const mem = GuestMemory.create(size, { layout: 'flat' });
  try {
    // Data in 1 MiB runs every other MiB, so zero and non-zero pages alternate.
    const chunk = Buffer.alloc(MiB);
    for (let off = 0; off < data; off += MiB) {
      randomFillSync(chunk);
      mem.write((off * 2) % size, chunk);
    }
    const out = await openOutgoing(`unix:${sock}`);
    if (kind === 'socket') {
      const bytes = Math.ceil(data / MiB) * MiB;
      const buf = Buffer.alloc(MiB, 0x5a);
      const t0 = performance.now();
      for (let sent = 0; sent < bytes; sent += MiB) await out.sink.write(buf);
      const ms = performance.now() - t0;
      await out.close();
      return { ms, bytes };
    }
    const ram = guestMemoryRam(mem);
    const writer = new WorkerStreamWriter({
      sink: out.sink,
      machineType: 'pc',
      vcpus: 1,
      ram: nativeRamLayout(ram),
      ramHere: ram,
      devices: [],
    });
    try {
      const t0 = performance.now();
      await writer.begin();
      await writer.sendRam();
      const ms = performance.now() - t0;
      const stats = await writer.complete();
      await out.close();
      return { ms, bytes: stats.bytes };
    } finally {
      await writer.close();
    }
  } finally {
    mem.close();
  }
}

if (process.argv[2] === '--child') {
  const [, , , kind, sock, size, data] = process.argv;
  const r = await child(kind, sock, Number(size), Number(data));
  console.log(JSON.stringify(r));
  process.exit(0);
}

await runBench('migration-thread', async () => {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '5' },
      size: { type: 'string', default: '512M' },
      data: { type: 'string', default: '128M' },
    },
    strict: true,
  });
  const runs = Number(values.runs);
  if (!(Number.isInteger(runs) && runs > 0))
    throw new BenchError(`--runs ${values.runs}: give a count`);
  const ramBytes = sizeOption(values.size, 'size');
  const data = sizeOption(values.data, 'data');
  if (data > ramBytes / 2) throw new BenchError('--data must be at most half of --size');
  const dir = makeTempDir('tsvmm-bench-mthread-');
  const sock = join(dir, 'drain.sock');
  const drain = await startDrain(sock);
  const results = { socket: [], tsvmm: [] };
  try {
    for (let i = 0; i < runs; i++) {
      // Alternate, so that a change in the machine's load falls on both.
      for (const kind of ['socket', 'tsvmm']) {
        const run = spawnSync(
          process.execPath,
          [
            join(root, 'bench/migration-thread.mjs'),
            '--child',
            kind,
            sock,
            String(ramBytes),
            String(data),
          ],
          { encoding: 'utf8', timeout: 300_000 },
        );
        if (run.status !== 0)
          throw new BenchError(`${kind} run failed: ${run.stderr.slice(-2000)}`);
        results[kind].push(JSON.parse(run.stdout.trim().split('\n').at(-1)));
      }
    }
  } finally {
    await stopChild(drain);
  }
  const row = (label, rs) => {
    const ms = median(rs.map((r) => r.ms));
    const bytes = rs[0].bytes;
    return { label, ms, bytes, rate: bytes / MiB / (ms / 1000) };
  };
  const ref = row('the channel alone, 1 MiB writes (reference)', results.socket);
  const ts = row('tsvmm migration thread, one full RAM pass', results.tsvmm);
  console.log(
    `migration-thread: ${values.size} of guest RAM with ${values.data} of data, ${runs} run(s) each, medians`,
  );
  console.log(
    table(
      [
        ['', 'bytes', 'ms', 'MiB/s', 'ratio tsvmm/reference (time)'],
        ...[ref, ts].map((r) => [
          r.label,
          String(r.bytes),
          r.ms.toFixed(0),
          r.rate.toFixed(0),
          (r.ms / ref.ms).toFixed(2),
        ]),
      ],
      (i) => i > 0,
    ),
  );
  console.log(
    `RESULT socket_ms=${ref.ms.toFixed(0)} tsvmm_pass_ms=${ts.ms.toFixed(0)} ratio=${(ts.ms / ref.ms).toFixed(2)}`,
  );
});
