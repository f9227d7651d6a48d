#!/usr/bin/env node
// bench/rss: resident memory of an idle VM, tsvmm against QEMU (Debian's
// qemu-system-x86, installed here if missing) in the same run. Both boot
// guests/probe-os/probe-os.elf with 512 MiB, on 1 and on 4 vCPUs; once every
// CPU has printed its ready line and the guest has idled for --settle
// seconds, the process's /proc/PID/status and smaps are read. The guest's
// RAM is the mapping of the guest's size (what the guest touched of it);
// "VMM's own" is the rest: what the VMM itself costs.
//
// Usage: npm run bench -- rss [--runs N] [--settle SECONDS] [--smp 1,4]
//   --reference-only   QEMU alone (with -accel tcg where KVM is not usable),
//                      no tsvmm and no ratios.
import { existsSync, readFileSync } from 'node:fs';
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
  sleep,
  spawnTracked,
  stopChild,
  table,
} from './lib/common.mjs';

const MEMORY_MIB = 512;
const CMDLINE = 'console=ttyS0';

await runBench('rss', async () => {
  const { values } = parseArgs({
    options: {
      'reference-only': { type: 'boolean', default: false },
      runs: { type: 'string', default: '2' },
      settle: { type: 'string', default: '1' },
      smp: { type: 'string', default: '1,4' },
      timeout: { type: 'string', default: '60' },
    },
    strict: true,
  });
  const referenceOnly = values['reference-only'];
  const runs = Number(values.runs);
  const settleMs = Number(values.settle) * 1000;
  const timeoutMs = Number(values.timeout) * 1000;
  const smps = values.smp.split(',').map(Number);
  if (!Number.isInteger(runs) || runs < 1)
    throw new BenchError(`--runs ${values.runs}: give a whole number >= 1`);
  if (!(settleMs >= 0)) throw new BenchError(`--settle ${values.settle}: give seconds >= 0`);
  if (!(timeoutMs > 0)) throw new BenchError(`--timeout ${values.timeout}: give seconds > 0`);
  if (smps.some((n) => !Number.isInteger(n) || n < 1 || n > 8))
    throw new BenchError(`--smp ${values.smp}: give vCPU counts from 1 to 8, comma-separated`);

  const host = probeKvmHost();
  if (!host.usable && !referenceOnly) throw new BenchError(`cannot run: ${host.reason}`);
  const accel = host.usable ? 'kvm' : 'tcg';
  const image = join(root, 'guests/probe-os/probe-os.elf');
  if (!existsSync(image)) {
    throw new BenchError(
      `cannot run: the probe OS ${relative(root, image)} is missing (build it with 'make -C guests/probe-os')`,
    );
  }
  const qemu = ensureQemu('rss');
  const version = qemuVersion(qemu);

  const vmms = (smp) => {
    const list = [];
    if (!referenceOnly) {
      list.push({
        label: 'tsvmm',
        command: process.execPath,
        args: [
          join(root, 'dist/cli/main.cjs'),
          '-kernel',
          image,
          '-append',
          CMDLINE,
          '-smp',
          String(smp),
          '-m',
          `${MEMORY_MIB}M`,
          '-serial',
          'stdio',
        ],
      });
    }
    list.push({
      label: 'QEMU',
      command: qemu,
      args: [
        '-accel',
        accel,
        '-M',
        'microvm',
        '-kernel',
        image,
        '-append',
        CMDLINE,
        '-nographic',
        '-nodefaults',
        '-serial',
        'stdio',
        '-smp',
        String(smp),
        '-m',
        `${MEMORY_MIB}M`,
      ],
    });
    return list;
  };

  const results = []; // { smp, label, samples: [{ rss, anon, file, shmem, guest, hwm }] }
  for (const smp of smps) {
    const list = vmms(smp).map((v) => ({ ...v, smp, samples: [] }));
    for (const v of list) console.error(`rss: ${v.label}: ${v.command} ${v.args.join(' ')}`);
    for (let i = 0; i < runs; i++) {
      for (const v of list) {
        const s = await measureOnce(v, smp, settleMs, timeoutMs);
        v.samples.push(s);
        console.error(
          `rss: ${v.label} smp=${smp} run ${i + 1}/${runs}: RSS ${mb(s.rss)} MB, guest RAM ${mb(s.guest)} MB, own ${mb(s.rss - s.guest)} MB`,
        );
      }
    }
    results.push(...list);
  }
  report({ results, smps, runs, referenceOnly, accel, version, host, settleMs });
});

function mb(kb) {
  return (kb / 1000).toFixed(1);
}

/** The kB fields of /proc/PID/status that say where resident memory is. */
function readStatus(pid) {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name) => {
    const m = new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };
  return {
    rss: field('VmRSS'),
    hwm: field('VmHWM'),
    anon: field('RssAnon'),
    file: field('RssFile'),
    shmem: field('RssShmem'),
    threads: field('Threads'),
  };
}

/**
 * The resident kB of the guest's RAM: the mappings whose size is the
 * guest's (QEMU may add an alignment page or two to its RAM block; a
 * mapping of exactly that size is nothing else in either VMM).
 */
function guestRamRss(pid) {
  const text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  let total = 0;
  let size = 0;
  for (const line of text.split('\n')) {
    const m = /^(Size|Rss):\s+(\d+) kB/.exec(line);
    if (!m) continue;
    if (m[1] === 'Size') size = Number(m[2]);
    else if (size >= MEMORY_MIB * 1024 && size <= MEMORY_MIB * 1024 + 8192) total += Number(m[2]);
  }
  return total;
}

