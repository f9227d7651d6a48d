#!/usr/bin/env node
// bench/migrate: migration to and from a file, tsvmm against QEMU (Debian's
// qemu-system-x86, installed here if missing) in the same run.
//
// Full benchmark (needs KVM): for 512 MiB and 2 GiB guests running the probe
// OS (guests/probe-os/probe-os.elf), idle and with 256 MiB dirtied
// (probe.dirty_mb=256):
//   - save: `migrate file:FILE` (tsvmm) and `migrate exec:cat > FILE` (QEMU),
//     timed from the QMP command to query-migrate `completed`;
//   - restore: a new process with `-incoming file:FILE` (tsvmm) or
//     `-incoming 'exec:cat FILE'` (QEMU), timed from the spawn to run state
//     `running`; the guest must tick again afterwards;
//   - file sizes, and the ratios QEMU / tsvmm (goal >= 2);
//   - tsvmm's write rate against dd on the same disk (goal: within 2x);
//   - live migration over unix: of the probe OS dirtying memory, between
//     two tsvmm processes: query-migrate's downtime against downtime-limit;
//   - mapped-ram restore (tsvmm only): the probe OS with 256 MiB dirtied,
//     saved once as the stream and once with the mapped-ram capability;
//     each restored by a new process started with `-incoming defer`, timed
//     from sending migrate-incoming to the RESUME event's time stamp (the
//     destination's own clock, the same host's), then the guest must tick
//     (goal from issue 12: < 20 ms for 2 GiB on a KVM host).
//
// Without KVM it says why, then runs, clearly labelled, what needs no VM:
//   (1) stream only: tsvmm's stream writer and loader on a GuestMemory
//       through the file: channel (no VM, no vCPU state from KVM);
//   (2) dd on the same disk;
//   (3) QEMU under TCG: the probe OS booted, paused, saved with
//       `migrate exec:cat > FILE` and restored with -incoming;
// prints their table and indicative ratios, and exits 1 at the end.
//
// Files go under $TMPDIR (default /tmp): set TMPDIR to measure another disk.
//
// Usage: npm run bench -- migrate [--runs N] [--sizes 512M,2G] [--dd-mb N]
//                                 [--downtime-limit MS] [--dirty-rate MB_S]
//                                 [--only mapped-ram|idle|save] [--baseline MAIN_JS]
// `--only mapped-ram` runs the mapped-ram restore rows alone (with KVM).
// `--only save` runs only saves of the idle probe OS (no restore, no
// dirtying: minutes on a PVM host), `--runs` rounds alternating tsvmm and
// QEMU, and reports the setup (migrate to the first byte) and the downtime
// (STOP to completed) of each; with `--baseline PATH`, another tsvmm build
// (its dist/cli/main.cjs, or main.js in a build from before main.cjs) takes part in every
// round too, for a before/after in the same run.
// `--only idle` runs the idle save and restore rows alone (with KVM): no
// dirtied guest (its first 256 MiB take minutes where the host's KVM uses
// shadow paging), no dd, no live migration, no mapped-ram.
import { rmSync, statSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import { probeKvmHost } from '../dist/util/kvm-gate.js';
import {
  BenchError,
  ensureQemu,
  makeTempDir,
  median,
  qemuVersion,
  removeTempDir,
  root,
  runBench,
  sleep,
  table,
  withTimeout,
} from './lib/common.mjs';
import { ddRate } from './lib/migrate-disk.mjs';
import { streamCase } from './lib/migrate-stream.mjs';
import { startVmm, timedIncoming, timedMigrate } from './lib/migrate-vmm.mjs';

const NAME = 'migrate';
const PROBE_OS = join(root, 'guests/probe-os/probe-os.elf');
const TSVMM = join(root, 'dist/cli/main.cjs');
const DIRTY_MB = 256;
const BOOT_TIMEOUT_MS = 60_000; // spawn to the probe OS's ready line
// Ready to the end of the first dirty pass: the guest's first touch of 256
// MiB, one page fault each (fewer with huge pages); slow where the host's
// own KVM is nested or uses shadow paging, so this one is generous.
const DIRTY_TIMEOUT_MS = 300_000;
const MIGRATE_TIMEOUT_MS = 300_000; // migrate to completed, -incoming to running
const MiB = 2 ** 20;
const MAPPED_RAM = [{ capability: 'mapped-ram', state: true }];
/** What each save and restore round reports; medians of these are compared. */
const PHASE_KEYS = [
  'saveMs',
  'restoreMs',
  'fileBytes',
  'firstByteMs',
  'setupMs',
  'downtimeMs',
  'stopToCompletedMs',
  'dirtyPassMs',
];

const CONTENTS = [
  ['zero', 'all zero'],
  ['half', 'half zero, half pattern'],
  ['random256', `${DIRTY_MB} MiB random, rest zero`],
];

await runBench(NAME, async () => {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      sizes: { type: 'string', default: '512M,2G' },
      'dd-mb': { type: 'string', default: '1024' },
      'downtime-limit': { type: 'string', default: '300' },
      'dirty-rate': { type: 'string', default: '64' },
      only: { type: 'string' },
      baseline: { type: 'string' },
    },
    strict: true,
  });
  if (values.only !== undefined && !['mapped-ram', 'idle', 'save'].includes(values.only)) {
    throw new BenchError(
      `--only ${values.only}: the parts that run alone are mapped-ram, idle and save`,
    );
  }
  if (values.baseline !== undefined && values.only !== 'save') {
    throw new BenchError('--baseline goes with --only save');
  }
  const runs = positiveInt(values.runs, '--runs');
  const sizes = values.sizes.split(',').map(parseSize);
  const ddMb = positiveInt(values['dd-mb'], '--dd-mb');
  const downtimeLimit = positiveInt(values['downtime-limit'], '--downtime-limit');
  const dirtyRate = positiveInt(values['dirty-rate'], '--dirty-rate');

  const host = probeKvmHost();
  if (values.only === 'save') {
    if (!host.usable) throw new BenchError(`--only save needs KVM: ${host.reason}`);
    await saveRounds({ runs, sizes, baseline: values.baseline });
    return;
  }
  if (host.usable && values.only === 'mapped-ram') {
    const dir = makeTempDir('tsvmm-bench-migrate-');
    try {
      const mapped = await mappedRamRounds({ sizes, runs, dir });
      const result = ['mode=mapped-ram-only', 'kvm=1'];
      reportMappedRam(mapped, result);
      console.log(`RESULT ${result.join(' ')}`);
    } finally {
      removeTempDir(dir);
    }
    return;
  }
  if (host.usable && values.only === 'idle') {
    await idleBenchmark({ runs, sizes });
    return;
  }
  if (host.usable) {
    await fullBenchmark({ runs, sizes, ddMb, downtimeLimit, dirtyRate });
    return;
  }
  console.log(`${NAME}: the full benchmark cannot run: ${host.reason}`);
  console.log(
    `${NAME}: running only what needs no VM: (1) tsvmm's stream alone, (2) dd, (3) QEMU under TCG`,
  );
  console.log('');
  await reducedBenchmark({ runs, sizes, ddMb });
  console.error(
    `${NAME}: the full benchmark could not run (${host.reason}); the figures above are stream-only and QEMU TCG, not tsvmm saving a VM`,
  );
  process.exitCode = 1;
});

