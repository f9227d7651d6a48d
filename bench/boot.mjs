#!/usr/bin/env node
// bench/boot: wall time from process start to the probe OS's ready line
// (`probe cpu=0 ready ...` on the serial console), tsvmm against QEMU
// (Debian's qemu-system-x86, installed here if missing) booting the same
// guests/probe-os/probe-os.elf: tsvmm through its 64-bit boot protocol
// loader, QEMU through the image's PVH entry (-kernel). One unmeasured
// warm-up boot each, then the runs alternate; the medians are compared.
//
// Usage: npm run bench -- boot [--runs N] [--timeout SECONDS] [--machine microvm|pc]
//   --reference-only   boot under QEMU alone (with -accel tcg where KVM is not
//                      usable) and print its figures without ratios: for
//                      checking the QEMU half on a host that cannot run tsvmm.
import { existsSync } from 'node:fs';
import { join, relative } from 'node:path';
import { parseArgs } from 'node:util';
import { probeKvmHost } from '../dist/util/kvm-gate.js';
import {
  BenchError,
  collectTail,
  ensureQemu,
  median,
  qemuVersion,
  root,
  runBench,
  spawnTracked,
  stopChild,
  table,
} from './lib/common.mjs';

const READY_TEXT = 'probe cpu=0 ready';
const READY = /^probe cpu=0 ready\b/m;
const CMDLINE = 'console=ttyS0';

await runBench('boot', async () => {
  const { values } = parseArgs({
    options: {
      'reference-only': { type: 'boolean', default: false },
      machine: { type: 'string', default: 'microvm' },
      runs: { type: 'string', default: '5' },
      timeout: { type: 'string', default: '60' },
    },
    strict: true,
  });
  const referenceOnly = values['reference-only'];
  const machineType = values.machine;
  const runs = Number(values.runs);
  const timeoutMs = Number(values.timeout) * 1000;
  if (!['microvm', 'pc', 'q35'].includes(machineType)) {
    throw new BenchError(`--machine ${machineType}: use microvm, pc or q35`);
  }
  if (!Number.isInteger(runs) || runs < 1)
    throw new BenchError(`--runs ${values.runs}: give a whole number >= 1`);
  if (!(timeoutMs > 0)) throw new BenchError(`--timeout ${values.timeout}: give seconds > 0`);

  const host = probeKvmHost();
  if (!host.usable && !referenceOnly) throw new BenchError(`cannot run: ${host.reason}`);
  const accel = host.usable ? 'kvm' : 'tcg';

  const image = join(root, 'guests/probe-os/probe-os.elf');
  if (!existsSync(image)) {
    throw new BenchError(
      `cannot run: the probe OS ${relative(root, image)} is missing (build it with 'make -C guests/probe-os')`,
    );
  }

  const qemu = ensureQemu('boot');
  const version = qemuVersion(qemu);
  const vmms = [];
  if (!referenceOnly) {
    vmms.push({
      label: 'tsvmm',
      command: process.execPath,
      args: [
        join(root, 'dist/cli/main.cjs'),
        '-kernel',
        image,
        '-append',
        CMDLINE,
        '-smp',
        '1',
        '-m',
        '256M',
        '-serial',
        'stdio',
      ],
      times: [],
    });
  }
  vmms.push({
    label: 'QEMU',
    command: qemu,
    args: [
      '-accel',
      accel,
      '-M',
      machineType,
      '-kernel',
      image,
      '-append',
      CMDLINE,
      '-nographic',
      '-nodefaults',
      '-serial',
      'stdio',
      '-smp',
      '1',
      '-m',
      '256M',
    ],
    times: [],
  });
  for (const vmm of vmms) console.error(`boot: ${vmm.label}: ${vmm.command} ${vmm.args.join(' ')}`);

  for (const vmm of vmms) {
    const ms = await bootOnce(vmm, timeoutMs);
    console.error(`boot: ${vmm.label} warm-up: ${ms.toFixed(1)} ms (not counted)`);
  }
  for (let i = 0; i < runs; i++) {
    for (const vmm of vmms) {
      const ms = await bootOnce(vmm, timeoutMs);
      vmm.times.push(ms);
      console.error(`boot: ${vmm.label} run ${i + 1}/${runs}: ${ms.toFixed(1)} ms`);
    }
  }
  report({ vmms, runs, referenceOnly, accel, version, machineType, host });
});

