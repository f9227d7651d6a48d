/** A coalesced ring page laid out as KVM fills it, with KVM's side (`push`) for tests. */
import { CoalescedRing } from '../accel/kvm/coalesced-ring.js';
import {
  KVM_COALESCED_MMIO_MAX,
  KVM_COALESCED_MMIO_RING_HEADER_SIZE,
  KVM_COALESCED_MMIO_SIZE,
  KVM_COALESCED_RING_BYTES,
} from '../accel/kvm/structs/coalesced-mmio.js';

export interface FakeCoalescedRing {
  ring: CoalescedRing;
  /** The page's header and entries, as the consumer sees them. */
  view: DataView;
  /** Queues one write as KVM does: the entry first, then `last` moves on. */
  push(addr: number, bytes: readonly number[], pio?: boolean): void;
}

export function fakeCoalescedRing(): FakeCoalescedRing {
  const page = new Uint8Array(KVM_COALESCED_RING_BYTES);
  const view = new DataView(page.buffer);
  const push = (addr: number, bytes: readonly number[], pio = true) => {
    const last = view.getUint32(4, true);
    const e = KVM_COALESCED_MMIO_RING_HEADER_SIZE + last * KVM_COALESCED_MMIO_SIZE;
    view.setBigUint64(e, BigInt(addr), true);
    view.setUint32(e + 8, bytes.length, true);
    view.setUint32(e + 12, pio ? 1 : 0, true);
    page.set(bytes, e + 16);
    view.setUint32(4, (last + 1) % KVM_COALESCED_MMIO_MAX, true);
  };
  return { ring: new CoalescedRing(page), view, push };
}
