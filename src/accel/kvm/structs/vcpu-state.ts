/**
 * The rest of a vCPU's saved state: kvm_lapic_state, kvm_vcpu_events,
 * kvm_mp_state; and kvm_signal_mask, which sets the signals unblocked
 * while the vCPU thread is inside KVM_RUN.
 */
import { KvmStructError } from '../errors.js';
import { defineStruct } from './layout.js';

/** struct kvm_lapic_state: the local APIC's 1 KiB register page, as bytes. */
export interface KvmLapicState {
  regs: Uint8Array;
}

export const KVM_LAPIC_STATE_SIZE = 1024;

/** Codec for struct kvm_lapic_state. */
export const KVM_LAPIC_STATE = defineStruct<KvmLapicState>(
  'struct kvm_lapic_state',
  KVM_LAPIC_STATE_SIZE,
  { regs: { offset: 0, type: 'bytes', length: 1024 } },
);

/** Pending or injected exception in struct kvm_vcpu_events. */
export interface KvmVcpuEventsException {
  injected: number;
  nr: number;
  hasErrorCode: number;
  pending: number;
  errorCode: number;
}

/** Pending or injected external interrupt in struct kvm_vcpu_events. */
export interface KvmVcpuEventsInterrupt {
  injected: number;
  nr: number;
  soft: number;
  /** KVM_X86_SHADOW_INT_* bits. */
  shadow: number;
}

/** NMI state in struct kvm_vcpu_events. */
export interface KvmVcpuEventsNmi {
  injected: number;
  pending: number;
  masked: number;
}

/** SMM state in struct kvm_vcpu_events. */
export interface KvmVcpuEventsSmi {
  smm: number;
  pending: number;
  smmInsideNmi: number;
  latchedInit: number;
}

/** struct kvm_vcpu_events (KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS). */
export interface KvmVcpuEvents {
  exception: KvmVcpuEventsException;
  interrupt: KvmVcpuEventsInterrupt;
  nmi: KvmVcpuEventsNmi;
  sipiVector: number;
  /** KVM_VCPUEVENT_VALID_* bits: which optional parts SET should apply. */
  flags: number;
  smi: KvmVcpuEventsSmi;
  tripleFault: { pending: number };
  exceptionHasPayload: number;
  exceptionPayload: bigint;
}

export const KVM_VCPU_EVENTS_SIZE = 64;

const EXCEPTION = defineStruct<KvmVcpuEventsException>(null, 8, {
  injected: { offset: 0, type: 'u8' },
  nr: { offset: 1, type: 'u8' },
  hasErrorCode: { offset: 2, type: 'u8' },
  pending: { offset: 3, type: 'u8' },
  errorCode: { offset: 4, type: 'u32' },
});
const INTERRUPT = defineStruct<KvmVcpuEventsInterrupt>(null, 4, {
  injected: { offset: 0, type: 'u8' },
  nr: { offset: 1, type: 'u8' },
  soft: { offset: 2, type: 'u8' },
  shadow: { offset: 3, type: 'u8' },
});
const NMI = defineStruct<KvmVcpuEventsNmi>(null, 4, {
  injected: { offset: 0, type: 'u8' },
  pending: { offset: 1, type: 'u8' },
  masked: { offset: 2, type: 'u8' },
});
const SMI = defineStruct<KvmVcpuEventsSmi>(null, 4, {
  smm: { offset: 0, type: 'u8' },
  pending: { offset: 1, type: 'u8' },
  smmInsideNmi: { offset: 2, type: 'u8' },
  latchedInit: { offset: 3, type: 'u8' },
});
const TRIPLE_FAULT = defineStruct<{ pending: number }>(null, 1, {
  pending: { offset: 0, type: 'u8' },
});

/** Codec for struct kvm_vcpu_events. */
export const KVM_VCPU_EVENTS = defineStruct<KvmVcpuEvents>(
  'struct kvm_vcpu_events',
  KVM_VCPU_EVENTS_SIZE,
  {
    exception: { offset: 0, type: 'struct', codec: EXCEPTION },
    interrupt: { offset: 8, type: 'struct', codec: INTERRUPT },
    nmi: { offset: 12, type: 'struct', codec: NMI },
    sipiVector: { offset: 16, type: 'u32' },
    flags: { offset: 20, type: 'u32' },
    smi: { offset: 24, type: 'struct', codec: SMI },
    tripleFault: { offset: 28, type: 'struct', codec: TRIPLE_FAULT },
    exceptionHasPayload: { offset: 55, type: 'u8' },
    exceptionPayload: { offset: 56, type: 'u64' },
  },
);

