import assert from 'node:assert/strict';
import { test } from 'node:test';
import { captureTrace, traceBody } from '../trace/capture.js';
import { shutdownCausedByGuest, VmLifecycle } from './cpus.js';
import { RecordingCpus } from './recording-cpus.js';
import { type RunState, RunStateMachine } from './runstate.js';

// Unit tests of our lifecycle sequencing against a recording CpuController
// double. They check the order of our own calls; they do not stand in for KVM.

function setup(initial: RunState = 'prelaunch') {
  const log: string[] = [];
  const cpus = new RecordingCpus(2, log);
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine(initial) });
  if (initial === 'running') cpus.paused = false;
  vm.notifiers.add({
    callback: (running, state) => {
      log.push(
        `notify ${running ? 1 : 0} ${state} (state ${vm.runstate.current}, vcpus ${cpus.paused ? 'paused' : 'running'})`,
      );
    },
  });
  for (const ev of ['STOP', 'RESUME'] as const) vm.events.on(ev, () => log.push(ev));
  vm.events.on('SHUTDOWN', (d) => log.push(`SHUTDOWN guest=${d.guest} reason=${d.reason}`));
  vm.events.on('RESET', (d) => log.push(`RESET guest=${d.guest} reason=${d.reason}`));
  return { vm, cpus, log };
}

test('sequencing double: vmStart sets running and notifies before any vCPU resumes', async () => {
  const { vm, log } = setup();
  assert.equal(await vm.vmStart(), true);
  assert.deepEqual(log, ['RESUME', 'notify 1 running (state running, vcpus paused)', 'resumeAll']);
  assert.equal(vm.runstate.current, 'running');
});

test('sequencing double: vmStart on a running VM does nothing', async () => {
  const { vm, log } = setup('running');
  assert.equal(await vm.vmStart(), false);
  assert.deepEqual(log, []);
});

test('sequencing double: vmPrepareStart notifies and leaves the vCPUs paused', async () => {
  const { vm, log, cpus } = setup();
  assert.equal(await vm.vmPrepareStart(), true);
  assert.deepEqual(log, ['RESUME', 'notify 1 running (state running, vcpus paused)']);
  assert.equal(cpus.paused, true);
});

test('sequencing double: vmStop sets the state, pauses every vCPU, then notifies, then STOP', async () => {
  const { vm, log } = setup('running');
  await vm.vmStop('paused');
  assert.deepEqual(log, ['pauseAll', 'notify 0 paused (state paused, vcpus paused)', 'STOP']);
});

test('sequencing double: a repeated stop is a no-op', async () => {
  const { vm, log } = setup('running');
  await vm.vmStop('paused');
  log.length = 0;
  await vm.vmStop('paused');
  await vm.doVmStop('paused', true);
  assert.deepEqual(log, []);
  assert.equal(vm.runstate.current, 'paused');
});

test('sequencing double: vmShutdown notifies shutdown and emits no STOP', async () => {
  const { vm, log } = setup('running');
  await vm.vmShutdown();
  assert.deepEqual(log, ['pauseAll', 'notify 0 shutdown (state shutdown, vcpus paused)']);
});

test('sequencing double: the shutdown path emits one SHUTDOWN and no STOP', async () => {
  const { vm, log } = setup('running');
  vm.systemShutdown('host-qmp-quit');
  await vm.vmShutdown();
  assert.deepEqual(log, [
    'SHUTDOWN guest=false reason=host-qmp-quit',
    'pauseAll',
    'notify 0 shutdown (state shutdown, vcpus paused)',
  ]);
});

test('sequencing double: vmShutdown of a stopped VM (postmigrate) notifies nobody', async () => {
  const { vm, log } = setup('postmigrate');
  await vm.vmShutdown();
  assert.deepEqual(log, []);
  assert.equal(vm.runstate.current, 'postmigrate');
});

test('sequencing double: vmStopForceState stops a running VM, and only sets the state of a stopped one', async () => {
  const a = setup('running');
  await a.vm.vmStopForceState('finish-migrate');
  assert.deepEqual(a.log, [
    'pauseAll',
    'notify 0 finish-migrate (state finish-migrate, vcpus paused)',
    'STOP',
  ]);
  const b = setup('postmigrate');
  await b.vm.vmStopForceState('finish-migrate');
  assert.deepEqual(b.log, []);
  assert.equal(b.vm.runstate.current, 'finish-migrate');
});

