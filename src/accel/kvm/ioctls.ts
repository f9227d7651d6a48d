/**
 * KVM ioctl request numbers, capability numbers, exit reasons and clock
 * flags. Request numbers are computed the way <asm-generic/ioctl.h> builds
 * them, from the direction, the KVM ioctl type (0xAE), the command number
 * and the argument struct's size taken from the struct codecs, so a wrong
 * struct size shows up as a wrong request number in the cross-check test.
 */
import { KVM_COALESCED_MMIO_ZONE_SIZE } from './structs/coalesced-mmio.js';
import { KVM_CPUID2_HEADER_SIZE } from './structs/cpuid.js';
import { KVM_FPU_SIZE, KVM_XCRS_SIZE, KVM_XSAVE_SIZE } from './structs/fpu.js';
import { KVM_MSR_LIST_HEADER_SIZE, KVM_MSRS_HEADER_SIZE } from './structs/msrs.js';
import { KVM_DEBUGREGS_SIZE, KVM_REGS_SIZE, KVM_SREGS_SIZE } from './structs/regs.js';
import {
  KVM_LAPIC_STATE_SIZE,
  KVM_MP_STATE_SIZE,
  KVM_SIGNAL_MASK_HEADER_SIZE,
  KVM_VCPU_EVENTS_SIZE,
} from './structs/vcpu-state.js';
import {
  KVM_CLOCK_DATA_SIZE,
  KVM_DIRTY_LOG_SIZE,
  KVM_ENABLE_CAP_SIZE,
  KVM_IRQ_LEVEL_SIZE,
  KVM_IRQCHIP_SIZE,
  KVM_PIT_CONFIG_SIZE,
  KVM_PIT_STATE2_SIZE,
  KVM_USERSPACE_MEMORY_REGION_SIZE,
} from './structs/vm.js';

/** The ioctl "type" byte of every KVM ioctl. */
export const KVMIO = 0xae;

/** The only KVM API version there has ever been in mainline Linux. */
export const KVM_API_VERSION = 12;

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

/** Builds an ioctl number: dir in bits 30-31, size 16-29, type 8-15, nr 0-7. */
export function ioc(dir: number, type: number, nr: number, size: number): number {
  if (size < 0 || size >= 1 << 14)
    throw new RangeError(`ioctl argument size ${size} does not fit 14 bits`);
  return ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;
}
/** An ioctl with no argument struct. */
export const io = (nr: number, type = KVMIO): number => ioc(IOC_NONE, type, nr, 0);
/** An ioctl where the kernel writes the struct (user reads it). */
export const ior = (nr: number, size: number, type = KVMIO): number =>
  ioc(IOC_READ, type, nr, size);
/** An ioctl where the kernel reads the struct. */
export const iow = (nr: number, size: number, type = KVMIO): number =>
  ioc(IOC_WRITE, type, nr, size);
/** An ioctl where the kernel reads and writes the struct. */
export const iowr = (nr: number, size: number, type = KVMIO): number =>
  ioc(IOC_READ | IOC_WRITE, type, nr, size);

