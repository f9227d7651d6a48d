/**
 * The whole architectural state of one x86 vCPU as plain data, and the two
 * vCPU-thread functions that read it from KVM and write it back. They run
 * on the vCPU's own thread (as the vCPU ops `get_cpu_state` and
 * `set_cpu_state`), because KVM wants vCPU ioctls from the thread that runs
 * the vCPU; the state object then crosses to the main thread by structured
 * clone, which is why it holds only numbers, bigints, arrays and bytes.
 */
import { MSR_KVM_SYSTEM_TIME_NEW } from '../../hw/i386/kvm/pvclock.js';
import { TsvmmError } from '../../util/errors.js';
import type { KvmFpu, KvmXcrs, KvmXsave } from './structs/fpu.js';
import type { KvmMsrEntry } from './structs/msrs.js';
import type { KvmDebugregs, KvmRegs, KvmSregs } from './structs/regs.js';
import type { KvmLapicState, KvmMpState, KvmVcpuEvents } from './structs/vcpu-state.js';
import type { KvmVcpu } from './vcpu.js';

/** MSR_IA32_TSC. */
export const MSR_IA32_TSC = 0x10;
/** MSR_IA32_TSC_DEADLINE: restored after the LAPIC (see restoreCpuState). */
export const MSR_IA32_TSC_DEADLINE = 0x6e0;
/** MSR_KVM_WALL_CLOCK_NEW. */
export const MSR_KVM_WALL_CLOCK_NEW = 0x4b564d00;

/**
 * The MSRs saved for every vCPU, in the order they are read and written,
 * each with the field name it has in the migration stream. Fixed, so both
 * ends agree on the stream's layout; at most 64 (a presence bit each).
 * Left out on purpose: feature MSRs the CPUID model decides (tsvmm has one
 * model). MSRs this host's KVM cannot read are skipped (readMsrs).
 */
export const CPU_MSRS: readonly { readonly index: number; readonly name: string }[] = [
  { index: MSR_IA32_TSC, name: 'tsc' },
  { index: 0x1b, name: 'apic_base' },
  { index: 0x3b, name: 'tsc_adjust' },
  { index: 0x1a0, name: 'misc_enable' },
  { index: 0x174, name: 'sysenter_cs' },
  { index: 0x175, name: 'sysenter_esp' },
  { index: 0x176, name: 'sysenter_eip' },
  { index: 0x277, name: 'pat' },
  { index: 0x2ff, name: 'mtrr_deftype' },
  { index: 0x250, name: 'mtrr_fixed_64k_00000' },
  { index: 0x258, name: 'mtrr_fixed_16k_80000' },
  { index: 0x259, name: 'mtrr_fixed_16k_a0000' },
  ...Array.from({ length: 8 }, (_, i) => ({
    index: 0x268 + i,
    name: `mtrr_fixed_4k_${(0xc0000 + i * 0x8000).toString(16)}`,
  })),
  ...Array.from({ length: 8 }, (_, i) => [
    { index: 0x200 + 2 * i, name: `mtrr_var${i}_base` },
    { index: 0x201 + 2 * i, name: `mtrr_var${i}_mask` },
  ]).flat(),
  { index: 0xc0000080, name: 'efer' },
  { index: 0xc0000081, name: 'star' },
  { index: 0xc0000082, name: 'lstar' },
  { index: 0xc0000083, name: 'cstar' },
  { index: 0xc0000084, name: 'fmask' },
  { index: 0xc0000102, name: 'kernel_gs_base' },
  { index: 0xc0000103, name: 'tsc_aux' },
  { index: MSR_KVM_WALL_CLOCK_NEW, name: 'kvm_wall_clock' },
  { index: MSR_KVM_SYSTEM_TIME_NEW, name: 'kvm_system_time' },
  { index: MSR_IA32_TSC_DEADLINE, name: 'tsc_deadline' },
  // KVM's other paravirtual MSRs, which a Linux guest enables when CPUID
  // offers them (hw/i386/cpuid.ts passes them through). The async-PF
  // interrupt vector goes before async-PF enable: KVM wants it set first.
  { index: 0x4b564d06, name: 'kvm_async_pf_int' },
  { index: 0x4b564d02, name: 'kvm_async_pf_en' },
  { index: 0x4b564d03, name: 'kvm_steal_time' },
  { index: 0x4b564d04, name: 'kvm_pv_eoi_en' },
  { index: 0x4b564d05, name: 'kvm_poll_control' },
];

/**
 * Everything KVM holds for one vCPU. Exactly one of `fpu` and `xsave` is
 * set; `xcrs` is set where the host has KVM_CAP_XCRS. `msrs` holds the
 * {@link CPU_MSRS} that KVM could read, in that order.
 */
export interface CpuSavedState {
  regs: KvmRegs;
  sregs: KvmSregs;
  fpu?: KvmFpu;
  xsave?: KvmXsave;
  xcrs?: KvmXcrs;
  msrs: KvmMsrEntry[];
  lapic: KvmLapicState;
  events: KvmVcpuEvents;
  mpState: KvmMpState;
  debugregs: KvmDebugregs;
}

