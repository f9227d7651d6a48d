#!/usr/bin/env node
// bench/qmp: QMP round-trip latency of query-status, stop and cont (median
// and p99 of 200 each, after 20 warm-up), tsvmm against QEMU (Debian's
// qemu-system-x86, installed here if missing) in the same run, over a unix
// socket. A round trip is from writing the command to reading its reply.
// After each stop the STOP event must arrive, and after each cont the
// RESUME event, before the next command is sent.
//
// Two scenarios, each with its own table and RESULT keys:
//   prelaunch  started with -S and no guest, 1 vCPU, 128 MiB: query-status
//              in prelaunch, then cont and the stop/cont loop (the VMM's own
//              cost: nothing runs in the vCPU but firmware or nothing);
//   guest      the probe OS (guests/probe-os/probe-os.elf) running on 2
//              vCPUs, 128 MiB, -M pc: stop and cont of a running guest, with
//              its ticks, kvmclock and every vCPU to take out of KVM_RUN (what
//              a user pausing a VM feels).
//
// Usage: npm run bench -- qmp [--machine microvm|pc] [--scenario prelaunch,guest]
//                             [--samples N]   (per command and VMM, default 200)
//   --reference-only   measure QEMU alone (with -accel tcg where KVM is not
//                      usable) and print its figures without ratios: for
//                      checking the QEMU half on a host that cannot run tsvmm.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { QmpClient } from '../dist/monitor/qmp-client.js';
import { probeKvmHost } from '../dist/util/kvm-gate.js';
import {
  BenchError,
  collectTail,
  ensureQemu,
  makeTempDir,
  median,
  percentile,
  qemuVersion,
  removeTempDir,
  root,
  runBench,
  sleep,
  spawnTracked,
  stopChild,
  table,
  withTimeout,
} from './lib/common.mjs';

const WARMUP = 20; // per VMM process, not counted
let SAMPLES = 200; // per command and VMM, over both processes of a VMM (--samples)
const START_TIMEOUT_MS = 30_000; // process start to a negotiated QMP session
const COMMAND_TIMEOUT_MS = 10_000; // each reply, and each STOP/RESUME event
const QUIT_TIMEOUT_MS = 10_000; // quit to process exit
const COMMANDS = ['query-status', 'stop', 'cont'];

const PROBE_OS = join(root, 'guests/probe-os/probe-os.elf');
const GUEST_READY_TIMEOUT_MS = 60_000; // process start to the probe OS ready on every vCPU
const SCENARIOS = ['prelaunch', 'guest'];

