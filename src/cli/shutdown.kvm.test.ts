// tsvmm ends soon after SIGTERM, SIGINT, SIGHUP or `quit`, whatever it is
// doing: in every run state it can reach (prelaunch, running, paused,
// inmigrate, postmigrate, internal-error), with a vCPU blocked in KVM_RUN,
// a vCPU the guest made fail, a dead stdout, or QMP clients that hang. And
// when even that fails (a vCPU that cannot be kicked out of KVM_RUN), a
// second signal or the deadline still ends it.
//
// Each case runs a real tsvmm process and a real guest on /dev/kvm, and
// checks the exit status and that the process was gone within 2 s of the
// request (a bound, as the issue requires; the time is also printed).
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { syntheticElf } from '../hw/i386/boot/synthetic-kernels.js';
import { isJsonObject } from '../monitor/json-value.js';
import type { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';
import { waitFor } from '../test-support/machine.js';
import { scaled } from '../test-support/time-scale.js';
import {
  type Exit,
  ProcessScope,
  type TsvmmProcess,
  within,
} from '../test-support/tsvmm-process.js';

/**
 * The bound: tsvmm is gone this long after the request. 2 s on a KVM host;
 * under emulation it stretches with the time scale, as does tsvmm's own
 * forced-exit deadline (test-support/tsvmm-process.ts passes
 * -x-shutdown-deadline there).
 */
const EXIT_BOUND_MS = scaled(2_000);
/** How long a QMP exchange or a state change may take (the VM runner is slow). */
const STEP_MS = 60_000;
/** tsvmm's start-up in the VM runner can take half a minute on a loaded machine. */
const START_MS = 240_000;
const TEST_TIMEOUT = 600_000;

/** Physical address the test guests are linked at (1 MiB, as a kernel). */
const LOAD_AT = 0x100000;

/**
 * A guest whose only CPU disables interrupts and halts for good: with the
 * in-kernel irqchip, its vCPU thread stays inside KVM_RUN (the kernel's
 * halt wait) and only a kick brings it out.
 */
function haltForeverElf(): Uint8Array {
  // cli; 1: hlt; jmp 1b
  const code = Uint8Array.from([0xfa, 0xf4, 0xeb, 0xfd]);
  return syntheticElf({ segments: [{ paddr: LOAD_AT, data: code }], entry: BigInt(LOAD_AT) });
}

/**
 * A guest that jumps to 3 GiB: inside the boot identity map, but in the
 * PCI hole, where no memory is. Fetching an instruction there is an MMIO
 * access KVM cannot emulate: KVM_RUN returns KVM_EXIT_INTERNAL_ERROR
 * (emulation failure), and the VM goes to internal-error as QEMU's does.
 */
function jumpIntoNoMemoryElf(): Uint8Array {
  // movabs rax, 0xc0000000; jmp rax
  const code = Uint8Array.from([
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x00, 0x00, 0xff, 0xe0,
  ]);
  return syntheticElf({ segments: [{ paddr: LOAD_AT, data: code }], entry: BigInt(LOAD_AT) });
}

/** One started VM with its QMP client, negotiated. */
interface Started {
  scope: ProcessScope;
  dir: string;
  sock: string;
  vm: TsvmmProcess;
  qmp: QmpClient;
}

/** Starts tsvmm with a QMP socket and `args`, and negotiates QMP. */
async function start(t: TestContext, args: readonly string[]): Promise<Started> {
  const scope = new ProcessScope(t);
  const dir = scope.tempDir('tsvmm-sd-');
  const sock = join(dir, 'qmp.sock');
  const vm = scope.start(['-qmp', `unix:${sock},server=on,wait=off`, '-m', '128M', ...args]);
  const qmp = await scope.connect(sock, vm, START_MS);
  await within(qmp.greeting(), 'the QMP greeting', STEP_MS);
  assert.deepEqual(await within(qmp.execute('qmp_capabilities'), 'negotiation', STEP_MS), {});
  return { scope, dir, sock, vm, qmp };
}

/** Writes a test guest into `dir` and returns its path. */
function guestFile(dir: string, name: string, image: Uint8Array): string {
  const path = join(dir, name);
  writeFileSync(path, image);
  return path;
}

async function status(qmp: QmpClient): Promise<string> {
  const r = await within(qmp.execute('query-status'), 'query-status', STEP_MS);
  assert.ok(isJsonObject(r));
  return r.status as string;
}

async function waitStatus(qmp: QmpClient, want: string): Promise<void> {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const now = await status(qmp);
    if (now === want) return;
    if (Date.now() > deadline) throw new Error(`run state still ${now}, not ${want}`);
    await sleep(20);
  }
}

