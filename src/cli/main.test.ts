// End-to-end tests of the tsvmm command: each spawns `node dist/cli/main.js`
// as a child process (test-support/tsvmm-process.ts), with a deadline after
// which the child is killed by pid, and removes its temp dir, socket and
// child in every outcome.
//
// The command-line tests run anywhere. The VM tests need a real /dev/kvm:
// where the host kernel has none they report NOT RUN (requireKvm).
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { DEFAULT_TICK_NS } from '../hw/i386/probe-boot.js';
import { isJsonObject } from '../monitor/json-value.js';
import type { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';
import { type ProbeLine, parseProbeOutput, waitFor } from '../test-support/machine.js';
import {
  type Exit,
  ProcessScope as Scope,
  within as withinMs,
} from '../test-support/tsvmm-process.js';
import { traceBody } from '../trace/capture.js';
import { probeKvmHost } from '../util/kvm-gate.js';
import { versionText } from './help.js';
import { OPTION_SPECS } from './options.js';

/** How long a command that should exit at once may take. */
const QUICK_EXIT_MS = 15_000;
/** How long a VM may take to shut down after quit or a signal. */
const SHUTDOWN_MS = 20_000;
/** How long any single QMP exchange or event may take. */
const QMP_MS = 15_000;

/** `promise`, or a failure naming `what` once `ms` has passed. */
function within<T>(promise: Promise<T>, what: string, ms = QMP_MS): Promise<T> {
  return withinMs(promise, what, ms);
}

/** Runs tsvmm with `args` to its exit (killed by pid past the deadline). */
async function runToExit(
  t: TestContext,
  args: readonly string[],
): Promise<Exit & { stdout: string; stderr: string }> {
  const vm = new Scope(t).start(args);
  const exit = await vm.waitExit(QUICK_EXIT_MS);
  return { ...exit, stdout: vm.stdout, stderr: vm.stderr };
}

/** An error reported the way a user should see it: one `tsvmm:` line, no JS stack. */
function assertCleanError(stderr: string): void {
  assert.match(stderr, /^tsvmm: /);
  assert.doesNotMatch(stderr, /^\s+at /m, 'no stack trace');
  assert.doesNotMatch(stderr, /internal error/);
}

/** The greeting, then capabilities negotiation. */
async function negotiate(qmp: QmpClient): Promise<void> {
  const greeting = await within(qmp.greeting(), 'the QMP greeting');
  assert.ok(isJsonObject(greeting.QMP), 'the greeting has a QMP member');
  assert.deepEqual(await within(qmp.execute('qmp_capabilities'), 'qmp_capabilities'), {});
}

async function queryStatus(qmp: QmpClient): Promise<{ status: string; running: boolean }> {
  const r = await within(qmp.execute('query-status'), 'query-status');
  assert.ok(isJsonObject(r));
  assert.equal(typeof r.status, 'string');
  assert.equal(typeof r.running, 'boolean');
  return { status: r.status as string, running: r.running as boolean };
}

async function waitRunning(qmp: QmpClient): Promise<void> {
  const deadline = Date.now() + QMP_MS;
  for (;;) {
    const s = await queryStatus(qmp);
    if (s.status === 'running') {
      assert.equal(s.running, true);
      return;
    }
    if (Date.now() > deadline) throw new Error(`the VM never reached running (still ${s.status})`);
    await sleep(20);
  }
}

/**
 * After quit or a signal: reads every event until the server closes the
 * connection, and checks it was one SHUTDOWN with `reason` and no STOP.
 */
async function expectShutdownOnly(qmp: QmpClient, reason: string): Promise<void> {
  await within(qmp.closed(), 'the QMP connection to close', SHUTDOWN_MS);
  const events = qmp.pendingEvents();
  const names = events.map((e) => e.event);
  const shutdowns = events.filter((e) => e.event === 'SHUTDOWN');
  assert.equal(shutdowns.length, 1, `one SHUTDOWN event, got ${JSON.stringify(names)}`);
  assert.deepEqual(shutdowns[0]!.data, { guest: false, reason });
  assert.ok(!names.includes('STOP'), `no STOP on the way out, got ${JSON.stringify(names)}`);
}

function qmpArg(socket: string): string[] {
  return ['-qmp', `unix:${socket},server=on,wait=off`];
}

describe('tsvmm command line (no KVM needed)', () => {
  test('--help prints the usage with every option and exits 0', async (t) => {
    const r = await runToExit(t, ['--help']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
    assert.match(r.stdout, /^usage: tsvmm \[options\]\n/);
    const lines = r.stdout.split('\n');
    for (const spec of OPTION_SPECS) {
      const row = `  ${spec.names.join(', ')}${spec.arg !== undefined ? ` ${spec.arg}` : ''}`;
      assert.ok(lines.includes(row), `the help lists ${JSON.stringify(row)}`);
      assert.ok(lines.includes(`        ${spec.help}`), `the help explains ${spec.names[0]}`);
    }
  });

  test('-version prints the version and exits 0', async (t) => {
    const r = await runToExit(t, ['-version']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, versionText());
    assert.match(r.stdout, /^tsvmm version \S+ \(QMP and command line of QEMU \d+\.\d+\.\d+\)\n$/);
    assert.equal(r.stderr, '');
  });

  test('an unknown option exits 1 naming it', async (t) => {
    const r = await runToExit(t, ['-m', '256', '-no-such-option']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, 'tsvmm: -no-such-option: invalid option (see --help)\n');
  });

  test('-smp 0 exits 1: CPU topology parameters must be greater than zero', async (t) => {
    const r = await runToExit(t, ['-smp', '0']);
    assert.equal(r.code, 1);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: -smp 0: invalid CPU topology: .*greater than zero\n$/);
    // Refused while parsing, before any attempt to open KVM.
    assert.doesNotMatch(r.stderr, /\/dev\/kvm/);
  });

  test('a -kernel that is missing or not a kernel is refused before KVM is opened', async (t) => {
    const missing = await runToExit(t, ['-kernel', '/nonexistent/bzImage']);
    assert.equal(missing.code, 1);
    assertCleanError(missing.stderr);
    assert.match(missing.stderr, /^tsvmm: -kernel \/nonexistent\/bzImage: ENOENT/);
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-kernel-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const corrupt = join(dir, 'bzImage');
    writeFileSync(corrupt, Buffer.alloc(8192, 0x5a));
    const r = await runToExit(t, ['-kernel', corrupt]);
    assert.equal(r.code, 1);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: .*not a Linux kernel/);
    assert.doesNotMatch(r.stderr, /\/dev\/kvm/);
  });

  test('-append without -kernel is refused', async (t) => {
    const r = await runToExit(t, ['-append', 'console=ttyS0']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'tsvmm: -append only allowed with -kernel option\n');
  });

  test('without KVM, running a VM exits 1 naming /dev/kvm, with no stack trace', async (t) => {
    // There is no option to point tsvmm at another KVM device, so this can
    // only be checked where /dev/kvm cannot be used.
    if (probeKvmHost().usable) {
      t.skip('host has KVM');
      return;
    }
    const r = await runToExit(t, []);
    assert.equal(r.code, 1);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: cannot open \/dev\/kvm \(E[A-Z]+\): /);
    assert.equal(r.stderr.split('\n').length, 2, 'one line');
  });
});

