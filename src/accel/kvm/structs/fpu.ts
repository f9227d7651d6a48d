/**
 * Floating-point and extended state of an x86 vCPU: kvm_fpu, kvm_xsave and
 * kvm_xcrs. XSAVE areas stay raw bytes: their layout follows the host's
 * CPUID leaf 0xD, and a monitor only saves and restores them.
 */
import { KvmStructError } from '../errors.js';
import { defineStruct } from './layout.js';

/** struct kvm_fpu (KVM_GET_FPU / KVM_SET_FPU), in FXSAVE terms. */
export interface KvmFpu {
  /** ST0..ST7 / MM0..MM7, 16 bytes each. */
  fpr: Uint8Array;
  fcw: number;
  fsw: number;
  /** Abridged tag word, as FXSAVE stores it. */
  ftwx: number;
  lastOpcode: number;
  lastIp: bigint;
  lastDp: bigint;
  /** XMM0..XMM15, 16 bytes each. */
  xmm: Uint8Array;
  mxcsr: number;
}

export const KVM_FPU_SIZE = 416;

/** Codec for struct kvm_fpu. */
export const KVM_FPU = defineStruct<KvmFpu>('struct kvm_fpu', KVM_FPU_SIZE, {
  fpr: { offset: 0, type: 'bytes', length: 128 },
  fcw: { offset: 128, type: 'u16' },
  fsw: { offset: 130, type: 'u16' },
  ftwx: { offset: 132, type: 'u8' },
  lastOpcode: { offset: 134, type: 'u16' },
  lastIp: { offset: 136, type: 'u64' },
  lastDp: { offset: 144, type: 'u64' },
  xmm: { offset: 152, type: 'bytes', length: 256 },
  mxcsr: { offset: 408, type: 'u32' },
});

/**
 * struct kvm_xsave (KVM_GET_XSAVE / KVM_SET_XSAVE): the XSAVE area as
 * bytes. `region` is 4096 bytes, or larger when it comes from
 * KVM_GET_XSAVE2 (size from KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)).
 */
export interface KvmXsave {
  region: Uint8Array;
}

export const KVM_XSAVE_SIZE = 4096;

/** Codec for the fixed 4096-byte struct kvm_xsave. */
export const KVM_XSAVE = defineStruct<KvmXsave>('struct kvm_xsave', KVM_XSAVE_SIZE, {
  region: { offset: 0, type: 'bytes', length: 4096 },
});

/** struct kvm_xcr: one extended control register (XCR0...). */
export interface KvmXcr {
  xcr: number;
  value: bigint;
}

export const KVM_XCR_SIZE = 16;

/** Codec for struct kvm_xcr. */
export const KVM_XCR = defineStruct<KvmXcr>('struct kvm_xcr', KVM_XCR_SIZE, {
  xcr: { offset: 0, type: 'u32' },
  value: { offset: 8, type: 'u64' },
});

/** The most XCRs struct kvm_xcrs holds (KVM_MAX_XCRS). */
export const KVM_MAX_XCRS = 16;

/** struct kvm_xcrs as laid out: a count and a fixed array of 16 entries. */
export interface KvmXcrsRaw {
  nrXcrs: number;
  flags: number;
  xcrs: KvmXcr[];
}

export const KVM_XCRS_SIZE = 392;

/** Layout of struct kvm_xcrs; use {@link encodeKvmXcrs}/{@link decodeKvmXcrs}. */
export const KVM_XCRS_RAW = defineStruct<KvmXcrsRaw>('struct kvm_xcrs', KVM_XCRS_SIZE, {
  nrXcrs: { offset: 0, type: 'u32' },
  flags: { offset: 4, type: 'u32' },
  xcrs: { offset: 8, type: 'struct[]', codec: KVM_XCR, count: KVM_MAX_XCRS },
});

/** struct kvm_xcrs (KVM_GET_XCRS / KVM_SET_XCRS) with only the valid entries. */
export interface KvmXcrs {
  flags: number;
  xcrs: KvmXcr[];
}

/** Encodes up to {@link KVM_MAX_XCRS} XCRs into a struct kvm_xcrs. */
export function encodeKvmXcrs(value: KvmXcrs): Buffer {
  if (value.xcrs.length > KVM_MAX_XCRS) {
    throw new KvmStructError(
      `struct kvm_xcrs holds at most ${KVM_MAX_XCRS} XCRs, got ${value.xcrs.length}`,
    );
  }
  const xcrs = [...value.xcrs];
  while (xcrs.length < KVM_MAX_XCRS) xcrs.push({ xcr: 0, value: 0n });
  return KVM_XCRS_RAW.encode({ nrXcrs: value.xcrs.length, flags: value.flags, xcrs });
}

/** Decodes a struct kvm_xcrs, keeping only its first nr_xcrs entries. */
export function decodeKvmXcrs(buf: Uint8Array): KvmXcrs {
  const raw = KVM_XCRS_RAW.decode(buf);
  if (raw.nrXcrs > KVM_MAX_XCRS) {
    throw new KvmStructError(`struct kvm_xcrs says ${raw.nrXcrs} XCRs, more than ${KVM_MAX_XCRS}`);
  }
  return { flags: raw.flags, xcrs: raw.xcrs.slice(0, raw.nrXcrs) };
}