// ------------------------------------------------------------ full: KVM

/** Save and restore rounds, tsvmm and QEMU alternating, for each size and dirty state. */
async function saveRestoreCases({ runs, sizes, dirtyStates, qemu, dir }) {
  const cases = [];
  for (const size of sizes) {
    for (const dirty of dirtyStates) {
      const c = { size, dirty, tsvmm: [], qemu: [] };
      for (let i = 0; i < runs; i++) {
        log(
          `${sizeName(size)} ${dirty ? `${DIRTY_MB} MiB dirtied` : 'idle'}: run ${i + 1}/${runs}`,
        );
        c.tsvmm.push(await vmRound({ vmm: 'tsvmm', qemu, size, dirty, dir }));
        c.qemu.push(await vmRound({ vmm: 'qemu', qemu, size, dirty, dir, accel: 'kvm' }));
      }
      cases.push(summarize(c));
    }
  }
  return cases;
}

/** `--only idle`: the idle save and restore rows, nothing else. */
async function idleBenchmark({ runs, sizes }) {
  const qemu = ensureQemu(NAME);
  const version = qemuVersion(qemu);
  const dir = makeTempDir('tsvmm-bench-migrate-');
  try {
    const cases = await saveRestoreCases({ runs, sizes, dirtyStates: [false], qemu, dir });
    const result = ['mode=idle-only', 'kvm=1'];
    reportSaveRestore({ cases, version, runs, result });
    console.log(`RESULT ${result.join(' ')}`);
  } finally {
    removeTempDir(dir);
  }
}

async function fullBenchmark({ runs, sizes, ddMb, downtimeLimit, dirtyRate }) {
  const qemu = ensureQemu(NAME);
  const version = qemuVersion(qemu);
  const dir = makeTempDir('tsvmm-bench-migrate-');
  try {
    const cases = await saveRestoreCases({ runs, sizes, dirtyStates: [false, true], qemu, dir });
    log(`dd: ${ddMb} MiB`);
    const dd = await ddRate({ dir, mb: ddMb });
    log(
      `live migration over unix: 512 MiB, probe OS dirtying ${DIRTY_MB} MiB at ${dirtyRate} MiB/s`,
    );
    // A live round that fails (a guest dirtying faster than the host sends,
    // under emulation) must not lose the save and restore figures above.
    let live;
    try {
      live = await liveRound({ dir, downtimeLimit, dirtyRate });
    } catch (e) {
      if (!(e instanceof BenchError)) throw e;
      live = { error: e.message };
      process.exitCode = 1;
    }
    const mapped = await mappedRamRounds({ sizes, runs, dir });
    reportFull({ cases, dd, live, mapped, version, runs, downtimeLimit, dirtyRate });
  } finally {
    removeTempDir(dir);
  }
}

function guestArgs(size, dirty, extra = '') {
  const append = `console=ttyS0${dirty ? ` probe.dirty_mb=${DIRTY_MB}` : ''}${extra}`;
  return ['-smp', '1', '-m', `${size / MiB}M`, '-kernel', PROBE_OS, '-append', append];
}

function vmmCommand(vmm, qemu, size, dirty, accel, extra) {
  if (vmm === 'tsvmm') {
    return {
      label: 'tsvmm',
      command: process.execPath,
      args: [TSVMM, ...guestArgs(size, dirty, extra), '-serial', 'stdio'],
    };
  }
  return {
    label: `QEMU (${accel})`,
    command: qemu,
    args: [
      '-accel',
      accel,
      '-M',
      'pc',
      ...guestArgs(size, dirty, extra),
      '-display',
      'none',
      '-serial',
      'stdio',
      '-monitor',
      'none',
      '-nodefaults',
      '-no-reboot',
    ],
  };
}

/**
 * `--only save`: idle saves only, every VMM once per round, in turn; the
 * setup and the downtime of each, their range and median per VMM.
 */