describe('tsvmm VMs over QMP (needs KVM)', () => {
  test('the management-tool flow: -S, cont, stop, cont, quit', { timeout: 90_000 }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const sock = join(scope.tempDir(), 'qmp.sock');
    const vm = scope.start(['-S', ...qmpArg(sock), '-serial', 'none', '-smp', '2']);
    const qmp = await scope.connect(sock, vm);
    await negotiate(qmp);

    assert.deepEqual(await queryStatus(qmp), { status: 'prelaunch', running: false });
    assert.deepEqual(await within(qmp.execute('cont'), 'cont'), {});
    await within(qmp.nextEvent('RESUME'), 'RESUME after cont');
    assert.deepEqual(await queryStatus(qmp), { status: 'running', running: true });

    assert.deepEqual(await within(qmp.execute('stop'), 'stop'), {});
    await within(qmp.nextEvent('STOP'), 'STOP after stop');
    assert.deepEqual(await queryStatus(qmp), { status: 'paused', running: false });

    assert.deepEqual(await within(qmp.execute('cont'), 'cont'), {});
    await within(qmp.nextEvent('RESUME'), 'RESUME after the second cont');
    assert.deepEqual(await queryStatus(qmp), { status: 'running', running: true });
    assert.deepEqual(qmp.pendingEvents(), [], 'no other event so far');

    assert.deepEqual(await within(qmp.execute('quit'), 'quit'), {});
    await expectShutdownOnly(qmp, 'host-qmp-quit');
    const exit = await vm.waitExit(SHUTDOWN_MS);
    assert.deepEqual(exit, { code: 0, signal: null }, vm.stderr);
    assert.equal(existsSync(sock), false, 'the QMP socket file is removed');
  });

  test('SIGTERM shuts down cleanly: SHUTDOWN reason host-signal, exit 0', {
    timeout: 90_000,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const sock = join(scope.tempDir(), 'qmp.sock');
    const vm = scope.start([...qmpArg(sock), '-serial', 'none', '-smp', '1']);
    const qmp = await scope.connect(sock, vm);
    await negotiate(qmp);
    await waitRunning(qmp);

    vm.signal('SIGTERM');
    await expectShutdownOnly(qmp, 'host-signal');
    const exit = await vm.waitExit(SHUTDOWN_MS);
    assert.deepEqual(exit, { code: 0, signal: null }, vm.stderr);
    assert.equal(existsSync(sock), false, 'the QMP socket file is removed');
  });
});

