/**
 * What an x86 vCPU needs before a kernel runs on it, beyond its registers:
 * the FPU in its reset state, the local APIC's LINT pins wired as on a PC
 * (so the PIC's interrupts and NMIs reach the BSP in virtual-wire mode), and
 * the MSRs a kernel expects firmware to have set. Pure functions over the
 * vCPU's get/set calls; they run on the vCPU's own thread (vcpu-ops.ts).
 */
import type { KvmFpu } from '../../accel/kvm/structs/fpu.js';
import type { KvmMsrEntry } from '../../accel/kvm/structs/msrs.js';
import type { KvmLapicState } from '../../accel/kvm/structs/vcpu-state.js';

/** The part of a vCPU this module needs. */
export interface X86VcpuState {
  getFpu(): KvmFpu;
  setFpu(fpu: KvmFpu): void;
  getLapic(): KvmLapicState;
  setLapic(lapic: KvmLapicState): void;
}

/** x87 control word after FNINIT: all exceptions masked, 64-bit precision. */
export const FPU_RESET_FCW = 0x37f;
/** MXCSR after reset: all SIMD exceptions masked. */
export const MXCSR_RESET = 0x1f80;

const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_MODE_MASK = 0x700;
const APIC_MODE_EXTINT = 0x700;
const APIC_MODE_NMI = 0x400;
const APIC_LVT_MASKED = 0x10000;

/** Puts the FPU and SSE control registers in their reset state. */
export function initFpu(vcpu: X86VcpuState): void {
  vcpu.setFpu({ ...vcpu.getFpu(), fcw: FPU_RESET_FCW, mxcsr: MXCSR_RESET });
}

/** Returns a copy of `regs` (the 1 KiB LAPIC page) with LINT0 = ExtINT and LINT1 = NMI, unmasked. */
export function withPcLintWiring(regs: Uint8Array): Uint8Array {
  const copy = new Uint8Array(regs);
  const view = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
  for (const [offset, mode] of [
    [APIC_LVT_LINT0, APIC_MODE_EXTINT],
    [APIC_LVT_LINT1, APIC_MODE_NMI],
  ] as const) {
    const lvt = view.getUint32(offset, true);
    view.setUint32(offset, (lvt & ~(APIC_MODE_MASK | APIC_LVT_MASKED)) | mode, true);
  }
  return copy;
}

/** Wires the local APIC's LINT pins as a PC's firmware leaves them. */
export function initLapicLints(vcpu: X86VcpuState): void {
  vcpu.setLapic({ regs: withPcLintWiring(vcpu.getLapic().regs) });
}

export const MSR_IA32_SYSENTER_CS = 0x174;
export const MSR_IA32_SYSENTER_ESP = 0x175;
export const MSR_IA32_SYSENTER_EIP = 0x176;
export const MSR_IA32_MISC_ENABLE = 0x1a0;
export const MSR_MTRR_DEF_TYPE = 0x2ff;
export const MSR_STAR = 0xc0000081;
export const MSR_LSTAR = 0xc0000082;
export const MSR_CSTAR = 0xc0000083;
export const MSR_SYSCALL_MASK = 0xc0000084;
export const MSR_KERNEL_GS_BASE = 0xc0000102;

const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRs enabled, default type write-back: all RAM cacheable without per-range MTRRs. */
const MTRR_ENABLE_WRITEBACK = (1n << 11n) | 6n;

/** The MSRs a kernel finds set by firmware at boot. */
export function bootMsrs(): KvmMsrEntry[] {
  return [
    { index: MSR_IA32_SYSENTER_CS, data: 0n },
    { index: MSR_IA32_SYSENTER_ESP, data: 0n },
    { index: MSR_IA32_SYSENTER_EIP, data: 0n },
    { index: MSR_STAR, data: 0n },
    { index: MSR_CSTAR, data: 0n },
    { index: MSR_KERNEL_GS_BASE, data: 0n },
    { index: MSR_SYSCALL_MASK, data: 0n },
    { index: MSR_LSTAR, data: 0n },
    { index: MSR_IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING },
    { index: MSR_MTRR_DEF_TYPE, data: MTRR_ENABLE_WRITEBACK },
  ];
}
