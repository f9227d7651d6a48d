// Tests against a real /dev/kvm: the test runner gives them one (the host's,
// or the nested-KVM VM's), and requireKvm fails them without it. They never
// fake the kernel.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { type TestContext, test } from 'node:test';
import { requireKvm } from '../../test-support/kvm.js';
import { KvmClosedError, KvmIoctlError } from './errors.js';
import { KVM_API_VERSION, KVM_CAP, KVM_EXIT } from './ioctls.js';
import { GuestMemory } from './memory/guest-memory.js';
import { KVM_EXIT_IO_OUT, KVM_RUN_SIZE } from './structs/run.js';
import { KVM_IRQCHIP_PIC_MASTER } from './structs/vm.js';
import { Kvm } from './system.js';
import type { KvmVcpu } from './vcpu.js';
import type { KvmVm } from './vm.js';

const MiB = 2 ** 20;
// Where QEMU puts the VMX real-mode TSS: three pages just below the BIOS.
const TSS_ADDR = 0xfffb_d000;

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

interface Machine {
  kvm: Kvm;
  vm: KvmVm;
  mem: GuestMemory;
  vcpu: KvmVcpu;
}

/** A VM with 16 MiB of RAM and one vCPU; `irqchip` adds the in-kernel PIC/IOAPIC/PIT. */
function makeMachine(t: TestContext, irqchip: boolean): Machine {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const mem = GuestMemory.create(16 * MiB, { layout: 'flat' });
  vm.setTssAddr(TSS_ADDR);
  if (irqchip) {
    vm.createIrqchip();
    vm.createPit2();
  }
  mem.register(vm, { logDirty: true });
  const vcpu = vm.createVcpuHandle(0);
  t.after(() => {
    vcpu.close();
    vm.close();
    mem.close();
    kvm.close();
  });
  return { kvm, vm, mem, vcpu };
}

test('KVM system fd: API version, capabilities, mmap size, CPUID and MSR lists', (t) => {
  if (!requireKvm(t)) return;
  const kvm = Kvm.open();
  try {
    assert.equal(kvm.getApiVersion(), KVM_API_VERSION);
    assert.ok(kvm.checkExtension(KVM_CAP.USER_MEMORY) > 0);
    assert.ok(kvm.checkExtension(KVM_CAP.IRQCHIP) > 0);
    assert.ok(kvm.checkExtension(KVM_CAP.NR_VCPUS) > 0);
    assert.ok(kvm.checkExtension(KVM_CAP.ADJUST_CLOCK) > 0);
    assert.ok(kvm.getVcpuMmapSize() >= KVM_RUN_SIZE);
    const cpuid = kvm.getSupportedCpuid();
    assert.ok(
      cpuid.some((e) => e.function === 0),
      'leaf 0 is offered',
    );
    const msrs = kvm.getMsrIndexList();
    assert.ok(msrs.length > 0);
    assert.ok(msrs.includes(0x10), 'the TSC MSR is listed');
  } finally {
    kvm.close();
  }
});

test('VM and vCPU: registers, special registers and the rest of the state round trip', (t) => {
  if (!requireKvm(t)) return;
  const { vm, vcpu } = makeMachine(t, true);
  assert.ok(vm.checkExtension(KVM_CAP.USER_MEMORY) > 0);

  const regs = vcpu.getRegs();
  vcpu.setRegs({ ...regs, rip: 0x1234n, rsp: 0x8000n, rax: 0xdeadbeefn, rflags: 2n });
  const regs2 = vcpu.getRegs();
  assert.equal(regs2.rip, 0x1234n);
  assert.equal(regs2.rsp, 0x8000n);
  assert.equal(regs2.rax, 0xdeadbeefn);

  const sregs = vcpu.getSregs();
  sregs.cs.base = 0x10000n;
  sregs.cs.selector = 0x1000;
  sregs.cr3 = 0x9000n;
  vcpu.setSregs(sregs);
  const sregs2 = vcpu.getSregs();
  assert.equal(sregs2.cs.base, 0x10000n);
  assert.equal(sregs2.cs.selector, 0x1000);
  assert.equal(sregs2.cr3, 0x9000n);

  vcpu.setFpu(vcpu.getFpu());
  vcpu.setLapic(vcpu.getLapic());
  vcpu.setVcpuEvents(vcpu.getVcpuEvents());
  const mp = vcpu.getMpState();
  vcpu.setMpState(mp);
  const dr = vcpu.getDebugregs();
  vcpu.setDebugregs(dr);
  if (vm.checkExtension(KVM_CAP.XSAVE) > 0) vcpu.setXsave(vcpu.getXsave());
  if (vm.checkExtension(KVM_CAP.XCRS) > 0) vcpu.setXcrs(vcpu.getXcrs());
  const [tsc] = vcpu.getMsrs([0x10]);
  assert.equal(tsc?.index, 0x10);

  const pic = vm.getIrqchip(KVM_IRQCHIP_PIC_MASTER);
  vm.setIrqchip(pic);
  vm.setPit2(vm.getPit2());
  vm.irqLine(4, 1);
  vm.irqLine(4, 0);
});