test('sequencing double: a stop arriving while a start is notifying waits for the start', async () => {
  const { vm, log } = setup();
  let release!: () => void;
  const gate = new Promise<void>((r) => {
    release = r;
  });
  vm.notifiers.add({
    priority: 1,
    callback: async (running) => {
      if (!running) return;
      log.push('slow start handler waits');
      await gate;
      log.push('slow start handler done');
    },
  });
  const started = vm.vmStart();
  await new Promise((r) => setImmediate(r));
  const stopped = vm.vmStop('paused');
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(
    log.includes('pauseAll'),
    false,
    'the stop did not begin while the start was in flight',
  );
  release();
  await Promise.all([started, stopped]);
  assert.deepEqual(log, [
    'RESUME',
    'notify 1 running (state running, vcpus paused)',
    'slow start handler waits',
    'slow start handler done',
    'resumeAll',
    'pauseAll',
    'notify 0 paused (state paused, vcpus paused)',
    'STOP',
  ]);
});

test('sequencing double: a start from a state that forbids it throws and announces nothing', async () => {
  const { vm, log } = setup('shutdown');
  await assert.rejects(vm.vmStart(), { code: 'INVALID_RUNSTATE_TRANSITION' });
  assert.deepEqual(log, []);
  // The lifecycle is still usable after the failure.
  await vm.vmReset('host-qmp-system-reset');
  assert.equal(vm.runstate.current, 'prelaunch');
  assert.equal(await vm.vmStart(), true);
});

test('sequencing double: reset of a paused VM pauses, resets, emits RESET and leaves prelaunch', async () => {
  const { vm, log } = setup('paused');
  vm.addResetHandler((reason) => void log.push(`reset handler ${reason}`));
  await vm.vmReset('host-qmp-system-reset');
  assert.deepEqual(log, [
    'pauseAll',
    'synchronizeState',
    'reset handler host-qmp-system-reset',
    'RESET guest=false reason=host-qmp-system-reset',
  ]);
  assert.equal(vm.runstate.current, 'prelaunch');
});

test('sequencing double: reset of a running VM resumes it, and a guest reset says guest=true', async () => {
  const { vm, log } = setup('running');
  const remove = vm.addResetHandler(() => void log.push('reset handler'));
  await vm.vmReset('guest-reset');
  assert.deepEqual(log, [
    'pauseAll',
    'synchronizeState',
    'reset handler',
    'RESET guest=true reason=guest-reset',
    'resumeAll',
  ]);
  assert.equal(vm.runstate.current, 'running');
  remove();
  log.length = 0;
  await vm.vmReset('subsystem-reset');
  assert.deepEqual(log, ['pauseAll', 'synchronizeState', 'resumeAll']);
});

test('shutdown causes name the guest exactly for guest-shutdown, guest-reset, guest-panic and snapshot-load', () => {
  assert.equal(shutdownCausedByGuest('host-signal'), false);
  assert.equal(shutdownCausedByGuest('host-qmp-quit'), false);
  assert.equal(shutdownCausedByGuest('subsystem-reset'), false);
  assert.equal(shutdownCausedByGuest('guest-shutdown'), true);
  assert.equal(shutdownCausedByGuest('guest-panic'), true);
  assert.equal(shutdownCausedByGuest('snapshot-load'), true);
});

test('vm_start and vm_stop are traced around the state change and the notification', async () => {
  const { vm } = setup();
  const lines = await captureTrace(['vm_st*', 'runstate_set', '*_all_vcpus'], async () => {
    await vm.vmStart();
    await vm.vmStop('paused');
  });
  assert.deepEqual(lines.map(traceBody), [
    'vm_start',
    'runstate_set from=prelaunch to=running',
    'vm_state_notify running=1 state=running',
    'resume_all_vcpus count=2',
    'vm_stop state=paused',
    'runstate_set from=running to=paused',
    'pause_all_vcpus count=2',
    'vm_state_notify running=0 state=paused',
  ]);
});