/** The KvmVcpu methods the state functions use (a recording double implements them in tests). */
export type CpuStateVcpu = Pick<
  KvmVcpu,
  | 'getRegs'
  | 'setRegs'
  | 'getSregs'
  | 'setSregs'
  | 'getFpu'
  | 'setFpu'
  | 'getXsave'
  | 'setXsave'
  | 'getXcrs'
  | 'setXcrs'
  | 'getMsrs'
  | 'setMsrs'
  | 'getLapic'
  | 'setLapic'
  | 'getVcpuEvents'
  | 'setVcpuEvents'
  | 'getMpState'
  | 'setMpState'
  | 'getDebugregs'
  | 'setDebugregs'
>;

/** What the host's KVM offers, from KVM_CHECK_EXTENSION; both default to true (every x86-64 host since Linux 2.6.36). */
export interface CpuStateOptions {
  /** KVM_CAP_XSAVE: save the XSAVE area rather than the legacy FPU state. */
  readonly xsave?: boolean;
  /** KVM_CAP_XCRS: save XCR0. */
  readonly xcrs?: boolean;
}

/** A vCPU's state could not be restored (KVM refused part of it). */
export class CpuStateError extends TsvmmError {}

/**
 * KVM_GET_MSRS stops at the first MSR it cannot read; read the rest after
 * skipping it, so one MSR this host lacks does not lose the others.
 */
function readMsrs(vcpu: CpuStateVcpu, indices: readonly number[]): KvmMsrEntry[] {
  const out: KvmMsrEntry[] = [];
  let rest = indices;
  while (rest.length > 0) {
    const got = vcpu.getMsrs(rest);
    out.push(...got);
    rest = rest.slice(got.length + 1);
  }
  return out;
}

/**
 * Reads the vCPU's whole state (QEMU's kvm_arch_get_registers). Run it on
 * the vCPU's own thread, with the VM stopped.
 */
export function captureCpuState(vcpu: CpuStateVcpu, options: CpuStateOptions = {}): CpuSavedState {
  const regs = vcpu.getRegs();
  const sregs = vcpu.getSregs();
  const fp: Pick<CpuSavedState, 'fpu' | 'xsave' | 'xcrs'> =
    options.xsave === false ? { fpu: vcpu.getFpu() } : { xsave: vcpu.getXsave() };
  if (options.xcrs !== false) fp.xcrs = vcpu.getXcrs();
  const msrs = readMsrs(
    vcpu,
    CPU_MSRS.map((m) => m.index),
  );
  return {
    regs,
    sregs,
    ...fp,
    msrs,
    lapic: vcpu.getLapic(),
    events: vcpu.getVcpuEvents(),
    mpState: vcpu.getMpState(),
    debugregs: vcpu.getDebugregs(),
  };
}

function writeMsrs(vcpu: CpuStateVcpu, entries: readonly KvmMsrEntry[]): void {
  if (entries.length === 0) return;
  const set = vcpu.setMsrs(entries);
  if (set < entries.length) {
    const refused = entries[set]!;
    throw new CpuStateError(
      'CPU_STATE_MSR_REFUSED',
      `KVM_SET_MSRS refused MSR 0x${refused.index.toString(16)} (value 0x${refused.data.toString(16)}): ` +
        "the destination host's KVM does not support it; migrate between hosts with the same CPU features",
    );
  }
}

/**
 * Writes a state read by {@link captureCpuState} back into the vCPU (QEMU's
 * kvm_arch_put_registers at KVM_PUT_FULL_STATE, plus the LAPIC). Run it on
 * the vCPU's own thread, with the VM stopped. The order matters:
 * - sregs before regs: the control registers and EFER set the mode that
 *   the general registers and RIP are interpreted in;
 * - MSRs (with the TSC) after the mode is set, before the LAPIC;
 * - the LAPIC, then the TSC deadline MSR: KVM ignores a deadline written
 *   while the LAPIC timer is not in TSC-deadline mode;
 * - vCPU events (pending exceptions, NMIs, interrupt shadow) and then the
 *   MP state last, because KVM_SET_MP_STATE acts on pending INIT/SIPI.
 */
export function restoreCpuState(vcpu: CpuStateVcpu, state: CpuSavedState): void {
  vcpu.setSregs(state.sregs);
  vcpu.setRegs(state.regs);
  if (state.xsave) vcpu.setXsave(state.xsave);
  else if (state.fpu) vcpu.setFpu(state.fpu);
  else {
    throw new CpuStateError(
      'CPU_STATE_INCOMPLETE',
      'the saved vCPU state has neither an XSAVE area nor FPU state',
    );
  }
  if (state.xcrs) vcpu.setXcrs(state.xcrs);
  writeMsrs(
    vcpu,
    state.msrs.filter((m) => m.index !== MSR_IA32_TSC_DEADLINE),
  );
  vcpu.setLapic(state.lapic);
  writeMsrs(
    vcpu,
    state.msrs.filter((m) => m.index === MSR_IA32_TSC_DEADLINE),
  );
  vcpu.setVcpuEvents(state.events);
  vcpu.setMpState(state.mpState);
  vcpu.setDebugregs(state.debugregs);
}