test('KVM_GET_CLOCK / KVM_SET_CLOCK set the VM clock exactly with flags 0', (t) => {
  if (!requireKvm(t)) return;
  const { vm } = makeMachine(t, true);
  const before = vm.getClock();
  assert.ok(before.clock >= 0n);
  const target = before.clock + 5_000_000_000n;
  vm.setClock({ clock: target });
  const after = vm.getClock();
  assert.ok(after.clock >= target, `clock ${after.clock} is below the ${target} just set`);
  assert.ok(after.clock - target < 1_000_000_000n, 'and within a second of it');
  vm.setClock({ clock: before.clock });
  assert.ok(vm.getClock().clock < target, 'the clock can be set backwards');
});

test('KVM_RUN runs real-mode code: a port write exits with its data, then HLT exits', (t) => {
  if (!requireKvm(t)) return;
  // No in-kernel irqchip, so HLT comes back to us instead of sleeping in KVM.
  const { mem, vcpu, vm } = makeMachine(t, false);
  // mov al, 0x42 ; out 0x10, al ; hlt
  mem.write(0x1000, Uint8Array.of(0xb0, 0x42, 0xe6, 0x10, 0xf4));
  const sregs = vcpu.getSregs();
  sregs.cs.base = 0n;
  sregs.cs.selector = 0;
  vcpu.setSregs(sregs);
  vcpu.setRegs({ ...vcpu.getRegs(), rip: 0x1000n, rflags: 2n });

  assert.equal(vcpu.run(), KVM_EXIT.IO);
  const io = vcpu.kvmRun.io();
  assert.equal(io.direction, KVM_EXIT_IO_OUT);
  assert.equal(io.port, 0x10);
  assert.equal(io.size, 1);
  assert.deepEqual([...vcpu.kvmRun.ioData()], [0x42]);
  assert.equal(vcpu.run(), KVM_EXIT.HLT);

  // The slot was registered with dirty logging: the log covers every page.
  const bitmap = vm.getDirtyLog(0, mem.slots[0]!.size / 4096);
  assert.equal(bitmap.byteLength, mem.slots[0]!.size / 4096 / 8);

  // immediate_exit makes the next KVM_RUN return at once as an interruption.
  vcpu.kvmRun.immediateExit = 1;
  assert.equal(vcpu.run(), KVM_EXIT.INTR);
  vcpu.kvmRun.immediateExit = 0;
});

test('a coalesced port: KVM queues its writes in the ring without exiting; another port still exits', (t) => {
  if (!requireKvm(t)) return;
  const { kvm, mem, vcpu, vm } = makeMachine(t, false);
  const ringPage = kvm.checkExtension(KVM_CAP.COALESCED_MMIO);
  assert.ok(ringPage > 0, 'KVM_CAP_COALESCED_MMIO gives the ring page');
  assert.ok(kvm.checkExtension(KVM_CAP.COALESCED_PIO) > 0, 'KVM_CAP_COALESCED_PIO');
  vm.registerCoalescedPio(0x3f8, 1);
  // mov dx, 0x3f8 ; mov al, 'o' ; out dx, al ; mov al, 'k' ; out dx, al ;
  // inc dx ; out dx, al (0x3f9: not coalesced) ; hlt
  mem.write(
    0x1000,
    Uint8Array.of(0xba, 0xf8, 0x03, 0xb0, 0x6f, 0xee, 0xb0, 0x6b, 0xee, 0x42, 0xee, 0xf4),
  );
  const sregs = vcpu.getSregs();
  sregs.cs.base = 0n;
  sregs.cs.selector = 0;
  vcpu.setSregs(sregs);
  vcpu.setRegs({ ...vcpu.getRegs(), rip: 0x1000n, rflags: 2n });
  const ring = vcpu.coalescedRing(ringPage);
  assert.equal(ring.pending, false);

  assert.equal(vcpu.run(), KVM_EXIT.IO, 'the first exit is the uncoalesced port');
  assert.equal(vcpu.kvmRun.io().port, 0x3f9);
  const queued: [number, boolean, number[]][] = [];
  ring.drain((addr, pio, data) => queued.push([addr, pio, [...data]]));
  assert.deepEqual(queued, [
    [0x3f8, true, [0x6f]],
    [0x3f8, true, [0x6b]],
  ]);
  assert.equal(ring.pending, false);
  assert.equal(vcpu.run(), KVM_EXIT.HLT);
});

test('handles refuse use after close and release every fd', (t) => {
  if (!requireKvm(t)) return;
  const before = openFds();
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const vcpu = vm.createVcpuHandle(0);
  assert.throws(
    () => vm.createVcpu(0),
    (e: unknown) => e instanceof KvmIoctlError && e.errnoName === 'EEXIST',
  );
  vcpu.close();
  vm.close();
  kvm.close();
  assert.equal(openFds(), before);
  assert.throws(() => vcpu.getRegs(), KvmClosedError);
  assert.throws(() => vcpu.kvmRun.exitReason, KvmClosedError);
  assert.throws(() => vm.getClock(), KvmClosedError);
  assert.throws(() => kvm.checkExtension(0), KvmClosedError);
  vcpu.close();
});