await runBench('qmp', async () => {
  const { values } = parseArgs({
    options: {
      'reference-only': { type: 'boolean', default: false },
      machine: { type: 'string', default: 'microvm' },
      scenario: { type: 'string', default: SCENARIOS.join(',') },
      samples: { type: 'string', default: String(SAMPLES) },
    },
    strict: true,
  });
  const referenceOnly = values['reference-only'];
  const machineType = values.machine;
  if (!['microvm', 'pc', 'q35'].includes(machineType)) {
    throw new BenchError(`--machine ${machineType}: use microvm, pc or q35`);
  }
  SAMPLES = Number(values.samples);
  if (!Number.isInteger(SAMPLES) || SAMPLES < 2 || SAMPLES % 2 !== 0) {
    throw new BenchError(`--samples ${values.samples}: an even number >= 2`);
  }
  const scenarios = values.scenario.split(',').map((x) => x.trim());
  for (const name of scenarios) {
    if (!SCENARIOS.includes(name)) {
      throw new BenchError(`--scenario ${name}: use ${SCENARIOS.join(', ')} (comma-separated)`);
    }
  }

  const host = probeKvmHost();
  if (!host.usable && !referenceOnly) throw new BenchError(`cannot run: ${host.reason}`);
  const accel = host.usable ? 'kvm' : 'tcg';

  const qemu = ensureQemu('qmp');
  const version = qemuVersion(qemu);
  const common = ['-nodefaults', '-display', 'none'];
  const setups = {
    prelaunch: {
      title: `prelaunch: started with -S, no guest, 1 vCPU, 128 MiB, QEMU -M ${machineType}`,
      cpus: 1,
      guest: false,
      qemuArgs: ['-accel', accel, '-M', machineType, ...common, '-S', '-smp', '1', '-m', '128M'],
      tsvmmArgs: [
        join(root, 'dist/cli/main.cjs'),
        '-S',
        '-smp',
        '1',
        '-m',
        '128M',
        '-serial',
        'none',
      ],
    },
    guest: {
      title: 'guest: the probe OS running on 2 vCPUs, 128 MiB, QEMU -M pc',
      cpus: 2,
      guest: true,
      qemuArgs: [
        '-accel',
        accel,
        '-M',
        'pc',
        ...common,
        '-smp',
        '2',
        '-m',
        '128M',
        '-kernel',
        PROBE_OS,
        '-append',
        'console=ttyS0',
        '-serial',
        'stdio',
        '-monitor',
        'none',
      ],
      tsvmmArgs: [
        join(root, 'dist/cli/main.cjs'),
        '-smp',
        '2',
        '-m',
        '128M',
        '-kernel',
        PROBE_OS,
        '-append',
        'console=ttyS0',
        '-serial',
        'stdio',
      ],
    },
  };

  const dir = makeTempDir('tsvmm-bench-qmp-');
  const result = [`qemu_accel=${accel}`, `qemu_machine=${machineType}`];
  if (referenceOnly) result.unshift('mode=reference-only');
  try {
    for (const name of scenarios) {
      const setup = setups[name];
      // Two processes per VMM, in the order A B B A, half the samples each:
      // a slow drift of the host's load then weighs on both VMMs alike.
      const runs = referenceOnly
        ? [['QEMU', qemu, setup.qemuArgs]]
        : [
            ['tsvmm', process.execPath, setup.tsvmmArgs],
            ['QEMU', qemu, setup.qemuArgs],
          ];
      const order = runs.length === 2 ? [0, 1, 1, 0] : [0, 0];
      const samples = {};
      for (const [n, index] of order.entries()) {
        const [label, command, args] = runs[index];
        const got = await measure(label, command, args, dir, SAMPLES / 2, `${name}-${n}`, setup);
        samples[label] ??= { 'query-status': [], stop: [], cont: [] };
        for (const cmd of COMMANDS) samples[label][cmd].push(...got[cmd]);
      }
      const results = {};
      for (const [label, key] of [
        ['tsvmm', 'tsvmm'],
        ['QEMU', 'qemu'],
      ]) {
        if (!samples[label]) continue;
        results[key] = {};
        for (const cmd of COMMANDS) {
          const all = samples[label][cmd];
          results[key][cmd] = { median: median(all), p99: percentile(all, 99) };
        }
      }
      report({ name, setup, results, referenceOnly, accel, version, host, result });
    }
    console.log(`RESULT ${result.join(' ')}`);
  } finally {
    removeTempDir(dir);
  }
});

/**
 * Starts one VMM with a QMP socket, measures `count` round trips of each of
 * the three commands after {@link WARMUP} unmeasured ones, quits it.
 * Returns the samples in nanoseconds.
 */