/**
 * Does `request` (send a signal, say quit) and waits for the process to
 * end: returns its exit and how long after the request it was gone. Fails
 * (after killing it by pid) if it is still there after 10 s.
 */
async function endAfter(
  what: string,
  vm: TsvmmProcess,
  request: () => void,
): Promise<Exit & { ms: number }> {
  const gone = vm.processExit();
  const t0 = performance.now();
  request();
  const exit = await within(gone, `tsvmm to end after ${what}`, 10_000).catch(async (err) => {
    await vm.kill();
    throw new Error(`${(err as Error).message}\nstderr:\n${vm.stderr}`);
  });
  const ms = Math.round(performance.now() - t0);
  // The figure for the report; the assertion is on the bound only.
  process.stdout.write(`# ${what}: exit ${exit.code ?? exit.signal} after ${ms} ms\n`);
  return { ...exit, ms };
}

/** The reply to a command sent in endAfter, or a failure that shows tsvmm's stderr. */
async function answer(reply: Promise<unknown> | undefined, vm: TsvmmProcess): Promise<unknown> {
  try {
    return await reply;
  } catch (err) {
    throw new Error(
      `no reply (${(err as Error).message}); exit ${vm.child.exitCode}, stderr:\n${vm.stderr}`,
    );
  }
}

function assertEndedInTime(r: Exit & { ms: number }, code: number, vm: TsvmmProcess): void {
  assert.deepEqual({ code: r.code, signal: r.signal }, { code, signal: null }, vm.stderr);
  assert.ok(
    r.ms <= EXIT_BOUND_MS,
    `gone ${r.ms} ms after the request; the bound is ${EXIT_BOUND_MS} ms`,
  );
}

for (const [state, signal, extra] of [
  ['prelaunch', 'SIGTERM', ['-S']],
  ['running', 'SIGINT', []],
  ['running', 'SIGHUP', []],
  ['inmigrate', 'SIGTERM', ['-incoming', 'defer']],
] as const) {
  test(`${signal} in ${state} ends tsvmm with status 0`, { timeout: TEST_TIMEOUT }, async (t) => {
    if (!requireKvm(t)) return;
    const { vm, qmp } = await start(t, ['-smp', '2', '-serial', 'none', ...extra]);
    await waitStatus(qmp, state);
    const r = await endAfter(`${signal} in ${state}`, vm, () => vm.signal(signal));
    assertEndedInTime(r, 0, vm);
    assert.match(vm.stderr, new RegExp(`terminating on signal ${signal}`));
  });
}

test('SIGTERM in paused (after stop) ends tsvmm with status 0', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp } = await start(t, ['-smp', '2', '-serial', 'none']);
  await waitStatus(qmp, 'running');
  await within(qmp.execute('stop'), 'stop', STEP_MS);
  await waitStatus(qmp, 'paused');
  assertEndedInTime(await endAfter('SIGTERM in paused', vm, () => vm.signal('SIGTERM')), 0, vm);
});

test('SIGTERM in postmigrate (after migrate to a file) ends tsvmm with status 0', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp, dir } = await start(t, ['-smp', '2', '-serial', 'none']);
  await waitStatus(qmp, 'running');
  // From paused the save is one pass: quick even in a slow VM runner.
  await within(qmp.execute('stop'), 'stop', STEP_MS);
  await waitStatus(qmp, 'paused');
  await within(
    qmp.execute('migrate', { uri: `file:${join(dir, 'vm.state')}` }),
    'migrate',
    STEP_MS,
  );
  await waitStatus(qmp, 'postmigrate');
  assertEndedInTime(
    await endAfter('SIGTERM in postmigrate', vm, () => vm.signal('SIGTERM')),
    0,
    vm,
  );
});

