/**
 * The foundation on real KVM: probe guests on vCPU threads, kicks, pause and
 * resume, work queued on a vCPU's own thread, and a clean end.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { gettid } from '../../accel/kvm/ffi.js';
import { requireKvm } from '../../test-support/kvm.js';
import {
  parseProbeOutput,
  processResources,
  waitFor,
  withMachine,
} from '../../test-support/machine.js';

const MiB = 2 ** 20;
const TICK_NS = 10_000_000n;

function ticksOf(output: string, cpu: number): number {
  return parseProbeOutput(output).filter((l) => l.cpu === cpu && l.event === 'tick').length;
}

// The probe guest never idles: each vCPU polls its clock in a loop. With
// 8 of them on the VM runner's emulated CPUs they starve each other; the
// probe OS (which halts between ticks) is run with 8 (probe-os.kvm.test.ts).
for (const cpus of [1, 2, 4]) {
  test(`probe guest with ${cpus} vCPU(s): every vCPU reports ready and ticks, nothing goes backwards`, async (t) => {
    if (!requireKvm(t)) return;
    await withMachine(
      { cpus, memoryBytes: 64 * MiB, boot: { kind: 'probe', image: 'probe', tickNs: TICK_NS } },
      async ({ machine, output }) => {
        await machine.lifecycle.vmStart();
        await waitFor(`${cpus} vCPUs ticking`, () =>
          Array.from({ length: cpus }, (_, cpu) => ticksOf(output(), cpu)).every((n) => n >= 3),
        );
        const lines = parseProbeOutput(output());
        for (let cpu = 0; cpu < cpus; cpu++) {
          assert.ok(
            lines.some((l) => l.cpu === cpu && l.event === 'ready'),
            `cpu ${cpu} ready`,
          );
        }
        assert.deepEqual(
          lines.filter((l) => l.event === 'backwards'),
          [],
        );
        await machine.lifecycle.vmShutdown();
      },
    );
  });
}

test('a spinning vCPU is paused and resumed 1,000 times without a hang or a torn line', async (t) => {
  if (!requireKvm(t)) return;
  await withMachine(
    { cpus: 2, memoryBytes: 64 * MiB, boot: { kind: 'probe', image: 'probe', tickNs: 1_000_000n } },
    async ({ machine, output }) => {
      await machine.lifecycle.vmStart();
      await waitFor('first ticks', () => ticksOf(output(), 0) > 0 && ticksOf(output(), 1) > 0);
      for (let i = 0; i < 1000; i++) {
        await machine.vcpus.pauseAll();
        await machine.vcpus.resumeAll();
      }
      const before = [ticksOf(output(), 0), ticksOf(output(), 1)];
      await waitFor(
        'ticks after the pauses',
        () => ticksOf(output(), 0) > before[0]! && ticksOf(output(), 1) > before[1]!,
      );
      // parseProbeOutput throws on any malformed (torn) line.
      assert.deepEqual(
        parseProbeOutput(output()).filter((l) => l.event === 'backwards'),
        [],
      );
      await machine.lifecycle.vmShutdown();
    },
  );
});

test('runOnCpu runs on the target vCPU thread: the ioctl is issued by that thread id', async (t) => {
  if (!requireKvm(t)) return;
  await withMachine(
    { cpus: 4, memoryBytes: 64 * MiB, boot: { kind: 'probe', image: 'probe' } },
    async ({ machine }) => {
      const ids = machine.vcpus.threadIds;
      assert.equal(new Set(ids).size, 4, 'four distinct vCPU threads');
      for (let cpu = 0; cpu < 4; cpu++) {
        const tid = await machine.vcpus.runOnCpu(cpu, 'gettid');
        assert.equal(tid, ids[cpu]);
        assert.notEqual(tid, gettid(), 'not the main thread');
      }
      // Also while the guest runs (the thread must be kicked out of KVM_RUN).
      await machine.lifecycle.vmStart();
      assert.equal(await machine.vcpus.runOnCpu(3, 'gettid'), ids[3]);
      await machine.lifecycle.vmShutdown();
    },
  );
});

test('ending a running VM leaves no fd and no thread behind', async (t) => {
  if (!requireKvm(t)) return;
  // Warm up what Node creates lazily (worker infrastructure, libuv pool).
  await withMachine(
    { cpus: 1, memoryBytes: 16 * MiB, boot: { kind: 'probe', image: 'probe' } },
    async () => {},
  );
  const before = processResources();
  await withMachine(
    { cpus: 4, memoryBytes: 64 * MiB, boot: { kind: 'probe', image: 'probe' } },
    async ({ machine, output }) => {
      await machine.lifecycle.vmStart();
      await waitFor('ready', () => output().includes('ready'));
    },
  );
  await waitFor('threads to be reaped', () => processResources().threads <= before.threads, 5_000);
  assert.deepEqual(processResources(), before);
});
