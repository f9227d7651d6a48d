// KVM ioctl tracing: `kvm_vm_ioctl` for VM fds, `kvm_vcpu_ioctl` for vCPU
// fds (never KVM_RUN). The failure path runs anywhere: a KVM ioctl on a file
// that is not a KVM fd fails with ENOTTY and is traced with ret=-25. The
// success path needs a real /dev/kvm.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { requireKvm } from '../../test-support/kvm.js';
import { captureTrace, traceBody } from '../../trace/capture.js';
import { Errno, errnoName } from './errno.js';
import { KvmIoctlError } from './errors.js';
import { lastErrno, O_CLOEXEC, O_RDWR, sysOpen } from './ffi.js';
import { KVM_CAP } from './ioctls.js';
import { Kvm } from './system.js';
import { KvmVcpu } from './vcpu.js';
import { KvmVm } from './vm.js';

const ENOTTY_RET = -Errno.ENOTTY;
/** Room for struct kvm_run, as KvmVcpu insists on; one page. */
const RUN_SIZE = 4096;

function openOrFail(path: string): number {
  const fd = sysOpen(path, O_RDWR | O_CLOEXEC);
  assert.ok(fd >= 0, `open ${path}: ${errnoName(lastErrno())}`);
  return fd;
}

/**
 * A KvmVcpu over a page-sized temp file: mmap works on it (as on a vCPU fd)
 * and every KVM ioctl on it fails with ENOTTY. Closed and removed after the test.
 */
function fakeVcpuFile(t: TestContext, index?: number): KvmVcpu {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-ioctl-trace-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'not-a-vcpu');
  writeFileSync(path, Buffer.alloc(RUN_SIZE));
  const fd = openOrFail(path);
  const vcpu = new KvmVcpu(fd, RUN_SIZE, index === undefined ? {} : { index });
  t.after(() => vcpu.close());
  return vcpu;
}

function assertEnotty(ioctl: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof KvmIoctlError);
    assert.equal(e.ioctl, ioctl);
    // errno is read before the trace record is written, so it survives it.
    assert.equal(e.errno, Errno.ENOTTY);
    return true;
  };
}

test('a failed VM ioctl is traced as kvm_vm_ioctl with ret=-errno, then thrown', async () => {
  const vm = new KvmVm(openOrFail('/dev/null'));
  try {
    const lines = await captureTrace(['kvm_vm_ioctl'], () => {
      assert.throws(() => vm.getClock(), assertEnotty('KVM_GET_CLOCK'));
      assert.throws(
        () => vm.checkExtension(KVM_CAP.KVMCLOCK_CTRL),
        assertEnotty('KVM_CHECK_EXTENSION'),
      );
    });
    assert.deepEqual(lines.map(traceBody), [
      `kvm_vm_ioctl type=KVM_GET_CLOCK ret=${ENOTTY_RET}`,
      `kvm_vm_ioctl type=KVM_CHECK_EXTENSION ret=${ENOTTY_RET}`,
    ]);
    assert.match(
      lines[0]!,
      new RegExp(
        `^${process.pid}@\\d+\\.\\d{6}:kvm_vm_ioctl type=KVM_GET_CLOCK ret=-25 thread=main$`,
      ),
    );
  } finally {
    vm.close();
  }
});

test('a failed vCPU ioctl is traced as kvm_vcpu_ioctl with the cpu index; KVM_RUN is not traced', async (t) => {
  const vcpu = fakeVcpuFile(t, 3);
  assert.equal(vcpu.index, 3);
  const lines = await captureTrace(['kvm_vcpu_ioctl', 'kvm_vm_ioctl'], () => {
    assert.throws(() => vcpu.getRegs(), assertEnotty('KVM_GET_REGS'));
    assert.throws(() => vcpu.run(), assertEnotty('KVM_RUN'));
    assert.throws(() => vcpu.kvmclockCtrl(), assertEnotty('KVM_KVMCLOCK_CTRL'));
  });
  assert.deepEqual(lines.map(traceBody), [
    `kvm_vcpu_ioctl cpu=3 type=KVM_GET_REGS ret=${ENOTTY_RET}`,
    `kvm_vcpu_ioctl cpu=3 type=KVM_KVMCLOCK_CTRL ret=${ENOTTY_RET}`,
  ]);
  assert.match(lines[0]!, / thread=main$/);
});

test('a vCPU built without an index traces cpu=-1', async (t) => {
  const vcpu = fakeVcpuFile(t);
  assert.equal(vcpu.index, -1);
  const lines = await captureTrace(['kvm_vcpu_ioctl'], () => {
    assert.throws(() => vcpu.getMpState(), assertEnotty('KVM_GET_MP_STATE'));
  });
  assert.deepEqual(lines.map(traceBody), [
    `kvm_vcpu_ioctl cpu=-1 type=KVM_GET_MP_STATE ret=${ENOTTY_RET}`,
  ]);
});

test('with the ioctl events off nothing is written, and failures still throw', async (t) => {
  const vcpu = fakeVcpuFile(t, 0);
  const vm = new KvmVm(openOrFail('/dev/null'));
  try {
    const lines = await captureTrace(['kvm_*', '-kvm_vm_ioctl', '-kvm_vcpu_ioctl'], () => {
      assert.throws(() => vm.getClock(), assertEnotty('KVM_GET_CLOCK'));
      assert.throws(() => vcpu.getSregs(), assertEnotty('KVM_GET_SREGS'));
    });
    assert.deepEqual(lines, []);
  } finally {
    vm.close();
  }
});

test('successful VM and vCPU ioctls are traced with their result', async (t) => {
  if (!requireKvm(t)) return;
  const kvm = Kvm.open();
  let vm: KvmVm | undefined;
  let vcpu: KvmVcpu | undefined;
  t.after(() => {
    vcpu?.close();
    vm?.close();
    kvm.close();
  });
  let ctrlCap = -1;
  const lines = await captureTrace(['kvm_vm_ioctl', 'kvm_vcpu_ioctl'], () => {
    vm = kvm.createVm();
    ctrlCap = vm.checkExtension(KVM_CAP.KVMCLOCK_CTRL);
    vm.getClock();
    vcpu = vm.createVcpuHandle(1);
    vcpu.getRegs();
  });
  assert.ok(vcpu !== undefined);
  const bodies = lines.map(traceBody);
  // KVM_CREATE_VM is a system ioctl (/dev/kvm), not a VM one: not traced here.
  assert.deepEqual(bodies.slice(0, 2), [
    `kvm_vm_ioctl type=KVM_CHECK_EXTENSION ret=${ctrlCap}`,
    'kvm_vm_ioctl type=KVM_GET_CLOCK ret=0',
  ]);
  assert.equal(bodies[2], `kvm_vm_ioctl type=KVM_CREATE_VCPU ret=${vcpu.fd}`);
  assert.equal(bodies[3], 'kvm_vcpu_ioctl cpu=1 type=KVM_GET_REGS ret=0');
  assert.equal(bodies.length, 4);
});