/** One parsed trace record. */
interface TraceRecord {
  pid: number;
  seconds: number;
  event: string;
  fields: Record<string, string>;
  thread: string;
}

const TRACE_LINE = /^(\d+)@(\d+)\.(\d{6}):([a-z0-9_]+)((?: [a-z_]+=\S*)*) thread=([a-z0-9_-]+)$/;

/** Parses a -D trace file, insisting every line has the documented format. */
function parseTrace(text: string): TraceRecord[] {
  assert.ok(text.endsWith('\n'), 'the trace ends with a whole line');
  return text
    .slice(0, -1)
    .split('\n')
    .map((line) => {
      const m = TRACE_LINE.exec(line);
      assert.ok(
        m,
        `trace line format <pid>@<sec>.<usec>:<event> key=value ... thread=<name>: ${line}`,
      );
      const body = traceBody(line);
      const [event, ...pairs] = body.split(' ');
      assert.equal(event, m[4]);
      const fields: Record<string, string> = {};
      for (const pair of pairs) {
        const eq = pair.indexOf('=');
        fields[pair.slice(0, eq)] = pair.slice(eq + 1);
      }
      return {
        pid: Number(m[1]),
        seconds: Number(m[2]),
        event: event!,
        fields,
        thread: m[6]!,
      };
    });
}

function isIoctl(r: TraceRecord, kind: 'kvm_vm_ioctl' | 'kvm_vcpu_ioctl', type: string): boolean {
  return r.event === kind && r.fields.type === type;
}

function count(records: readonly TraceRecord[], pred: (r: TraceRecord) => boolean): number {
  return records.filter(pred).length;
}