async function measure(label, command, args, dir, count, n, setup) {
  const socket = join(dir, `${label.toLowerCase()}-${n}.sock`);
  const argv = [...args, '-qmp', `unix:${socket},server=on,wait=off`];
  console.error(`qmp: starting ${label}: ${command} ${argv.join(' ')}`);
  const child = spawnTracked(command, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  const out = collectTail(child.stdout, 20_000);
  const err = collectTail(child.stderr);
  const spawnError = new Promise((_, reject) =>
    child.once('error', (e) =>
      reject(new BenchError(`${label}: cannot start ${command}: ${e.message}`)),
    ),
  );
  spawnError.catch(() => {});
  const died = () =>
    new BenchError(
      `${label} exited (status ${child.exitCode ?? child.signalCode}) before the benchmark ended${output(out, err)}`,
    );
  let client;
  try {
    client = await Promise.race([
      withTimeout(
        connectQmp(label, socket, child, died),
        START_TIMEOUT_MS,
        `${label}: QMP session`,
      ),
      spawnError,
    ]);
    const call = async (cmd) => {
      try {
        return await Promise.race([request(label, client, cmd), spawnError]);
      } catch (e) {
        // A VMM that died mid-run explains the failure better with its own output.
        await sleep(100);
        if (child.exitCode !== null || child.signalCode !== null) throw died();
        throw e;
      }
    };
    const event = (name) =>
      withTimeout(client.nextEvent(name), COMMAND_TIMEOUT_MS, `${label}: ${name} event`);

    const samples = { 'query-status': [], stop: [], cont: [] };
    if (setup.guest) {
      // The guest must be up on every vCPU: stop and cont then take running
      // vCPUs out of KVM_RUN and back.
      await waitOutput(
        out,
        new RegExp(`probe cpu=${setup.cpus - 1} ready`),
        GUEST_READY_TIMEOUT_MS,
        `${label}: the probe OS ready on ${setup.cpus} vCPUs`,
        child,
        died,
      );
      const running = await call('query-status');
      if (running.return.status !== 'running') {
        throw new BenchError(
          `${label}: guest started, but query-status says ${JSON.stringify(running.return)}`,
        );
      }
      for (let i = 0; i < WARMUP + count; i++) {
        const { ns } = await timed(call, 'query-status');
        if (i >= WARMUP) samples['query-status'].push(ns);
      }
    } else {
      const first = await call('query-status');
      if (first.return.status !== 'prelaunch') {
        throw new BenchError(
          `${label}: started with -S but query-status says ${JSON.stringify(first.return)}`,
        );
      }
      // query-status in prelaunch; then QEMU needs a running VM for stop and
      // cont (with no kernel its firmware spins).
      for (let i = 0; i < WARMUP + count; i++) {
        const { ns } = await timed(call, 'query-status');
        if (i >= WARMUP) samples['query-status'].push(ns);
      }
      await call('cont');
      await event('RESUME');
      const running = await call('query-status');
      if (running.return.status !== 'running') {
        throw new BenchError(
          `${label}: after cont, query-status says ${JSON.stringify(running.return)}`,
        );
      }
    }

    for (let i = 0; i < WARMUP + count; i++) {
      expectNoPending(label, client, ['STOP', 'RESUME']);
      const stop = await timed(call, 'stop');
      await event('STOP');
      expectNoPending(label, client, ['STOP', 'RESUME']);
      const cont = await timed(call, 'cont');
      await event('RESUME');
      if (i >= WARMUP) {
        samples.stop.push(stop.ns);
        samples.cont.push(cont.ns);
      }
    }

    const quit = await call('quit');
    if ('error' in quit) throw new BenchError(`${label}: quit: ${JSON.stringify(quit.error)}`);
    const end = await stopAfterQuit(child);
    if (end.killed)
      console.error(`qmp: ${label} did not exit within ${QUIT_TIMEOUT_MS} ms of quit: killed`);
    else if (end.code !== 0)
      console.error(`qmp: ${label} exited with status ${end.code ?? end.signal} after quit`);

    return samples;
  } finally {
    client?.close();
    await stopChild(child, { signal: 'SIGKILL', graceMs: 5000 });
    rmSync(socket, { force: true });
  }
}

/** Waits until the child's output (its serial console) matches `re`. */
async function waitOutput(out, re, ms, what, child, died) {
  const deadline = Date.now() + ms;
  while (!re.test(out.text)) {
    if (child.exitCode !== null || child.signalCode !== null) throw died();
    if (Date.now() > deadline) throw new BenchError(`${what}: not within ${ms} ms`);
    await sleep(10);
  }
}

/** Connects once the socket accepts, reads the greeting and negotiates. */
async function connectQmp(label, socket, child, died) {
  let client;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw died();
    try {
      client = await QmpClient.connect({ path: socket });
      break;
    } catch (e) {
      if (e.code !== 'ENOENT' && e.code !== 'ECONNREFUSED') {
        throw new BenchError(`${label}: cannot connect to ${socket}: ${e.message}`);
      }
      await sleep(20);
    }
  }
  const greeting = await client.greeting();
  if (!greeting.QMP)
    throw new BenchError(`${label}: unexpected greeting ${JSON.stringify(greeting)}`);
  const caps = await client.request('qmp_capabilities');
  if ('error' in caps)
    throw new BenchError(`${label}: qmp_capabilities: ${JSON.stringify(caps.error)}`);
  return client;
}

async function request(label, client, cmd) {
  let response;
  try {
    response = await withTimeout(client.request(cmd), COMMAND_TIMEOUT_MS, `${label}: ${cmd}`);
  } catch (e) {
    if (e instanceof BenchError) throw e;
    throw new BenchError(`${label}: ${cmd}: ${e.message}`);
  }
  if ('error' in response && cmd !== 'quit') {
    throw new BenchError(`${label}: ${cmd} failed: ${JSON.stringify(response.error)}`);
  }
  return response;
}

