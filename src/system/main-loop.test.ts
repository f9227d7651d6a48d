import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { test } from 'node:test';
import { eventually } from '../test-support/eventually.js';
import { captureTrace, traceBody } from '../trace/capture.js';
import { VmLifecycle } from './cpus.js';
import {
  BottomHalf,
  installSignalHandlers,
  MainLoop,
  runUntilShutdown,
  SHUTDOWN_SIGNALS,
} from './main-loop.js';
import { RecordingCpus } from './recording-cpus.js';
import { RunStateMachine } from './runstate.js';

const turn = () => new Promise<void>((r) => setImmediate(r));

function runningVm() {
  const log: string[] = [];
  const cpus = new RecordingCpus(2, log);
  cpus.paused = false;
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine('running') });
  vm.notifiers.add({
    callback: (running, state) => void log.push(`notify ${running ? 1 : 0} ${state}`),
  });
  vm.events.on('STOP', () => log.push('STOP'));
  vm.events.on('SHUTDOWN', (d) => log.push(`SHUTDOWN guest=${d.guest} reason=${d.reason}`));
  vm.events.on('RESET', (d) => log.push(`RESET guest=${d.guest} reason=${d.reason}`));
  return { vm, log };
}

test('a bottom half runs once however often it was scheduled before running', async () => {
  let runs = 0;
  const bh = new BottomHalf('count', () => {
    runs++;
  });
  bh.schedule();
  bh.schedule();
  bh.schedule();
  assert.equal(bh.scheduled, true);
  await turn();
  assert.equal(runs, 1);
  assert.equal(bh.scheduled, false);
  bh.schedule();
  await turn();
  assert.equal(runs, 2);
});

test('bottom halves run in the order they were scheduled', async () => {
  const order: string[] = [];
  const a = new BottomHalf('a', () => void order.push('a'));
  const b = new BottomHalf('b', () => void order.push('b'));
  const c = new BottomHalf('c', () => void order.push('c'));
  b.schedule();
  c.schedule();
  a.schedule();
  await turn();
  assert.deepEqual(order, ['b', 'c', 'a']);
});

test('a cancelled bottom half does not run; one rescheduling itself runs again on a later turn', async () => {
  let cancelled = 0;
  const bh = new BottomHalf('cancelled', () => {
    cancelled++;
  });
  bh.schedule();
  bh.cancel();
  let again = 0;
  const self: BottomHalf = new BottomHalf('again', () => {
    if (++again < 3) self.schedule();
  });
  self.schedule();
  await turn();
  assert.equal(again, 1, 'a bottom half scheduled from its own callback waits for the next turn');
  await turn();
  await turn();
  assert.equal(again, 3);
  assert.equal(cancelled, 0);
});

test('bottom halves are traced when scheduled and when run', async () => {
  const lines = await captureTrace(['bh_*'], async () => {
    new BottomHalf('process_incoming_migration_bh', () => {}).schedule();
    await turn();
  });
  assert.deepEqual(lines.map(traceBody), [
    'bh_schedule name=process_incoming_migration_bh',
    'bh_run name=process_incoming_migration_bh',
  ]);
});

test('a signal requests a clean shutdown: SHUTDOWN host-signal, vmShutdown, no STOP, exit status 0', async () => {
  const { vm, log } = runningVm();
  const messages: string[] = [];
  const loop = new MainLoop({ lifecycle: vm, log: (m) => messages.push(m) });
  const signals = new EventEmitter();
  const uninstall = installSignalHandlers(loop, signals);
  for (const s of SHUTDOWN_SIGNALS) assert.equal(signals.listenerCount(s), 1);
  const status = runUntilShutdown(loop, vm, () => void log.push('cleanup'));
  await turn();
  signals.emit('SIGINT', 'SIGINT');
  assert.equal(await status, 0);
  assert.deepEqual(log, [
    'SHUTDOWN guest=false reason=host-signal',
    'pauseAll',
    'notify 0 shutdown',
    'cleanup',
  ]);
  assert.deepEqual(messages, ['terminating on signal SIGINT']);
  assert.equal(vm.runstate.current, 'shutdown');
  uninstall();
  for (const s of SHUTDOWN_SIGNALS) assert.equal(signals.listenerCount(s), 0);
});

test('a real SIGHUP sent to this process is turned into a clean shutdown', async () => {
  const { vm, log } = runningVm();
  const loop = new MainLoop({ lifecycle: vm, log: () => {} });
  const uninstall = installSignalHandlers(loop);
  try {
    const status = runUntilShutdown(loop, vm);
    process.kill(process.pid, 'SIGHUP');
    assert.equal(await status, 0);
    assert.deepEqual(log, [
      'SHUTDOWN guest=false reason=host-signal',
      'pauseAll',
      'notify 0 shutdown',
    ]);
  } finally {
    uninstall();
  }
});

