import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type CpuController, VmLifecycle } from '../../../system/cpus.js';
import { RecordingCpus } from '../../../system/recording-cpus.js';
import { RunStateMachine } from '../../../system/runstate.js';
import { doKvmclockCtrl, KVMCLOCK_CTRL_OP, KvmClockDevice, type KvmClockFaults } from './clock.js';
import { KvmClockSanitizer, type KvmClockViolation, type PvclockAccess } from './clock-check.js';
import { PVCLOCK_GUEST_STOPPED } from './pvclock.js';

// The sanitizer's checks against a simulated KVM: one VM clock, a 1 GHz
// TSC shared by the vCPUs, and pvclock pages in a byte array that "KVM"
// rewrites when a vCPU enters after a start, as the real one does. This
// pins down the checks' logic; the KVM tests (src/cli/kvmclock.kvm.test.ts)
// run the same faults against real KVM and a real guest.

const CPUS = 2;
const S = 1_000_000_000n;

class SimKvm implements PvclockAccess {
  readonly count = CPUS;
  readonly hostHasCtrl = true;
  /** Host ns and guest TSC (1 GHz) at once. */
  t = 10n * S;
  /** kvmclock = t + offset. */
  offset = -9n * S;
  readonly memory = new Uint8Array(0x1000 * (CPUS + 1));
  readonly tscStop: (bigint | undefined)[] = [];
  private readonly stopRequest: boolean[] = [];
  private readonly versions: number[] = [];

  constructor() {
    for (let cpu = 0; cpu < CPUS; cpu++) this.enter(cpu);
  }

  gpa(cpu: number): bigint {
    return BigInt(0x1000 * (cpu + 1));
  }

  /** A vCPU enters the guest after a clock update request: KVM rewrites its page. */
  enter(cpu: number): void {
    const v = new DataView(this.memory.buffer, Number(this.gpa(cpu)), 32);
    const version = (this.versions[cpu] ?? 0) + 2;
    this.versions[cpu] = version;
    v.setUint32(0, version, true);
    v.setBigUint64(8, this.t, true);
    v.setBigUint64(16, this.t + this.offset, true);
    v.setUint32(24, 2 ** 31, true); // with shift 1: 1 ns per TSC tick
    v.setInt8(28, 1);
    v.setUint8(29, this.stopRequest[cpu] ? PVCLOCK_GUEST_STOPPED | 1 : 1);
    this.stopRequest[cpu] = false;
  }

  ctrl(cpu: number): void {
    this.stopRequest[cpu] = true;
  }

  async readMsrs(cpu: number) {
    return { systemTime: this.gpa(cpu) | 1n, tsc: this.t };
  }

  readGuest(gpa: bigint, length: number): Uint8Array {
    return this.memory.slice(Number(gpa), Number(gpa) + length);
  }

  tscAtStop(cpu: number): bigint | undefined {
    return this.tscStop[cpu];
  }

  hostRealtimeNs(): bigint {
    return 1_700_000_000n * S + this.t;
  }
}

function harness(faults: KvmClockFaults = {}) {
  const sim = new SimKvm();
  const recording = new RecordingCpus(CPUS);
  recording.ops.set(KVMCLOCK_CTRL_OP, (cpu) =>
    doKvmclockCtrl({ kvmclockCtrl: () => sim.ctrl(cpu) }, cpu),
  );
  let sanitizer: KvmClockSanitizer | undefined;
  const cpus: CpuController = {
    count: CPUS,
    pauseAll: () => recording.pauseAll(),
    resumeAll: async () => {
      await recording.resumeAll();
      sim.t += 1_000n;
      for (let cpu = 0; cpu < CPUS; cpu++) sim.enter(cpu);
      await sanitizer?.afterResume();
    },
    runOnCpu: (cpu, op, arg) => recording.runOnCpu(cpu, op, arg),
    asyncRunOnCpu: (cpu, op, arg) => recording.asyncRunOnCpu(cpu, op, arg),
  };
  const device = new KvmClockDevice(
    {
      getClock: () => ({ clock: sim.t + sim.offset, flags: 2 }),
      setClock: (clock) => {
        sim.offset = clock - sim.t;
      },
      hasKvmclockCtrl: true,
      clockIsReliableFromHost: true,
      hostRealtimeNs: () => sim.hostRealtimeNs(),
      // The guest's pvclock at vCPU 0's TSC now, not at the stop's TSC: a
      // backend with the bug the machine once had, which lets the pause in.
      readGuestPvclockNs: () => sim.t + sim.offset,
      synchronizeTscs: async () => {
        for (let cpu = 0; cpu < CPUS; cpu++) sim.tscStop[cpu] = sim.t;
      },
    },
    cpus,
    { faults },
  );
  const vm = new VmLifecycle({ cpus, runstate: new RunStateMachine('prelaunch') });
  device.realize(vm.notifiers);
  // The tsc-snapshot notifier of the machine: forgotten when the VM runs.
  vm.notifiers.add({
    name: 'tsc-snapshot',
    priority: 0,
    callback: (running) => {
      if (running) sim.tscStop.length = 0;
    },
  });
  const found: KvmClockViolation[] = [];
  sanitizer = new KvmClockSanitizer(sim, device, {
    report: true,
    updateWaitMs: 1000,
    onViolation: (v) => found.push(v),
  });
  /** start, run 1 s, stop, wait 5 s, cont, run 1 s. */
  const cycle = async () => {
    await vm.vmStart();
    sim.t += S;
    await vm.vmStop('paused');
    sim.t += 5n * S;
    await vm.vmStart();
    sim.t += S;
  };
  return { sim, vm, device, sanitizer, found, cycle };
}

test('sanitizer: a correct freeze across a stop is silent, and each vCPU has a reading', async () => {
  const h = harness();
  await h.cycle();
  assert.deepEqual(h.found, []);
  const readings = h.sanitizer.readings;
  assert.equal(readings.length, CPUS);
  for (const r of readings) {
    assert.equal(r?.transition, 'cont');
    assert.equal(r?.updated, true);
    assert.equal(r?.guestStoppedSeen, true);
  }
});

test('sanitizer: a clock set backwards is caught on every vCPU, and as a broken freeze', async () => {
  const h = harness({ setClockBackwardsNs: S });
  await h.cycle();
  assert.deepEqual(
    h.found.map((v) => `${v.kind}@${v.transition}:${v.cpu}`),
    ['policy@cont:-1', 'backwards@cont:0', 'backwards@cont:1'],
  );
});

test('sanitizer: without KVMCLOCK_CTRL on a host that has it, GUEST_STOPPED is missing', async () => {
  const h = harness({ noKvmclockCtrl: true });
  await h.cycle();
  assert.deepEqual(
    h.found.map((v) => `${v.kind}:${v.cpu}`),
    ['guest-stopped-missing:0', 'guest-stopped-missing:1'],
  );
});

test('sanitizer: an unreliable GET_CLOCK read at the TSC of the start lets the pause leak into a frozen clock: caught', async () => {
  const h = harness({ unreliableGetClock: true });
  await h.cycle();
  assert.deepEqual(
    h.found.map((v) => v.kind),
    ['policy'],
  );
  assert.match(h.found[0]!.detail, /policy freeze: the clock was set 5000/);
});