test('quit while running: the reply, then SHUTDOWN, then exit 0', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp } = await start(t, ['-smp', '2', '-serial', 'none']);
  await waitStatus(qmp, 'running');
  let reply: Promise<unknown> | undefined;
  const r = await endAfter('quit in running', vm, () => {
    reply = qmp.execute('quit');
  });
  assert.deepEqual(await answer(reply, vm), {});
  await within(qmp.closed(), 'the QMP connection to close', STEP_MS);
  assert.deepEqual(
    qmp.pendingEvents().map((e) => e.event),
    ['SHUTDOWN'],
  );
  assertEndedInTime(r, 0, vm);
});

test('a vCPU halted inside KVM_RUN is kicked out: SIGTERM ends tsvmm with status 0', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const scope = new ProcessScope(t);
  const kernel = guestFile(scope.tempDir('tsvmm-sd-'), 'halt.elf', haltForeverElf());
  const { vm, qmp } = await start(t, ['-smp', '2', '-serial', 'none', '-kernel', kernel]);
  await waitStatus(qmp, 'running');
  // Give the guest time to reach its hlt (and vCPU 1 to wait for its SIPI).
  await sleep(500);
  assert.equal(await status(qmp), 'running');
  assertEndedInTime(
    await endAfter('SIGTERM, vCPUs in KVM_RUN', vm, () => vm.signal('SIGTERM')),
    0,
    vm,
  );
});

/** Starts the guest that makes vCPU 0 fail, and waits for internal-error. */
async function startInternalError(t: TestContext): Promise<Started> {
  const scope = new ProcessScope(t);
  const kernel = guestFile(scope.tempDir('tsvmm-sd-'), 'jump.elf', jumpIntoNoMemoryElf());
  // -smp 2: vCPU 1 sits in KVM_RUN waiting for a SIPI that never comes.
  // -S, then cont once QMP is connected: the guest fails in its first
  // instruction, and on a fast host (PVM) that came before the client
  // connected, which then never saw the STOP event.
  const started = await start(t, ['-S', '-smp', '2', '-serial', 'none', '-kernel', kernel]);
  await within(started.qmp.execute('cont'), 'cont', STEP_MS);
  await waitStatus(started.qmp, 'internal-error');
  await within(started.qmp.nextEvent('RESUME'), 'RESUME from cont', STEP_MS);
  await within(started.qmp.nextEvent('STOP'), 'STOP on the failure', STEP_MS);
  await waitFor('the failure reported', () => /vCPU 0: KVM internal error/.test(started.vm.stderr));
  return started;
}

test('internal-error for real (an instruction fetch from no memory): stop, cont and quit answer as QEMU does', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp } = await startInternalError(t);
  assert.match(vm.stderr, /Suberror: 1\n/, 'KVM reports an emulation failure');

  // QEMU's stop outside running does nothing and succeeds: no STOP, state kept.
  assert.deepEqual(await within(qmp.execute('stop'), 'stop', STEP_MS), {});
  assert.equal(await status(qmp), 'internal-error');
  // cont is refused until a reset.
  const cont = await within(qmp.request('cont'), 'cont', STEP_MS);
  assert.deepEqual(cont.error, {
    class: 'GenericError',
    desc: 'Resetting the Virtual Machine is required',
  });

  let reply: Promise<unknown> | undefined;
  const r = await endAfter('quit in internal-error', vm, () => {
    reply = qmp.execute('quit');
  });
  assert.deepEqual(await answer(reply, vm), {});
  await within(qmp.closed(), 'the QMP connection to close', STEP_MS);
  const events = qmp.pendingEvents();
  assert.deepEqual(
    events.map((e) => e.event),
    ['SHUTDOWN'],
    'no STOP from stop or quit; one SHUTDOWN',
  );
  assert.deepEqual(events[0]!.data, { guest: false, reason: 'host-qmp-quit' });
  assertEndedInTime(r, 0, vm);
});

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
  test(`${signal} in internal-error ends tsvmm with status 0`, {
    timeout: TEST_TIMEOUT,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const { vm } = await startInternalError(t);
    assertEndedInTime(
      await endAfter(`${signal} in internal-error`, vm, () => vm.signal(signal)),
      0,
      vm,
    );
  });
}