test('a shutdown requested before the loop runs is carried out when it runs', async () => {
  const { vm, log } = runningVm();
  const loop = new MainLoop({ lifecycle: vm });
  loop.requestShutdown('host-qmp-quit');
  loop.requestShutdown('host-signal');
  assert.equal(await runUntilShutdown(loop, vm), 0);
  assert.deepEqual(log, [
    'SHUTDOWN guest=false reason=host-qmp-quit',
    'pauseAll',
    'notify 0 shutdown',
  ]);
});

test('under -no-shutdown a guest shutdown stops the VM and the loop goes on', async () => {
  const { vm, log } = runningVm();
  const loop = new MainLoop({ lifecycle: vm, noShutdown: true, log: () => {} });
  const status = runUntilShutdown(loop, vm);
  loop.requestShutdown('guest-shutdown');
  await eventually(() => {
    assert.equal(vm.runstate.current, 'shutdown');
    assert.deepEqual(log, [
      'SHUTDOWN guest=true reason=guest-shutdown',
      'pauseAll',
      'notify 0 shutdown',
      'STOP',
    ]);
  });
  loop.requestShutdown('host-signal', 'SIGTERM');
  assert.equal(await status, 0);
  assert.equal(log.at(-1), 'SHUTDOWN guest=false reason=host-signal');
});

test('a reset request resets the machine on the main loop; -no-reboot turns a guest reset into a shutdown', async () => {
  const a = runningVm();
  const loop = new MainLoop({ lifecycle: a.vm });
  const status = runUntilShutdown(loop, a.vm);
  loop.requestReset('guest-reset');
  await eventually(() =>
    assert.deepEqual(a.log, [
      'pauseAll',
      'synchronizeState',
      'RESET guest=true reason=guest-reset',
      'resumeAll',
    ]),
  );
  loop.requestShutdown('host-qmp-quit');
  assert.equal(await status, 0);

  const b = runningVm();
  const noReboot = new MainLoop({ lifecycle: b.vm, noReboot: true });
  noReboot.requestReset('guest-reset');
  assert.equal(await runUntilShutdown(noReboot, b.vm), 0);
  assert.deepEqual(b.log, [
    'SHUTDOWN guest=true reason=guest-reset',
    'pauseAll',
    'notify 0 shutdown',
  ]);
});

test('a vmstop request stops the VM from the main loop', async () => {
  const { vm, log } = runningVm();
  const loop = new MainLoop({ lifecycle: vm });
  const status = runUntilShutdown(loop, vm);
  loop.requestVmStop('internal-error');
  await eventually(() => {
    assert.equal(vm.runstate.current, 'internal-error');
    assert.deepEqual(log, ['pauseAll', 'notify 0 internal-error', 'STOP']);
  });
  loop.requestShutdown('host-qmp-quit');
  assert.equal(await status, 0);
});

test('a failing bottom half ends the loop with exit status 1 after a clean VM stop', async () => {
  const { vm, log } = runningVm();
  const messages: string[] = [];
  const loop = new MainLoop({ lifecycle: vm, log: (m) => messages.push(m) });
  const status = runUntilShutdown(loop, vm);
  loop
    .newBottomHalf('broken', () => {
      throw new Error('device model bug');
    })
    .schedule();
  assert.equal(await status, 1);
  assert.deepEqual(log, ['pauseAll', 'notify 0 shutdown']);
  assert.match(messages[0]!, /device model bug/);
});

test('a failing cleanup makes the exit status 1', async () => {
  const { vm } = runningVm();
  const loop = new MainLoop({ lifecycle: vm });
  loop.requestShutdown('host-qmp-quit');
  const status = await runUntilShutdown(
    loop,
    vm,
    () => {
      throw new Error('worker would not stop');
    },
    () => {},
  );
  assert.equal(status, 1);
});

test('a shutdown request ends the loop even while a stop it carries out never finishes', async () => {
  const { vm, log } = runningVm();
  // The vCPUs never acknowledge the pause (a vCPU stuck in KVM_RUN).
  let releasePause!: () => void;
  const stuck = new Promise<void>((r) => {
    releasePause = r;
  });
  vm.cpus.pauseAll = async () => {
    log.push('pauseAll (stuck)');
    await stuck;
  };
  const requests: string[] = [];
  const loop = new MainLoop({
    lifecycle: vm,
    log: () => {},
    onShutdownRequest: (reason, signal) => void requests.push(`${reason} ${signal ?? '-'}`),
  });
  const exit = loop.run();
  loop.requestVmStop('internal-error');
  await eventually(() => assert.deepEqual(log, ['pauseAll (stuck)']));
  loop.requestShutdown('host-signal', 'SIGTERM');
  loop.requestShutdown('host-signal', 'SIGINT');
  assert.deepEqual(await exit, { reason: 'host-signal', signal: 'SIGTERM' });
  assert.deepEqual(log, ['pauseAll (stuck)', 'SHUTDOWN guest=false reason=host-signal']);
  // Every request is reported, the repeated one too: the CLI's second-signal rule needs it.
  assert.deepEqual(requests, ['host-signal SIGTERM', 'host-signal SIGINT']);
  releasePause();
});