async function saveRounds({ runs, sizes, baseline }) {
  const qemu = ensureQemu(NAME);
  const version = qemuVersion(qemu);
  const dir = makeTempDir('tsvmm-bench-migrate-');
  const vmms = [
    ...(baseline ? [{ key: 'baseline', label: `tsvmm (${baseline})`, main: baseline }] : []),
    { key: 'tsvmm', label: 'tsvmm', main: TSVMM },
    { key: 'qemu', label: version, main: undefined },
  ];
  try {
    const result = ['mode=save-only', 'kvm=1'];
    for (const size of sizes) {
      const samples = new Map(vmms.map((v) => [v.key, []]));
      for (let i = 0; i < runs; i++) {
        log(`${sizeName(size)} idle, saves only: round ${i + 1}/${runs}`);
        for (const v of vmms) {
          let cmd = vmmCommand(v.key === 'qemu' ? 'qemu' : 'tsvmm', qemu, size, false, 'kvm', '');
          if (v.main) cmd = { ...cmd, args: [v.main, ...cmd.args.slice(1)] };
          samples.get(v.key).push(await saveOnce(cmd, v.key, dir));
        }
      }
      const rows = [['', 'first byte, ms', '(median)', 'STOP → completed, ms', '(median)']];
      const range = (list) => `${Math.min(...list).toFixed(1)}-${Math.max(...list).toFixed(1)}`;
      for (const v of vmms) {
        const list = samples.get(v.key);
        const fb = list.map((r) => r.firstByteMs);
        const dt = list.map((r) => r.stopToCompletedMs);
        rows.push([v.label, range(fb), median(fb).toFixed(1), range(dt), median(dt).toFixed(2)]);
        const k = `${sizeName(size).toLowerCase()}_${v.key}`;
        result.push(`${k}_first_byte_ms=${median(fb).toFixed(1)}`);
        result.push(`${k}_stop_to_completed_ms=${median(dt).toFixed(2)}`);
      }
      console.log(
        `${sizeName(size)} idle, ${runs} saves each (file: for tsvmm, exec:cat for QEMU):`,
      );
      console.log(table(rows, (i) => i > 0));
    }
    console.log(`RESULT ${result.join(' ')}`);
  } finally {
    removeTempDir(dir);
  }
}

/** One save of the idle probe OS: the first byte and the downtime. */
async function saveOnce(cmd, name, dir) {
  const path = join(dir, `${name}.state`);
  const uri = name === 'qemu' ? `exec:cat > '${path}'` : `file:${path}`;
  const src = await bootProbe(cmd, dir, `${name}-src`, false);
  try {
    const base = basename(path);
    const match = (n) => n === base || (n.startsWith(`.${base}.`) && n.endsWith('.tsvmm-tmp'));
    const save = await timedMigrate(src, uri, MIGRATE_TIMEOUT_MS, { firstByte: { dir, match } });
    return { firstByteMs: save.firstByteMs, stopToCompletedMs: save.stopToCompletedMs };
  } finally {
    await src.quit();
    rmSync(path, { force: true });
  }
}

/** Boots the probe OS, waits for it to be ready (and its dirty pass). */
async function bootProbe(cmd, dir, name, dirty) {
  const vmm = await startVmm({ ...cmd, dir, name });
  try {
    await vmm.waitLine(/^probe cpu=0 ready/, BOOT_TIMEOUT_MS, 'probe OS ready line');
    vmm.dirtyPassMs = undefined;
    if (dirty) {
      const t0 = process.hrtime.bigint();
      await vmm.waitLine(/^probe cpu=0 dirty pass=1 /, DIRTY_TIMEOUT_MS, 'first dirty pass');
      vmm.dirtyPassMs = Number(process.hrtime.bigint() - t0) / 1e6;
    }
    return vmm;
  } catch (e) {
    await vmm.kill();
    throw e;
  }
}

/**
 * One save and restore of the probe OS by one VMM. `pause`: stop the guest
 * before the save, so the destination stays paused (QEMU keeps the source's
 * run state) and the restore ends at `paused` instead of `running`.
 */
async function vmRound({ vmm, qemu, size, dirty, dir, accel = 'kvm', pause = false }) {
  const cmd = vmmCommand(vmm, qemu, size, dirty, accel, '');
  const path = join(dir, `${vmm}.state`);
  const uri = vmm === 'tsvmm' ? `file:${path}` : `exec:cat > '${path}'`;
  const incoming = vmm === 'tsvmm' ? `file:${path}` : `exec:cat '${path}'`;
  const src = await bootProbe(cmd, dir, `${vmm}-src`, dirty);
  const dirtyPassMs = src.dirtyPassMs;
  let save;
  try {
    if (pause) await src.call('stop');
    // The first byte: tsvmm writes a temporary file next to FILE and renames
    // it at the end; QEMU's cat writes FILE itself.
    const base = basename(path);
    const match = (name) =>
      name === base || (name.startsWith(`.${base}.`) && name.endsWith('.tsvmm-tmp'));
    save = await timedMigrate(src, uri, MIGRATE_TIMEOUT_MS, { firstByte: { dir, match } });
  } finally {
    await src.quit();
  }
  const fileBytes = statSync(path).size;
  const { vmm: dst, ms: restoreMs } = await timedIncoming({
    ...cmd,
    args: [...cmd.args, '-incoming', incoming],
    dir,
    name: `${vmm}-dst`,
    timeoutMs: MIGRATE_TIMEOUT_MS,
    pausedOk: pause,
  });
  try {
    if (!pause) {
      // The restored guest must go on: a tick from the new process.
      await dst.waitLine(/^probe cpu=0 tick /, 10_000, 'a tick after the restore');
    }
  } finally {
    await dst.quit();
  }
  rmSync(path, { force: true });
  return {
    saveMs: save.ms,
    dirtyPassMs,
    firstByteMs: save.firstByteMs,
    setupMs: save.info['setup-time'],
    downtimeMs: save.info.downtime,
    stopToCompletedMs: save.stopToCompletedMs,
    reportedTotalMs: save.info['total-time'],
    restoreMs,
    fileBytes,
  };
}

