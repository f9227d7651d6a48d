import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { JsonMessageStream, type JsonStreamEvent } from './json-stream.js';
import { writeJson } from './json-writer.js';
import { QmpError } from './qmp-error.js';
import { validateArgs } from './qmp-schema.js';

function parseAll(chunks: (string | Buffer)[], limits = {}): JsonStreamEvent[] {
  const events: JsonStreamEvent[] = [];
  const stream = new JsonMessageStream((e) => events.push(e), limits);
  for (const c of chunks) stream.feed(typeof c === 'string' ? Buffer.from(c) : c);
  return events;
}

describe('JSON message stream', () => {
  it('splits several values in one chunk, scalars included', () => {
    assert.deepEqual(parseAll(['{"a": 1}[2, 3] 4 "five" true null {}']), [
      { value: { a: 1 } },
      { value: [2, 3] },
      { value: 4 },
      { value: 'five' },
      { value: true },
      { value: null },
      { value: {} },
    ]);
  });

  it('joins a value split at every byte, multi-byte UTF-8 included', () => {
    const text = Buffer.from('{"k": "h\u00e9llo \ud83d\ude00", "n": -12.5e-1, "l": [0, false]}');
    const chunks = [...text].map((b) => Buffer.from([b]));
    assert.deepEqual(parseAll(chunks), [
      { value: { k: 'h\u00e9llo \ud83d\ude00', n: -1.25, l: [0, false] } },
    ]);
  });

  it("accepts QEMU's single-quoted strings and the \\' escape", () => {
    assert.deepEqual(parseAll([`{'execute': 'it\\'s', "q": "\\"\\/\\b\\f\\n\\r\\t\\u0041"}`]), [
      { value: { execute: "it's", q: '"/\b\f\n\r\tA' } },
    ]);
  });

  it('reports syntax errors with QEMU descriptions and carries on', () => {
    assert.deepEqual(
      parseAll([
        '{"a" 1}',
        '{1: 2}',
        '[1 2]',
        '{"a": 1 "b": 2}',
        '{"a": 1, "a": 2}',
        'nul ',
        '"\\x"',
        '"\\ud800"',
        Buffer.from([0x22, 0xc3, 0x28, 0x22]),
        '{"ok": 1}',
      ]),
      [
        { error: 'JSON parse error, missing : in object pair' },
        { error: 'JSON parse error, key is not a string in object' },
        { error: 'JSON parse error, expected separator in list' },
        { error: 'JSON parse error, expected separator in dict' },
        { error: 'JSON parse error, duplicate key' },
        { error: "JSON parse error, invalid keyword 'nul'" },
        { error: 'JSON parse error, invalid escape sequence in string' },
        { error: 'JSON parse error, \\ud800 is not a valid Unicode character' },
        { error: 'JSON parse error, invalid UTF-8 sequence in string' },
        { value: { ok: 1 } },
      ],
    );
  });

  it('reports lexical errors as stray input and resynchronises at a structural or control character', () => {
    assert.deepEqual(parseAll(['{"a": 01}', '\n', '+', '{"b": 2}', ' 1.x ', '\t', '\n3 ']), [
      { error: "JSON parse error, stray '01'" },
      { error: 'JSON parse error, expecting value' }, // the lone '}' after recovery
      { error: "JSON parse error, stray '+'" },
      { value: { b: 2 } },
      { error: "JSON parse error, stray '1.x'" },
      { value: 3 },
    ]);
  });

  it('a control character inside a string is an error, as in QEMU', () => {
    assert.deepEqual(parseAll(['"a\u0001b"', '\n"ok"']), [
      { error: "JSON parse error, stray '\"a\u0001'" },
      { value: 'ok' },
    ]);
  });

  it('refuses a value over the size limit once, skips the rest of it, and goes on', () => {
    const events = parseAll(
      ['{"a": "', 'x'.repeat(50), 'x'.repeat(50), '", "b": [1, {}]} {"c": 3}'],
      {
        maxValueBytes: 64,
      },
    );
    assert.deepEqual(events, [{ error: 'JSON token size limit exceeded' }, { value: { c: 3 } }]);
  });

  it('refuses too many tokens and too deep nesting', () => {
    assert.deepEqual(parseAll(['[1,2,3,4,5,6] 7 '], { maxTokens: 5 }), [
      { error: 'JSON token count limit exceeded' },
      { value: 7 },
    ]);
    assert.deepEqual(parseAll(['[[[[]]]] [[]]'], { maxNesting: 3 }), [
      { error: 'JSON nesting depth limit exceeded' },
      { value: [[]] },
    ]);
  });

  it('a lexical error ends the skipping of an oversized value (the documented resync)', () => {
    const events = parseAll(['{"a": "', 'y'.repeat(100), Buffer.from([0xff]), '\n{"d": 4}'], {
      maxValueBytes: 32,
    });
    assert.deepEqual(events, [
      { error: 'JSON token size limit exceeded' },
      { error: "JSON parse error, stray '\u00ff'" },
      { value: { d: 4 } },
    ]);
  });

  it('parses a 1 MiB string in one value', () => {
    const big = 'z'.repeat(1024 * 1024);
    assert.deepEqual(parseAll([`{"id": "${big}"}`]), [{ value: { id: big } }]);
  });

  it('keeps a "__proto__" key as an ordinary member', () => {
    const [event] = parseAll(['{"__proto__": {"polluted": true}}']);
    const value = (event as { value: Record<string, unknown> }).value;
    assert.ok(Object.hasOwn(value, '__proto__'));
    assert.equal(({} as Record<string, unknown>).polluted, undefined);
  });
});

