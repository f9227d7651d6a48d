/**
 * The CPUID table each vCPU gets with KVM_SET_CPUID2, made from the host's
 * KVM_GET_SUPPORTED_CPUID. Plain data in, plain data out: the input is never
 * changed, and nothing here touches KVM.
 *
 * KVM_GET_SUPPORTED_CPUID describes what KVM can offer, not one CPU: its
 * topology fields still hold the host's values (APIC id 0, the host's core
 * counts). This module fills in the per-vCPU ones and adds what a guest needs
 * to find the hypervisor: the hypervisor bit and the KVM paravirtual leaves,
 * without which Linux never selects kvm-clock.
 *
 * Topology: `-smp N` is N sockets of one core with one thread each, as in
 * QEMU's classic `-smp N` and as the MP table (mptable.ts) describes it:
 * one processor entry per socket. So APIC id = vCPU index, every level of
 * leaves 0xB/0x1F has an id shift of 0, and leaf 4 says one core per
 * package with each cache private to its logical processor.
 */
import {
  KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
  type KvmCpuidEntry2,
} from '../../accel/kvm/structs/cpuid.js';
import { TsvmmError } from '../../util/errors.js';
import {
  applyCpuFeatures,
  type CpuFeatureBits,
  type CpuFeatureSetting,
  hasFeatureBits,
} from './cpu-features.js';

/** The KVM paravirtual signature leaf: max hypervisor leaf and "KVMKVMKVM\0\0\0". */
export const KVM_CPUID_SIGNATURE = 0x40000000;
/** The KVM paravirtual features leaf: EAX features, EDX hints. */
export const KVM_CPUID_FEATURES = 0x40000001;

/** "KVMKVMKVM\0\0\0" as EBX, ECX, EDX little-endian words. */
export const KVM_SIGNATURE_EBX = 0x4b4d564b; // "KVMK"
export const KVM_SIGNATURE_ECX = 0x564b4d56; // "VMKV"
export const KVM_SIGNATURE_EDX = 0x0000004d; // "M\0\0\0"

/** KVM_FEATURE_* bits of leaf 0x40000001 EAX (linux/kvm_para.h). */
export const KVM_FEATURE = {
  CLOCKSOURCE: 1 << 0,
  NOP_IO_DELAY: 1 << 1,
  MMU_OP: 1 << 2,
  CLOCKSOURCE2: 1 << 3,
  ASYNC_PF: 1 << 4,
  STEAL_TIME: 1 << 5,
  PV_EOI: 1 << 6,
  PV_UNHALT: 1 << 7,
  PV_TLB_FLUSH: 1 << 9,
  ASYNC_PF_VMEXIT: 1 << 10,
  PV_SEND_IPI: 1 << 11,
  POLL_CONTROL: 1 << 12,
  PV_SCHED_YIELD: 1 << 13,
  ASYNC_PF_INT: 1 << 14,
  MSI_EXT_DEST_ID: 1 << 15,
  HC_MAP_GPA_RANGE: 1 << 16,
  MIGRATION_CONTROL: 1 << 17,
  CLOCKSOURCE_STABLE_BIT: 1 << 24,
} as const;

/**
 * The KVM features passed through by default: every one the host reports,
 * except those that need the VMM's help, which tsvmm does not give:
 * MSI_EXT_DEST_ID (extended destination ids in MSI/IOAPIC routing),
 * HC_MAP_GPA_RANGE (a hypercall KVM hands to userspace) and
 * MIGRATION_CONTROL (an MSR userspace must emulate). MMU_OP is long gone.
 */
export const KVM_FEATURES_DEFAULT =
  ~(
    KVM_FEATURE.MMU_OP |
    KVM_FEATURE.MSI_EXT_DEST_ID |
    KVM_FEATURE.HC_MAP_GPA_RANGE |
    KVM_FEATURE.MIGRATION_CONTROL
  ) >>> 0;

/**
 * What any KVM since Linux 2.6.x offers, used only when the supported table
 * lacks leaf 0x40000001 (every current kernel reports it).
 */
const KVM_FEATURES_BASELINE =
  KVM_FEATURE.CLOCKSOURCE | KVM_FEATURE.NOP_IO_DELAY | KVM_FEATURE.CLOCKSOURCE2;