function summarize(c) {
  const m = (list, key) => median(list.map((r) => r[key]));
  return {
    size: c.size,
    dirty: c.dirty,
    tsvmm: Object.fromEntries(PHASE_KEYS.map((k) => [k, m(c.tsvmm, k)])),
    qemu: Object.fromEntries(PHASE_KEYS.map((k) => [k, m(c.qemu, k)])),
  };
}

/** Live migration between two tsvmm processes over a unix socket, with the probe OS dirtying memory. */
async function liveRound({ dir, downtimeLimit, dirtyRate }) {
  const size = 512 * MiB;
  const extra = ` probe.dirty_rate_mb=${dirtyRate}`;
  const cmd = vmmCommand('tsvmm', undefined, size, true, 'kvm', extra);
  const sock = join(dir, 'live.sock');
  const dst = await startVmm({
    ...cmd,
    args: [...cmd.args, '-incoming', `unix:${sock}`],
    dir,
    name: 'live-dst',
  });
  try {
    const src = await bootProbe(cmd, dir, 'live-src', true);
    let save;
    try {
      await withTimeout(waitForSocket(sock), 30_000, 'tsvmm destination: unix: migration socket');
      await src.call('migrate-set-parameters', { 'downtime-limit': downtimeLimit });
      save = await timedMigrate(src, `unix:${sock}`, MIGRATE_TIMEOUT_MS);
    } finally {
      await src.quit();
    }
    const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
    for (;;) {
      const status = (await dst.call('query-status')).return.status;
      if (status === 'running') break;
      if (Date.now() > deadline)
        throw new BenchError(`live migration: destination still ${status}`);
      await sleep(5);
    }
    await dst.waitLine(/^probe cpu=0 tick /, 10_000, 'a tick on the destination');
    const ram = save.info.ram ?? {};
    return {
      downtimeMs: save.info.downtime,
      totalMs: save.info['total-time'],
      passes: ram['dirty-sync-count'],
      transferred: ram.transferred,
    };
  } finally {
    await dst.quit();
  }
}

async function waitForSocket(path) {
  for (;;) {
    try {
      if (statSync(path).isSocket()) return;
    } catch {
      // not yet
    }
    await sleep(10);
  }
}

// ------------------------------------------------------ mapped-ram restore

/** For each size: `runs` rounds of mappedRamRound, medians. */
async function mappedRamRounds({ sizes, runs, dir }) {
  const out = [];
  for (const size of sizes) {
    const rounds = [];
    for (let i = 0; i < runs; i++) {
      log(`mapped-ram restore: ${sizeName(size)} ${DIRTY_MB} MiB dirtied, run ${i + 1}/${runs}`);
      rounds.push(await mappedRamRound({ size, dir }));
    }
    const m = (key) => median(rounds.map((r) => r[key]));
    out.push({
      size,
      streamMs: m('streamMs'),
      mappedMs: m('mappedMs'),
      streamPollMs: m('streamPollMs'),
      mappedPollMs: m('mappedPollMs'),
      streamFile: m('streamFile'),
      mappedFile: m('mappedFile'),
      mappedAllocated: m('mappedAllocated'),
      mappedSaveMs: m('mappedSaveMs'),
      streamSaveMs: m('streamSaveMs'),
    });
  }
  return out;
}

/**
 * One source (probe OS, 256 MiB dirtied) saved twice, stopped: as the
 * stream and with mapped-ram. Each file restored by a new process started
 * with `-incoming defer` (QMP up, the capability set where it applies),
 * timed from sending migrate-incoming to RESUME.
 */
async function mappedRamRound({ size, dir }) {
  const cmd = vmmCommand('tsvmm', undefined, size, true, 'kvm', '');
  const streamPath = join(dir, 'stream.state');
  const mappedPath = join(dir, 'mapped.state');
  const src = await bootProbe(cmd, dir, 'mr-src', true);
  let streamSave;
  let mappedSave;
  try {
    await src.call('stop');
    streamSave = await timedMigrate(src, `file:${streamPath}`, MIGRATE_TIMEOUT_MS);
    await src.call('migrate-set-capabilities', { capabilities: MAPPED_RAM });
    mappedSave = await timedMigrate(src, `file:${mappedPath}`, MIGRATE_TIMEOUT_MS);
  } finally {
    await src.quit();
  }
  const stream = await timedIncomingDefer({ cmd, dir, path: streamPath, mapped: false });
  const mapped = await timedIncomingDefer({ cmd, dir, path: mappedPath, mapped: true });
  const st = statSync(mappedPath);
  const r = {
    size,
    streamSaveMs: streamSave.ms,
    mappedSaveMs: mappedSave.ms,
    streamMs: stream.ms,
    streamPollMs: stream.pollMs,
    mappedMs: mapped.ms,
    mappedPollMs: mapped.pollMs,
    streamFile: statSync(streamPath).size,
    mappedFile: st.size,
    mappedAllocated: st.blocks * 512,
  };
  rmSync(streamPath, { force: true });
  rmSync(mappedPath, { force: true });
  return r;
}

