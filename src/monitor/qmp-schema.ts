import { isJsonObject, type JsonObject, type JsonValue } from './json-value.js';
import { QmpError } from './qmp-error.js';

/**
 * The type of a command argument, in QAPI's spelling:
 * - `'str'`, `'int'` (a whole number), `'number'`, `'bool'`, `'any'`;
 * - `'uint8'`, `'uint32'`, `'uint64'` (QAPI's unsigned integers and
 *   `size`): like QEMU, a negative number is taken as its two's-complement
 *   for uint64 and refused for the narrower ones;
 * - `'StrOrNull'`: a string or null;
 * - `{ enum: [...] }`: a string from a fixed set;
 * - `{ array: T }`: a JSON array of T;
 * - a nested {@link QmpArgsSchema} for an object with known members.
 */
export type QmpType =
  | 'str'
  | 'int'
  | 'number'
  | 'bool'
  | 'any'
  | 'uint8'
  | 'uint32'
  | 'uint64'
  | 'StrOrNull'
  | { readonly enum: readonly string[] }
  | { readonly array: QmpType }
  | { readonly struct: QmpArgsSchema };

/**
 * The members of a command's `arguments` object, as in QAPI's schema files:
 * a name starting with `*` is optional.
 *
 * @example
 * const schema: QmpArgsSchema = { name: 'str', '*vcpu': 'int' };
 */
export type QmpArgsSchema = Readonly<Record<string, QmpType>>;

/**
 * Checks `args` against `schema` the way QEMU's input visitor does, member
 * by member in schema order, then for members the schema does not know.
 * Throws a GenericError {@link QmpError} worded as QEMU's:
 * `Parameter 'x' is missing`, `Invalid parameter type for 'x', expected:
 * integer`, `Parameter 'x' is unexpected`, `Parameter 'x' does not accept
 * value 'y'`, `Parameter 'x' expects uint8_t`. Nested members are named
 * `a.b`, list elements `a[0]`, except where QEMU's visitor names only the
 * member itself (a bad enum value, an unsigned integer out of range) or,
 * for a list element, `null`.
 */
export function validateArgs(schema: QmpArgsSchema, args: JsonObject): void {
  checkStruct(schema, args, '');
}

function checkStruct(schema: QmpArgsSchema, obj: JsonObject, prefix: string): void {
  const known = new Set<string>();
  for (const [key, type] of Object.entries(schema)) {
    const optional = key.startsWith('*');
    const name = optional ? key.slice(1) : key;
    known.add(name);
    const full = prefix + name;
    if (!Object.hasOwn(obj, name)) {
      if (optional) continue;
      throw invalid(`Parameter '${full}' is missing`);
    }
    checkValue(type, obj[name]!, full, name);
  }
  for (const name of Object.keys(obj)) {
    if (!known.has(name)) throw invalid(`Parameter '${prefix}${name}' is unexpected`);
  }
}

/** `name`: the bare member name QEMU uses in some messages; null for a list element. */
function checkValue(type: QmpType, value: JsonValue, full: string, name: string | null): void {
  if (typeof type === 'string') {
    switch (type) {
      case 'uint8':
      case 'uint32':
      case 'uint64': {
        // QEMU reads any integer from -2^63 to 2^64-1 as a uint64 (a negative
        // one wraps); JSON numbers are exact only to 2^53.
        if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
          throw invalid(`Parameter '${full}' expects uint64`);
        }
        const max = type === 'uint8' ? 0xff : type === 'uint32' ? 0xffff_ffff : undefined;
        if (max !== undefined && (value < 0 || value > max)) {
          throw invalid(`Parameter '${name ?? 'null'}' expects ${type}_t`);
        }
        return;
      }
      case 'StrOrNull':
        if (typeof value !== 'string' && value !== null) throw wrongType(full, 'StrOrNull');
        return;
      case 'any':
        return;
      case 'str':
        if (typeof value !== 'string') throw wrongType(full, 'string');
        return;
      case 'int':
        if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
          throw wrongType(full, 'integer');
        }
        return;
      case 'number':
        if (typeof value !== 'number') throw wrongType(full, 'number');
        return;
      case 'bool':
        if (typeof value !== 'boolean') throw wrongType(full, 'boolean');
        return;
    }
  }
  if ('enum' in type) {
    if (typeof value !== 'string') throw wrongType(full, 'string');
    if (!type.enum.includes(value)) {
      throw invalid(`Parameter '${name ?? 'null'}' does not accept value '${value}'`);
    }
    return;
  }
  if ('array' in type) {
    if (!Array.isArray(value)) throw wrongType(full, 'array');
    value.forEach((element, i) => {
      checkValue(type.array, element, `${full}[${i}]`, null);
    });
    return;
  }
  if (!isJsonObject(value)) throw wrongType(full, 'object');
  checkStruct(type.struct, value, `${full}.`);
}

function wrongType(full: string, expected: string): QmpError {
  return invalid(`Invalid parameter type for '${full}', expected: ${expected}`);
}

function invalid(desc: string): QmpError {
  return new QmpError('GenericError', desc);
}
