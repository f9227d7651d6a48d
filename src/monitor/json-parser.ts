import type { JsonToken } from './json-lexer.js';
import type { JsonObject, JsonValue } from './json-value.js';

/** Thrown inside the parser; the message is QMP's `desc` for the client. */
class ParseFailure extends Error {}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Parses the tokens of one complete top-level value. Returns the value, or
 * the error description QEMU would send ("JSON parse error, ..."), worded
 * like QEMU's so clients that match on it keep working.
 */
export function parseJsonTokens(tokens: readonly JsonToken[]): JsonParseResult {
  const parser = new TokenParser(tokens);
  try {
    const value = parser.value();
    if (!parser.atEnd()) parser.fail('expecting value');
    return { ok: true, value };
  } catch (e) {
    if (e instanceof ParseFailure) return { ok: false, error: `JSON parse error, ${e.message}` };
    throw e;
  }
}

/** The outcome of parsing one value. */
export type JsonParseResult = { ok: true; value: JsonValue } | { ok: false; error: string };

class TokenParser {
  private index = 0;
  private readonly tokens: readonly JsonToken[];

  constructor(tokens: readonly JsonToken[]) {
    this.tokens = tokens;
  }

  atEnd(): boolean {
    return this.index >= this.tokens.length;
  }

  fail(message: string): never {
    throw new ParseFailure(message);
  }

  private next(): JsonToken {
    const token = this.tokens[this.index++];
    if (token === undefined) this.fail('premature EOI');
    return token;
  }

  private peek(): JsonToken {
    const token = this.tokens[this.index];
    if (token === undefined) this.fail('premature EOI');
    return token;
  }

  value(): JsonValue {
    const token = this.peek();
    switch (token.type) {
      case 'lcurly':
        return this.object();
      case 'lsquare':
        return this.array();
      case 'string':
        this.index++;
        return decodeString(token.raw);
      case 'integer':
      case 'float':
        this.index++;
        return Number(token.raw.toString('latin1'));
      case 'keyword': {
        this.index++;
        const word = token.raw.toString('latin1');
        if (word === 'true') return true;
        if (word === 'false') return false;
        if (word === 'null') return null;
        return this.fail(`invalid keyword '${word}'`);
      }
      default:
        return this.fail('expecting value');
    }
  }

  private object(): JsonObject {
    this.index++; // '{'
    const result: JsonObject = {};
    if (this.peek().type === 'rcurly') {
      this.index++;
      return result;
    }
    for (;;) {
      const keyToken = this.peek();
      if (keyToken.type !== 'string') {
        // Parse it anyway so an invalid token is reported as such first.
        this.value();
        this.fail('key is not a string in object');
      }
      this.index++;
      const key = decodeString(keyToken.raw);
      if (this.next().type !== 'colon') this.fail('missing : in object pair');
      const member = this.value();
      if (Object.hasOwn(result, key)) this.fail('duplicate key');
      // A client's "__proto__" key must stay an ordinary member.
      if (key === '__proto__') {
        Object.defineProperty(result, key, {
          value: member,
          enumerable: true,
          writable: true,
          configurable: true,
        });
      } else {
        result[key] = member;
      }
      const separator = this.next();
      if (separator.type === 'rcurly') return result;
      if (separator.type !== 'comma') this.fail('expected separator in dict');
    }
  }

  private array(): JsonValue[] {
    this.index++; // '['
    const result: JsonValue[] = [];
    if (this.peek().type === 'rsquare') {
      this.index++;
      return result;
    }
    for (;;) {
      result.push(this.value());
      const separator = this.next();
      if (separator.type === 'rsquare') return result;
      if (separator.type !== 'comma') this.fail('expected separator in list');
    }
  }
}

/** Decodes a string token (quotes included), checking escapes and UTF-8. */
function decodeString(raw: Buffer): string {
  const body = raw.subarray(1, raw.length - 1);
  if (!body.includes(0x5c)) return decodeUtf8(body);
  let out = '';
  let runStart = 0;
  let i = 0;
  while (i < body.length) {
    if (body[i] !== 0x5c) {
      i++;
      continue;
    }
    out += decodeUtf8(body.subarray(runStart, i));
    const escaped = body[i + 1];
    i += 2;
    switch (escaped) {
      case 0x22:
        out += '"';
        break;
      case 0x27:
        out += "'";
        break;
      case 0x5c:
        out += '\\';
        break;
      case 0x2f:
        out += '/';
        break;
      case 0x62:
        out += '\b';
        break;
      case 0x66:
        out += '\f';
        break;
      case 0x6e:
        out += '\n';
        break;
      case 0x72:
        out += '\r';
        break;
      case 0x74:
        out += '\t';
        break;
      case 0x75: {
        const escStart = i - 2;
        let cp = hex4(body, i);
        i += 4;
        // A leading surrogate must be followed by an escaped trailing one.
        if (cp >= 0xd800 && cp <= 0xdbff) {
          const trail = body[i] === 0x5c && body[i + 1] === 0x75 ? hex4(body, i + 2) : -1;
          if (trail >= 0xdc00 && trail <= 0xdfff) {
            cp = 0x10000 + ((cp - 0xd800) << 10) + (trail - 0xdc00);
            i += 6;
          } else {
            cp = -1;
          }
        } else if (cp >= 0xdc00 && cp <= 0xdfff) {
          cp = -1;
        }
        if (cp < 0) {
          const text = body.subarray(escStart, Math.min(i, body.length)).toString('latin1');
          throw new ParseFailure(`${text} is not a valid Unicode character`);
        }
        out += String.fromCodePoint(cp);
        break;
      }
      default:
        throw new ParseFailure('invalid escape sequence in string');
    }
    runStart = i;
  }
  return out + decodeUtf8(body.subarray(runStart));
}

function hex4(buf: Buffer, at: number): number {
  if (at + 4 > buf.length) return -1;
  const text = buf.subarray(at, at + 4).toString('latin1');
  return /^[0-9a-fA-F]{4}$/.test(text) ? Number.parseInt(text, 16) : -1;
}

function decodeUtf8(bytes: Buffer): string {
  if (bytes.length === 0) return '';
  try {
    return utf8.decode(bytes);
  } catch {
    throw new ParseFailure('invalid UTF-8 sequence in string');
  }
}