/** One command's reply round trip, in nanoseconds. */
async function timed(call, cmd) {
  const t0 = process.hrtime.bigint();
  const response = await call(cmd);
  const t1 = process.hrtime.bigint();
  return { ns: Number(t1 - t0), response };
}

/** A STOP or RESUME left over would satisfy the next wait wrongly: refuse it. */
function expectNoPending(label, client, names) {
  const stale = client.pendingEvents().filter((e) => names.includes(e.event));
  if (stale.length) {
    throw new BenchError(`${label}: unexpected events ${stale.map((e) => e.event).join(', ')}`);
  }
}

async function stopAfterQuit(child) {
  // quit has been answered: give the process time to exit by itself, then kill it.
  return stopChild(child, { signal: 0, graceMs: QUIT_TIMEOUT_MS });
}

function output(out, err) {
  const text = `${out.text}${err.text}`.trim();
  return text ? `:\n${text}` : ' (no output)';
}

function report({ name, setup, results, referenceOnly, accel, version, host, result }) {
  const us = (ns) => (ns / 1000).toFixed(1);
  const ratio = (cmd, key) => results.qemu[cmd][key] / results.tsvmm[cmd][key];
  console.log(`qmp: ${setup.title}`);
  console.log(
    `     QMP reply round trip over a unix socket, ${SAMPLES} samples per command and VMM`,
  );
  console.log(
    `     (${referenceOnly ? 'two QEMU processes' : 'two processes per VMM, run A B B A'}, each ${SAMPLES / 2} samples after ${WARMUP} warm-up)`,
  );
  console.log(
    `     QEMU: ${version}, -accel ${accel}${accel === 'tcg' ? ' (software emulation: no usable KVM here)' : ''}`,
  );
  console.log('');
  if (referenceOnly) {
    console.log(
      `     reference only: QEMU measured alone, no tsvmm, no ratios (${host.usable ? 'asked for' : host.reason})`,
    );
    console.log('');
    const rows = [['command', 'QEMU median', 'QEMU p99']];
    for (const cmd of COMMANDS) {
      rows.push([cmd, `${us(results.qemu[cmd].median)} µs`, `${us(results.qemu[cmd].p99)} µs`]);
    }
    console.log(table(rows, (i) => i > 0));
    for (const cmd of COMMANDS) {
      const k = `${name}_${cmd.replace('-', '_')}`;
      result.push(`qemu_${k}_median_us=${us(results.qemu[cmd].median)}`);
      result.push(`qemu_${k}_p99_us=${us(results.qemu[cmd].p99)}`);
    }
  } else {
    const rows = [
      [
        'command',
        'tsvmm median',
        'tsvmm p99',
        'QEMU median',
        'QEMU p99',
        'ratio median',
        'ratio p99',
      ],
    ];
    for (const cmd of COMMANDS) {
      rows.push([
        cmd,
        `${us(results.tsvmm[cmd].median)} µs`,
        `${us(results.tsvmm[cmd].p99)} µs`,
        `${us(results.qemu[cmd].median)} µs`,
        `${us(results.qemu[cmd].p99)} µs`,
        ratio(cmd, 'median').toFixed(3),
        ratio(cmd, 'p99').toFixed(3),
      ]);
    }
    console.log(table(rows, (i) => i > 0));
    console.log('');
    console.log('  ratio = QEMU / tsvmm: above 1 means tsvmm answers faster (goal >= 1)');
    for (const cmd of COMMANDS) {
      const k = `${name}_${cmd.replace('-', '_')}`;
      result.push(`tsvmm_${k}_median_us=${us(results.tsvmm[cmd].median)}`);
      result.push(`tsvmm_${k}_p99_us=${us(results.tsvmm[cmd].p99)}`);
      result.push(`qemu_${k}_median_us=${us(results.qemu[cmd].median)}`);
      result.push(`qemu_${k}_p99_us=${us(results.qemu[cmd].p99)}`);
      result.push(`ratio_${k}_median=${ratio(cmd, 'median').toFixed(3)}`);
      result.push(`ratio_${k}_p99=${ratio(cmd, 'p99').toFixed(3)}`);
    }
  }
  console.log('');
}
