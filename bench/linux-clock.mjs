#!/usr/bin/env node
// bench/linux-clock: what a Linux guest's own clocks show of a 5 s stop/cont
// and of save -> 5 s -> restore, tsvmm (policy freeze and realtime) against
// QEMU (Debian's qemu-system-x86, installed here if missing), both booting
// Debian's cloud kernel with the guest image's clock reporter as /script
// (guests/clock-reporter: CLOCK_REALTIME, MONOTONIC, MONOTONIC_RAW and
// BOOTTIME every 100 ms, backwards steps and watchdog splats).
//
// For each pause it reports the step each clock took between the last
// sample before and the first after, beyond the reporter's intervals (0 for
// a clock frozen across the pause, the pause itself for one that follows the
// host), how far the guest's realtime fell behind the host's, and any
// backwards step or soft-lockup/RCU-stall splat (watchdog_thresh=1).
//
// `--scenario ctrl` shows instead why KVMCLOCK_CTRL exists: a guest with one
// CPU kept busy in user space, policy realtime, a --pause stop (default 10 s
// there), with CTRL and with -x-no-kvmclock-ctrl, and freeze without CTRL.
// Only the realtime jump without CTRL should bring a soft-lockup splat.
//
// `--scenario live` migrates the running guest live to a second process of
// the same VMM over a unix socket, and reports the clocks' step across the
// switch-over against the VMM's own downtime figure.
//
// Needs the guest image (`node scripts/build-guest.mjs`) and hardware KVM;
// without it, run it in the VM runner:
//   ../shared/tools/kvm-vm/run --smp 1 -- node bench/linux-clock.mjs --interval 1000
//
// Usage: npm run bench -- linux-clock [--scenario clocks|ctrl|live] [--pause SECONDS] [--interval MS]
//                                      [--smp N] [--watchdog-thresh S] [--timeout SECONDS]
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { QmpClient } from '../dist/monitor/qmp-client.js';
import { buildGuestImage, CLOCK_REPORTER_PATH } from '../dist/tools/guest-image/build.js';
import { parseClockReport, pauseAround } from '../dist/tools/guest-image/clock-report.js';
import { buildInitramfs } from '../dist/tools/guest-image/initramfs.js';
import { defaultGuestCacheDir } from '../dist/tools/guest-image/main.js';
import { probeKvmHost } from '../dist/util/kvm-gate.js';
import {
  BenchError,
  collectTail,
  ensureQemu,
  makeTempDir,
  qemuVersion,
  root,
  runBench,
  sleep,
  spawnTracked,
  stopChild,
  table,
  withTimeout,
} from './lib/common.mjs';

const MS = 1_000_000n;
/** The reporter's period in ms (--interval). */
let INTERVAL_MS = 100;