/**
 * `-incoming defer`, then (mapped) migrate-set-capabilities mapped-ram and
 * `events`, then migrate-incoming: the time from sending it to the RESUME
 * event's own time stamp (`ms`) and to the first query-status that says
 * running (`pollMs`, 5 ms polls and a QMP round trip included). tsvmm's
 * destination starts the guest unless -S, whatever the source's run state.
 * The guest must then tick twice more.
 */
async function timedIncomingDefer({ cmd, dir, path, mapped }) {
  const vmm = await startVmm({
    ...cmd,
    args: [...cmd.args, '-incoming', 'defer'],
    dir,
    name: mapped ? 'mr-dst-mapped' : 'mr-dst-stream',
  });
  try {
    const capabilities = [{ capability: 'events', state: true }];
    if (mapped) capabilities.push(...MAPPED_RAM);
    await vmm.call('migrate-set-capabilities', { capabilities });
    while (vmm.client.pendingEvents().length) await vmm.client.nextEvent();
    const sentAt = performance.timeOrigin + performance.now();
    const t0 = process.hrtime.bigint();
    await vmm.call('migrate-incoming', { uri: `file:${path}` });
    const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
    let pollMs;
    for (;;) {
      const status = (await vmm.call('query-status')).return.status;
      if (status === 'running') {
        pollMs = Number(process.hrtime.bigint() - t0) / 1e6;
        break;
      }
      if (status !== 'inmigrate') throw new BenchError(`${vmm.label}: run state ${status}`);
      if (Date.now() > deadline) throw new BenchError(`${vmm.label}: still ${status}`);
      await sleep(5);
    }
    const resume = vmm.client.pendingEvents().find((e) => e.event === 'RESUME');
    const ms = resume
      ? resume.timestamp.seconds * 1000 + resume.timestamp.microseconds / 1000 - sentAt
      : pollMs;
    await vmm.waitLine(/^probe cpu=0 tick /, 60_000, 'a tick after the restore');
    const ticksBefore = vmm.lines.filter((l) => /^probe cpu=0 tick /.test(l)).length;
    await withTimeout(
      (async () => {
        while (vmm.lines.filter((l) => /^probe cpu=0 tick /.test(l)).length < ticksBefore + 2) {
          await sleep(20);
        }
      })(),
      60_000,
      `${vmm.label}: ticks after the restore`,
    );
    return { ms, pollMs };
  } finally {
    await vmm.quit();
  }
}

function reportMappedRam(mapped, result) {
  console.log(
    `  mapped-ram restore (tsvmm): probe OS, 1 vCPU, ${DIRTY_MB} MiB dirtied, source stopped; new process with -incoming defer;`,
  );
  console.log(
    '  migrate-incoming sent -> RESUME (its time stamp), and -> first query-status running (5 ms polls)',
  );
  const rows = [
    [
      'guest',
      'stream restore',
      'mapped-ram restore',
      'ratio',
      '(polled: stream / mapped)',
      'stream file',
      'mapped file (allocated)',
      'save: stream / mapped',
    ],
  ];
  for (const m of mapped) {
    const key = sizeName(m.size).toLowerCase();
    const ratio = m.streamMs / m.mappedMs;
    rows.push([
      sizeName(m.size),
      ms(m.streamMs),
      ms(m.mappedMs),
      ratio.toFixed(1),
      `${ms(m.streamPollMs)} / ${ms(m.mappedPollMs)}`,
      mib(m.streamFile),
      `${mib(m.mappedFile)} (${mib(m.mappedAllocated)})`,
      `${ms(m.streamSaveMs)} / ${ms(m.mappedSaveMs)}`,
    ]);
    result.push(
      `tsvmm_${key}_dirty256_stream_incoming_ms=${fixed(m.streamMs)}`,
      `tsvmm_${key}_dirty256_mapped_ram_incoming_ms=${fixed(m.mappedMs)}`,
      `ratio_${key}_mapped_ram_incoming=${fixed(ratio, 3)}`,
      `tsvmm_${key}_mapped_ram_file_bytes=${m.mappedFile}`,
      `tsvmm_${key}_mapped_ram_allocated_bytes=${m.mappedAllocated}`,
    );
  }
  console.log(table(rows, (i) => i > 0));
  console.log(
    '  ratio = stream restore / mapped-ram restore; goal: mapped-ram < 20 ms for 2G on a KVM host',
  );
  console.log('');
}