/** Leaf 1 ECX: the hypervisor-present bit. */
export const CPUID_1_ECX_HYPERVISOR = 1 << 31;
/** Leaf 1 ECX: x2APIC. */
export const CPUID_1_ECX_X2APIC = 1 << 21;
/** Leaf 1 ECX: TSC-deadline mode of the LAPIC timer. */
export const CPUID_1_ECX_TSC_DEADLINE = 1 << 24;
/** Leaf 1 EDX: HTT, "EBX[23:16] is valid and more than one logical CPU per package". */
export const CPUID_1_EDX_HTT = 1 << 28;

/** Level types of leaves 0xB and 0x1F (ECX[15:8]). */
const LEVEL_TYPE_SMT = 1;
const LEVEL_TYPE_CORE = 2;

/**
 * The most vCPUs a table can describe: xAPIC ids are 8 bits, and 0xff is
 * the broadcast id, so ids run 0..254.
 */
export const CPUID_MAX_CPUS = 255;

/** Options of buildGuestCpuid. */
export interface GuestCpuidOptions {
  /** This vCPU's index, which is also its APIC id. */
  cpuIndex: number;
  /** Number of vCPUs in the VM (sockets of one core, one thread). */
  cpuCount: number;
  /**
   * KVM paravirtual features wanted in leaf 0x40000001 EAX; the result is
   * this masked by what the host supports. Default KVM_FEATURES_DEFAULT.
   */
  kvmFeatures?: number;
  /**
   * The host has KVM_CAP_TSC_DEADLINE_TIMER: KVM emulates the LAPIC
   * TSC-deadline timer but does not list it in KVM_GET_SUPPORTED_CPUID, so
   * the VMM sets leaf 1 ECX bit 24 itself, as QEMU does. Default false.
   */
  tscDeadlineTimer?: boolean;
  /**
   * `-cpu host,...` flags, applied last, in order. A flag switched on must
   * be one this table would offer or KVM supports (CpuFeatureError
   * CPU_FEATURE_UNSUPPORTED otherwise).
   */
  features?: readonly CpuFeatureSetting[];
}

/** The CPUID options cannot describe a VM (bad vCPU index or count). */
export class CpuidTopologyError extends TsvmmError {
  constructor(message: string) {
    super('CPUID_INVALID_TOPOLOGY', message);
  }
}

/**
 * The entries to give KVM_SET_CPUID2 for vCPU `cpuIndex` of `cpuCount`,
 * built from `supported` (Kvm.getSupportedCpuid()). Entries come in the
 * order of `supported`, except that leaves 0xB and 0x1F are replaced by
 * this vCPU's, and the hypervisor range (0x40000000 to 0x400000ff) by the
 * two KVM leaves, which come last.
 *
 * @example
 * const supported = kvm.getSupportedCpuid();
 * vcpu.setCpuid2(buildGuestCpuid(supported, { cpuIndex: 1, cpuCount: 4 }));
 */
export function buildGuestCpuid(
  supported: readonly KvmCpuidEntry2[],
  options: GuestCpuidOptions,
): KvmCpuidEntry2[] {
  const { cpuIndex, cpuCount } = options;
  if (!Number.isInteger(cpuCount) || cpuCount < 1 || cpuCount > CPUID_MAX_CPUS) {
    throw new CpuidTopologyError(
      `cannot build CPUID for ${cpuCount} vCPUs: give between 1 and ${CPUID_MAX_CPUS} (-smp)`,
    );
  }
  if (!Number.isInteger(cpuIndex) || cpuIndex < 0 || cpuIndex >= cpuCount) {
    throw new CpuidTopologyError(
      `cannot build CPUID for vCPU index ${cpuIndex}: a VM of ${cpuCount} vCPUs has indexes 0 to ${cpuCount - 1}`,
    );
  }
  const apicId = cpuIndex;
  const wanted = (options.kvmFeatures ?? KVM_FEATURES_DEFAULT) >>> 0;
  const hostKvm = supported.find((e) => e.function === KVM_CPUID_FEATURES);
  const kvmEax = ((hostKvm ? hostKvm.eax : KVM_FEATURES_BASELINE) & wanted) >>> 0;

  const out: KvmCpuidEntry2[] = [];
  const done = new Set<number>();
  for (const entry of supported) {
    const fn = entry.function;
    if (fn >= KVM_CPUID_SIGNATURE && fn <= 0x400000ff) {
      // The hypervisor range is ours: the two KVM leaves, written below.
      continue;
    }
    if (fn === 0xb || fn === 0x1f) {
      // Replaced as a whole: the host's subleaves describe the host.
      if (!done.has(fn)) out.push(...extendedTopology(fn, apicId));
      done.add(fn);
      continue;
    }
    out.push(fixEntry({ ...entry }, apicId, options.tscDeadlineTimer === true));
  }
  out.push(
    {
      function: KVM_CPUID_SIGNATURE,
      index: 0,
      flags: 0,
      eax: KVM_CPUID_FEATURES,
      ebx: KVM_SIGNATURE_EBX,
      ecx: KVM_SIGNATURE_ECX,
      edx: KVM_SIGNATURE_EDX,
    },
    // EDX holds hints (KVM_HINTS_REALTIME: vCPUs never preempted); we
    // promise none.
    { function: KVM_CPUID_FEATURES, index: 0, flags: 0, eax: kvmEax, ebx: 0, ecx: 0, edx: 0 },
  );
  if (options.features && options.features.length > 0) {
    // KVM's table lists what it can do; ours adds what the VMM provides
    // (hypervisor bit, TSC deadline) and drops what it cannot (some KVM
    // leaf bits), so the KVM leaf is judged by ours alone.
    const offered = (bits: CpuFeatureBits) =>
      hasFeatureBits(out, bits) ||
      (bits.leaf !== KVM_CPUID_FEATURES && hasFeatureBits(supported, bits));
    applyCpuFeatures(out, options.features, offered);
  }
  return out;
}

