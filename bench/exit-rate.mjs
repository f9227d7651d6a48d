#!/usr/bin/env node
// bench/exit-rate: port-I/O exits per second handled by tsvmm (vCPU worker
// thread, koffi) against the same guest run by a minimal C VMM built here,
// in the same run. Usage: npm run bench -- exit-rate [seconds]
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { X86Machine } from '../dist/hw/i386/machine.js';
import { probeKvmHost } from '../dist/util/kvm-gate.js';

const seconds = Number(process.argv[2] ?? 3);
const root = fileURLToPath(new URL('..', import.meta.url));

const host = probeKvmHost();
if (!host.usable) {
  console.error(`exit-rate: cannot run: ${host.reason}`);
  process.exit(1);
}

function measureC() {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-bench-'));
  try {
    const bin = join(dir, 'exit-rate-ref');
    execFileSync('gcc', ['-O2', '-o', bin, join(root, 'bench/exit-rate.c')], { stdio: 'inherit' });
    const out = execFileSync(bin, [join(root, 'guests/ioloop.bin'), String(seconds)], {
      encoding: 'utf8',
    });
    const m = /exits=(\d+) seconds=([\d.]+)/.exec(out);
    if (!m) throw new Error(`unexpected output from the C reference: ${out}`);
    return Number(m[1]) / Number(m[2]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function measureTsvmm() {
  const machine = await X86Machine.create({
    cpus: 1,
    memoryBytes: 16 << 20,
    boot: { kind: 'probe', image: 'ioloop' },
    serialFd: null,
  });
  try {
    await machine.lifecycle.vmStart();
    await new Promise((r) => setTimeout(r, 200)); // let the loop settle
    const c0 = machine.vcpus.countedWrites();
    const t0 = process.hrtime.bigint();
    await new Promise((r) => setTimeout(r, seconds * 1000));
    const c1 = machine.vcpus.countedWrites();
    const t1 = process.hrtime.bigint();
    await machine.lifecycle.vmShutdown();
    return (c1 - c0) / (Number(t1 - t0) / 1e9);
  } finally {
    await machine.destroy();
  }
}

const c = measureC();
const ts = await measureTsvmm();
const ratio = ts / c;
const fmt = (n) => Math.round(n).toLocaleString('en-US').padStart(12);
console.log(`exit-rate: port-I/O exits per second, ${seconds} s each, 1 vCPU`);
console.log('');
console.log('  VMM              exits/s');
console.log(`  C reference  ${fmt(c)}`);
console.log(`  tsvmm        ${fmt(ts)}`);
console.log(`  ratio        ${ratio.toFixed(3).padStart(12)}   (goal >= 0.85)`);
console.log(
  `RESULT c_exits_per_s=${Math.round(c)} tsvmm_exits_per_s=${Math.round(ts)} ratio=${ratio.toFixed(3)}`,
);
