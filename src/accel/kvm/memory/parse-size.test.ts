import assert from 'node:assert/strict';
import { test } from 'node:test';
import { flatRamLayout, pcRamLayout } from './layout.js';
import { parseMemorySize } from './parse-size.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

test('parseMemorySize reads sizes like QEMU -m', () => {
  assert.equal(parseMemorySize('512M'), 512 * MiB);
  assert.equal(parseMemorySize('4G'), 4 * GiB);
  assert.equal(parseMemorySize('8G'), 8 * GiB);
  assert.equal(parseMemorySize('1024'), 1024 * MiB, 'a plain number is MiB');
  assert.equal(parseMemorySize('128'), 128 * MiB);
  assert.equal(parseMemorySize('2g'), 2 * GiB);
  assert.equal(parseMemorySize('1.5G'), 1.5 * GiB);
  assert.equal(parseMemorySize('1T'), 2 ** 40);
  assert.equal(parseMemorySize('65536K'), 64 * MiB);
  assert.equal(parseMemorySize('512MiB'), 512 * MiB);
  assert.equal(parseMemorySize(' 256 M '), 256 * MiB);
  assert.equal(parseMemorySize('8192B'), 8192);
  assert.equal(parseMemorySize('1K'), 8192, 'rounded up to 8 KiB like QEMU');
});

test('parseMemorySize refuses what QEMU refuses, saying how to write a size', () => {
  for (const bad of ['', 'abc', '-1G', '0', '0M', '4X', '4GG', '1e3', '2T']) {
    assert.throws(
      () => parseMemorySize(bad),
      (e: unknown) => {
        assert.equal((e as { code?: string }).code, 'INVALID_MEMORY_SIZE', bad);
        return true;
      },
    );
  }
  assert.throws(() => parseMemorySize('4X'), /such as 512M or 4G/);
});

test('pc layout keeps RAM below 3.5 GiB whole and splits from 3.5 GiB at 3 GiB', () => {
  assert.deepEqual(pcRamLayout(512 * MiB), [{ gpa: 0, size: 512 * MiB, hostOffset: 0 }]);
  assert.deepEqual(pcRamLayout(3 * GiB + 256 * MiB), [
    { gpa: 0, size: 3 * GiB + 256 * MiB, hostOffset: 0 },
  ]);
  assert.deepEqual(pcRamLayout(3.5 * GiB), [
    { gpa: 0, size: 3 * GiB, hostOffset: 0 },
    { gpa: 4 * GiB, size: 0.5 * GiB, hostOffset: 3 * GiB },
  ]);
  assert.deepEqual(pcRamLayout(8 * GiB), [
    { gpa: 0, size: 3 * GiB, hostOffset: 0 },
    { gpa: 4 * GiB, size: 5 * GiB, hostOffset: 3 * GiB },
  ]);
  assert.deepEqual(flatRamLayout(8 * GiB), [{ gpa: 0, size: 8 * GiB, hostOffset: 0 }]);
});