/** Exactly one kvmclock_ctrl and one KVM_KVMCLOCK_CTRL per vCPU, each on that vCPU's thread. */
function assertCtrlPerVcpu(
  segment: readonly TraceRecord[],
  cpus: number,
  what: string,
  expectRet?: string,
): void {
  const ctrl = segment.filter((r) => r.event === 'kvmclock_ctrl');
  assert.deepEqual(
    ctrl.map((r) => Number(r.fields.cpu)).sort((a, b) => a - b),
    Array.from({ length: cpus }, (_, i) => i),
    `${what}: one kvmclock_ctrl per vCPU`,
  );
  for (const r of ctrl) {
    assert.equal(r.thread, `vcpu${r.fields.cpu}`, `${what}: kvmclock_ctrl on its vCPU's thread`);
    if (expectRet !== undefined)
      assert.equal(r.fields.ret, expectRet, `${what}: kvmclock_ctrl ret`);
  }
  const ioctls = segment.filter((r) => isIoctl(r, 'kvm_vcpu_ioctl', 'KVM_KVMCLOCK_CTRL'));
  assert.deepEqual(
    ioctls.map((r) => Number(r.fields.cpu)).sort((a, b) => a - b),
    Array.from({ length: cpus }, (_, i) => i),
    `${what}: one KVM_KVMCLOCK_CTRL ioctl per vCPU`,
  );
  for (const r of ioctls) assert.equal(r.thread, `vcpu${r.fields.cpu}`);
}

/** Reads the serial file and parses the probe's complete lines. */
function probeLines(path: string): ProbeLine[] {
  return existsSync(path) ? parseProbeOutput(readFileSync(path, 'utf8')) : [];
}

/** Waits until every vCPU printed `ready` and at least `ticks` tick lines. */
async function waitForTicks(serial: string, cpus: number, ticks: number, from = 0): Promise<void> {
  await waitFor(`${ticks} ticks from each of ${cpus} vCPUs`, () => {
    const lines = probeLines(serial).slice(from);
    for (let cpu = 0; cpu < cpus; cpu++) {
      if (from === 0 && !lines.some((l) => l.cpu === cpu && l.event === 'ready')) return false;
      if (lines.filter((l) => l.cpu === cpu && l.event === 'tick').length < ticks) return false;
    }
    return true;
  });
}

