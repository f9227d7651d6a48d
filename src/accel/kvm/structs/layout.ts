/**
 * A small, declarative description of C structs and the codec that moves
 * them between Buffers and typed objects.
 *
 * Each KVM struct is described once, as a table of fields with their byte
 * offsets and C types; encoding, decoding, default values and the gcc
 * cross-check test all read that one table. Padding and reserved fields are
 * left out of the table: encode writes them as zero, decode ignores them.
 * Everything is little-endian (x86_64).
 */
import { KvmStructError } from '../errors.js';

/** Integer fields read as number. */
export type IntType = 'u8' | 'u16' | 'u32' | 's32';
/** 64-bit fields, read as bigint. */
export type BigType = 'u64' | 's64';

interface FieldBase {
  /** Byte offset from the start of the enclosing struct. */
  offset: number;
  /** The C member name when it is not the snake_case of the TS name. */
  c?: string;
}

/** An 8/16/32-bit integer field. */
export interface IntField extends FieldBase {
  type: IntType;
}
/** A 64-bit integer field. */
export interface BigField extends FieldBase {
  type: BigType;
}
/** A fixed-size byte array (kept as bytes: FPU registers, APIC page, chip state). */
export interface BytesField extends FieldBase {
  type: 'bytes';
  length: number;
}
/** A fixed-size array of u64. */
export interface BigArrayField extends FieldBase {
  type: 'u64[]';
  count: number;
}
/** An embedded struct. */
export interface StructField<V> extends FieldBase {
  type: 'struct';
  codec: StructCodec<V>;
}
/** A fixed-size array of embedded structs. */
export interface StructArrayField<E> extends FieldBase {
  type: 'struct[]';
  codec: StructCodec<E>;
  count: number;
}

/** The field description that fits a TS value type. */
export type FieldSpec<V> = [V] extends [bigint]
  ? BigField
  : [V] extends [number]
    ? IntField
    : [V] extends [Uint8Array]
      ? BytesField
      : [V] extends [bigint[]]
        ? BigArrayField
        : [V] extends [(infer E)[]]
          ? StructArrayField<E>
          : [V] extends [object]
            ? StructField<V>
            : never;

/** One field description per property of T. */
export type FieldSpecs<T> = { [K in keyof T]-?: FieldSpec<T[K]> };

/** Any field description, as {@link StructCodec.entries} lists them. */
export type AnyField =
  | IntField
  | BigField
  | BytesField
  | BigArrayField
  | StructField<unknown>
  | StructArrayField<unknown>;

const INT_LIMITS: Record<IntType, [number, number, number]> = {
  // [size, min, max]
  u8: [1, 0, 0xff],
  u16: [2, 0, 0xffff],
  u32: [4, 0, 0xffffffff],
  s32: [4, -0x80000000, 0x7fffffff],
};
const U64_MAX = (1n << 64n) - 1n;
const S64_MIN = -(1n << 63n);
const S64_MAX = (1n << 63n) - 1n;

/** Byte size of one field as laid out in the struct. */
export function fieldSize(field: FieldSpec<unknown> | AnyField): number {
  const f = field as AnyField;
  switch (f.type) {
    case 'u8':
    case 'u16':
    case 'u32':
    case 's32':
      return INT_LIMITS[f.type][0];
    case 'u64':
    case 's64':
      return 8;
    case 'bytes':
      return f.length;
    case 'u64[]':
      return 8 * f.count;
    case 'struct':
      return f.codec.size;
    case 'struct[]':
      return f.codec.size * f.count;
  }
}

/** The C member name of a field: its `c` override or the snake_case of `name`. */
export function cMemberName(name: string, field: { c?: string }): string {
  return field.c ?? name.replace(/[A-Z]/g, (ch) => `_${ch.toLowerCase()}`);
}

/**
 * Encoder and decoder for one C struct. `cType` is the C spelling
 * (`struct kvm_regs`), or null for an anonymous struct nested in another.
 */
export class StructCodec<T> {
  readonly cType: string | null;
  readonly size: number;
  readonly fields: FieldSpecs<T>;

  constructor(cType: string | null, size: number, fields: FieldSpecs<T>) {
    this.cType = cType;
    this.size = size;
    this.fields = fields;
    for (const [name, field] of this.entries()) {
      if (field.offset < 0 || field.offset + fieldSize(field) > size) {
        throw new KvmStructError(`${cType ?? 'struct'}.${name} lies outside its ${size} bytes`);
      }
    }
  }

  /** The fields as [name, description] pairs, in declaration order. */
  entries(): [string, AnyField][] {
    return Object.entries(this.fields) as [string, AnyField][];
  }

