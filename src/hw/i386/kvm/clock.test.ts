import assert from 'node:assert/strict';
import { test } from 'node:test';
import { VmLifecycle } from '../../../system/cpus.js';
import { RecordingCpus } from '../../../system/recording-cpus.js';
import { type RunState, RunStateMachine } from '../../../system/runstate.js';
import { captureTrace, traceBody } from '../../../trace/capture.js';
import {
  doKvmclockCtrl,
  KVMCLOCK_CTRL_OP,
  type KvmClockBackend,
  KvmClockDevice,
  type KvmClockOptions,
} from './clock.js';

// Sequencing tests of the kvmclock device against a recording double of its
// KVM interface and of the vCPU layer. They pin down which clock ioctls we
// issue and in what order; they do not stand in for KVM itself.
// Log letters: G = KVM_GET_CLOCK, S = KVM_SET_CLOCK, C = KVM_KVMCLOCK_CTRL,
// P = pvclock read from guest memory, T = TSC synchronisation.

interface HarnessOptions {
  smp?: number;
  initial?: RunState;
  hasKvmclockCtrl?: boolean;
  clockIsReliableFromHost?: boolean;
  pvclockNs?: bigint;
  device?: KvmClockOptions;
}

function harness(o: HarnessOptions = {}) {
  const smp = o.smp ?? 2;
  const seq: string[] = [];
  const calls: string[] = [];
  const sets: bigint[] = [];
  let kvmClock = 1_000_000n;
  const backend: KvmClockBackend = {
    getClock() {
      seq.push('G');
      kvmClock += 1000n; // the VM clock moves on between reads
      return { clock: kvmClock, flags: 0xe };
    },
    setClock(clock) {
      seq.push('S');
      sets.push(clock);
      kvmClock = clock;
    },
    hasKvmclockCtrl: o.hasKvmclockCtrl ?? true,
    clockIsReliableFromHost: o.clockIsReliableFromHost ?? true,
    readGuestPvclockNs: async () => {
      seq.push('P');
      return o.pvclockNs ?? 0n;
    },
    synchronizeTscs: async () => void seq.push('T'),
  };
  const cpus = new RecordingCpus(smp, calls);
  const ctrlSeenPaused: boolean[] = [];
  const vcpus = Array.from({ length: smp }, () => ({
    kvmclockCtrl() {
      seq.push('C');
      ctrlSeenPaused.push(cpus.paused);
    },
  }));
  cpus.ops.set(KVMCLOCK_CTRL_OP, (cpu) => doKvmclockCtrl(vcpus[cpu]!, cpu));
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine(o.initial ?? 'prelaunch') });
  const dev = new KvmClockDevice(backend, cpus, o.device);
  dev.realize(vm.notifiers);
  const ioctls = () => seq.filter((x) => x === 'G' || x === 'S' || x === 'C').join(' ');
  return { vm, dev, seq, sets, calls, ioctls, ctrlSeenPaused, clock: () => kvmClock };
}

test('sequencing double: start, stop, cont, migrate, quit with -smp 2 gives G S C C G S C C G G', async () => {
  const h = harness();
  await h.vm.vmStart(); // S C C
  await h.vm.vmStop('paused'); // G
  const savedAtStop = h.dev.clock;
  await h.vm.vmStart(); // cont: S C C, with the clock saved at the stop
  assert.equal(h.sets[1], savedAtStop, 'cont restores the clock read at the stop');
  await h.vm.vmStopForceState('finish-migrate'); // G (not paused)
  h.dev.preSave(); // G again: the stop was not a user pause
  h.vm.runstate.set('postmigrate');
  await h.vm.vmShutdown(); // not running: nothing
  assert.equal(h.ioctls(), 'G S C C G S C C G G');
  assert.equal(h.vm.runstate.current, 'postmigrate');
  // Every KVMCLOCK_CTRL ran with the vCPUs still paused, i.e. before resumeAll.
  assert.deepEqual(h.ctrlSeenPaused, [true, true, true, true]);
  // The TSCs are synchronised before each stop's GET_CLOCK.
  assert.equal(h.seq.join(''), 'GSCCTGSCCTGG');
});

