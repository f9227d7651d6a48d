import assert from 'node:assert/strict';
import { test } from 'node:test';
import { roundTripThroughFile } from '../../../migration/test-roundtrip.js';
import { VmLifecycle } from '../../../system/cpus.js';
import { RecordingCpus } from '../../../system/recording-cpus.js';
import { RunStateMachine } from '../../../system/runstate.js';
import { KVMCLOCK_CTRL_OP, type KvmClockBackend, KvmClockDevice } from './clock.js';
import { kvmclockSection } from './clock-vmstate.js';

// Round trips of kvmclock's vmstate through a real stream and file, with a
// recording double of its KVM interface (as clock.test.ts uses). G = GET_CLOCK, S = SET_CLOCK.

function side(
  opts: { reliableHost?: boolean; useReliableGetClock?: boolean; pvclockNs?: bigint } = {},
) {
  const log: string[] = [];
  const sets: bigint[] = [];
  let kvmClock = 5_000_000n;
  const backend: KvmClockBackend = {
    getClock() {
      log.push('G');
      kvmClock += 1000n;
      return { clock: kvmClock, flags: 0 };
    },
    setClock(clock) {
      log.push('S');
      sets.push(clock);
      kvmClock = clock;
    },
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: opts.reliableHost ?? true,
    readGuestPvclockNs: () => {
      log.push('P');
      return opts.pvclockNs ?? 0n;
    },
  };
  const cpus = new RecordingCpus(2);
  cpus.ops.set(KVMCLOCK_CTRL_OP, () => 0);
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine('prelaunch') });
  const dev = new KvmClockDevice(
    backend,
    cpus,
    opts.useReliableGetClock === undefined ? {} : { useReliableGetClock: opts.useReliableGetClock },
  );
  dev.realize(vm.notifiers);
  return { vm, dev, log, sets, advance: (ns: bigint) => (kvmClock += ns) };
}

test('kvmclock vmstate: the clock saved at finish-migrate starts the destination, not advanced by the gap', async () => {
  const src = side();
  await src.vm.vmStart();
  src.advance(10_000_000n);
  await src.vm.vmStopForceState('finish-migrate');
  src.log.length = 0;
  const dst = side();
  const loaded = await roundTripThroughFile([kvmclockSection(src.dev)], [kvmclockSection(dst.dev)]);
  // finish-migrate is not a user pause: pre-save re-reads the clock.
  assert.deepEqual(src.log, ['G']);
  assert.equal(dst.dev.clock, src.dev.clock);
  assert.equal(dst.dev.clockIsReliable, true);
  const desc = loaded.vmdesc.devices.find((d) => d.name === 'kvmclock')!;
  assert.deepEqual(desc.fields, [{ name: 'clock', type: 'uint64', size: 8 }]);
  assert.equal(desc.subsections?.[0]?.vmsd_name, 'kvmclock/clock_is_reliable');

  dst.log.length = 0;
  await dst.vm.vmStart();
  assert.deepEqual(dst.sets, [src.dev.clock], 'KVM_SET_CLOCK gets exactly the saved clock');
  assert.deepEqual(dst.log, ['S'], 'a reliable clock needs no pvclock read');
});

test('kvmclock vmstate: after a user pause, pre-save keeps the clock the pause read', async () => {
  const src = side();
  await src.vm.vmStart();
  await src.vm.vmStop('paused');
  const atPause = src.dev.clock;
  src.log.length = 0;
  const dst = side();
  await roundTripThroughFile([kvmclockSection(src.dev)], [kvmclockSection(dst.dev)]);
  assert.deepEqual(src.log, [], 'no GET_CLOCK at pre-save');
  assert.equal(dst.dev.clock, atPause);
});

test('kvmclock vmstate: without x-mach-use-reliable-get-clock no subsection; the destination reads the pvclock', async () => {
  const src = side({ useReliableGetClock: false });
  await src.vm.vmStart();
  await src.vm.vmStopForceState('finish-migrate');
  const dst = side({ pvclockNs: 42_000_000n });
  dst.dev.clockIsReliable = true;
  const loaded = await roundTripThroughFile([kvmclockSection(src.dev)], [kvmclockSection(dst.dev)]);
  assert.equal(loaded.vmdesc.devices.find((d) => d.name === 'kvmclock')!.subsections, undefined);
  assert.equal(dst.dev.clockIsReliable, false, 'pre-load marks the clock unreliable');
  dst.log.length = 0;
  await dst.vm.vmStart();
  assert.deepEqual(dst.log, ['P', 'S']);
  assert.deepEqual(dst.sets, [42_000_000n]);
});

test('kvmclock vmstate: the policy realtime sends its pair in kvmclock/realtime; freeze never does', async () => {
  let realtime = 1_700_000_000_123_456_789n;
  const backend: KvmClockBackend = {
    getClock: () => ({ clock: 77_000_000n, flags: 0x6, realtime }),
    setClock() {},
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: true,
    hasRealtimeClock: true,
    hostRealtimeNs: () => realtime,
  };
  const cpus = new RecordingCpus(1);
  cpus.ops.set(KVMCLOCK_CTRL_OP, () => 0);
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine('prelaunch') });
  const src = new KvmClockDevice(backend, cpus, { policy: 'realtime' });
  src.realize(vm.notifiers);
  await vm.vmStart();
  realtime += 1000n;
  await vm.vmStopForceState('finish-migrate');
  const dst = new KvmClockDevice(backend, new RecordingCpus(1), { policy: 'realtime' });
  const loaded = await roundTripThroughFile([kvmclockSection(src)], [kvmclockSection(dst)]);
  assert.deepEqual(dst.realtimePair, {
    clock: 77_000_000n,
    realtime: 1_700_000_000_123_457_789n,
    errorNs: 0n,
    source: 'kvm',
  });
  const desc = loaded.vmdesc.devices.find((d) => d.name === 'kvmclock')!;
  assert.deepEqual(
    desc.subsections?.map((s) => s.vmsd_name),
    ['kvmclock/clock_is_reliable', 'kvmclock/realtime'],
  );
  assert.deepEqual(
    desc.subsections?.[1]?.fields.map((f) => `${f.name}:${f.type}:${f.size}`),
    ['clock:uint64:8', 'realtime:uint64:8', 'error_ns:uint64:8'],
  );

  const frozen = side();
  await frozen.vm.vmStart();
  await frozen.vm.vmStopForceState('finish-migrate');
  const other = side();
  const loaded2 = await roundTripThroughFile(
    [kvmclockSection(frozen.dev)],
    [kvmclockSection(other.dev)],
  );
  assert.deepEqual(
    loaded2.vmdesc.devices.find((d) => d.name === 'kvmclock')!.subsections?.map((s) => s.vmsd_name),
    ['kvmclock/clock_is_reliable'],
  );
  assert.equal(other.dev.realtimePair, undefined);
});
