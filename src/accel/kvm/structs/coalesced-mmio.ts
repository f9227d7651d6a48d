/**
 * Coalesced MMIO and port I/O: the zone a VM registers, and the ring KVM
 * fills with the writes it took for userspace without an exit.
 */
import { defineStruct } from './layout.js';

/** struct kvm_coalesced_mmio_zone (KVM_REGISTER_COALESCED_MMIO). */
export interface KvmCoalescedMmioZone {
  /** Guest-physical address, or the first port when `pio` is 1. */
  addr: bigint;
  size: number;
  /** 1: a port range; 0: an MMIO range. */
  pio: number;
}

export const KVM_COALESCED_MMIO_ZONE_SIZE = 16;

/** Codec for struct kvm_coalesced_mmio_zone. */
export const KVM_COALESCED_MMIO_ZONE = defineStruct<KvmCoalescedMmioZone>(
  'struct kvm_coalesced_mmio_zone',
  KVM_COALESCED_MMIO_ZONE_SIZE,
  {
    addr: { offset: 0, type: 'u64' },
    size: { offset: 8, type: 'u32' },
    pio: { offset: 12, type: 'u32' },
  },
);

/** One write KVM took: struct kvm_coalesced_mmio. */
export interface KvmCoalescedMmio {
  physAddr: bigint;
  len: number;
  pio: number;
  data: Uint8Array;
}

export const KVM_COALESCED_MMIO_SIZE = 24;

/** Codec for struct kvm_coalesced_mmio (one ring entry). */
export const KVM_COALESCED_MMIO = defineStruct<KvmCoalescedMmio>(
  'struct kvm_coalesced_mmio',
  KVM_COALESCED_MMIO_SIZE,
  {
    physAddr: { offset: 0, type: 'u64' },
    len: { offset: 8, type: 'u32' },
    pio: { offset: 12, type: 'u32' },
    data: { offset: 16, type: 'bytes', length: 8 },
  },
);

/** The ring's head: struct kvm_coalesced_mmio_ring without its entries. */
export interface KvmCoalescedMmioRingHeader {
  /** The next entry userspace takes. */
  first: number;
  /** The next entry KVM fills. */
  last: number;
}

export const KVM_COALESCED_MMIO_RING_HEADER_SIZE = 8;

/** Codec for struct kvm_coalesced_mmio_ring's fixed part. */
export const KVM_COALESCED_MMIO_RING_HEADER = defineStruct<KvmCoalescedMmioRingHeader>(
  'struct kvm_coalesced_mmio_ring',
  KVM_COALESCED_MMIO_RING_HEADER_SIZE,
  {
    first: { offset: 0, type: 'u32' },
    last: { offset: 4, type: 'u32' },
  },
);

/** The ring is one page of the vCPU mapping (x86_64's page size). */
export const KVM_COALESCED_RING_BYTES = 4096;

/**
 * KVM_COALESCED_MMIO_MAX: how many entries the ring page holds. The
 * indices wrap at this count; one slot stays empty so that a full ring is
 * told apart from an empty one.
 */
export const KVM_COALESCED_MMIO_MAX = Math.floor(
  (KVM_COALESCED_RING_BYTES - KVM_COALESCED_MMIO_RING_HEADER_SIZE) / KVM_COALESCED_MMIO_SIZE,
);