test('a dead stdout (the reader of -trace output went away) neither spins nor keeps SIGTERM from ending tsvmm', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  // As `tsvmm -trace 'kvm*' | head -40`: the probe's console and the trace
  // both go to pipes whose reader stops after 40 lines and closes them.
  const scope = new ProcessScope(t);
  const vm = scope.start(['-smp', '2', '-m', '128M', '-serial', 'stdio', '-trace', 'kvm*']);
  await waitFor('40 lines of output', () => vm.stdout.split('\n').length > 40, START_MS);
  vm.child.stdout!.destroy();
  vm.child.stderr!.destroy();
  // The guest and the tracer go on writing into the closed pipes meanwhile.
  await sleep(1_000);
  assert.equal(vm.exited, false, 'a closed stdout does not end tsvmm by itself');
  const r = await endAfter('SIGTERM with a dead stdout', vm, () => vm.signal('SIGTERM'));
  assertEndedInTime(r, 0, vm);
});

/** QMP clients that never read, and one stopped halfway through a command. */
async function hangClients(sock: string, scope: ProcessScope): Promise<void> {
  const sockets: Socket[] = [];
  scope.onClose(() => {
    for (const s of sockets) s.destroy();
  });
  const open = () =>
    new Promise<Socket>((resolve, reject) => {
      const s = connect(sock, () => resolve(s));
      s.once('error', reject);
      sockets.push(s);
    });
  // Negotiates, then asks for far more replies than the socket buffers
  // hold, and reads none of them.
  const flooder = await open();
  flooder.pause();
  flooder.write(
    `{"execute":"qmp_capabilities"}\r\n${'{"execute":"query-status"}\r\n'.repeat(20_000)}`,
  );
  // Sends half a command and nothing more.
  const half = await open();
  half.pause();
  half.write('{"execute": "qmp_capa');
  await sleep(500);
}

test('QMP clients that never read or stop mid-command do not hold up SIGTERM', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp, sock, scope } = await start(t, ['-smp', '2', '-serial', 'none']);
  await waitStatus(qmp, 'running');
  await hangClients(sock, scope);
  assertEndedInTime(
    await endAfter('SIGTERM with hung QMP clients', vm, () => vm.signal('SIGTERM')),
    0,
    vm,
  );
});

test('QMP clients that never read or stop mid-command do not hold up quit from another', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm, qmp, sock, scope } = await start(t, ['-smp', '2', '-serial', 'none']);
  await waitStatus(qmp, 'running');
  await hangClients(sock, scope);
  let reply: Promise<unknown> | undefined;
  const r = await endAfter('quit with hung QMP clients', vm, () => {
    reply = qmp.execute('quit');
  });
  assert.deepEqual(await answer(reply, vm), {});
  assertEndedInTime(r, 0, vm);
});

/** The halting guest with vCPUs that ignore kicks: the clean shutdown cannot pause them. */
async function startUnkickable(t: TestContext): Promise<Started> {
  const scope = new ProcessScope(t);
  const kernel = guestFile(scope.tempDir('tsvmm-sd-'), 'halt.elf', haltForeverElf());
  const started = await start(t, [
    '-smp',
    '2',
    '-serial',
    'none',
    '-kernel',
    kernel,
    '-x-vcpu-ignores-kicks',
  ]);
  await waitStatus(started.qmp, 'running');
  await sleep(500);
  return started;
}

test('vCPUs that cannot be kicked out of KVM_RUN: a second signal forces the exit at once', {
  timeout: TEST_TIMEOUT,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { vm } = await startUnkickable(t);
  const r = await endAfter('SIGTERM then SIGINT, unkickable vCPUs', vm, () => {
    vm.signal('SIGTERM');
    // At once: where the fault cannot hold a vCPU in KVM_RUN (nested KVM)
    // a clean shutdown can finish within 200 ms, before a later signal.
    setTimeout(() => vm.signal('SIGINT'), 10);
  });
  assertEndedInTime(r, 1, vm);
  assert.match(vm.stderr, /SIGINT again while shutting down; exiting now/);
  assert.ok(r.ms < 1_500, `the second signal, not the deadline, ended it (${r.ms} ms)`);
});