/** Every KVM ioctl tsvmm issues, by its linux/kvm.h name. */
export const KVM_IOCTLS = {
  // System (/dev/kvm) ioctls.
  KVM_GET_API_VERSION: io(0x00),
  KVM_CREATE_VM: io(0x01),
  KVM_GET_MSR_INDEX_LIST: iowr(0x02, KVM_MSR_LIST_HEADER_SIZE),
  KVM_CHECK_EXTENSION: io(0x03),
  KVM_GET_VCPU_MMAP_SIZE: io(0x04),
  KVM_GET_SUPPORTED_CPUID: iowr(0x05, KVM_CPUID2_HEADER_SIZE),
  KVM_GET_MSR_FEATURE_INDEX_LIST: iowr(0x0a, KVM_MSR_LIST_HEADER_SIZE),
  // VM ioctls.
  KVM_CREATE_VCPU: io(0x41),
  KVM_GET_DIRTY_LOG: iow(0x42, KVM_DIRTY_LOG_SIZE),
  KVM_SET_USER_MEMORY_REGION: iow(0x46, KVM_USERSPACE_MEMORY_REGION_SIZE),
  KVM_SET_TSS_ADDR: io(0x47),
  KVM_SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  KVM_CREATE_IRQCHIP: io(0x60),
  KVM_IRQ_LINE: iow(0x61, KVM_IRQ_LEVEL_SIZE),
  KVM_GET_IRQCHIP: iowr(0x62, KVM_IRQCHIP_SIZE),
  KVM_SET_IRQCHIP: ior(0x63, KVM_IRQCHIP_SIZE),
  KVM_REGISTER_COALESCED_MMIO: iow(0x67, KVM_COALESCED_MMIO_ZONE_SIZE),
  KVM_UNREGISTER_COALESCED_MMIO: iow(0x68, KVM_COALESCED_MMIO_ZONE_SIZE),
  KVM_IRQ_LINE_STATUS: iowr(0x67, KVM_IRQ_LEVEL_SIZE),
  KVM_CREATE_PIT2: iow(0x77, KVM_PIT_CONFIG_SIZE),
  KVM_SET_CLOCK: iow(0x7b, KVM_CLOCK_DATA_SIZE),
  KVM_GET_CLOCK: ior(0x7c, KVM_CLOCK_DATA_SIZE),
  KVM_GET_PIT2: ior(0x9f, KVM_PIT_STATE2_SIZE),
  KVM_SET_PIT2: iow(0xa0, KVM_PIT_STATE2_SIZE),
  // vCPU ioctls.
  KVM_RUN: io(0x80),
  KVM_GET_REGS: ior(0x81, KVM_REGS_SIZE),
  KVM_SET_REGS: iow(0x82, KVM_REGS_SIZE),
  KVM_GET_SREGS: ior(0x83, KVM_SREGS_SIZE),
  KVM_SET_SREGS: iow(0x84, KVM_SREGS_SIZE),
  KVM_GET_MSRS: iowr(0x88, KVM_MSRS_HEADER_SIZE),
  KVM_SET_MSRS: iow(0x89, KVM_MSRS_HEADER_SIZE),
  KVM_SET_SIGNAL_MASK: iow(0x8b, KVM_SIGNAL_MASK_HEADER_SIZE),
  KVM_GET_FPU: ior(0x8c, KVM_FPU_SIZE),
  KVM_SET_FPU: iow(0x8d, KVM_FPU_SIZE),
  KVM_GET_LAPIC: ior(0x8e, KVM_LAPIC_STATE_SIZE),
  KVM_SET_LAPIC: iow(0x8f, KVM_LAPIC_STATE_SIZE),
  KVM_SET_CPUID2: iow(0x90, KVM_CPUID2_HEADER_SIZE),
  KVM_GET_CPUID2: iowr(0x91, KVM_CPUID2_HEADER_SIZE),
  KVM_GET_MP_STATE: ior(0x98, KVM_MP_STATE_SIZE),
  KVM_SET_MP_STATE: iow(0x99, KVM_MP_STATE_SIZE),
  KVM_NMI: io(0x9a),
  KVM_GET_VCPU_EVENTS: ior(0x9f, KVM_VCPU_EVENTS_SIZE),
  KVM_SET_VCPU_EVENTS: iow(0xa0, KVM_VCPU_EVENTS_SIZE),
  KVM_GET_DEBUGREGS: ior(0xa1, KVM_DEBUGREGS_SIZE),
  KVM_SET_DEBUGREGS: iow(0xa2, KVM_DEBUGREGS_SIZE),
  KVM_SET_TSC_KHZ: io(0xa2),
  KVM_GET_TSC_KHZ: io(0xa3),
  KVM_ENABLE_CAP: iow(0xa3, KVM_ENABLE_CAP_SIZE),
  KVM_GET_XSAVE: ior(0xa4, KVM_XSAVE_SIZE),
  KVM_SET_XSAVE: iow(0xa5, KVM_XSAVE_SIZE),
  KVM_GET_XCRS: ior(0xa6, KVM_XCRS_SIZE),
  KVM_SET_XCRS: iow(0xa7, KVM_XCRS_SIZE),
  KVM_KVMCLOCK_CTRL: io(0xad),
  KVM_GET_XSAVE2: ior(0xcf, KVM_XSAVE_SIZE),
} as const;

/** The name of a KVM ioctl in {@link KVM_IOCTLS}. */
export type KvmIoctlName = keyof typeof KVM_IOCTLS;

