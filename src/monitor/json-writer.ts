import type { JsonValue } from './json-value.js';

/**
 * Serialises a JSON value the way QEMU's QMP writer does, so byte-level
 * expectations in users' scripts (`"return": {}`) hold: `", "` between
 * members and `": "` after keys, and output that is pure ASCII (every code
 * point below 0x20 or from 0x7F up is written as an upper-case `\uXXXX`
 * escape, beyond the BMP as a surrogate pair).
 *
 * @example
 * writeJson({ return: {} }); // '{"return": {}}'
 */
export function writeJson(value: JsonValue): string {
  const out: string[] = [];
  writeValue(value, out);
  return out.join('');
}

function writeValue(value: JsonValue, out: string[]): void {
  if (value === null) {
    out.push('null');
  } else if (typeof value === 'boolean') {
    out.push(value ? 'true' : 'false');
  } else if (typeof value === 'number') {
    // JSON has no Inf or NaN; null is what JSON.stringify writes for them too.
    out.push(Number.isFinite(value) ? String(value) : 'null');
  } else if (typeof value === 'string') {
    out.push(quote(value));
  } else if (Array.isArray(value)) {
    out.push('[');
    for (let i = 0; i < value.length; i++) {
      if (i > 0) out.push(', ');
      writeValue(value[i]!, out);
    }
    out.push(']');
  } else {
    out.push('{');
    let first = true;
    for (const key of Object.keys(value)) {
      const member = value[key];
      if (member === undefined) continue; // an optional member left out
      if (!first) out.push(', ');
      first = false;
      out.push(quote(key), ': ');
      writeValue(member, out);
    }
    out.push('}');
  }
}

/** Whether `s` is printable ASCII without `"` or `\\` (the common case: written as is). */
function plain(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c >= 0x7f || c === 0x22 || c === 0x5c) return false;
  }
  return true;
}

function quote(s: string): string {
  if (plain(s)) return `"${s}"`;
  let r = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    switch (c) {
      case 0x22:
        r += '\\"';
        break;
      case 0x5c:
        r += '\\\\';
        break;
      case 0x08:
        r += '\\b';
        break;
      case 0x0c:
        r += '\\f';
        break;
      case 0x0a:
        r += '\\n';
        break;
      case 0x0d:
        r += '\\r';
        break;
      case 0x09:
        r += '\\t';
        break;
      default:
        // JS strings are UTF-16 already, so a surrogate pair comes out as the
        // two escapes QEMU writes for a code point beyond the BMP.
        r += c < 0x20 || c >= 0x7f ? `\\u${c.toString(16).toUpperCase().padStart(4, '0')}` : s[i];
    }
  }
  return `${r}"`;
}