for (const cpus of [1, 2, 4]) {
  test(`the seed's trace with -smp ${cpus}: start, stop, cont, quit`, {
    timeout: 120_000,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const dir = scope.tempDir();
    const sock = join(dir, 'qmp.sock');
    const traceFile = join(dir, 'trace.log');
    const serial = join(dir, 'serial.out');
    const startedAt = Math.floor(Date.now() / 1000);
    const vm = scope.start([
      '-trace',
      'kvmclock_*',
      '-trace',
      'kvm_vm_ioctl',
      '-trace',
      'kvm_vcpu_ioctl',
      '-D',
      traceFile,
      '-serial',
      `file:${serial}`,
      ...qmpArg(sock),
      '-smp',
      String(cpus),
    ]);
    const qmp = await scope.connect(sock, vm);
    await negotiate(qmp);
    await waitRunning(qmp);
    // The guest runs and has enabled kvmclock on every vCPU.
    await waitForTicks(serial, cpus, 1);

    await within(qmp.execute('stop'), 'stop');
    await within(qmp.nextEvent('STOP'), 'STOP');
    await within(qmp.execute('cont'), 'cont');
    await within(qmp.nextEvent('RESUME'), 'RESUME');
    await within(qmp.execute('quit'), 'quit');
    await expectShutdownOnly(qmp, 'host-qmp-quit');
    const exit = await vm.waitExit(SHUTDOWN_MS);
    assert.deepEqual(exit, { code: 0, signal: null }, vm.stderr);

    const records = parseTrace(readFileSync(traceFile, 'utf8'));
    const endedAt = Math.ceil(Date.now() / 1000);
    for (const r of records) {
      assert.equal(r.pid, vm.pid, 'records carry the tsvmm pid');
      assert.ok(r.seconds >= startedAt - 1 && r.seconds <= endedAt + 1, 'wall-clock seconds');
      assert.match(r.thread, /^(main|vcpu\d+)$/);
      assert.ok(!isIoctl(r, 'kvm_vcpu_ioctl', 'KVM_RUN'), 'KVM_RUN is never traced');
    }

    // The change-state handler: start, stop, cont, quit, all on the main thread.
    const changes = records
      .map((r, i) => ({ r, i }))
      .filter(({ r }) => r.event === 'kvmclock_vm_state_change');
    assert.deepEqual(
      changes.map(
        ({ r }) => `running=${r.fields.running} state=${r.fields.state} thread=${r.thread}`,
      ),
      [
        'running=1 state=running thread=main',
        'running=0 state=paused thread=main',
        'running=1 state=running thread=main',
        'running=0 state=shutdown thread=main',
      ],
    );
    const cut = changes.map(({ i }) => i);
    const realize = records.slice(0, cut[0]);
    const [start, stop, cont, shutdown] = [0, 1, 2, 3].map((k) =>
      records.slice(cut[k]! + 1, cut[k + 1] ?? records.length),
    ) as [TraceRecord[], TraceRecord[], TraceRecord[], TraceRecord[]];
    const getClock = (r: TraceRecord) => isIoctl(r, 'kvm_vm_ioctl', 'KVM_GET_CLOCK');
    const setClock = (r: TraceRecord) => isIoctl(r, 'kvm_vm_ioctl', 'KVM_SET_CLOCK');

    // realize reads the clock once; nothing kvmclock does before the start.
    assert.equal(count(realize, getClock), 1, 'realize: one KVM_GET_CLOCK');
    assert.equal(count(realize, setClock), 0);
    assert.equal(
      count(realize, (r) => r.event === 'kvmclock_ctrl'),
      0,
    );

    // Start: SET_CLOCK, then KVMCLOCK_CTRL once per vCPU on its own thread
    // (EINVAL is fine here: the guest has not enabled kvmclock yet).
    assert.equal(count(start, setClock), 1, 'start: one KVM_SET_CLOCK');
    assert.equal(count(start, getClock), 0, 'start: no KVM_GET_CLOCK');
    assert.ok(start.filter(setClock).every((r) => r.thread === 'main' && r.fields.ret === '0'));
    assertCtrlPerVcpu(start, cpus, 'start');

    // stop: exactly one GET_CLOCK, nothing else of kvmclock's.
    assert.equal(count(stop, getClock), 1, 'stop: one KVM_GET_CLOCK');
    assert.ok(stop.filter(getClock).every((r) => r.thread === 'main' && r.fields.ret === '0'));
    assert.equal(count(stop, setClock), 0, 'stop: no KVM_SET_CLOCK');
    assert.equal(
      count(stop, (r) => r.event === 'kvmclock_ctrl'),
      0,
      'stop: no kvmclock_ctrl',
    );

    // cont: exactly one SET_CLOCK, then KVMCLOCK_CTRL per vCPU, which now
    // succeeds: every vCPU has enabled kvmclock.
    assert.equal(count(cont, setClock), 1, 'cont: one KVM_SET_CLOCK');
    assert.equal(count(cont, getClock), 0, 'cont: no KVM_GET_CLOCK');
    assertCtrlPerVcpu(cont, cpus, 'cont', '0');
    for (const r of cont.filter((x) => isIoctl(x, 'kvm_vcpu_ioctl', 'KVM_KVMCLOCK_CTRL'))) {
      assert.equal(r.fields.ret, '0', `cont: KVM_KVMCLOCK_CTRL on vCPU ${r.fields.cpu}`);
    }

    // quit: the clock is saved once more and the VM is not started again.
    assert.equal(count(shutdown, getClock), 1, 'quit: one KVM_GET_CLOCK');
    assert.equal(count(shutdown, setClock), 0);
    assert.equal(
      count(shutdown, (r) => r.event === 'kvmclock_ctrl'),
      0,
    );
  });
}

/**
 * Starts a -smp `cpus` VM whose serial port goes to a file, stops it for
 * `pauseMs`, resumes it and waits for two more ticks per vCPU. Returns the
 * probe's lines and the index of the first line printed after the resume.
 */