  /**
   * Writes `value` into `into` at byte `at` (a new zeroed Buffer of
   * {@link size} bytes by default) and returns the Buffer. Bytes of the
   * struct not covered by a field are set to zero.
   */
  encode(value: T, into?: Uint8Array, at = 0): Buffer {
    const buf = into
      ? Buffer.from(into.buffer, into.byteOffset, into.byteLength)
      : Buffer.alloc(this.size);
    if (at < 0 || at + this.size > buf.byteLength) {
      throw new KvmStructError(
        `${this.label()} needs ${this.size} bytes at ${at} in a ${buf.byteLength}-byte buffer`,
      );
    }
    if (into) buf.fill(0, at, at + this.size);
    this.write(value, buf, at);
    return buf;
  }

  /** Reads a T from `buf` at byte `at`. Byte arrays in the result are copies. */
  decode(buf: Uint8Array, at = 0): T {
    if (at < 0 || at + this.size > buf.byteLength) {
      throw new KvmStructError(
        `${this.label()} needs ${this.size} bytes at ${at}, the buffer has ${buf.byteLength}`,
      );
    }
    const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    return this.read(view, buf, at);
  }

  /** A T with every field zero: a starting point for callers that set a few fields. */
  zero(): T {
    return this.decode(new Uint8Array(this.size));
  }

  private label(): string {
    return this.cType ?? 'struct';
  }

  private write(value: T, buf: Buffer, base: number): void {
    const record = value as Record<string, unknown>;
    for (const [name, field] of this.entries()) {
      const v = record[name];
      const where = `${this.label()}.${name}`;
      const at = base + field.offset;
      switch (field.type) {
        case 'u8':
        case 'u16':
        case 'u32':
        case 's32': {
          const [size, min, max] = INT_LIMITS[field.type];
          if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
            throw new KvmStructError(
              `${where} must be an integer in ${min}..${max}, got ${String(v)}`,
            );
          }
          if (field.type === 's32') buf.writeInt32LE(v, at);
          else buf.writeUIntLE(v, at, size);
          break;
        }
        case 'u64':
        case 's64': {
          const [min, max] = field.type === 'u64' ? [0n, U64_MAX] : [S64_MIN, S64_MAX];
          if (typeof v !== 'bigint' || v < min || v > max) {
            throw new KvmStructError(
              `${where} must be a bigint in ${min}..${max}, got ${String(v)}`,
            );
          }
          if (field.type === 'u64') buf.writeBigUInt64LE(v, at);
          else buf.writeBigInt64LE(v, at);
          break;
        }
        case 'bytes': {
          if (!(v instanceof Uint8Array) || v.byteLength !== field.length) {
            throw new KvmStructError(`${where} must be a Uint8Array of ${field.length} bytes`);
          }
          buf.set(v, at);
          break;
        }
        case 'u64[]': {
          if (!Array.isArray(v) || v.length !== field.count) {
            throw new KvmStructError(`${where} must be an array of ${field.count} bigints`);
          }
          v.forEach((item, i) => {
            if (typeof item !== 'bigint' || item < 0n || item > U64_MAX) {
              throw new KvmStructError(`${where}[${i}] must be a bigint in 0..${U64_MAX}`);
            }
            buf.writeBigUInt64LE(item, at + 8 * i);
          });
          break;
        }
        case 'struct': {
          if (typeof v !== 'object' || v === null)
            throw new KvmStructError(`${where} must be an object`);
          field.codec.write(v, buf, at);
          break;
        }
        case 'struct[]': {
          if (!Array.isArray(v) || v.length !== field.count) {
            throw new KvmStructError(`${where} must be an array of ${field.count} structs`);
          }
          v.forEach((item: unknown, i) => {
            field.codec.write(item, buf, at + i * field.codec.size);
          });
          break;
        }
      }
    }
  }

  private read(view: DataView, bytes: Uint8Array, base: number): T {
    const out: Record<string, unknown> = {};
    for (const [name, field] of this.entries()) {
      const at = base + field.offset;
      switch (field.type) {
        case 'u8':
          out[name] = view.getUint8(at);
          break;
        case 'u16':
          out[name] = view.getUint16(at, true);
          break;
        case 'u32':
          out[name] = view.getUint32(at, true);
          break;
        case 's32':
          out[name] = view.getInt32(at, true);
          break;
        case 'u64':
          out[name] = view.getBigUint64(at, true);
          break;
        case 's64':
          out[name] = view.getBigInt64(at, true);
          break;
        case 'bytes':
          // A plain Uint8Array copy: Buffer#slice would share memory.
          out[name] = new Uint8Array(bytes.subarray(at, at + field.length));
          break;
        case 'u64[]':
          out[name] = Array.from({ length: field.count }, (_, i) =>
            view.getBigUint64(at + 8 * i, true),
          );
          break;
        case 'struct':
          out[name] = field.codec.read(view, bytes, at);
          break;
        case 'struct[]':
          out[name] = Array.from({ length: field.count }, (_, i) =>
            field.codec.read(view, bytes, at + i * field.codec.size),
          );
          break;
      }
    }
    return out as T;
  }
}

/** Describes a C struct: its C name (or null if anonymous), size and fields. */
export function defineStruct<T>(
  cType: string | null,
  size: number,
  fields: FieldSpecs<T>,
): StructCodec<T> {
  return new StructCodec(cType, size, fields);
}