test('sequencing double: each vCPU gets KVMCLOCK_CTRL on its own runOnCpu, in order, before resumeAll', async () => {
  const h = harness({ smp: 3 });
  await h.vm.vmStart();
  assert.deepEqual(h.calls, [
    'runOnCpu 0 kvmclock_ctrl',
    'runOnCpu 1 kvmclock_ctrl',
    'runOnCpu 2 kvmclock_ctrl',
    'resumeAll',
  ]);
});

test('sequencing double: a stop into paused keeps its clock for a later save (no second read)', async () => {
  const h = harness();
  await h.vm.vmStart();
  await h.vm.vmStop('paused');
  assert.equal(h.dev.runstatePaused, true);
  assert.equal(h.dev.clockValid, true);
  const atStop = h.dev.clock;
  h.dev.preSave();
  assert.equal(h.dev.clock, atStop);
  assert.equal(h.ioctls(), 'G S C C G');
});

test('sequencing double: a second stop notification without a start does not re-read the clock', async () => {
  const h = harness({ initial: 'running' });
  await h.dev.kvmclockVmStateChange(false, 'paused');
  await h.dev.kvmclockVmStateChange(false, 'finish-migrate');
  assert.equal(h.ioctls(), 'G G');
  assert.equal(h.dev.runstatePaused, true, 'the second notification changed nothing');
});

test('sequencing double: an incoming VM (preLoad, load, start) gives S C C after its realize G', async () => {
  const h = harness({ initial: 'inmigrate' });
  h.dev.preLoad();
  assert.equal(h.dev.clockIsReliable, false);
  h.dev.loadState({ clock: 42_000_000_000n, clockIsReliable: true });
  await h.vm.vmStart();
  assert.equal(h.ioctls(), 'G S C C');
  assert.deepEqual(h.sets, [42_000_000_000n]);
  assert.equal(h.seq.includes('P'), false, 'a reliable saved clock is used as is');
});

test('sequencing double: an incoming stream without clock_is_reliable restores from the guest pvclock', async () => {
  const h = harness({ initial: 'inmigrate', pvclockNs: 41_999_999_000n });
  h.dev.preLoad();
  h.dev.loadState({ clock: 42_000_000_000n });
  await h.vm.vmStart();
  assert.equal(h.seq.join(' '), 'G P S C C');
  assert.deepEqual(h.sets, [41_999_999_000n]);
});

test('sequencing double: a guest without kvmclock (pvclock 0) keeps the saved clock', async () => {
  const h = harness({ initial: 'inmigrate', pvclockNs: 0n });
  h.dev.preLoad();
  h.dev.loadState({ clock: 7_000n });
  await h.vm.vmStart();
  assert.deepEqual(h.sets, [7_000n]);
});

test('fault: without KVM_CAP_KVMCLOCK_CTRL (masked) no vCPU gets KVMCLOCK_CTRL', async () => {
  const h = harness({ device: { faults: { noKvmclockCtrl: true } } });
  assert.equal(h.dev.usesKvmclockCtrl, false);
  await h.vm.vmStart();
  await h.vm.vmStop('paused');
  await h.vm.vmStart();
  assert.equal(h.ioctls(), 'G S G S');
  assert.deepEqual(
    h.calls.filter((c) => c.startsWith('runOnCpu')),
    [],
  );
});

test('fault: a host really lacking KVM_CAP_KVMCLOCK_CTRL behaves the same', async () => {
  const h = harness({ hasKvmclockCtrl: false });
  await h.vm.vmStart();
  assert.equal(h.ioctls(), 'G S');
});

test('fault: with an unreliable KVM_GET_CLOCK every start restores from the guest pvclock', async () => {
  const h = harness({ pvclockNs: 5_555n, device: { faults: { unreliableGetClock: true } } });
  assert.equal(h.dev.clockIsReliable, false);
  await h.vm.vmStart();
  await h.vm.vmStop('paused');
  assert.equal(h.dev.clockIsReliable, false);
  await h.vm.vmStart();
  assert.equal(h.seq.join(' '), 'G P S C C T G P S C C');
  assert.deepEqual(h.sets, [5_555n, 5_555n]);
  assert.deepEqual(h.dev.saveState(), { clock: h.dev.clock, clockIsReliable: false });
});