/** Boots the VMM, waits for every CPU's ready line and the settle time, reads its memory, ends it. */
async function measureOnce(vmm, smp, settleMs, timeoutMs) {
  const child = spawnTracked(vmm.command, vmm.args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const err = collectTail(child.stderr);
  let out = '';
  try {
    await new Promise((resolve, reject) => {
      const ready = new Set();
      const timer = setTimeout(
        () =>
          reject(
            new BenchError(
              `${vmm.label} smp=${smp}: only ${ready.size} of ${smp} ready lines within ${timeoutMs / 1000} s${output(out, err)}`,
            ),
          ),
        timeoutMs,
      );
      const done = (fn, value) => {
        clearTimeout(timer);
        fn(value);
      };
      child.stdout.on('data', (chunk) => {
        out = (out + chunk.toString('latin1')).slice(-16_000);
        for (const m of out.matchAll(/^probe cpu=(\d+) ready\b/gm)) ready.add(m[1]);
        if (ready.size >= smp) done(resolve);
      });
      child.once('error', (e) =>
        done(reject, new BenchError(`${vmm.label}: cannot start ${vmm.command}: ${e.message}`)),
      );
      child.once('exit', (code, signal) =>
        done(
          reject,
          new BenchError(
            `${vmm.label} exited (status ${code ?? signal}) before the ready lines${output(out, err)}`,
          ),
        ),
      );
    });
    await sleep(settleMs);
    const status = readStatus(child.pid);
    return { ...status, guest: guestRamRss(child.pid) };
  } finally {
    const end = await stopChild(child, { signal: 'SIGTERM', graceMs: 5000 });
    if (end.killed) console.error(`rss: ${vmm.label} ignored SIGTERM for 5 s: killed`);
  }
}

function output(out, err) {
  const text = `${out}${err.text}`.trim().slice(-3000);
  return text ? `; its output:\n${text}` : ' (no output)';
}

function report({ results, smps, runs, referenceOnly, accel, version, host, settleMs }) {
  const med = (v, f) => median(v.samples.map(f));
  console.log(
    `rss: resident memory of an idle guests/probe-os/probe-os.elf, ${MEMORY_MIB} MiB, ${settleMs / 1000} s after every CPU's ready line, median of ${runs}`,
  );
  console.log(
    `     QEMU: ${version}, -accel ${accel} -M microvm (PVH entry)${accel === 'tcg' ? ', software emulation: no usable KVM here' : ''}`,
  );
  if (referenceOnly) {
    console.log(
      `     reference only: QEMU measured alone, no tsvmm, no ratio (${host.usable ? 'asked for' : host.reason})`,
    );
  }
  console.log('     MB = 1000 kB; own = RSS minus the guest RAM the guest touched');
  console.log('');
  const rows = [
    ['vCPUs', 'VMM', 'RSS', 'own', 'guest RAM', 'anon', 'file', 'shmem', 'peak (HWM)', 'threads'],
  ];
  for (const v of results) {
    rows.push([
      v.smp,
      v.label,
      `${mb(med(v, (s) => s.rss))} MB`,
      `${mb(med(v, (s) => s.rss - s.guest))} MB`,
      `${mb(med(v, (s) => s.guest))} MB`,
      `${mb(med(v, (s) => s.anon))} MB`,
      `${mb(med(v, (s) => s.file))} MB`,
      `${mb(med(v, (s) => s.shmem))} MB`,
      `${mb(med(v, (s) => s.hwm))} MB`,
      med(v, (s) => s.threads),
    ]);
  }
  console.log(table(rows, (i) => i !== 1));
  const result = [`qemu_accel=${accel}`, 'qemu_machine=microvm', `memory_mib=${MEMORY_MIB}`];
  const find = (label, smp) => results.find((v) => v.label === label && v.smp === smp);
  if (!referenceOnly) {
    console.log('');
    for (const smp of smps) {
      const t = find('tsvmm', smp);
      const q = find('QEMU', smp);
      const rss = med(q, (s) => s.rss) / med(t, (s) => s.rss);
      const own = med(q, (s) => s.rss - s.guest) / med(t, (s) => s.rss - s.guest);
      console.log(
        `  ${smp} vCPU${smp > 1 ? 's' : ''}: ratio QEMU / tsvmm  RSS ${rss.toFixed(3)}  own ${own.toFixed(3)}   (above 1 means tsvmm uses less; goal >= 1)`,
      );
      result.push(
        `tsvmm_rss_mb_smp${smp}=${mb(med(t, (s) => s.rss))}`,
        `qemu_rss_mb_smp${smp}=${mb(med(q, (s) => s.rss))}`,
        `ratio_smp${smp}=${rss.toFixed(3)}`,
        `tsvmm_own_mb_smp${smp}=${mb(med(t, (s) => s.rss - s.guest))}`,
        `qemu_own_mb_smp${smp}=${mb(med(q, (s) => s.rss - s.guest))}`,
      );
    }
  } else {
    for (const smp of smps) {
      const q = find('QEMU', smp);
      result.push(`qemu_rss_mb_smp${smp}=${mb(med(q, (s) => s.rss))}`);
    }
  }
  result.push(`runs=${runs}`);
  console.log(`RESULT ${result.join(' ')}`);
}
