import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  PROBE_LOAD_ADDR,
  PROBE_MAX_CPUS,
  PVCLOCK_AREA_BASE,
  probeEntry,
  probeImage,
  probeMemoryNeeded,
  pvclockAreaOf,
  STACK_BASE,
  STACK_SIZE,
} from './probe-boot.js';

const guests = fileURLToPath(new URL('../../../guests/', import.meta.url));

test('the committed guest images are what the sources in guests/ assemble to', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-guests-'));
  try {
    for (const f of ['Makefile', 'probe.S', 'ioloop.S'])
      copyFileSync(join(guests, f), join(dir, f));
    execFileSync('make', ['-s', '-C', dir, 'probe.bin', 'ioloop.bin'], { stdio: 'pipe' });
    for (const name of ['probe', 'ioloop'] as const) {
      const built = readFileSync(join(dir, `${name}.bin`));
      assert.ok(built.length > 0);
      assert.deepEqual(
        built,
        Buffer.from(probeImage(name)),
        `guests/${name}.bin is stale: run make -C guests`,
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the probe guest enables kvmclock and prints each event of the line format', () => {
  const image = Buffer.from(probeImage('probe'));
  // wrmsr with ecx = MSR_KVM_SYSTEM_TIME_NEW (mov ecx, 0x4b564d01; ...; wrmsr)
  assert.ok(image.includes(Buffer.from([0xb9, 0x01, 0x4d, 0x56, 0x4b])), 'loads MSR 0x4b564d01');
  assert.ok(image.includes(Buffer.from([0x0f, 0x30])), 'wrmsr');
  assert.ok(image.includes(Buffer.from([0xf3, 0x6e])), 'one rep outsb per line');
  for (const text of [
    'probe cpu=',
    ' ready',
    ' tick ns=',
    ' stopped ns=',
    ' backwards prev=',
    ' now=',
  ]) {
    assert.ok(image.includes(Buffer.from(`${text}\0`)), `string ${JSON.stringify(text)}`);
  }
});

test('each vCPU gets its own stack and pvclock area, clear of the code and of each other', () => {
  const image = probeImage('probe');
  assert.ok(
    PROBE_LOAD_ADDR + image.length <= PVCLOCK_AREA_BASE,
    'code ends before the pvclock page',
  );
  assert.ok(
    pvclockAreaOf(PROBE_MAX_CPUS - 1) + 32 <= PVCLOCK_AREA_BASE + 4096,
    'areas fit one page',
  );
  const seen = new Set<bigint>();
  for (let cpu = 0; cpu < PROBE_MAX_CPUS; cpu++) {
    const e = probeEntry(cpu);
    assert.equal(e.rip, BigInt(PROBE_LOAD_ADDR));
    assert.equal(e.rdi, BigInt(cpu));
    assert.equal(e.rsi, BigInt(pvclockAreaOf(cpu)));
    assert.equal(e.rsp, BigInt(STACK_BASE + (cpu + 1) * STACK_SIZE));
    assert.ok(!seen.has(e.rsp));
    seen.add(e.rsp);
    assert.ok(Number(e.rsp) <= probeMemoryNeeded(PROBE_MAX_CPUS));
  }
});
