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
import type { KvmRegs, KvmSegment } from './structs/regs.js';
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

/** The vCPU op behind HMP `info registers`. */
export const DESCRIBE_REGISTERS_OP = 'describe_registers';
/** The vCPU op behind HMP `info lapic`. */
export const DESCRIBE_LAPIC_OP = 'describe_lapic';

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
  /** The register dump of HMP `info registers`. */
  [DESCRIBE_REGISTERS_OP]: ({ vcpu }) => describeVcpuRegisters(vcpu),
  /** The LAPIC dump of HMP `info lapic`. */
  [DESCRIBE_LAPIC_OP]: ({ vcpu }) => describeVcpuLapic(vcpu),
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

const hex64 = (v: bigint) => v.toString(16).padStart(16, '0');
const hex32 = (v: number) => (v >>> 0).toString(16).padStart(8, '0');

/** QEMU's layout of one segment line: selector, base, limit and flags. */
function segmentLine(name: string, s: KvmSegment): string {
  const flags =
    (s.type << 8) | (s.s << 12) | (s.dpl << 13) | (s.present << 15) | (s.avl << 20) | (s.l << 21);
  const all = flags | (s.db << 22) | (s.g << 23);
  return `${name.padEnd(3)}=${s.selector.toString(16).padStart(4, '0')} ${hex64(s.base)} ${hex32(s.limit)} ${hex32(all)}`;
}

const MP_STATE_NAMES = Object.fromEntries(
  Object.entries(KVM_MP_STATE).map(([name, value]) => [value, name.toLowerCase()]),
);

/**
 * A register dump in the layout of QEMU's `info registers`: the general
 * registers, flags, segments, tables and control registers, plus the vCPU's
 * multiprocessing state (halted, waiting for SIPI) and its pending events,
 * which tell where a guest that stopped making progress is waiting.
 */
export function describeVcpuRegisters(vcpu: KvmVcpu): string {
  try {
    const r = vcpu.getRegs();
    const s = vcpu.getSregs();
    const mp = vcpu.getMpState().mpState;
    const ev = vcpu.getVcpuEvents();
    return [
      `RAX=${hex64(r.rax)} RBX=${hex64(r.rbx)} RCX=${hex64(r.rcx)} RDX=${hex64(r.rdx)}`,
      `RSI=${hex64(r.rsi)} RDI=${hex64(r.rdi)} RBP=${hex64(r.rbp)} RSP=${hex64(r.rsp)}`,
      `R8 =${hex64(r.r8)} R9 =${hex64(r.r9)} R10=${hex64(r.r10)} R11=${hex64(r.r11)}`,
      `R12=${hex64(r.r12)} R13=${hex64(r.r13)} R14=${hex64(r.r14)} R15=${hex64(r.r15)}`,
      `RIP=${hex64(r.rip)} RFL=${r.rflags.toString(16).padStart(8, '0')} CPL=${s.cs.selector & 3} ` +
        `HLT=${mp === KVM_MP_STATE.HALTED ? 1 : 0} MP=${MP_STATE_NAMES[mp] ?? mp}`,
      segmentLine('ES', s.es),
      segmentLine('CS', s.cs),
      segmentLine('SS', s.ss),
      segmentLine('DS', s.ds),
      segmentLine('FS', s.fs),
      segmentLine('GS', s.gs),
      segmentLine('LDT', s.ldt),
      segmentLine('TR', s.tr),
      `GDT=     ${hex64(s.gdt.base)} ${hex32(s.gdt.limit)}`,
      `IDT=     ${hex64(s.idt.base)} ${hex32(s.idt.limit)}`,
      `CR0=${hex32(Number(s.cr0))} CR2=${hex64(s.cr2)} CR3=${hex64(s.cr3)} CR4=${hex32(Number(s.cr4))}`,
      `CR8=${s.cr8.toString(16)} EFER=${hex64(s.efer)} APIC_BASE=${hex64(s.apicBase)}`,
      `EVENTS: exception=${ev.exception.injected ? ev.exception.nr : '-'} ` +
        `interrupt=${ev.interrupt.injected ? ev.interrupt.nr : '-'} shadow=${ev.interrupt.shadow} ` +
        `nmi=${ev.nmi.pending ? 'pending' : ev.nmi.injected ? 'injected' : '-'}${ev.nmi.masked ? ',masked' : ''}`,
    ].join('\n');
  } catch (err) {
    return `(registers unavailable: ${(err as Error).message})`;
  }
}

/** 32-bit LAPIC register at byte `offset` of the KVM_GET_LAPIC page. */
function lapicReg(regs: Uint8Array, offset: number): number {
  return new DataView(regs.buffer, regs.byteOffset, regs.byteLength).getUint32(offset, true);
}

/** The 256-bit ISR, TMR or IRR starting at `offset`, as the vectors set in it. */
function lapicVectors(regs: Uint8Array, offset: number): string {
  const vectors: number[] = [];
  for (let word = 0; word < 8; word++) {
    const bits = lapicReg(regs, offset + word * 16);
    for (let bit = 0; bit < 32; bit++) if (bits & (1 << bit)) vectors.push(word * 32 + bit);
  }
  return vectors.length ? vectors.join(',') : '(none)';
}

const MSR_IA32_TSC = 0x10;
const MSR_IA32_TSC_DEADLINE = 0x6e0;

/**
 * The local APIC as KVM holds it, in the spirit of QEMU's `info lapic`:
 * the timer (its LVT, counts and the TSC deadline against the TSC), the
 * other LVT entries, and the vectors in service and requested.
 */
export function describeVcpuLapic(vcpu: KvmVcpu): string {
  try {
    const regs = vcpu.getLapic().regs;
    const reg = (offset: number) => hex32(lapicReg(regs, offset));
    const [tsc, deadline] = vcpu.getMsrs([MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]);
    const lvtt = lapicReg(regs, 0x320);
    const mode = ['one-shot', 'periodic', 'tsc-deadline', 'reserved'][(lvtt >>> 17) & 3];
    return [
      `LAPIC ID=${lapicReg(regs, 0x20) >>> 24} SVR=${reg(0xf0)} TPR=${reg(0x80)} PPR=${reg(0xa0)}`,
      `LVTT=${reg(0x320)} (${mode}${lvtt & 0x10000 ? ', masked' : ''}, vector ${lvtt & 0xff}) ` +
        `TMICT=${reg(0x380)} TMCCT=${reg(0x390)} TDCR=${reg(0x3e0)}`,
      `TSC=${tsc ? hex64(tsc.data) : '?'} TSC_DEADLINE=${deadline ? hex64(deadline.data) : '?'}`,
      `LINT0=${reg(0x350)} LINT1=${reg(0x360)} LVTERR=${reg(0x370)} ESR=${reg(0x280)}`,
      `ISR=${lapicVectors(regs, 0x100)}`,
      `TMR=${lapicVectors(regs, 0x180)}`,
      `IRR=${lapicVectors(regs, 0x200)}`,
    ].join('\n');
  } catch (err) {
    return `(LAPIC unavailable: ${(err as Error).message})`;
  }
}