/** Sets the per-vCPU fields of one copied entry; returns it. */
function fixEntry(e: KvmCpuidEntry2, apicId: number, tscDeadline: boolean): KvmCpuidEntry2 {
  switch (e.function) {
    case 1: {
      // EBX: [31:24] initial APIC id, [23:16] logical processors per
      // package (1), [15:8] CLFLUSH size and [7:0] brand index kept.
      e.ebx = ((e.ebx & 0xffff) | (1 << 16) | (apicId << 24)) >>> 0;
      e.ecx = (e.ecx | CPUID_1_ECX_HYPERVISOR) >>> 0;
      if (tscDeadline) e.ecx = (e.ecx | CPUID_1_ECX_TSC_DEADLINE) >>> 0;
      // One logical processor per package: HTT off, as QEMU does.
      e.edx = (e.edx & ~CPUID_1_EDX_HTT) >>> 0;
      break;
    }
    case 4:
      // A subleaf with cache type 0 ends the list; leave it all zero.
      if ((e.eax & 0x1f) !== 0) {
        // [31:26] cores per package - 1 and [25:14] logical processors
        // sharing this cache - 1: both 0.
        e.eax = (e.eax & 0x3fff) >>> 0;
      }
      break;
    case 0x80000001:
      // CmpLegacy (ECX bit 1) claims several cores per package.
      e.ecx = (e.ecx & ~(1 << 1)) >>> 0;
      break;
    case 0x80000008:
      // ECX [7:0] cores - 1, [15:12] APIC id bits for the core: one core.
      e.ecx = (e.ecx & ~0xf0ff) >>> 0;
      break;
    case 0x8000001d:
      // AMD's leaf 4: [25:14] logical processors sharing the cache - 1.
      e.eax = (e.eax & ~(0xfff << 14)) >>> 0;
      break;
    case 0x8000001e:
      // AMD extended APIC id; compute unit 0 of one thread; node 0 of one.
      e.eax = apicId;
      e.ebx = 0;
      e.ecx = 0;
      e.edx = 0;
      break;
  }
  return e;
}

/**
 * Leaf 0xB or 0x1F for one vCPU: an SMT level and a core level, each of one
 * logical processor and id shift 0, then the invalid level that ends the
 * list. EDX is the x2APIC id at every subleaf.
 */
function extendedTopology(fn: number, apicId: number): KvmCpuidEntry2[] {
  const flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
  return [
    { function: fn, index: 0, flags, eax: 0, ebx: 1, ecx: (LEVEL_TYPE_SMT << 8) | 0, edx: apicId },
    { function: fn, index: 1, flags, eax: 0, ebx: 1, ecx: (LEVEL_TYPE_CORE << 8) | 1, edx: apicId },
    { function: fn, index: 2, flags, eax: 0, ebx: 0, ecx: 2, edx: apicId },
  ];
}
