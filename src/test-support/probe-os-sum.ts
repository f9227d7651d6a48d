/**
 * Checks the probe OS's `probe mem sum=` answer against its dirty pattern
 * (guests/probe-os/main.c): each 8-byte word of the area is its address
 * XOR the pass number, written 64 KiB at a time by CPU 0, and the sum is
 * 64-bit FNV-1a over the area's words in order. CPU 0 computes the sum, so
 * the dirtier is paused meanwhile and the area holds pass P below some
 * cursor c (a multiple of 64 KiB) and pass P-1 from c on; pass 0 is the
 * RAM the guest got (zero). A wrong word anywhere (a page migration lost
 * or sent stale) makes every (P, c) fail.
 *
 * FNV-1a's step h' = (h ^ w) * prime (mod 2^64) can be undone, the prime
 * being odd, so instead of hashing the area once per cursor this hashes
 * forward with pass P, backward from the sum with pass P-1, and looks for a
 * 64 KiB boundary where both meet: two passes over the area per P.
 */

/** The dirtier's unit of work: 64 KiB. */
export const PROBE_DIRTY_CHUNK = 64 * 1024;

const OFFSET_BASIS = 0xcbf29ce484222325n;
const PRIME = 0x100000001b3n;
const MASK64 = (1n << 64n) - 1n;

/** The inverse of `a` modulo 2^64 (a odd), by Newton's iteration. */
function inverse64(a: bigint): bigint {
  let x = a; // correct to 3 bits for odd a
  for (let i = 0; i < 6; i++) x = (x * (2n - ((a * x) & MASK64))) & MASK64;
  return x;
}

const PRIME_INV = inverse64(PRIME);
const INV_HI = Number(PRIME_INV >> 32n);
const INV_LO = Number(PRIME_INV & 0xffffffffn);

/** (hi, lo) 32-bit halves of a 64-bit state. */
type State = [number, number];

function split(v: bigint): State {
  return [Number((v >> 32n) & 0xffffffffn), Number(v & 0xffffffffn)];
}

/** Low 64 bits of (ah:al) * (bh:bl), as [hi, lo]. */
function mul64(ah: number, al: number, bh: number, bl: number): State {
  const a0 = al & 0xffff;
  const a1 = al >>> 16;
  const b0 = bl & 0xffff;
  const b1 = bl >>> 16;
  const mid = a0 * b1 + a1 * b0; // < 2^33
  const low = a0 * b0 + (mid % 0x10000) * 0x10000; // < 2^33
  const lo = low >>> 0;
  const carry = Math.floor(low / 0x1_0000_0000);
  const hi = a1 * b1 + Math.floor(mid / 0x10000) + carry + Math.imul(ah, bl) + Math.imul(al, bh);
  return [hi >>> 0, lo];
}

/** The word the dirtier writes at `addr` in pass `pass` (pass 0: untouched, zero). Addresses and passes fit 32 bits. */
function word(addr: number, pass: number): number {
  return pass === 0 ? 0 : (addr ^ pass) >>> 0;
}

/** FNV-1a forward over the area with `pass`: the state at each chunk boundary, by chunk index. */
function forward(base: number, bytes: number, pass: number): State[] {
  let hi = Number(OFFSET_BASIS >> 32n);
  let lo = Number(OFFSET_BASIS & 0xffffffffn);
  const out: State[] = [[hi, lo]];
  for (let off = 0; off < bytes; off += 8) {
    lo = (lo ^ word(base + off, pass)) >>> 0;
    // * (2^40 + 0x1b3): lo*0x1b3 fits a double exactly.
    const t = lo * 0x1b3;
    const nlo = t >>> 0;
    const carry = Math.floor(t / 0x1_0000_0000);
    hi = (Math.imul(hi, 0x1b3) + carry + (lo << 8)) >>> 0;
    lo = nlo;
    if ((off + 8) % PROBE_DIRTY_CHUNK === 0) out.push([hi, lo]);
  }
  return out;
}

/** FNV-1a undone from `sum` back over the area with `pass`: the state before each chunk boundary, by chunk index. */
function backward(base: number, bytes: number, pass: number, sum: bigint): State[] {
  const chunks = bytes / PROBE_DIRTY_CHUNK;
  const out: State[] = new Array<State>(chunks + 1);
  let [hi, lo] = split(sum);
  out[chunks] = [hi, lo];
  for (let off = bytes - 8; off >= 0; off -= 8) {
    [hi, lo] = mul64(hi, lo, INV_HI, INV_LO);
    lo = (lo ^ word(base + off, pass)) >>> 0;
    if (off % PROBE_DIRTY_CHUNK === 0) out[off / PROBE_DIRTY_CHUNK] = [hi, lo];
  }
  return out;
}

/** Where the dirtier was when the sum was taken. */
export interface ProbeSumMatch {
  /** The pass under way (words below `cursor` have it, the rest pass - 1). */
  pass: number;
  /** Bytes of the area already written in `pass`. */
  cursor: number;
}

/**
 * The (pass, cursor) among `passes` that explains `sum` for the area of
 * `bytes` at guest-physical `base`, or undefined if none does.
 */
export function matchProbeSum(
  base: number,
  bytes: number,
  sum: bigint,
  passes: Iterable<number>,
): ProbeSumMatch | undefined {
  if (bytes % PROBE_DIRTY_CHUNK !== 0 || base + bytes > 2 ** 32) {
    throw new RangeError(
      `a probe dirty area of ${bytes} bytes at ${base} is not in the guest's form`,
    );
  }
  const chunks = bytes / PROBE_DIRTY_CHUNK;
  for (const pass of passes) {
    if (pass < 1 || pass >= 2 ** 32) continue;
    const f = forward(base, bytes, pass);
    const b = backward(base, bytes, pass - 1, sum);
    for (let k = 0; k < chunks; k++) {
      if (f[k]![0] === b[k]![0] && f[k]![1] === b[k]![1]) {
        return { pass, cursor: k * PROBE_DIRTY_CHUNK };
      }
    }
  }
  return undefined;
}

/** The sum as the guest computes it, word by word with BigInt (slow: for tests of the matcher). */
export function probeSumReference(
  base: number,
  bytes: number,
  pass: number,
  cursor: number,
): bigint {
  let h = OFFSET_BASIS;
  for (let off = 0; off < bytes; off += 8) {
    const w = BigInt(word(base + off, off < cursor ? pass : pass - 1));
    h = ((h ^ w) * PRIME) & MASK64;
  }
  return h;
}
