/**
 * Where the probe guests (guests/*.S) live in guest memory and what each
 * vCPU starts with. They start directly in 64-bit mode on every vCPU; see
 * the register contract at the top of guests/probe.S.
 */
import { readFileSync } from 'node:fs';
import type { LongModeEntry } from '../../accel/kvm/vcpu-ops.js';
import { distUrl } from '../../util/dist-path.js';
import { TsvmmError } from '../../util/errors.js';

export const PROBE_LOAD_ADDR = 0x10000;
/** One 32-byte pvclock area per vCPU, 64 bytes apart, in one page. */
export const PVCLOCK_AREA_BASE = 0x20000;
export const PVCLOCK_AREA_STRIDE = 64;
/** 16 KiB stacks, one per vCPU, from 1 MiB up. */
export const STACK_BASE = 0x100000;
export const STACK_SIZE = 0x4000;
/** The largest vCPU count the layout has room for (one page of pvclock areas). */
export const PROBE_MAX_CPUS = 4096 / PVCLOCK_AREA_STRIDE;
/** Default interval between `tick` lines. */
export const DEFAULT_TICK_NS = 100_000_000n;

export type ProbeGuestName = 'probe' | 'ioloop';

/** The probe guest image, as committed in guests/. */
export function probeImage(name: ProbeGuestName): Uint8Array {
  const url = distUrl(`../guests/${name}.bin`);
  try {
    return readFileSync(url);
  } catch (err) {
    throw new TsvmmError(
      'GUEST_IMAGE_MISSING',
      `cannot read the ${name} guest image ${url.pathname}: ${(err as Error).message}; rebuild it with 'make -C guests'`,
    );
  }
}

/** The guest-physical address of vCPU `cpu`'s pvclock area. */
export function pvclockAreaOf(cpu: number): number {
  return PVCLOCK_AREA_BASE + cpu * PVCLOCK_AREA_STRIDE;
}

/** What vCPU `cpu` starts with. */
export function probeEntry(cpu: number, tickNs: bigint = DEFAULT_TICK_NS): LongModeEntry {
  return {
    rip: BigInt(PROBE_LOAD_ADDR),
    rsp: BigInt(STACK_BASE + (cpu + 1) * STACK_SIZE),
    rdi: BigInt(cpu),
    rsi: BigInt(pvclockAreaOf(cpu)),
    rdx: tickNs,
  };
}

/** Bytes of guest RAM the layout needs for `cpus` vCPUs. */
export function probeMemoryNeeded(cpus: number): number {
  return STACK_BASE + (cpus + 1) * STACK_SIZE;
}