/** The save and restore table, then setup and downtime; figures appended to `result`. */
function reportSaveRestore({ cases, version, runs, result }) {
  console.log('');
  console.log(`${NAME}: save and restore of the probe OS, 1 vCPU, median of ${runs} run(s)`);
  console.log(`     tsvmm: migrate file:FILE (fsync, rename), -incoming file:FILE`);
  console.log(
    `     QEMU:  ${version}, -accel kvm -M pc: migrate exec:cat > FILE (no fsync), -incoming 'exec:cat FILE'`,
  );
  console.log(
    '     save: migrate command to query-migrate completed; restore: process start to running',
  );
  console.log(`     files under ${tmpdir()}`);
  console.log('');
  const rows = [
    [
      'guest',
      'tsvmm save',
      'QEMU save',
      'ratio',
      'tsvmm restore',
      'QEMU restore',
      'ratio',
      'tsvmm file',
      'QEMU file',
      'tsvmm write',
    ],
  ];
  for (const c of cases) {
    const key = caseKey(c);
    const saveRatio = c.qemu.saveMs / c.tsvmm.saveMs;
    const restoreRatio = c.qemu.restoreMs / c.tsvmm.restoreMs;
    const writeRate = c.tsvmm.fileBytes / (c.tsvmm.saveMs / 1000);
    rows.push([
      caseName(c),
      ms(c.tsvmm.saveMs),
      ms(c.qemu.saveMs),
      saveRatio.toFixed(2),
      ms(c.tsvmm.restoreMs),
      ms(c.qemu.restoreMs),
      restoreRatio.toFixed(2),
      mib(c.tsvmm.fileBytes),
      mib(c.qemu.fileBytes),
      rate(writeRate),
    ]);
    result.push(
      `tsvmm_${key}_save_ms=${c.tsvmm.saveMs.toFixed(1)}`,
      `qemu_${key}_save_ms=${c.qemu.saveMs.toFixed(1)}`,
      `tsvmm_${key}_restore_ms=${c.tsvmm.restoreMs.toFixed(1)}`,
      `qemu_${key}_restore_ms=${c.qemu.restoreMs.toFixed(1)}`,
      `tsvmm_${key}_file_bytes=${c.tsvmm.fileBytes}`,
      `qemu_${key}_file_bytes=${c.qemu.fileBytes}`,
      `ratio_${key}_save=${saveRatio.toFixed(3)}`,
      `ratio_${key}_restore=${restoreRatio.toFixed(3)}`,
      `tsvmm_${key}_write_mib_s=${(writeRate / MiB).toFixed(1)}`,
    );
  }
  console.log(table(rows, (i) => i > 0));
  console.log('  ratio = QEMU time / tsvmm time (goal >= 2)');
  console.log('');
  // Setup and downtime: what a user waits for before anything is saved, and
  // how long the guest stays stopped.
  console.log(
    '  setup: migrate sent -> first byte of the file (inotify), and query-migrate setup-time;',
  );
  console.log(
    '  downtime: STOP event -> MIGRATION completed event (their own time stamps), and query-migrate downtime',
  );
  const prows = [
    [
      'guest',
      'tsvmm 1st byte',
      'QEMU 1st byte',
      'ratio',
      'tsvmm setup-time',
      'QEMU setup-time',
      'tsvmm STOP->done',
      'QEMU STOP->done',
      'ratio',
      'tsvmm downtime',
      'QEMU downtime',
    ],
  ];
  for (const c of cases) {
    const key = caseKey(c);
    const setupRatio = c.qemu.firstByteMs / c.tsvmm.firstByteMs;
    const downRatio = c.qemu.stopToCompletedMs / c.tsvmm.stopToCompletedMs;
    prows.push([
      caseName(c),
      ms(c.tsvmm.firstByteMs),
      ms(c.qemu.firstByteMs),
      setupRatio.toFixed(2),
      ms(c.tsvmm.setupMs),
      ms(c.qemu.setupMs),
      ms(c.tsvmm.stopToCompletedMs),
      ms(c.qemu.stopToCompletedMs),
      downRatio.toFixed(2),
      ms(c.tsvmm.downtimeMs),
      ms(c.qemu.downtimeMs),
    ]);
    result.push(
      `tsvmm_${key}_first_byte_ms=${fixed(c.tsvmm.firstByteMs)}`,
      `qemu_${key}_first_byte_ms=${fixed(c.qemu.firstByteMs)}`,
      `ratio_${key}_first_byte=${fixed(setupRatio, 3)}`,
      `tsvmm_${key}_setup_time_ms=${fixed(c.tsvmm.setupMs)}`,
      `qemu_${key}_setup_time_ms=${fixed(c.qemu.setupMs)}`,
      `tsvmm_${key}_stop_to_completed_ms=${fixed(c.tsvmm.stopToCompletedMs)}`,
      `qemu_${key}_stop_to_completed_ms=${fixed(c.qemu.stopToCompletedMs)}`,
      `ratio_${key}_stop_to_completed=${fixed(downRatio, 3)}`,
      `tsvmm_${key}_downtime_ms=${fixed(c.tsvmm.downtimeMs)}`,
      `qemu_${key}_downtime_ms=${fixed(c.qemu.downtimeMs)}`,
    );
  }
  console.log(table(prows, (i) => i > 0));
  console.log('  ratio = QEMU time / tsvmm time (goal >= 1)');
  console.log('');
}

