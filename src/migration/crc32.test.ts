import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { crc32, crc32Portable } from './crc32.js';

test('crc32 gives the IEEE check value and continues across pieces', () => {
  const check = Buffer.from('123456789');
  assert.equal(crc32(check), 0xcbf43926);
  assert.equal(crc32Portable(check), 0xcbf43926);
  const data = randomBytes(100_003);
  const whole = crc32(data);
  assert.equal(crc32Portable(data), whole);
  assert.equal(crc32(data.subarray(5000), crc32(data.subarray(0, 5000))), whole);
  assert.equal(crc32Portable(data.subarray(7), crc32Portable(data.subarray(0, 7))), whole);
  assert.equal(crc32(new Uint8Array(0)), 0);
});
