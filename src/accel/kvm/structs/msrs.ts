/**
 * Model-specific registers: kvm_msrs with its kvm_msr_entry list
 * (KVM_GET_MSRS / KVM_SET_MSRS) and kvm_msr_list (KVM_GET_MSR_INDEX_LIST).
 * Both end in a flexible array, so they are encoded by hand around the
 * fixed-size entry codec.
 */
import { KvmStructError } from '../errors.js';
import { defineStruct } from './layout.js';

/** struct kvm_msr_entry: one MSR index and its value. */
export interface KvmMsrEntry {
  index: number;
  data: bigint;
}

export const KVM_MSR_ENTRY_SIZE = 16;

/** Codec for struct kvm_msr_entry. */
export const KVM_MSR_ENTRY = defineStruct<KvmMsrEntry>('struct kvm_msr_entry', KVM_MSR_ENTRY_SIZE, {
  index: { offset: 0, type: 'u32' },
  data: { offset: 8, type: 'u64' },
});

/** Size of struct kvm_msrs without entries; entries start here. */
export const KVM_MSRS_HEADER_SIZE = 8;

/** Header of struct kvm_msrs (what the ioctl number encodes). */
export const KVM_MSRS_HEADER = defineStruct<{ nmsrs: number }>(
  'struct kvm_msrs',
  KVM_MSRS_HEADER_SIZE,
  {
    nmsrs: { offset: 0, type: 'u32' },
  },
);

/** Encodes a struct kvm_msrs holding `entries`. */
export function encodeKvmMsrs(entries: readonly KvmMsrEntry[]): Buffer {
  const buf = Buffer.alloc(KVM_MSRS_HEADER_SIZE + entries.length * KVM_MSR_ENTRY_SIZE);
  KVM_MSRS_HEADER.encode({ nmsrs: entries.length }, buf, 0);
  entries.forEach((entry, i) => {
    KVM_MSR_ENTRY.encode(entry, buf, KVM_MSRS_HEADER_SIZE + i * KVM_MSR_ENTRY_SIZE);
  });
  return buf;
}

/**
 * Decodes the first `count` entries of a struct kvm_msrs (by default all
 * nmsrs of them). KVM_GET_MSRS returns how many it read: pass that.
 */
export function decodeKvmMsrs(buf: Uint8Array, count?: number): KvmMsrEntry[] {
  const { nmsrs } = KVM_MSRS_HEADER.decode(buf);
  const n = count ?? nmsrs;
  if (n > nmsrs || KVM_MSRS_HEADER_SIZE + n * KVM_MSR_ENTRY_SIZE > buf.byteLength) {
    throw new KvmStructError(
      `struct kvm_msrs: ${n} entries do not fit (nmsrs ${nmsrs}, ${buf.byteLength} bytes)`,
    );
  }
  return Array.from({ length: n }, (_, i) =>
    KVM_MSR_ENTRY.decode(buf, KVM_MSRS_HEADER_SIZE + i * KVM_MSR_ENTRY_SIZE),
  );
}

/** Size of struct kvm_msr_list without indices; indices start here. */
export const KVM_MSR_LIST_HEADER_SIZE = 4;

/** Header of struct kvm_msr_list. */
export const KVM_MSR_LIST_HEADER = defineStruct<{ nmsrs: number }>(
  'struct kvm_msr_list',
  KVM_MSR_LIST_HEADER_SIZE,
  { nmsrs: { offset: 0, type: 'u32' } },
);

/** An empty struct kvm_msr_list with room for `capacity` indices. */
export function allocKvmMsrList(capacity: number): Buffer {
  const buf = Buffer.alloc(KVM_MSR_LIST_HEADER_SIZE + 4 * capacity);
  KVM_MSR_LIST_HEADER.encode({ nmsrs: capacity }, buf, 0);
  return buf;
}

/** The MSR indices of a struct kvm_msr_list filled by the kernel. */
export function decodeKvmMsrList(buf: Uint8Array): number[] {
  const { nmsrs } = KVM_MSR_LIST_HEADER.decode(buf);
  if (KVM_MSR_LIST_HEADER_SIZE + 4 * nmsrs > buf.byteLength) {
    throw new KvmStructError(
      `struct kvm_msr_list: ${nmsrs} indices do not fit in ${buf.byteLength} bytes`,
    );
  }
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  return Array.from({ length: nmsrs }, (_, i) =>
    view.getUint32(KVM_MSR_LIST_HEADER_SIZE + 4 * i, true),
  );
}

/** Encodes a struct kvm_msr_list holding `indices` (for tests and tools). */
export function encodeKvmMsrList(indices: readonly number[]): Buffer {
  const buf = allocKvmMsrList(indices.length);
  indices.forEach((index, i) => {
    buf.writeUInt32LE(index, KVM_MSR_LIST_HEADER_SIZE + 4 * i);
  });
  return buf;
}