function reportFull({ cases, dd, live, mapped, version, runs, downtimeLimit, dirtyRate }) {
  const result = ['mode=full', 'kvm=1'];
  reportSaveRestore({ cases, version, runs, result });
  // The guest's first touch of the dirtied MiB (ready line to the end of its
  // first pass): RAM that is not backed by huge pages shows here.
  const drows = [['guest', 'tsvmm dirty pass', 'QEMU dirty pass']];
  for (const c of cases.filter((x) => x.dirty)) {
    drows.push([caseName(c), ms(c.tsvmm.dirtyPassMs), ms(c.qemu.dirtyPassMs)]);
    result.push(
      `tsvmm_${caseKey(c)}_dirty_pass_ms=${fixed(c.tsvmm.dirtyPassMs)}`,
      `qemu_${caseKey(c)}_dirty_pass_ms=${fixed(c.qemu.dirtyPassMs)}`,
    );
  }
  console.log(table(drows, (i) => i > 0));
  console.log(
    '  dirty pass: probe OS ready line -> its first dirty pass line (the guest writing 256 MiB)',
  );
  console.log('');
  reportMappedRam(mapped, result);
  // The write rate that counts: the dirtied guest with the largest file.
  const dirtied = cases
    .filter((c) => c.dirty)
    .sort((a, b) => b.tsvmm.fileBytes - a.tsvmm.fileBytes)[0];
  const tsRate = dirtied.tsvmm.fileBytes / (dirtied.tsvmm.saveMs / 1000);
  const ddRatio = dd.bytesPerSec / tsRate;
  console.log(
    table(
      [
        ['write rate', 'MiB/s'],
        [`dd (${dd.direct ? 'oflag=direct ' : ''}conv=fsync)`, rate(dd.bytesPerSec)],
        [`tsvmm save, ${caseName(dirtied)}`, rate(tsRate)],
        ['dd / tsvmm (goal <= 2)', ddRatio.toFixed(2)],
      ],
      (i) => i > 0,
    ),
  );
  console.log('');
  if (live.error) {
    console.log(`  live migration (unix:, 512 MiB, tsvmm to tsvmm): FAILED: ${live.error}`);
    result.push('live_failed=1');
    console.log(`RESULT ${result.join(' ')}`);
    return;
  }
  const liveOk = live.downtimeMs <= downtimeLimit;
  console.log(
    table(
      [
        ['live migration (unix:, 512 MiB, tsvmm to tsvmm)', ''],
        [`probe OS dirtying ${DIRTY_MB} MiB at ${dirtyRate} MiB/s`, ''],
        ['downtime-limit', `${downtimeLimit} ms`],
        [
          'downtime (query-migrate)',
          `${live.downtimeMs} ms ${liveOk ? '(under the limit)' : '(OVER the limit)'}`,
        ],
        ['total time', `${live.totalMs} ms`],
        ['dirty syncs', String(live.passes)],
      ],
      (i) => i > 0,
    ),
  );
  result.push(
    `dd_mib_s=${(dd.bytesPerSec / MiB).toFixed(1)}`,
    `dd_direct=${dd.direct ? 1 : 0}`,
    `tsvmm_write_mib_s=${(tsRate / MiB).toFixed(1)}`,
    `ratio_dd_write=${ddRatio.toFixed(3)}`,
    `live_downtime_ms=${live.downtimeMs}`,
    `live_downtime_limit_ms=${downtimeLimit}`,
    `live_total_ms=${live.totalMs}`,
    `live_under_limit=${liveOk ? 1 : 0}`,
  );
  console.log(`RESULT ${result.join(' ')}`);
}

// --------------------------------------------------------- without KVM

async function reducedBenchmark({ runs, sizes, ddMb }) {
  const dir = makeTempDir('tsvmm-bench-migrate-');
  try {
    const stream = [];
    for (const size of sizes) {
      for (const [content, label] of CONTENTS) {
        log(`(1) stream only: ${sizeName(size)} ${label}, ${runs} run(s)`);
        const r = await streamCase({ size, content, dir, runs, timeoutMs: MIGRATE_TIMEOUT_MS });
        const m = (key) => median(r.runs.map((x) => x[key]));
        stream.push({
          size,
          content,
          label,
          saveMs: m('saveMs'),
          syncMs: m('syncMs'),
          loadMs: m('loadMs'),
          fileBytes: m('fileBytes'),
          normalPages: r.runs[0].normalPages,
        });
      }
    }

    log(`(2) dd: ${ddMb} MiB, best of 2`);
    const dd = await ddRate({ dir, mb: ddMb });

    const qemu = ensureQemu(NAME);
    const version = qemuVersion(qemu);
    const tcg = [];
    for (const dirty of [false, true]) {
      const size = 512 * MiB;
      const rounds = [];
      for (let i = 0; i < runs; i++) {
        log(
          `(3) QEMU TCG: 512M ${dirty ? `${DIRTY_MB} MiB dirtied` : 'idle'}, run ${i + 1}/${runs}`,
        );
        rounds.push(
          await vmRound({ vmm: 'qemu', qemu, size, dirty, dir, accel: 'tcg', pause: true }),
        );
      }
      const m = (key) => median(rounds.map((x) => x[key]));
      tcg.push({
        size,
        dirty,
        saveMs: m('saveMs'),
        restoreMs: m('restoreMs'),
        fileBytes: m('fileBytes'),
        reportedTotalMs: m('reportedTotalMs'),
      });
    }
    reportReduced({ stream, dd, tcg, version, runs });
  } finally {
    removeTempDir(dir);
  }
}