await runBench('linux-clock', async () => {
  const { values } = parseArgs({
    options: {
      scenario: { type: 'string', default: 'clocks' },
      pause: { type: 'string' },
      // Under emulation (the VM runner) give 1000: the UART drains too slowly for ten lines a second.
      interval: { type: 'string', default: '100' },
      smp: { type: 'string', default: '2' },
      // The soft-lockup detector fires after 2 x this many seconds of a CPU not scheduling.
      'watchdog-thresh': { type: 'string', default: '1' },
      timeout: { type: 'string', default: '600' },
    },
    strict: true,
  });
  const scenario = values.scenario;
  if (!['clocks', 'ctrl', 'live'].includes(scenario))
    throw new BenchError(`--scenario ${scenario}: give clocks, ctrl or live`);
  const pauseMs = Number(values.pause ?? (scenario === 'ctrl' ? '10' : '5')) * 1000;
  INTERVAL_MS = Number(values.interval);
  if (!(INTERVAL_MS >= 10)) throw new BenchError(`--interval ${values.interval}: give ms >= 10`);
  const timeoutMs = Number(values.timeout) * 1000;
  if (!(pauseMs > 0)) throw new BenchError(`--pause ${values.pause}: give seconds > 0`);
  if (!(timeoutMs > 0)) throw new BenchError(`--timeout ${values.timeout}: give seconds > 0`);
  const host = probeKvmHost();
  if (!host.usable) throw new BenchError(`cannot run: ${host.reason}`);

  const cache = defaultGuestCacheDir();
  const built = await buildGuestImage({ outDir: cache, cachedOnly: true }).catch((err) => {
    throw new BenchError(err.message);
  });
  const dir = makeTempDir('tsvmm-bench-linux-clock-');
  const initrd = join(dir, 'clock.cpio');
  writeFileSync(
    initrd,
    buildInitramfs({
      busybox: readFileSync(join(cache, 'busybox')),
      clockReporter: readFileSync(CLOCK_REPORTER_PATH),
      // The ctrl scenario keeps one CPU busy in user space: an idle CPU's
      // wake-up touches the soft-lockup watchdog and hides the jump.
      script: Buffer.from(
        `${scenario === 'ctrl' ? '(while :; do :; done) &\n' : ''}exec clock-reporter ${INTERVAL_MS}\n`,
      ),
    }),
  );
  const qemu = ensureQemu('linux-clock');
  const append = `console=ttyS0 quiet watchdog_thresh=${values['watchdog-thresh']}`;
  const common = ['-smp', values.smp, '-m', '512M', '-initrd', initrd, '-append', append];
  const tsvmm = (extra) => ({
    command: process.execPath,
    args: [
      join(root, 'dist/cli/main.cjs'),
      '-kernel',
      built.vmlinux ?? built.vmlinuz,
      ...common,
      ...extra,
    ],
    fileUri: (path) => `file:${path}`,
  });
  if (scenario === 'ctrl') {
    const runs = [
      { label: 'tsvmm realtime, CTRL sent', ...tsvmm(['-global', 'kvmclock.policy=realtime']) },
      {
        label: 'tsvmm realtime, -x-no-kvmclock-ctrl',
        ...tsvmm(['-global', 'kvmclock.policy=realtime', '-x-no-kvmclock-ctrl']),
      },
      { label: 'tsvmm freeze, -x-no-kvmclock-ctrl', ...tsvmm(['-x-no-kvmclock-ctrl']) },
    ];
    const rows = [];
    for (const vmm of runs) {
      const tag = vmm.label.replace(/\W+/g, '-');
      const vm = await start(vmm, dir, tag, [], timeoutMs);
      try {
        await waitSample(vm, 10, timeoutMs);
        const stop = await stopCont(vm, pauseMs);
        // The detector reports within a few of its periods after the resume.
        await sleep(Number(values['watchdog-thresh']) * 3000);
        const r = parseClockReport(readFileSync(vm.serial, 'utf8'));
        rows.push({ vmm, stop, backwards: r.backwards.length, splats: r.splats });
      } finally {
        await closeVm(vm);
      }
    }
    reportCtrl(rows, pauseMs);
    return;
  }
  const vmms = [
    { label: 'tsvmm freeze', ...tsvmm([]) },
    { label: 'tsvmm realtime', ...tsvmm(['-global', 'kvmclock.policy=realtime']) },
    {
      label: qemuVersion(qemu),
      command: qemu,
      // QEMU 7.2 has no file: migration; exec: with cat writes the same stream.
      args: [
        '-accel',
        'kvm',
        '-cpu',
        'host',
        '-M',
        'pc',
        '-nodefaults',
        '-no-user-config',
        '-display',
        'none',
        '-kernel',
        built.vmlinuz,
        ...common,
      ],
      fileUri: (path) => `exec:cat > ${path}`,
      incomingUri: (path) => `exec:cat ${path}`,
    },
  ];
  if (scenario === 'live') {
    const rows = [];
    for (const vmm of vmms) {
      const live = await measureLive(vmm, dir, timeoutMs);
      console.error(`linux-clock: ${vmm.label}: live ${JSON.stringify(live, bigints)}`);
      rows.push({ vmm, live });
    }
    reportLive(rows);
    return;
  }
  const rows = [];
  for (const vmm of vmms) {
    const result = await measure(vmm, dir, pauseMs, timeoutMs);
    console.error(`linux-clock: ${vmm.label}: ${JSON.stringify(result, bigints)}`);
    rows.push({ vmm, result });
  }
  report(rows, pauseMs);
});

/** One VMM: boot, stop/cont, save -> pause -> restore. */
async function measure(vmm, dir, pauseMs, timeoutMs) {
  const tag = vmm.label.replace(/\W+/g, '-');
  const src = await start(vmm, dir, `${tag}-src`, [], timeoutMs);
  try {
    await waitSample(src, 10, timeoutMs);
    const stop = await stopCont(src, pauseMs);
    // The issue's flow: stop, save, quit, wait, restore paused (-S), cont.
    // The guest's pause runs from this stop to the cont on the destination.
    const stoppedAt = process.hrtime.bigint();
    await src.qmp.execute('stop');
    const saved = join(dir, `${tag}.state`);
    await src.qmp.execute('migrate', { uri: vmm.fileUri(saved) });
    await waitMigrated(src.qmp, timeoutMs);
    await src.qmp.execute('quit');
    await withTimeout(stopChild(src.child, { signal: 0, graceMs: 20_000 }), 30_000, 'quit');
    const near = lastSample(src);
    await sleep(pauseMs);
    const incoming = vmm.incomingUri ? vmm.incomingUri(saved) : vmm.fileUri(saved);
    const dst = await start(vmm, dir, `${tag}-dst`, ['-S', '-incoming', incoming], timeoutMs);
    try {
      await waitStatus(dst.qmp, 'paused', timeoutMs);
      await dst.qmp.execute('cont');
      const contAt = process.hrtime.bigint();
      await waitSample(dst, near.n + 8, timeoutMs);
      // A restored guest may first finish lines it wrote before the save.
      const samples = [src, dst].flatMap(
        (vm) => parseClockReport(readFileSync(vm.serial, 'utf8')).samples,
      );
      const seen = pauseAround(samples, near.n - 3, near.n + 8, intervalNs());
      const restore = { ...seen.beyond, hostNs: contAt - stoppedAt, ...health(dst) };
      return { stop: { ...stop, ...health(src) }, restore };
    } finally {
      await closeVm(dst);
    }
  } finally {
    await closeVm(src);
  }
}

