/**
 * What the host's KVM can do, as named facts rather than KVM_CAP numbers,
 * so the machine and devices never handle capability numbers themselves.
 */
import { KVM_CAP, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE } from './ioctls.js';

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
  /** KVM_SET_CLOCK takes KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK bit 2): KVM adds the wall time since a given realtime. */
  readonly clockRealtime: boolean;
  /** The local APIC's TSC-deadline timer can be offered to guests. */
  readonly tscDeadlineTimer: boolean;
}

/** Asks KVM once for each fact. */
export function kvmHostCapabilities(kvm: CapabilitySource): KvmHostCapabilities {
  const adjustClock = kvm.checkExtension(KVM_CAP.ADJUST_CLOCK);
  return {
    kvmclockCtrl: kvm.checkExtension(KVM_CAP.KVMCLOCK_CTRL) > 0,
    clockTscStable: (adjustClock & KVM_CLOCK_TSC_STABLE) !== 0,
    clockRealtime: (adjustClock & KVM_CLOCK_REALTIME) !== 0,
    tscDeadlineTimer: kvm.checkExtension(KVM_CAP.TSC_DEADLINE_TIMER) > 0,
  };
}