/** KVM_CHECK_EXTENSION capability numbers (KVM_CAP_<name>). */
export const KVM_CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  CLOCKSOURCE: 8,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  PIT: 11,
  NOP_IO_DELAY: 12,
  MP_STATE: 14,
  COALESCED_MMIO: 15,
  SYNC_MMU: 16,
  USER_NMI: 22,
  SET_GUEST_DEBUG: 23,
  IRQ_ROUTING: 25,
  IRQ_INJECT_STATUS: 26,
  IRQFD: 32,
  PIT2: 33,
  PIT_STATE2: 35,
  IOEVENTFD: 36,
  SET_IDENTITY_MAP_ADDR: 37,
  ADJUST_CLOCK: 39,
  INTERNAL_ERROR_DATA: 40,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  ENABLE_CAP: 54,
  XSAVE: 55,
  XCRS: 56,
  ASYNC_PF: 59,
  TSC_CONTROL: 60,
  GET_TSC_KHZ: 61,
  MAX_VCPUS: 66,
  TSC_DEADLINE_TIMER: 72,
  SYNC_REGS: 74,
  KVMCLOCK_CTRL: 76,
  SIGNAL_MSI: 77,
  READONLY_MEM: 81,
  ENABLE_CAP_VM: 98,
  CHECK_EXTENSION_VM: 105,
  X86_SMM: 117,
  SPLIT_IRQCHIP: 121,
  MAX_VCPU_ID: 128,
  X2APIC_API: 129,
  IMMEDIATE_EXIT: 136,
  X86_DISABLE_EXITS: 143,
  GET_MSR_FEATURES: 153,
  COALESCED_PIO: 162,
  EXCEPTION_PAYLOAD: 164,
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  X86_USER_SPACE_MSR: 188,
  DIRTY_LOG_RING: 192,
  SREGS2: 200,
  EXIT_HYPERCALL: 201,
  XSAVE2: 208,
  VM_TSC_CONTROL: 214,
  SYSTEM_EVENT_DATA: 215,
  X86_TRIPLE_FAULT_EVENT: 218,
} as const;

/** The name of a capability in {@link KVM_CAP}. */
export type KvmCapName = keyof typeof KVM_CAP;

/** Exit reasons in kvm_run.exit_reason (KVM_EXIT_<name>). */
export const KVM_EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  SET_TPR: 11,
  TPR_ACCESS: 12,
  NMI: 16,
  INTERNAL_ERROR: 17,
  WATCHDOG: 21,
  SYSTEM_EVENT: 24,
  IOAPIC_EOI: 26,
  HYPERV: 27,
  X86_RDMSR: 29,
  X86_WRMSR: 30,
  DIRTY_RING_FULL: 31,
  AP_RESET_HOLD: 32,
  X86_BUS_LOCK: 33,
  XEN: 34,
  NOTIFY: 37,
} as const;

const exitNames = new Map<number, string>(
  Object.entries(KVM_EXIT).map(([name, value]) => [value, `KVM_EXIT_${name}`]),
);

/** `KVM_EXIT_IO` for 2, `KVM_EXIT_<n>` for a reason this table does not know. */
export function exitReasonName(reason: number): string {
  return exitNames.get(reason) ?? `KVM_EXIT_${reason}`;
}

/** kvm_run.internal.suberror values (KVM_INTERNAL_ERROR_<name>). */
export const KVM_INTERNAL_ERROR = {
  EMULATION: 1,
  SIMUL_EX: 2,
  DELIVERY_EV: 3,
  UNEXPECTED_EXIT_REASON: 4,
} as const;

/** kvm_run.system_event.type values (KVM_SYSTEM_EVENT_<name>). */
export const KVM_SYSTEM_EVENT = {
  SHUTDOWN: 1,
  RESET: 2,
  CRASH: 3,
  WAKEUP: 4,
  SUSPEND: 5,
  SEV_TERM: 6,
} as const;

/** kvm_clock_data.flags: the clock is stable across vCPUs (master clock in use). */
export const KVM_CLOCK_TSC_STABLE = 2;
/** kvm_clock_data.flags: `realtime` is valid (GET) or to be used (SET). */
export const KVM_CLOCK_REALTIME = 4;
/** kvm_clock_data.flags: `host_tsc` is valid. */
export const KVM_CLOCK_HOST_TSC = 8;