test('a failing KVM_SET_CLOCK is fatal: the start fails and no vCPU resumes', async () => {
  const h = harness();
  const dev2Backend: KvmClockBackend = {
    getClock: () => ({ clock: 1n, flags: 0 }),
    setClock: () => {
      throw Object.assign(new Error('ioctl KVM_SET_CLOCK: Invalid argument'), { errno: 22 });
    },
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: true,
  };
  h.dev.unrealize(h.vm.notifiers);
  new KvmClockDevice(dev2Backend, h.vm.cpus).realize(h.vm.notifiers);
  await assert.rejects(h.vm.vmStart(), { code: 'KVMCLOCK_SET_CLOCK_FAILED' });
  assert.equal(h.calls.includes('resumeAll'), false);
});

test('a failing KVM_GET_CLOCK at realize is a typed error', () => {
  const backend: KvmClockBackend = {
    getClock: () => {
      throw Object.assign(new Error('ioctl KVM_GET_CLOCK: Bad address'), { errno: 14 });
    },
    setClock: () => {},
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: true,
  };
  const vm = new VmLifecycle({ cpus: new RecordingCpus(1) });
  assert.throws(() => new KvmClockDevice(backend, vm.cpus).realize(vm.notifiers), {
    code: 'KVMCLOCK_GET_CLOCK_FAILED',
  });
});

test('the handler is registered once, at priority 0, and removed by unrealize', () => {
  const h = harness();
  h.dev.realize(h.vm.notifiers);
  const entries = h.vm.notifiers.list();
  assert.equal(entries.length, 1);
  assert.equal(entries[0]!.priority, 0);
  h.dev.unrealize(h.vm.notifiers);
  assert.equal(h.vm.notifiers.list().length, 0);
});

test('migration state: clock always, clock_is_reliable only with x-mach-use-reliable-get-clock', () => {
  const on = harness();
  assert.deepEqual(on.dev.saveState(), { clock: on.dev.clock, clockIsReliable: true });
  assert.equal(on.dev.sendsClockIsReliable, true);
  const off = harness({ device: { useReliableGetClock: false } });
  assert.deepEqual(off.dev.saveState(), { clock: off.dev.clock });
  assert.equal(off.dev.sendsClockIsReliable, false);
  assert.throws(() => {
    off.dev.clock = 1n << 64n;
  }, RangeError);
});

test('doKvmclockCtrl ignores EINVAL, logs other errors, returns -errno, rethrows errors without errno', () => {
  const logged: string[] = [];
  const log = (m: string) => void logged.push(m);
  const failing = (errno: number) => ({
    kvmclockCtrl() {
      throw Object.assign(new Error('ioctl failed'), { errno });
    },
  });
  assert.equal(doKvmclockCtrl({ kvmclockCtrl() {} }, 0, log), 0);
  assert.equal(doKvmclockCtrl(failing(22), 1, log), -22);
  assert.equal(doKvmclockCtrl(failing(-22), 1, log), -22, 'uv-style negative errno is understood');
  assert.deepEqual(logged, []);
  assert.equal(doKvmclockCtrl(failing(5), 2, log), -5);
  assert.equal(logged.length, 1);
  assert.match(logged[0]!, /vCPU 2.*errno 5/);
  assert.throws(
    () =>
      doKvmclockCtrl(
        {
          kvmclockCtrl() {
            throw new TypeError('bug');
          },
        },
        0,
        log,
      ),
    TypeError,
  );
});

test('the seed trace of a start: one state change on main, then KVMCLOCK_CTRL per vCPU', async () => {
  const h = harness();
  const lines = await captureTrace(['kvmclock_vm_state_change', 'kvmclock_ctrl'], async () => {
    await h.vm.vmStart();
    await h.vm.vmShutdown();
  });
  assert.deepEqual(lines.map(traceBody), [
    'kvmclock_vm_state_change running=1 state=running',
    'kvmclock_ctrl cpu=0 ret=0',
    'kvmclock_ctrl cpu=1 ret=0',
    'kvmclock_vm_state_change running=0 state=shutdown',
  ]);
  assert.ok(lines.every((l) => l.endsWith(' thread=main')));
});

