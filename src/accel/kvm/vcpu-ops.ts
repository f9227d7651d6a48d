/**
 * Operations the main thread can run on a vCPU's own thread (runOnCpu).
 * Work crosses threads as a name and plain data, so every operation a
 * vCPU thread can run is listed here.
 */
import { doKvmclockCtrl } from '../../hw/i386/kvm/clock.js';
import { longModeSregs } from '../../hw/i386/long-mode.js';
import { bootMsrs, initFpu, initLapicLints } from '../../hw/i386/vcpu-init.js';
import { TsvmmError } from '../../util/errors.js';
import { type CpuSavedState, captureCpuState, restoreCpuState } from './cpu-state.js';
import { gettid } from './ffi.js';
import type { KvmCpuidEntry2 } from './structs/cpuid.js';
import type { KvmMsrEntry } from './structs/msrs.js';
import type { KvmRegs } from './structs/regs.js';
import { KVM_MP_STATE } from './structs/vcpu-state.js';
import type { KvmVcpu } from './vcpu.js';

/** What an operation sees: the thread's vCPU and index. */
export interface VcpuOpContext {
  vcpu: KvmVcpu;
  index: number;
  /** Lets a vCPU parked after a guest reset or power-off request run again. */
  unpark(): void;
}

/** Registers a direct 64-bit start gives the guest (see hw/i386/long-mode.ts). */
export interface LongModeEntry {
  rip: bigint;
  rsp: bigint;
  rdi?: bigint;
  rsi?: bigint;
  rdx?: bigint;
}

export class UnknownVcpuOpError extends TsvmmError {
  constructor(op: string) {
    super('VCPU_UNKNOWN_OP', `no vCPU operation named '${op}'`);
  }
}

type VcpuOp = (ctx: VcpuOpContext, arg: unknown) => unknown;

const ZERO_REGS: KvmRegs = {
  rax: 0n,
  rbx: 0n,
  rcx: 0n,
  rdx: 0n,
  rsi: 0n,
  rdi: 0n,
  rsp: 0n,
  rbp: 0n,
  r8: 0n,
  r9: 0n,
  r10: 0n,
  r11: 0n,
  r12: 0n,
  r13: 0n,
  r14: 0n,
  r15: 0n,
  rip: 0n,
  rflags: 2n,
};

const OPS: Record<string, VcpuOp> = {
  /** The kernel id of the thread that ran the op, after an ioctl on this vCPU. */
  gettid: ({ vcpu }) => {
    vcpu.getRegs();
    return gettid();
  },
  kvmclock_ctrl: ({ vcpu, index }) => doKvmclockCtrl(vcpu, index),
  set_cpuid: ({ vcpu }, arg) => vcpu.setCpuid2(arg as KvmCpuidEntry2[]),
  set_msrs: ({ vcpu }, arg) => vcpu.setMsrs(arg as KvmMsrEntry[]),
  get_msrs: ({ vcpu }, arg) => vcpu.getMsrs(arg as number[]),
  get_regs: ({ vcpu }) => vcpu.getRegs(),
  set_regs: ({ vcpu }, arg) => vcpu.setRegs(arg as KvmRegs),
  start_long_mode: ({ vcpu }, arg) => {
    const entry = arg as LongModeEntry;
    // With the in-kernel irqchip every vCPU but the first is created waiting
    // for INIT/SIPI; a vCPU we start ourselves must be made runnable.
    vcpu.setMpState({ mpState: KVM_MP_STATE.RUNNABLE });
    vcpu.setSregs(longModeSregs(vcpu.getSregs()));
    vcpu.setRegs({
      ...ZERO_REGS,
      rip: entry.rip,
      rsp: entry.rsp,
      rdi: entry.rdi ?? 0n,
      rsi: entry.rsi ?? 0n,
      rdx: entry.rdx ?? 0n,
    });
  },
  unpark: (ctx) => ctx.unpark(),
  /** All of the vCPU's state, for the migration stream (see cpu-state.ts). */
  get_cpu_state: ({ vcpu }) => captureCpuState(vcpu),
  set_cpu_state: ({ vcpu }, arg) => restoreCpuState(vcpu, arg as CpuSavedState),
  /** FPU reset state, PC LINT wiring and the boot MSRs (see hw/i386/vcpu-init.ts). */
  init_x86: ({ vcpu }) => {
    initFpu(vcpu);
    initLapicLints(vcpu);
    const msrs = bootMsrs();
    const set = vcpu.setMsrs(msrs);
    if (set !== msrs.length) {
      throw new TsvmmError(
        'VCPU_MSR_REFUSED',
        `KVM refused MSR 0x${msrs[set]!.index.toString(16)} at boot`,
      );
    }
  },
};

/** Runs operation `op` on this thread's vCPU. */
export function runVcpuOp(ctx: VcpuOpContext, op: string, arg: unknown): unknown {
  const fn = OPS[op];
  if (!fn) throw new UnknownVcpuOpError(op);
  return fn(ctx, arg);
}

/** The names of every operation a vCPU thread can run. */
export function vcpuOpNames(): string[] {
  return Object.keys(OPS);
}

/** A register dump like the one QEMU prints after a KVM internal error. */
export function describeVcpuRegisters(vcpu: KvmVcpu): string {
  try {
    const r = vcpu.getRegs();
    const s = vcpu.getSregs();
    const hex = (v: bigint) => v.toString(16).padStart(16, '0');
    return [
      `RAX=${hex(r.rax)} RBX=${hex(r.rbx)} RCX=${hex(r.rcx)} RDX=${hex(r.rdx)}`,
      `RSI=${hex(r.rsi)} RDI=${hex(r.rdi)} RBP=${hex(r.rbp)} RSP=${hex(r.rsp)}`,
      `R8 =${hex(r.r8)} R9 =${hex(r.r9)} R10=${hex(r.r10)} R11=${hex(r.r11)}`,
      `R12=${hex(r.r12)} R13=${hex(r.r13)} R14=${hex(r.r14)} R15=${hex(r.r15)}`,
      `RIP=${hex(r.rip)} RFL=${r.rflags.toString(16).padStart(8, '0')}`,
      `CS =${s.cs.selector.toString(16).padStart(4, '0')} ${hex(s.cs.base)} ${s.cs.limit.toString(16)}`,
      `CR0=${s.cr0.toString(16)} CR2=${hex(s.cr2)} CR3=${hex(s.cr3)} CR4=${s.cr4.toString(16)}`,
      `EFER=${hex(s.efer)}`,
    ].join('\n');
  } catch (err) {
    return `(registers unavailable: ${(err as Error).message})`;
  }
}