async function stopAndResume(
  t: TestContext,
  cpus: number,
  pauseMs: number,
  extraArgs: readonly string[],
): Promise<{ lines: ProbeLine[]; resumedAt: number; quit: () => Promise<void> }> {
  const scope = new Scope(t);
  const dir = scope.tempDir();
  const sock = join(dir, 'qmp.sock');
  const serial = join(dir, 'serial.out');
  const vm = scope.start([
    ...qmpArg(sock),
    '-serial',
    `file:${serial}`,
    '-smp',
    String(cpus),
    ...extraArgs,
  ]);
  const qmp = await scope.connect(sock, vm);
  await negotiate(qmp);
  await waitRunning(qmp);
  await waitForTicks(serial, cpus, 3);

  await within(qmp.execute('stop'), 'stop');
  await within(qmp.nextEvent('STOP'), 'STOP');
  // Every vCPU has left KVM_RUN and its last line is written: nothing comes until cont.
  const resumedAt = probeLines(serial).length;
  await sleep(pauseMs);
  assert.equal(probeLines(serial).length, resumedAt, 'the guest printed nothing while stopped');
  await within(qmp.execute('cont'), 'cont');
  await within(qmp.nextEvent('RESUME'), 'RESUME');
  await waitForTicks(serial, cpus, 2, resumedAt);

  return {
    lines: probeLines(serial),
    resumedAt,
    quit: async () => {
      await within(qmp.execute('quit'), 'quit');
      await expectShutdownOnly(qmp, 'host-qmp-quit');
      const exit = await vm.waitExit(SHUTDOWN_MS);
      assert.deepEqual(exit, { code: 0, signal: null }, vm.stderr);
    },
  };
}

/** The first tick after the resume is at most one tick interval (+1 ms) past the last one before the stop. */
function assertClockFrozen(lines: readonly ProbeLine[], resumedAt: number, cpus: number): void {
  const tolerance = DEFAULT_TICK_NS + 1_000_000n;
  for (let cpu = 0; cpu < cpus; cpu++) {
    const before = lines.slice(0, resumedAt).filter((l) => l.cpu === cpu && l.event === 'tick');
    const after = lines.slice(resumedAt).filter((l) => l.cpu === cpu && l.event === 'tick');
    assert.ok(before.length > 0 && after.length > 0, `vCPU ${cpu} ticked before and after`);
    const last = before[before.length - 1]!.fields.ns!;
    const next = after[0]!.fields.ns!;
    assert.ok(next > last, `vCPU ${cpu}: kvmclock went on from ${last} (got ${next})`);
    assert.ok(
      next - last < tolerance,
      `vCPU ${cpu}: kvmclock advanced ${next - last} ns across the stop; at most ${tolerance} expected (the clock must not run while stopped)`,
    );
  }
}

test('the guest kvmclock does not advance across a 2 s stop; every vCPU sees GUEST_STOPPED', {
  timeout: 120_000,
}, async (t) => {
  if (!requireKvm(t)) return;
  const cpus = 2;
  const { lines, resumedAt, quit } = await stopAndResume(t, cpus, 2_000, []);
  assert.deepEqual(
    lines.filter((l) => l.event === 'backwards'),
    [],
    'the guest never saw its clock go backwards',
  );
  assertClockFrozen(lines, resumedAt, cpus);
  for (let cpu = 0; cpu < cpus; cpu++) {
    assert.ok(
      lines.slice(resumedAt).some((l) => l.cpu === cpu && l.event === 'stopped'),
      `vCPU ${cpu} printed 'stopped' after the resume (KVM_KVMCLOCK_CTRL set PVCLOCK_GUEST_STOPPED)`,
    );
  }
  await quit();
});

test('with -x-no-kvmclock-ctrl the guest never sees GUEST_STOPPED', {
  timeout: 120_000,
}, async (t) => {
  if (!requireKvm(t)) return;
  const cpus = 2;
  const { lines, resumedAt, quit } = await stopAndResume(t, cpus, 1_000, ['-x-no-kvmclock-ctrl']);
  assert.deepEqual(
    lines.filter((l) => l.event === 'stopped'),
    [],
    "no 'stopped' line ever",
  );
  assert.deepEqual(
    lines.filter((l) => l.event === 'backwards'),
    [],
  );
  // Without KVMCLOCK_CTRL the clock is still saved and restored.
  assertClockFrozen(lines, resumedAt, cpus);
  await quit();
});