/** JSON.stringify's replacer for figures in ns. */
function bigints(_key, value) {
  return typeof value === 'bigint' ? String(value) : value;
}

/** One VMM: the running guest migrated live to a second process over a unix socket. */
async function measureLive(vmm, dir, timeoutMs) {
  const tag = vmm.label.replace(/\W+/g, '-');
  const src = await start(vmm, dir, `${tag}-live-src`, [], timeoutMs);
  try {
    await waitSample(src, 10, timeoutMs);
    const sock = join(dir, `${tag}-live.sock`);
    const dst = await start(vmm, dir, `${tag}-live-dst`, ['-incoming', `unix:${sock}`], timeoutMs);
    try {
      const sent = process.hrtime.bigint();
      await src.qmp.execute('migrate', { uri: `unix:${sock}` });
      const done = await waitMigrated(src.qmp, timeoutMs);
      const totalNs = process.hrtime.bigint() - sent;
      const near = lastSample(src);
      await waitStatus(dst.qmp, 'running', timeoutMs);
      await waitSample(dst, near.n + 8, timeoutMs);
      // The destination goes on with the source's sample numbers.
      const samples = [src, dst].flatMap(
        (vm) => parseClockReport(readFileSync(vm.serial, 'utf8')).samples,
      );
      const seen = pauseAround(samples, near.n - 3, near.n + 8, intervalNs());
      const [a, b] = [src, dst].map((vm) => parseClockReport(readFileSync(vm.serial, 'utf8')));
      return {
        ...seen.beyond,
        totalNs,
        downtimeMs: done.downtime,
        backwards: a.backwards.length + b.backwards.length,
        splats: a.splats.length + b.splats.length,
        // What a splat said, and on which side: the figures alone do not tell a stall from a lockup.
        firstSplat: a.splats[0]
          ? `source: ${a.splats[0]}`
          : b.splats[0] && `destination: ${b.splats[0]}`,
      };
    } finally {
      await closeVm(dst);
    }
  } finally {
    await closeVm(src);
  }
}

/** A VMM's label as a RESULT key: `qemu`, `tsvmm_freeze`, `tsvmm_realtime`. */
function resultKey(label) {
  return label.startsWith('QEMU') ? 'qemu' : label.replace(' ', '_');
}

function reportLive(rows) {
  const ms = (ns) => (Number(ns) / 1e6).toFixed(1);
  const lines = [
    [
      'VMM',
      'migrate to completed ms',
      'its downtime ms',
      'realtime +ms',
      'monotonic +ms',
      'raw +ms',
      'backwards',
      'splats',
      'first splat',
    ],
  ];
  for (const { vmm, live } of rows) {
    lines.push([
      vmm.label,
      ms(live.totalNs),
      String(live.downtimeMs ?? '-'),
      ms(live.realtime),
      ms(live.monotonic),
      ms(live.raw),
      String(live.backwards),
      String(live.splats),
      live.firstSplat ? live.firstSplat.slice(0, 80) : '-',
    ]);
  }
  console.log(table(lines, (col) => col >= 1 && col <= 7));
  console.log(
    `RESULT ${rows.map(({ vmm, live }) => `${resultKey(vmm.label)}_live_step_ms=${ms(live.monotonic)} ${resultKey(vmm.label)}_live_splats=${live.splats}`).join(' ')}`,
  );
}

async function start(vmm, dir, name, extra, timeoutMs) {
  const serial = join(dir, `${name}.serial`);
  const sock = join(dir, `${name}.qmp`);
  const child = spawnTracked(
    vmm.command,
    [...vmm.args, '-serial', `file:${serial}`, '-qmp', `unix:${sock},server=on,wait=off`, ...extra],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const err = collectTail(child.stderr);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (existsSync(sock)) {
      try {
        const qmp = await QmpClient.connect({ path: sock });
        await qmp.greeting();
        await qmp.execute('qmp_capabilities');
        return { child, qmp, serial, err };
      } catch {
        // not listening yet
      }
    }
    if (child.exitCode !== null) throw new BenchError(`${vmm.label} exited: ${err.text}`);
    if (Date.now() > deadline) throw new BenchError(`${vmm.label}: no QMP socket`);
    await sleep(50);
  }
}