describe('JSON writer', () => {
  it("writes QEMU's spacing and ASCII-only escapes", () => {
    assert.equal(writeJson({ return: {} }), '{"return": {}}');
    assert.equal(
      writeJson({ a: [1, 'b', null, true], c: { d: 1.5 } }),
      '{"a": [1, "b", null, true], "c": {"d": 1.5}}',
    );
    assert.equal(
      writeJson('\u00e9\ud83d\ude00\u007f\n"\\\u0001'),
      '"\\u00E9\\uD83D\\uDE00\\u007F\\n\\"\\\\\\u0001"',
    );
  });
});

describe('QMP argument schema', () => {
  const schema = {
    name: 'str',
    '*count': 'int',
    '*mode': { enum: ['a', 'b'] },
    '*list': { array: 'number' },
    '*nested': { struct: { inner: 'bool', '*x': 'any' } },
  } as const;

  function desc(args: Record<string, unknown>): string {
    try {
      validateArgs(schema, args as never);
      return 'ok';
    } catch (e) {
      assert.ok(e instanceof QmpError);
      assert.equal(e.errorClass, 'GenericError');
      return e.message;
    }
  }

  it('accepts valid arguments, optional ones left out', () => {
    assert.equal(desc({ name: 'n' }), 'ok');
    assert.equal(
      desc({ name: 'n', count: 3, mode: 'b', list: [1, 2.5], nested: { inner: true, x: [] } }),
      'ok',
    );
  });

  it('names missing, mistyped and unexpected members as QEMU does, nested ones by path', () => {
    assert.equal(desc({}), "Parameter 'name' is missing");
    assert.equal(desc({ name: 1 }), "Invalid parameter type for 'name', expected: string");
    assert.equal(
      desc({ name: 'n', count: '3' }),
      "Invalid parameter type for 'count', expected: integer",
    );
    assert.equal(
      desc({ name: 'n', count: 2 ** 60 }),
      "Invalid parameter type for 'count', expected: integer",
    );
    assert.equal(desc({ name: 'n', mode: 'c' }), "Parameter 'mode' does not accept value 'c'");
    assert.equal(
      desc({ name: 'n', list: {} }),
      "Invalid parameter type for 'list', expected: array",
    );
    assert.equal(
      desc({ name: 'n', list: [1, 'x'] }),
      "Invalid parameter type for 'list[1]', expected: number",
    );
    assert.equal(
      desc({ name: 'n', nested: [] }),
      "Invalid parameter type for 'nested', expected: object",
    );
    assert.equal(desc({ name: 'n', nested: {} }), "Parameter 'nested.inner' is missing");
    assert.equal(
      desc({ name: 'n', nested: { inner: true, y: 1 } }),
      "Parameter 'nested.y' is unexpected",
    );
    assert.equal(desc({ name: 'n', extra: 1 }), "Parameter 'extra' is unexpected");
    // Members are checked in schema order before unknown ones, as QEMU's visitor does.
    assert.equal(desc({ extra: 1 }), "Parameter 'name' is missing");
  });
});
