/**
 * CPUID tables: kvm_cpuid2 with its kvm_cpuid_entry2 list
 * (KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2).
 */
import { KvmStructError } from '../errors.js';
import { defineStruct } from './layout.js';

/** struct kvm_cpuid_entry2: the result of CPUID for one (function, index). */
export interface KvmCpuidEntry2 {
  function: number;
  index: number;
  /** KVM_CPUID_FLAG_* bits. */
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export const KVM_CPUID_ENTRY2_SIZE = 40;

/** Codec for struct kvm_cpuid_entry2. */
export const KVM_CPUID_ENTRY2 = defineStruct<KvmCpuidEntry2>(
  'struct kvm_cpuid_entry2',
  KVM_CPUID_ENTRY2_SIZE,
  {
    function: { offset: 0, type: 'u32' },
    index: { offset: 4, type: 'u32' },
    flags: { offset: 8, type: 'u32' },
    eax: { offset: 12, type: 'u32' },
    ebx: { offset: 16, type: 'u32' },
    ecx: { offset: 20, type: 'u32' },
    edx: { offset: 24, type: 'u32' },
  },
);

/** CPUID entry flag: the entry depends on the index (ECX) too. */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

/** Size of struct kvm_cpuid2 without entries; entries start here. */
export const KVM_CPUID2_HEADER_SIZE = 8;

/** Header of struct kvm_cpuid2. */
export const KVM_CPUID2_HEADER = defineStruct<{ nent: number }>(
  'struct kvm_cpuid2',
  KVM_CPUID2_HEADER_SIZE,
  {
    nent: { offset: 0, type: 'u32' },
  },
);

/** Encodes a struct kvm_cpuid2 holding `entries`. */
export function encodeKvmCpuid2(entries: readonly KvmCpuidEntry2[]): Buffer {
  const buf = allocKvmCpuid2(entries.length);
  entries.forEach((entry, i) => {
    KVM_CPUID_ENTRY2.encode(entry, buf, KVM_CPUID2_HEADER_SIZE + i * KVM_CPUID_ENTRY2_SIZE);
  });
  return buf;
}

/** An empty struct kvm_cpuid2 with room for `capacity` entries, nent = capacity. */
export function allocKvmCpuid2(capacity: number): Buffer {
  const buf = Buffer.alloc(KVM_CPUID2_HEADER_SIZE + capacity * KVM_CPUID_ENTRY2_SIZE);
  KVM_CPUID2_HEADER.encode({ nent: capacity }, buf, 0);
  return buf;
}

/** The nent entries of a struct kvm_cpuid2. */
export function decodeKvmCpuid2(buf: Uint8Array): KvmCpuidEntry2[] {
  const { nent } = KVM_CPUID2_HEADER.decode(buf);
  if (KVM_CPUID2_HEADER_SIZE + nent * KVM_CPUID_ENTRY2_SIZE > buf.byteLength) {
    throw new KvmStructError(
      `struct kvm_cpuid2: ${nent} entries do not fit in ${buf.byteLength} bytes`,
    );
  }
  return Array.from({ length: nent }, (_, i) =>
    KVM_CPUID_ENTRY2.decode(buf, KVM_CPUID2_HEADER_SIZE + i * KVM_CPUID_ENTRY2_SIZE),
  );
}