async function closeVm(vm) {
  vm.qmp.close();
  await stopChild(vm.child);
}

function lastSample(vm) {
  return parseClockReport(existsSync(vm.serial) ? readFileSync(vm.serial, 'utf8') : '').samples.at(
    -1,
  );
}

async function waitSample(vm, n, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while ((lastSample(vm)?.n ?? 0) < n) {
    if (Date.now() > deadline)
      throw new BenchError(`no clock sample ${n}: ${readFileSync(vm.serial, 'utf8').slice(-1500)}`);
    await sleep(50);
  }
}

async function waitStatus(qmp, status, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while ((await qmp.execute('query-status')).status !== status) {
    if (Date.now() > deadline) throw new BenchError(`status never became ${status}`);
    await sleep(50);
  }
}

async function waitMigrated(qmp, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await qmp.execute('query-migrate');
    if (m.status === 'completed') return m;
    if (m.status === 'failed') throw new BenchError(`migration failed: ${m['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new BenchError('migration did not complete');
    await sleep(50);
  }
}

async function stopCont(vm, pauseMs) {
  const stopSent = process.hrtime.bigint();
  await vm.qmp.execute('stop');
  const stopped = process.hrtime.bigint();
  // Lines written before the stop may still be on their way: the pause is
  // the largest step among the samples around it.
  const near = lastSample(vm);
  await sleep(pauseMs);
  const contSent = process.hrtime.bigint();
  await vm.qmp.execute('cont');
  const contDone = process.hrtime.bigint();
  await waitSample(vm, near.n + 8, 120_000);
  const samples = parseClockReport(readFileSync(vm.serial, 'utf8')).samples;
  const seen = pauseAround(samples, near.n - 3, near.n + 8, intervalNs());
  return { ...seen.beyond, hostNs: (contSent - stopped + (contDone - stopSent)) / 2n };
}

/** The reporter's period in ns. */
function intervalNs() {
  return BigInt(INTERVAL_MS) * MS;
}

function health(vm) {
  const r = parseClockReport(readFileSync(vm.serial, 'utf8'));
  return { backwards: r.backwards.length, splats: r.splats.length };
}

function reportCtrl(rows, pauseMs) {
  const ms = (ns) => (Number(ns) / 1e6).toFixed(1);
  const lines = [['VMM', 'pause', 'host ms', 'realtime +ms', 'backwards', 'splats', 'first splat']];
  for (const { vmm, stop, backwards, splats } of rows) {
    lines.push([
      vmm.label,
      `stop ${pauseMs / 1000} s, cont, one CPU busy`,
      ms(stop.hostNs),
      ms(stop.realtime),
      String(backwards),
      String(splats.length),
      splats[0] ? String(splats[0]).slice(0, 60) : '-',
    ]);
  }
  console.log(table(lines, (col) => col >= 2 && col <= 5));
  const key = (label) =>
    label
      .replace(/^tsvmm /, '')
      .replace(/-x-no-kvmclock-ctrl/, 'no_ctrl')
      .replace(/CTRL sent/, 'ctrl')
      .replace(/\W+/g, '_');
  console.log(
    `RESULT ${rows.map((r) => `${key(r.vmm.label)}_splats=${r.splats.length}`).join(' ')}`,
  );
}

function report(rows, pauseMs) {
  const ms = (ns) => (Number(ns) / 1e6).toFixed(1);
  const lines = [
    [
      'VMM',
      'pause',
      'host ms',
      'realtime +ms',
      'monotonic +ms',
      'raw +ms',
      'guest behind host ms',
      'backwards',
      'splats',
    ],
  ];
  for (const { vmm, result } of rows) {
    for (const [what, r] of [
      [`stop ${pauseMs / 1000} s, cont`, result.stop],
      [`save, ${pauseMs / 1000} s, restore`, result.restore],
    ]) {
      lines.push([
        vmm.label,
        what,
        ms(r.hostNs),
        ms(r.realtime),
        ms(r.monotonic),
        ms(r.raw),
        ms(r.hostNs - r.realtime),
        String(r.backwards),
        String(r.splats),
      ]);
    }
  }
  console.log(table(lines, (col) => col >= 2));
  const fields = rows.flatMap(({ vmm, result }) => {
    const k = resultKey(vmm.label);
    return [
      `${k}_stop_behind_ms=${ms(result.stop.hostNs - result.stop.realtime)}`,
      `${k}_restore_behind_ms=${ms(result.restore.hostNs - result.restore.realtime)}`,
      `${k}_splats=${result.stop.splats + result.restore.splats}`,
    ];
  });
  console.log(`RESULT ${fields.join(' ')}`);
}