/** kvm_vcpu_events.flags bits. */
export const KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01;
export const KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02;
export const KVM_VCPUEVENT_VALID_SHADOW = 0x04;
export const KVM_VCPUEVENT_VALID_SMM = 0x08;
export const KVM_VCPUEVENT_VALID_PAYLOAD = 0x10;
export const KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20;

/** struct kvm_mp_state (KVM_GET_MP_STATE / KVM_SET_MP_STATE). */
export interface KvmMpState {
  /** One of KVM_MP_STATE. */
  mpState: number;
}

export const KVM_MP_STATE_SIZE = 4;

/** Codec for struct kvm_mp_state. */
export const KVM_MP_STATE_STRUCT = defineStruct<KvmMpState>(
  'struct kvm_mp_state',
  KVM_MP_STATE_SIZE,
  {
    mpState: { offset: 0, type: 'u32' },
  },
);

/** The vCPU multiprocessing states (KVM_MP_STATE_*) used on x86. */
export const KVM_MP_STATE = {
  RUNNABLE: 0,
  UNINITIALIZED: 1,
  INIT_RECEIVED: 2,
  HALTED: 3,
  SIPI_RECEIVED: 4,
  STOPPED: 5,
  CHECK_STOP: 6,
  OPERATING: 7,
  LOAD: 8,
  AP_RESET_HOLD: 9,
  SUSPENDED: 10,
} as const;

/** Size of struct kvm_signal_mask without the set; the set starts here. */
export const KVM_SIGNAL_MASK_HEADER_SIZE = 4;
/** The only length x86_64 KVM accepts for the set: the kernel's 64-bit sigset. */
export const KVM_SIGNAL_MASK_SIGSET_BYTES = 8;

/** Header of struct kvm_signal_mask. */
export const KVM_SIGNAL_MASK_HEADER = defineStruct<{ len: number }>(
  'struct kvm_signal_mask',
  KVM_SIGNAL_MASK_HEADER_SIZE,
  { len: { offset: 0, type: 'u32' } },
);

/**
 * Encodes a struct kvm_signal_mask. `sigset` holds the signals blocked
 * during KVM_RUN, in the kernel's 8-byte format: the first 8 bytes of a
 * glibc sigset_t, so a 128-byte set from pthread_sigmask is accepted and
 * cut to its first 8 bytes.
 */
export function encodeKvmSignalMask(sigset: Uint8Array): Buffer {
  if (sigset.byteLength < KVM_SIGNAL_MASK_SIGSET_BYTES) {
    throw new KvmStructError(
      `struct kvm_signal_mask needs an ${KVM_SIGNAL_MASK_SIGSET_BYTES}-byte sigset`,
    );
  }
  const buf = Buffer.alloc(KVM_SIGNAL_MASK_HEADER_SIZE + KVM_SIGNAL_MASK_SIGSET_BYTES);
  KVM_SIGNAL_MASK_HEADER.encode({ len: KVM_SIGNAL_MASK_SIGSET_BYTES }, buf, 0);
  buf.set(sigset.subarray(0, KVM_SIGNAL_MASK_SIGSET_BYTES), KVM_SIGNAL_MASK_HEADER_SIZE);
  return buf;
}

/** The 8-byte set of an encoded struct kvm_signal_mask. */
export function decodeKvmSignalMask(buf: Uint8Array): Uint8Array {
  const { len } = KVM_SIGNAL_MASK_HEADER.decode(buf);
  if (KVM_SIGNAL_MASK_HEADER_SIZE + len > buf.byteLength) {
    throw new KvmStructError(
      `struct kvm_signal_mask: len ${len} does not fit in ${buf.byteLength} bytes`,
    );
  }
  return new Uint8Array(
    buf.subarray(KVM_SIGNAL_MASK_HEADER_SIZE, KVM_SIGNAL_MASK_HEADER_SIZE + len),
  );
}