function reportReduced({ stream, dd, tcg, version, runs }) {
  console.log('');
  console.log(
    `${NAME}: REDUCED RUN (no KVM): median of ${runs} run(s); ${cpus().length} CPUs; files under ${tmpdir()}`,
  );
  console.log('');
  console.log(
    '  (1) STREAM ONLY: tsvmm saveVmState/loadVmState on a GuestMemory, no VM, 1 fixture vCPU',
  );
  console.log(
    '      save: open file: to close (with fsync, rename, directory fsync); load: into fresh RAM,',
  );
  console.log(
    '      read back from the page cache (just written); RAM compared byte for byte after each load',
  );
  const srows = [['RAM', 'contents', 'file', 'save', '(fsync)', 'load', 'write rate', 'load rate']];
  const result = ['mode=stream-only', 'kvm=0'];
  for (const s of stream) {
    const w = s.fileBytes / (s.saveMs / 1000);
    const l = s.fileBytes / (s.loadMs / 1000);
    // An all-zero guest writes almost nothing: a rate would mean nothing.
    const data = s.content !== 'zero';
    srows.push([
      sizeName(s.size),
      s.label,
      mib(s.fileBytes),
      ms(s.saveMs),
      ms(s.syncMs),
      ms(s.loadMs),
      data ? rate(w) : '-',
      data ? rate(l) : '-',
    ]);
    const key = `${sizeName(s.size).toLowerCase()}_${s.content}`;
    result.push(
      `stream_${key}_save_ms=${s.saveMs.toFixed(1)}`,
      `stream_${key}_load_ms=${s.loadMs.toFixed(1)}`,
      `stream_${key}_file_bytes=${s.fileBytes}`,
    );
    if (data) result.push(`stream_${key}_write_mib_s=${(w / MiB).toFixed(1)}`);
  }
  console.log(table(srows, (i) => i > 1));
  console.log('');
  console.log(`  (2) DD on the same disk: ${dd.command} (best of 2, process start to exit)`);
  console.log(table([['write rate', rate(dd.bytesPerSec)]], (i) => i > 0));
  result.push(`dd_mib_s=${(dd.bytesPerSec / MiB).toFixed(1)}`, `dd_direct=${dd.direct ? 1 : 0}`);
  console.log('');
  console.log(
    `  (3) QEMU UNDER TCG: ${version}, -accel tcg -M pc -smp 1 -m 512M -kernel probe-os.elf, paused after boot`,
  );
  console.log(
    "      save: migrate exec:cat > FILE (no fsync), command to completed; restore: -incoming 'exec:cat FILE',",
  );
  console.log('      process start to the end of the load (run state paused, as the source was)');
  const qrows = [['guest', 'file', 'save', '(QEMU total-time)', 'restore']];
  for (const q of tcg) {
    const name = q.dirty ? `512M, probe OS, ${DIRTY_MB} MiB dirtied` : '512M, probe OS idle';
    qrows.push([name, mib(q.fileBytes), ms(q.saveMs), `${q.reportedTotalMs} ms`, ms(q.restoreMs)]);
    const key = q.dirty ? 'dirty256' : 'idle';
    result.push(
      `qemu_tcg_512m_${key}_save_ms=${q.saveMs.toFixed(1)}`,
      `qemu_tcg_512m_${key}_restore_ms=${q.restoreMs.toFixed(1)}`,
      `qemu_tcg_512m_${key}_file_bytes=${q.fileBytes}`,
    );
  }
  console.log(table(qrows, (i) => i > 0));
  console.log('');

  console.log('  RATIOS');
  const rrows = [['ratio', 'value', 'goal (full benchmark)']];
  for (const s of stream.filter((x) => x.content !== 'zero')) {
    const w = s.fileBytes / (s.saveMs / 1000);
    const key = `${sizeName(s.size).toLowerCase()}_${s.content}`;
    const r = w / dd.bytesPerSec;
    rrows.push([`stream write rate / dd, ${sizeName(s.size)} ${s.label}`, r.toFixed(2), '>= 0.5']);
    result.push(`ratio_stream_${key}_write_vs_dd=${r.toFixed(3)}`);
  }
  const pairs = [
    [
      'idle',
      tcg.find((q) => !q.dirty),
      stream.find((s) => s.size === 512 * MiB && s.content === 'zero'),
    ],
    [
      'dirty256',
      tcg.find((q) => q.dirty),
      stream.find((s) => s.size === 512 * MiB && s.content === 'random256'),
    ],
  ];
  for (const [key, q, s] of pairs) {
    if (!q || !s) continue;
    const save = q.saveMs / s.saveMs;
    const load = q.restoreMs / s.loadMs;
    const what =
      key === 'idle'
        ? 'QEMU idle / stream all zero'
        : `QEMU ${DIRTY_MB} MiB dirtied / stream ${DIRTY_MB} MiB random`;
    rrows.push([`save, 512M, ${what}: indicative`, save.toFixed(2), '>= 2']);
    rrows.push([`restore, 512M, ${what}: indicative`, load.toFixed(2), '>= 2']);
    result.push(
      `indicative_ratio_512m_${key}_save=${save.toFixed(3)}`,
      `indicative_ratio_512m_${key}_restore=${load.toFixed(3)}`,
    );
  }
  console.log(table(rrows, (i) => i > 0));
  console.log('');
  console.log(
    '  stream-only vs full QEMU save: indicative. The stream side has no VM (no vCPU, device or',
  );
  console.log(
    '  kvmclock state from KVM, no process start); the QEMU side is a whole VMM under TCG (its save',
  );
  console.log(
    '  cost is its own code, not the accelerator; its restore includes process start and firmware).',
  );
  console.log('  ratio = QEMU time / tsvmm stream time; write rate / dd: 1 means as fast as dd.');
  console.log(`RESULT ${result.join(' ')} full=0`);
}

// ------------------------------------------------------------- helpers

function log(text) {
  console.error(`${NAME}: ${text}`);
}

function caseKey(c) {
  return `${sizeName(c.size).toLowerCase()}_${c.dirty ? 'dirty256' : 'idle'}`;
}

function caseName(c) {
  return `${sizeName(c.size)} ${c.dirty ? `${DIRTY_MB} MiB dirtied` : 'idle'}`;
}

function sizeName(bytes) {
  return bytes % 2 ** 30 === 0 ? `${bytes / 2 ** 30}G` : `${bytes / MiB}M`;
}

function ms(v) {
  return Number.isFinite(v) ? `${v.toFixed(1)} ms` : '-';
}

function fixed(v, digits = 1) {
  return Number.isFinite(v) ? v.toFixed(digits) : 'NaN';
}

function mib(bytes) {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

function rate(bytesPerSec) {
  return `${(bytesPerSec / MiB).toFixed(0)} MiB/s`;
}

function positiveInt(text, name) {
  const v = Number(text);
  if (!Number.isInteger(v) || v < 1) throw new BenchError(`${name} ${text}: a positive integer`);
  return v;
}

function parseSize(text) {
  const m = /^(\d+)([MG])$/i.exec(text.trim());
  if (!m) throw new BenchError(`--sizes: '${text}' is not a size like 512M or 2G`);
  const bytes = Number(m[1]) * (m[2].toUpperCase() === 'G' ? 2 ** 30 : MiB);
  if (bytes < 64 * MiB) throw new BenchError(`--sizes: ${text}: at least 64M`);
  return bytes;
}
