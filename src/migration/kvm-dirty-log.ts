/**
 * KVM dirty logging of guest RAM, as live migration's precopy passes use
 * it (QEMU's kvm_log_start / kvm_physical_sync_dirty_bitmap / kvm_log_stop
 * for the pc.ram region):
 *
 * - start: every memory slot is registered again with the same slot id,
 *   guest-physical address, size and host address, and the flag
 *   KVM_MEM_LOG_DIRTY_PAGES. KVM treats that as a flags-only change of an
 *   existing slot (KVM_MR_FLAGS_ONLY), which it allows for this flag; it
 *   write-protects the slot and starts from an empty bitmap, so the first
 *   sync names the pages written since start.
 * - sync: KVM_GET_DIRTY_LOG per slot (which also clears the bits and
 *   write-protects those pages again), each bitmap turned into page numbers
 *   of the one "pc.ram" block of guest-memory-ram.ts. Slots are laid end to
 *   end in guest-physical order in that block, so the PCI-hole split does
 *   not show: a bit i of the slot whose block offset is S is page S/4096 + i.
 * - stop: the slots are registered again without the flag.
 *
 * KVM also marks pages it writes itself (the pvclock areas, steal time),
 * so those are sent again too.
 */
import type { GuestMemory, GuestMemorySlot } from '../accel/kvm/memory/guest-memory.js';
import type { KvmVm } from '../accel/kvm/vm.js';
import { traceEvent } from '../trace/control.js';
import { TsvmmError } from '../util/errors.js';
import { PC_RAM_BLOCK } from './guest-memory-ram.js';
import type { DirtyLog } from './machine-migration.js';
import { PAGE_SIZE, type RamPageSelection } from './ram.js';

/** The dirty log was used out of order, or KVM's answer does not fit the slot. */
export class DirtyLogError extends TsvmmError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('MIGRATION_DIRTY_LOG', message, options);
  }
}

/** One KVM slot and where its pages start in the "pc.ram" block. */
export interface SlotInBlock {
  /** KVM slot id. */
  readonly slot: number;
  /** Pages in the slot. */
  readonly pages: number;
  /** Page number in the block of the slot's first page. */
  readonly firstPage: number;
}

/**
 * Where each slot's pages lie in the single RAM block: slots in
 * guest-physical order, end to end (the order guestMemoryRam uses).
 */
export function slotsInBlock(
  slots: readonly Pick<GuestMemorySlot, 'slot' | 'gpa' | 'size'>[],
): SlotInBlock[] {
  let next = 0;
  return [...slots]
    .sort((a, b) => a.gpa - b.gpa)
    .map((s) => {
      if (s.size % PAGE_SIZE !== 0 || s.gpa % PAGE_SIZE !== 0) {
        throw new DirtyLogError(
          `memory slot ${s.slot} (0x${s.gpa.toString(16)}, ${s.size} bytes) is not page aligned`,
        );
      }
      const entry = { slot: s.slot, pages: s.size / PAGE_SIZE, firstPage: next };
      next += entry.pages;
      return entry;
    });
}

/**
 * Appends to `out` the page numbers of the set bits of `bitmap` (bit i of
 * byte j = page 8j+i, KVM's little-endian layout) below `pages`, each plus
 * `firstPage`, ascending. Bits at or past `pages` (KVM pads the bitmap to
 * 64 bits) are ignored.
 */
export function dirtyBitmapPages(
  bitmap: Uint8Array,
  pages: number,
  firstPage: number,
  out: number[] = [],
): number[] {
  if (bitmap.length * 8 < pages) {
    throw new DirtyLogError(`a dirty bitmap of ${bitmap.length} bytes cannot cover ${pages} pages`);
  }
  const bytes = Math.ceil(pages / 8);
  for (let j = 0; j < bytes; j++) {
    let b = bitmap[j]!;
    if (b === 0) continue;
    const base = j * 8;
    while (b !== 0) {
      const bit = 31 - Math.clz32(b & -b);
      b &= b - 1;
      const page = base + bit;
      if (page >= pages) break;
      out.push(firstPage + page);
    }
  }
  return out;
}

