/**
 * What the host's KVM can do, as named facts rather than KVM_CAP numbers,
 * so the machine and devices never handle capability numbers themselves.
 */
import { KVM_CAP, KVM_CLOCK_TSC_STABLE } from './ioctls.js';

/** The part of Kvm this module needs. */
export interface CapabilitySource {
  checkExtension(cap: number): number;
}

/** The host facts tsvmm acts on. */
export interface KvmHostCapabilities {
  /** KVM_KVMCLOCK_CTRL exists: a vCPU can be told it was stopped. */
  readonly kvmclockCtrl: boolean;
  /** KVM_GET_CLOCK is TSC-stable (KVM_CAP_ADJUST_CLOCK reports KVM_CLOCK_TSC_STABLE). */
  readonly clockTscStable: boolean;
  /** The local APIC's TSC-deadline timer can be offered to guests. */
  readonly tscDeadlineTimer: boolean;
}

/** Asks KVM once for each fact. */
export function kvmHostCapabilities(kvm: CapabilitySource): KvmHostCapabilities {
  return {
    kvmclockCtrl: kvm.checkExtension(KVM_CAP.KVMCLOCK_CTRL) > 0,
    clockTscStable: (kvm.checkExtension(KVM_CAP.ADJUST_CLOCK) & KVM_CLOCK_TSC_STABLE) !== 0,
    tscDeadlineTimer: kvm.checkExtension(KVM_CAP.TSC_DEADLINE_TIMER) > 0,
  };
}
