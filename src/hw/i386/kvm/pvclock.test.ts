import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  decodePvclock,
  PVCLOCK_GUEST_STOPPED,
  PVCLOCK_TSC_STABLE_BIT,
  type PvclockTimeInfo,
  pvclockNsAt,
  readPvclock,
} from './pvclock.js';

function encode(f: {
  version: number;
  tscTimestamp: bigint;
  systemTime: bigint;
  mul: number;
  shift: number;
  flags: number;
}): Uint8Array {
  const b = new Uint8Array(32);
  const v = new DataView(b.buffer);
  v.setUint32(0, f.version, true);
  v.setUint32(4, 0xdeadbeef, true); // pad: must be ignored
  v.setBigUint64(8, f.tscTimestamp, true);
  v.setBigUint64(16, f.systemTime, true);
  v.setUint32(24, f.mul, true);
  v.setInt8(28, f.shift);
  v.setUint8(29, f.flags);
  return b;
}

function info(p: Partial<PvclockTimeInfo>): PvclockTimeInfo {
  return {
    version: 2,
    tscTimestamp: 0n,
    systemTime: 0n,
    tscToSystemMul: 0,
    tscShift: 0,
    flags: 0,
    ...p,
  };
}

test('decodes every field of pvclock_vcpu_time_info at its offset, with a signed shift', () => {
  const bytes = encode({
    version: 4,
    tscTimestamp: 0x1122334455667788n,
    systemTime: 0x0102030405060708n,
    mul: 0xcccccccd,
    shift: -1,
    flags: PVCLOCK_TSC_STABLE_BIT | PVCLOCK_GUEST_STOPPED,
  });
  assert.deepEqual(decodePvclock(bytes), {
    version: 4,
    tscTimestamp: 0x1122334455667788n,
    systemTime: 0x0102030405060708n,
    tscToSystemMul: 0xcccccccd,
    tscShift: -1,
    flags: 3,
  });
  // Bytes as written by hand, to pin the offsets independently of DataView.
  assert.equal(bytes[28], 0xff);
  assert.equal(bytes[29], 3);
  assert.equal(bytes[8], 0x88);
});

test('decodes from a view into a larger buffer (guest memory) at an offset', () => {
  const mem = new Uint8Array(4096);
  mem.set(
    encode({ version: 2, tscTimestamp: 5n, systemTime: 7n, mul: 9, shift: 1, flags: 0 }),
    0x100,
  );
  const d = decodePvclock(mem.subarray(0x100, 0x120));
  assert.equal(d.tscTimestamp, 5n);
  assert.equal(d.systemTime, 7n);
  assert.equal(d.tscShift, 1);
});

test('a short buffer is refused', () => {
  assert.throws(() => decodePvclock(new Uint8Array(31)), { code: 'PVCLOCK_SHORT_READ' });
});

test('ns at a TSC, hand computed: mul 0.5 with shift +1, -1 and 0', () => {
  const base = { tscTimestamp: 1000n, systemTime: 5_000_000n, tscToSystemMul: 0x80000000 };
  // delta 2000: <<1 = 4000, *0.5 = 2000
  assert.equal(pvclockNsAt(info({ ...base, tscShift: 1 }), 3000n), 5_002_000n);
  // delta 2000: >>1 = 1000, *0.5 = 500
  assert.equal(pvclockNsAt(info({ ...base, tscShift: -1 }), 3000n), 5_000_500n);
  // delta 2000 * 0.5 = 1000
  assert.equal(pvclockNsAt(info({ ...base, tscShift: 0 }), 3000n), 5_001_000n);
  // at the timestamp itself: system_time exactly
  assert.equal(pvclockNsAt(info({ ...base, tscShift: 0 }), 1000n), 5_000_000n);
});

test('ns at a TSC, hand computed: a 2.5 GHz TSC advanced by one second gives 1e9 ns', () => {
  // 0.4 ns per tick = 0.8 * 2^-1: shift -1, mul = round(0.8 * 2^32) = 3435973837.
  // 2.5e9 >> 1 = 1.25e9; 1.25e9 * 3435973837 = 4294967296250000000; >> 32 = 1000000000 (.058 dropped).
  const i = info({ tscTimestamp: 10n, systemTime: 123n, tscToSystemMul: 3435973837, tscShift: -1 });
  assert.equal(pvclockNsAt(i, 10n + 2_500_000_000n), 1_000_000_123n);
});

test('the arithmetic wraps as u64, as the guest computes it', () => {
  // delta 2^63 << 1 overflows to 0 in 64 bits.
  const shifted = info({
    tscTimestamp: 0n,
    systemTime: 7n,
    tscToSystemMul: 0xffffffff,
    tscShift: 1,
  });
  assert.equal(pvclockNsAt(shifted, 1n << 63n), 7n);
  // system_time near 2^64 wraps around.
  const nearTop = info({
    tscTimestamp: 0n,
    systemTime: (1n << 64n) - 1n,
    tscToSystemMul: 0x80000000,
  });
  assert.equal(pvclockNsAt(nearTop, 4n), 1n);
});

test('a TSC before the timestamp is refused', () => {
  assert.throws(() => pvclockNsAt(info({ tscTimestamp: 100n }), 99n), {
    code: 'PVCLOCK_TSC_BEFORE_TIMESTAMP',
  });
});

test('version protocol: an odd version or a version that changed during the read is read again', () => {
  const odd = encode({ version: 3, tscTimestamp: 1n, systemTime: 1n, mul: 1, shift: 0, flags: 0 });
  const v4 = encode({ version: 4, tscTimestamp: 2n, systemTime: 2n, mul: 1, shift: 0, flags: 0 });
  const v6 = encode({ version: 6, tscTimestamp: 3n, systemTime: 3n, mul: 1, shift: 0, flags: 0 });
  // Reads: odd (update in progress); v4 then v6 (changed under us); v6 then v6 (stable): five reads.
  const seq = [odd, v4, v6, v6, v6];
  let reads = 0;
  const got = readPvclock(() => seq[reads++]!);
  assert.equal(got.version, 6);
  assert.equal(got.systemTime, 3n);
  assert.equal(reads, 5);
});

test('version protocol: a page that never settles is an error', () => {
  const odd = encode({ version: 1, tscTimestamp: 0n, systemTime: 0n, mul: 0, shift: 0, flags: 0 });
  assert.throws(() => readPvclock(() => odd, 10), { code: 'PVCLOCK_UNSTABLE' });
});