/**
 * Starts the VMM, waits for the ready line on its stdout, and ends it.
 * Returns the milliseconds from just before the spawn to the chunk that
 * completed the ready line.
 */
async function bootOnce(vmm, timeoutMs) {
  const t0 = process.hrtime.bigint();
  const child = spawnTracked(vmm.command, vmm.args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const err = collectTail(child.stderr);
  let out = '';
  try {
    const t1 = await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new BenchError(
              `${vmm.label}: no '${READY_TEXT}' line within ${timeoutMs / 1000} s${output(out, err)}`,
            ),
          ),
        timeoutMs,
      );
      const done = (fn, value) => {
        clearTimeout(timer);
        fn(value);
      };
      child.stdout.on('data', (chunk) => {
        const now = process.hrtime.bigint();
        out = (out + chunk.toString('latin1')).slice(-16_000);
        if (READY.test(out.slice(0, out.lastIndexOf('\n') + 1))) done(resolve, now);
      });
      child.once('error', (e) =>
        done(reject, new BenchError(`${vmm.label}: cannot start ${vmm.command}: ${e.message}`)),
      );
      child.once('exit', (code, signal) =>
        done(
          reject,
          new BenchError(
            `${vmm.label} exited (status ${code ?? signal}) before the ready line${output(out, err)}`,
          ),
        ),
      );
    });
    return Number(t1 - t0) / 1e6;
  } finally {
    // SIGTERM: both shut down cleanly on it; SIGKILL if one does not within 5 s.
    const end = await stopChild(child, { signal: 'SIGTERM', graceMs: 5000 });
    if (end.killed) console.error(`boot: ${vmm.label} ignored SIGTERM for 5 s: killed`);
  }
}

function output(out, err) {
  const text = `${out}${err.text}`.trim().slice(-3000);
  return text ? `; its output:\n${text}` : ' (no output)';
}

function report({ vmms, runs, referenceOnly, accel, version, machineType, host }) {
  const ms = (v) => v.toFixed(1);
  const medians = Object.fromEntries(vmms.map((v) => [v.label, median(v.times)]));
  console.log(
    `boot: wall time from process start to 'probe cpu=0 ready', guests/probe-os/probe-os.elf, 1 vCPU, 256 MiB, median of ${runs}`,
  );
  console.log(
    `      QEMU: ${version}, -accel ${accel} -M ${machineType} (PVH entry)${accel === 'tcg' ? ', software emulation: no usable KVM here' : ''}`,
  );
  if (referenceOnly) {
    console.log(
      `      reference only: QEMU measured alone, no tsvmm, no ratio (${host.usable ? 'asked for' : host.reason})`,
    );
  }
  console.log('');
  const rows = [['VMM', 'median', 'min', 'max', 'runs (ms)']];
  for (const v of vmms) {
    rows.push([
      v.label,
      `${ms(medians[v.label])} ms`,
      `${ms(Math.min(...v.times))} ms`,
      `${ms(Math.max(...v.times))} ms`,
      v.times.map(ms).join(' '),
    ]);
  }
  console.log(table(rows, (i) => i > 0 && i < 4));
  const result = [];
  if (referenceOnly) {
    result.push('mode=reference-only', `qemu_accel=${accel}`, `qemu_machine=${machineType}`);
  } else {
    const ratio = medians.QEMU / medians.tsvmm;
    console.log('');
    console.log(
      `  ratio QEMU / tsvmm  ${ratio.toFixed(3)}   (above 1 means tsvmm boots faster; goal > 1)`,
    );
    result.push(`qemu_accel=${accel}`, `qemu_machine=${machineType}`);
    result.push(`tsvmm_boot_ms_median=${ms(medians.tsvmm)}`);
    result.push(`qemu_boot_ms_median=${ms(medians.QEMU)}`, `ratio=${ratio.toFixed(3)}`);
    result.push(`runs=${runs}`);
    console.log(`RESULT ${result.join(' ')}`);
    return;
  }
  result.push(`qemu_boot_ms_median=${ms(medians.QEMU)}`, `runs=${runs}`);
  console.log(`RESULT ${result.join(' ')}`);
}
