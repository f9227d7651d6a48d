import { TsvmmError } from '../../../util/errors.js';

/**
 * The guest's paravirtual clock page, `struct pvclock_vcpu_time_info` (32
 * bytes, little endian), which KVM writes at the guest physical address the
 * guest gave in MSR_KVM_SYSTEM_TIME_NEW.
 */
export interface PvclockTimeInfo {
  /** Odd while KVM is updating the page. */
  readonly version: number;
  readonly tscTimestamp: bigint;
  /** Guest kvmclock ns at `tscTimestamp`. */
  readonly systemTime: bigint;
  readonly tscToSystemMul: number;
  /** Signed: a negative shift divides the TSC delta. */
  readonly tscShift: number;
  readonly flags: number;
}

/** Size of `pvclock_vcpu_time_info`. */
export const PVCLOCK_TIME_INFO_SIZE = 32;
/** The MSR through which the guest enables kvmclock; bit 0 = enabled, the rest = page address. */
export const MSR_KVM_SYSTEM_TIME_NEW = 0x4b564d01;
/** Flag: the TSC is stable across vCPUs. */
export const PVCLOCK_TSC_STABLE_BIT = 1 << 0;
/** Flag: the host stopped the guest (set by KVM_KVMCLOCK_CTRL); the guest's watchdogs forgive the gap. */
export const PVCLOCK_GUEST_STOPPED = 1 << 1;

const U64 = (1n << 64n) - 1n;

/** The guest's pvclock data cannot be used. */
export class PvclockError extends TsvmmError {}

/** Decodes the 32 bytes of a pvclock_vcpu_time_info. */
export function decodePvclock(bytes: Uint8Array): PvclockTimeInfo {
  if (bytes.length < PVCLOCK_TIME_INFO_SIZE) {
    throw new PvclockError(
      'PVCLOCK_SHORT_READ',
      `pvclock_vcpu_time_info needs ${PVCLOCK_TIME_INFO_SIZE} bytes, got ${bytes.length}: read the whole structure from guest memory`,
    );
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, PVCLOCK_TIME_INFO_SIZE);
  return {
    version: v.getUint32(0, true),
    tscTimestamp: v.getBigUint64(8, true),
    systemTime: v.getBigUint64(16, true),
    tscToSystemMul: v.getUint32(24, true),
    tscShift: v.getInt8(28),
    flags: v.getUint8(29),
  };
}

/**
 * The guest's kvmclock in ns at guest TSC `tsc`, computed as KVM and the
 * guest do, in 64-bit unsigned arithmetic: the TSC delta is shifted by
 * `tscShift` (u64, bits shifted out are lost), multiplied by the 32.32
 * fixed-point `tscToSystemMul` keeping bits 32..95 of the 128-bit product,
 * and added to `systemTime`. A TSC before the page's timestamp is an error
 * (QEMU asserts it cannot happen): the page is from another TSC timeline.
 */
export function pvclockNsAt(info: PvclockTimeInfo, tsc: bigint): bigint {
  if (tsc < info.tscTimestamp) {
    throw new PvclockError(
      'PVCLOCK_TSC_BEFORE_TIMESTAMP',
      `guest TSC ${tsc} is before the pvclock timestamp ${info.tscTimestamp}: the TSC was not restored with the clock page; restore the vCPU's TSC before computing kvmclock`,
    );
  }
  let delta = tsc - info.tscTimestamp;
  if (info.tscShift < 0) delta >>= BigInt(-info.tscShift);
  else delta = (delta << BigInt(info.tscShift)) & U64;
  const scaled = ((delta * BigInt(info.tscToSystemMul)) >> 32n) & U64;
  return (scaled + info.systemTime) & U64;
}

/**
 * Reads a consistent copy of the page with the version protocol: the
 * version must be even (no update in progress) and the same before and
 * after the read. `read` returns the 32 bytes as they are now in guest
 * memory (a live view is fine: the values are copied out at once).
 */
export function readPvclock(read: () => Uint8Array, maxTries = 1000): PvclockTimeInfo {
  for (let i = 0; i < maxTries; i++) {
    const info = decodePvclock(read());
    if (info.version & 1) continue;
    const again = decodePvclock(read()).version;
    if (again === info.version) return info;
  }
  throw new PvclockError(
    'PVCLOCK_UNSTABLE',
    `the pvclock page kept changing over ${maxTries} reads: pause the vCPUs before reading it`,
  );
}
