import { isJsonObject, type JsonObject, type JsonValue } from './json-value.js';
import { QmpError } from './qmp-error.js';

/**
 * The type of a command argument, in QAPI's spelling:
 * - `'str'`, `'int'` (a whole number), `'number'`, `'bool'`, `'any'`;
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
 * value 'y'`. Nested members are named `a.b`, list elements `a[0]`.
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
    checkValue(type, obj[name]!, full);
  }
  for (const name of Object.keys(obj)) {
    if (!known.has(name)) throw invalid(`Parameter '${prefix}${name}' is unexpected`);
  }
}

function checkValue(type: QmpType, value: JsonValue, full: string): void {
  if (typeof type === 'string') {
    switch (type) {
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
      throw invalid(`Parameter '${full}' does not accept value '${value}'`);
    }
    return;
  }
  if ('array' in type) {
    if (!Array.isArray(value)) throw wrongType(full, 'array');
    value.forEach((element, i) => {
      checkValue(type.array, element, `${full}[${i}]`);
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