// The policy `realtime` and the new faults, against a double whose VM
// clock and host realtime the test moves by hand.
function realtimeHarness(opts: { kvmRealtime: boolean; faults?: KvmClockOptions['faults'] }) {
  let realtime = 1_700_000_000_000_000_000n;
  let kvmClock = 1_000_000n;
  const sets: { clock: bigint; realtime?: bigint }[] = [];
  const backend: KvmClockBackend = {
    getClock: () => ({
      clock: kvmClock,
      flags: opts.kvmRealtime ? 0x6 : 0x2,
      ...(opts.kvmRealtime ? { realtime } : {}),
    }),
    setClock(clock, rt) {
      sets.push(rt === undefined ? { clock } : { clock, realtime: rt });
      kvmClock = clock;
    },
    hasRealtimeClock: opts.kvmRealtime,
    hostRealtimeNs: () => realtime,
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: true,
  };
  const cpus = new RecordingCpus(2);
  cpus.ops.set(KVMCLOCK_CTRL_OP, () => 0);
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine('prelaunch') });
  const dev = new KvmClockDevice(backend, cpus, {
    policy: 'realtime',
    ...(opts.faults ? { faults: opts.faults } : {}),
  });
  dev.realize(vm.notifiers);
  return {
    vm,
    dev,
    sets,
    pass: (ns: bigint) => {
      realtime += ns;
      kvmClock += ns;
    },
    wait: (ns: bigint) => {
      realtime += ns;
    },
  };
}

test('policy realtime with KVM_CLOCK_REALTIME: SET_CLOCK carries the pair GET_CLOCK took at the stop', async () => {
  const h = realtimeHarness({ kvmRealtime: true });
  await h.vm.vmStart();
  assert.deepEqual(h.sets.at(-1), { clock: 1_000_000n }, 'the first start has no pair: exact');
  h.pass(3_000_000n);
  await h.vm.vmStop('paused');
  const pair = h.dev.realtimePair!;
  assert.equal(pair.source, 'kvm');
  assert.equal(pair.errorNs, 0n);
  h.wait(5_000_000_000n);
  await h.vm.vmStart();
  assert.deepEqual(h.sets.at(-1), { clock: pair.clock, realtime: pair.realtime });
  assert.equal(h.dev.lastStart, undefined, 'no observer, no record');
  assert.equal(h.dev.realtimePair, undefined, 'the pair is used once');
});

test('policy realtime without KVM_CLOCK_REALTIME: the advance is computed from CLOCK_REALTIME', async () => {
  const h = realtimeHarness({ kvmRealtime: false });
  const records: bigint[] = [];
  h.dev.addObserver({ started: (r) => void records.push(r.advanceNs) });
  await h.vm.vmStart();
  await h.vm.vmStop('paused');
  const pair = h.dev.realtimePair!;
  assert.equal(pair.source, 'host');
  h.wait(5_000_000_000n);
  await h.vm.vmStart();
  assert.deepEqual(h.sets.at(-1), { clock: pair.clock + 5_000_000_000n });
  assert.deepEqual(records, [0n, 5_000_000_000n]);
  assert.equal(h.dev.lastStart?.realtimeMode, 'computed');
});

test('policy realtime never sets the clock back when the host clock stepped back', async () => {
  const h = realtimeHarness({ kvmRealtime: false });
  await h.vm.vmStart();
  await h.vm.vmStop('paused');
  const pair = h.dev.realtimePair!;
  h.wait(-60_000_000_000n);
  await h.vm.vmStart();
  assert.deepEqual(h.sets.at(-1), { clock: pair.clock });
});

test('faults: a clock set backwards, and a restore that skips KVM_SET_CLOCK', async () => {
  const back = realtimeHarness({ kvmRealtime: false, faults: { setClockBackwardsNs: 400n } });
  await back.vm.vmStart();
  assert.deepEqual(back.sets, [{ clock: 1_000_000n - 400n }]);

  const skip = realtimeHarness({ kvmRealtime: false, faults: { skipSetClockOnRestore: true } });
  await skip.vm.vmStart();
  assert.equal(skip.sets.length, 1, 'a start that is not a restore sets the clock');
  await skip.vm.vmStop('paused');
  skip.dev.preLoad();
  skip.dev.loadState({ clock: 9_000_000n, clockIsReliable: true });
  await skip.vm.vmStart();
  assert.equal(skip.sets.length, 1, 'the start after the load did not set it');
  await skip.vm.vmStop('paused');
  await skip.vm.vmStart();
  assert.equal(skip.sets.length, 2, 'only the first start after a load is skipped');
});
