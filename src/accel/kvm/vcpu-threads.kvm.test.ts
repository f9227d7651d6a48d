/**
 * VcpuThreads on real KVM, below the machine: threads launched without
 * waiting for them, and what a thread that cannot start leaves behind.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createSerialState } from '../../hw/char/serial.js';
import { requireKvm } from '../../test-support/kvm.js';
import { processResources, waitFor } from '../../test-support/machine.js';
import { gettid } from './ffi.js';
import { Kvm } from './system.js';
import { type GuestRequest, VcpuThreads } from './vcpu-threads.js';

const devices = {
  serial: { state: createSerialState(), base: 0x3f8, irq: 4, outFd: null },
};

test('work queued before the threads are up runs once they are, on their own threads', async (t) => {
  if (!requireKvm(t)) return;
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  try {
    const threads = VcpuThreads.launch({
      vm,
      count: 2,
      runMmapSize: kvm.getVcpuMmapSize(),
      devices,
      onGuestRequest: () => {},
    });
    try {
      // Queued at once, answered through the event loop, in each queue's order.
      const tids = [threads.queueOnCpu(0, 'gettid'), threads.runOnCpu(1, 'gettid')];
      await threads.started();
      const [tid0, tid1] = (await Promise.all(tids)) as number[];
      assert.deepEqual([tid0, tid1], threads.threadIds);
      assert.notEqual(tid0, tid1);
      assert.ok(tid0 !== gettid() && tid1 !== gettid(), 'not the main thread');
    } finally {
      await threads.end();
    }
  } finally {
    vm.close();
    kvm.close();
  }
});

test('a vCPU thread that cannot start: started() rejects, its queued work fails, nothing is left behind', async (t) => {
  if (!requireKvm(t)) return;
  // Warm up what Node creates lazily (worker infrastructure, libuv pool).
  const warm = Kvm.open();
  warm.close();
  const before = processResources();
  const requests: GuestRequest[] = [];
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  try {
    const threads = VcpuThreads.launch({
      vm,
      count: 1,
      // Smaller than struct kvm_run: the thread's KvmVcpu refuses it.
      runMmapSize: 64,
      devices,
      onGuestRequest: (r) => requests.push(r),
    });
    const queued = threads.queueOnCpu(0, 'gettid');
    queued.catch(() => {});
    await assert.rejects(threads.started(), { code: 'VCPU_EXITED' });
    await assert.rejects(queued, { code: 'VCPU_EXITED' });
    await threads.end();
    assert.ok(
      requests.some((r) => r.type === 'fatal' && /kvm_run mapping size 64/.test(r.message)),
      `the cause is reported: ${JSON.stringify(requests)}`,
    );
  } finally {
    vm.close();
    kvm.close();
  }
  // The thread closed its vCPU fd on the way out.
  await waitFor(
    'the thread to be reaped',
    () => processResources().threads <= before.threads,
    5_000,
  );
  assert.deepEqual(processResources(), before);
});