/** What the dirty log needs from KVM and guest RAM. */
export interface DirtyLogTarget {
  /** Guest RAM's slots (GuestMemory.slots). */
  readonly slots: readonly Pick<GuestMemorySlot, 'slot' | 'gpa' | 'size'>[];
  /** Registers every slot again, with or without KVM_MEM_LOG_DIRTY_PAGES. */
  setLogDirty(on: boolean): void;
  /** KVM_GET_DIRTY_LOG of one slot: its bitmap (cleared in KVM by the call). */
  getDirtyLog(slot: number, pages: number): Uint8Array;
}

/** The DirtyLogTarget of a VM and its guest RAM. */
export function kvmDirtyLogTarget(
  vm: KvmVm,
  memory: Pick<GuestMemory, 'slots' | 'register'>,
): DirtyLogTarget {
  return {
    slots: memory.slots,
    setLogDirty: (on) => memory.register(vm, { logDirty: on }),
    getDirtyLog: (slot, pages) => vm.getDirtyLog(slot, pages),
  };
}

const traceIoctl = traceEvent('dirty_log_ioctl');

/** µs since `t0` (a performance.now() reading). */
function usSince(t0: number): number {
  return Math.round((performance.now() - t0) * 1000);
}

/** target.setLogDirty(on), traced with its duration (all slots re-registered: slot=-1). */
function setLogDirtyTraced(target: DirtyLogTarget, on: boolean, pages: number): void {
  if (!traceIoctl.enabled) {
    target.setLogDirty(on);
    return;
  }
  const t0 = performance.now();
  target.setLogDirty(on);
  traceIoctl.emit({ op: on ? 'start' : 'stop', slot: -1, pages, dirty: 0, us: usSince(t0) });
}

/** A DirtyLog over `target`, naming pages of the "pc.ram" block. */
export function slotDirtyLog(target: DirtyLogTarget): DirtyLog {
  const layout = slotsInBlock(target.slots);
  const totalPages = layout.reduce((n, s) => n + s.pages, 0);
  let logging = false;
  return {
    start() {
      if (logging) throw new DirtyLogError('dirty logging was started twice');
      try {
        setLogDirtyTraced(target, true, totalPages);
      } catch (err) {
        // Some slots may have the flag already: take it off them again.
        try {
          target.setLogDirty(false);
        } catch {
          // The first error is the one to report.
        }
        throw new DirtyLogError(
          `could not start dirty logging: ${err instanceof Error ? err.message : String(err)}`,
          { cause: err },
        );
      }
      logging = true;
    },
    sync(): RamPageSelection[] {
      if (!logging) throw new DirtyLogError('the dirty log was read before start()');
      const pages: number[] = [];
      for (const s of layout) {
        const t0 = traceIoctl.enabled ? performance.now() : 0;
        const bitmap = target.getDirtyLog(s.slot, s.pages);
        const us = traceIoctl.enabled ? usSince(t0) : 0;
        const before = pages.length;
        dirtyBitmapPages(bitmap, s.pages, s.firstPage, pages);
        if (traceIoctl.enabled) {
          const dirty = pages.length - before;
          traceIoctl.emit({ op: 'sync', slot: s.slot, pages: s.pages, dirty, us });
        }
      }
      return pages.length > 0 ? [{ block: PC_RAM_BLOCK, pages }] : [];
    },
    stop() {
      if (!logging) return;
      logging = false;
      setLogDirtyTraced(target, false, totalPages);
    },
  };
}

/** The DirtyLog of an x86 machine's RAM (what x86MigrationHost gets as `dirtyLog`). */
export function kvmDirtyLog(vm: KvmVm, memory: Pick<GuestMemory, 'slots' | 'register'>): DirtyLog {
  return slotDirtyLog(kvmDirtyLogTarget(vm, memory));
}
