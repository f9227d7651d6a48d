/**
 * Just enough of an AML encoder (ACPI spec chapter 20) for the DSDT we
 * need: scopes, devices, named constants and resource-template buffers.
 * Each function returns the encoded bytes of one term.
 */

const ZERO_OP = 0x00;
const ONE_OP = 0x01;
const NAME_OP = 0x08;
const BYTE_PREFIX = 0x0a;
const WORD_PREFIX = 0x0b;
const DWORD_PREFIX = 0x0c;
const SCOPE_OP = 0x10;
const BUFFER_OP = 0x11;
const EXT_OP_PREFIX = 0x5b;
const DEVICE_OP = 0x82;
const ROOT_CHAR = 0x5c;

/** Concatenates byte arrays. */
export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

/**
 * A name string: one 4-character segment (shorter names are padded with
 * '_', as iasl does), optionally from the root (`\_SB`).
 */
export function nameString(name: string): Uint8Array {
  const root = name.startsWith('\\');
  const seg = (root ? name.slice(1) : name).padEnd(4, '_');
  if (!/^[A-Z_][A-Z0-9_]{3}$/.test(seg)) {
    throw new RangeError(`AML name segment '${seg}' is not 4 characters of A-Z, 0-9 or _`);
  }
  const bytes = [...seg].map((c) => c.charCodeAt(0));
  return Uint8Array.from(root ? [ROOT_CHAR, ...bytes] : bytes);
}

/**
 * The PkgLength that precedes `bodyLength` bytes: it counts itself, so
 * its own size (1 to 4 bytes) is part of the value encoded.
 */
export function pkgLength(bodyLength: number): Uint8Array {
  for (let size = 1; size <= 4; size++) {
    const total = bodyLength + size;
    if (size === 1 && total < 0x40) return Uint8Array.of(total);
    if (size > 1 && total < 2 ** (4 + 8 * (size - 1))) {
      const out = new Uint8Array(size);
      out[0] = ((size - 1) << 6) | (total & 0x0f);
      for (let i = 1; i < size; i++) out[i] = (total >> (4 + 8 * (i - 1))) & 0xff;
      return out;
    }
  }
  throw new RangeError(`AML package of ${bodyLength} bytes is too long for a PkgLength`);
}

/** An integer constant in its shortest encoding. */
export function integer(value: number): Uint8Array {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(`AML integer ${value} is out of range`);
  }
  if (value === 0) return Uint8Array.of(ZERO_OP);
  if (value === 1) return Uint8Array.of(ONE_OP);
  if (value <= 0xff) return Uint8Array.of(BYTE_PREFIX, value);
  if (value <= 0xffff) return Uint8Array.of(WORD_PREFIX, value & 0xff, value >> 8);
  const out = new Uint8Array(5);
  out[0] = DWORD_PREFIX;
  new DataView(out.buffer).setUint32(1, value, true);
  return out;
}

/** `Name(NAME, value)`. */
export function name(n: string, value: Uint8Array): Uint8Array {
  return concat([Uint8Array.of(NAME_OP), nameString(n), value]);
}

/** `Scope(NAME) { terms }`. */
export function scope(n: string, terms: readonly Uint8Array[]): Uint8Array {
  const body = concat([nameString(n), ...terms]);
  return concat([Uint8Array.of(SCOPE_OP), pkgLength(body.byteLength), body]);
}

/** `Device(NAME) { terms }`. */
export function device(n: string, terms: readonly Uint8Array[]): Uint8Array {
  const body = concat([nameString(n), ...terms]);
  return concat([Uint8Array.of(EXT_OP_PREFIX, DEVICE_OP), pkgLength(body.byteLength), body]);
}

/** `Buffer() { bytes }`. */
export function buffer(bytes: Uint8Array): Uint8Array {
  const body = concat([integer(bytes.byteLength), bytes]);
  return concat([Uint8Array.of(BUFFER_OP), pkgLength(body.byteLength), body]);
}

/**
 * `EisaId("PNP0501")` as the 32-bit integer AML stores: three letters of
 * 5 bits each and four hex digits, big-endian, read as a little-endian dword.
 */
export function eisaId(id: string): Uint8Array {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) {
    throw new RangeError(`EISA id '${id}' is not three capital letters and four hex digits`);
  }
  const letter = (i: number) => (id.charCodeAt(i) - 0x40) & 0x1f;
  const product = Number.parseInt(id.slice(3), 16);
  const b0 = (letter(0) << 2) | (letter(1) >> 3);
  const b1 = ((letter(1) & 7) << 5) | letter(2);
  const value = (b0 | (b1 << 8) | ((product >> 8) << 16) | ((product & 0xff) << 24)) >>> 0;
  return integer(value);
}

/** Resource descriptors for a `ResourceTemplate`. */
export const resource = {
  /** `IO(Decode16, base, base, 1, length)`: a fixed range of I/O ports. */
  io16(base: number, length: number): Uint8Array {
    return Uint8Array.of(0x47, 0x01, base & 0xff, base >> 8, base & 0xff, base >> 8, 1, length);
  },
  /** `IRQNoFlags() { irq }`: an ISA interrupt, edge-triggered, active high. */
  irq(irq: number): Uint8Array {
    const mask = 1 << irq;
    return Uint8Array.of(0x22, mask & 0xff, mask >> 8);
  },
};

/** `ResourceTemplate() { descriptors }`: a buffer ending in an End Tag with checksum 0. */
export function resourceTemplate(descriptors: readonly Uint8Array[]): Uint8Array {
  return buffer(concat([...descriptors, Uint8Array.of(0x79, 0x00)]));
}
