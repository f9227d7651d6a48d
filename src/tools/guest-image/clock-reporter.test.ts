// guests/clock-reporter: the committed binary is what its source builds to,
// and it runs (it is a static x86-64 Linux program, so the host runs it as
// the guest does) and prints what clock-report.ts reads.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { CLOCK_REPORTER_PATH } from './build.js';
import { parseClockReport, pauseAround, pauseBetween } from './clock-report.js';

const dir = fileURLToPath(new URL('../../../guests/clock-reporter/', import.meta.url));

test('the committed clock-reporter is what guests/clock-reporter builds to, byte for byte', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'tsvmm-clock-reporter-'));
  try {
    for (const f of ['Makefile', 'clock-reporter.c']) copyFileSync(join(dir, f), join(tmp, f));
    execFileSync('make', ['-s', '-C', tmp], { stdio: 'pipe' });
    assert.ok(
      readFileSync(join(tmp, 'clock-reporter')).equals(readFileSync(CLOCK_REPORTER_PATH)),
      'guests/clock-reporter/clock-reporter is stale: run make -C guests/clock-reporter',
    );
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('clock-reporter prints COUNT samples INTERVAL ms apart on every clock, then its end line', () => {
  const run = spawnSync(CLOCK_REPORTER_PATH, ['20', '6'], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(run.status, 0, run.stderr);
  const report = parseClockReport(run.stdout);
  assert.deepEqual(
    report.samples.map((s) => s.n),
    [1, 2, 3, 4, 5, 6],
  );
  assert.deepEqual(report.end, { backwards: 0, splats: 0 });
  assert.deepEqual(report.backwards, []);
  for (const [a, b] of report.samples.slice(1).map((s, i) => [report.samples[i]!, s] as const)) {
    assert.ok(b.monotonic > a.monotonic && b.raw > a.raw && b.boottime > a.boottime);
  }
  // Samples follow absolute deadlines on CLOCK_MONOTONIC, the first one
  // interval after the start: five steps span at least four intervals.
  const span = report.samples[5]!.monotonic - report.samples[0]!.monotonic;
  assert.ok(span >= 80_000_000n, `six samples 20 ms apart span ${span} ns`);
  const now = BigInt(Date.now()) * 1_000_000n;
  const rt = report.samples[0]!.realtime;
  assert.ok(rt > now - 60_000_000_000n && rt <= now, `realtime ${rt} is not now (${now})`);
});

test('clock-reporter takes a malformed interval as the default 100 ms', () => {
  const run = spawnSync(CLOCK_REPORTER_PATH, ['x', '2'], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(run.status, 0);
  const [a, b] = parseClockReport(run.stdout).samples;
  // Its first deadline is one interval after the start, before sample 1.
  assert.ok(a && b && b.monotonic - a.monotonic >= 50_000_000n);
});

test("pauseBetween subtracts the reporter's intervals, across a lost sample too", () => {
  const at = (n: number, mono: bigint) => ({
    n,
    realtime: mono,
    monotonic: mono,
    raw: mono,
    boottime: mono,
  });
  const seen = pauseBetween(at(10, 1_000_000_000n), at(13, 8_300_000_000n), 100_000_000n);
  assert.equal(seen.beyond.monotonic, 7_000_000_000n, '7.3 s less three 100 ms intervals');
});

test('parseClockReport reads samples, backwards steps, splats and the end, and skips torn lines', () => {
  const text = [
    '[   12.5] some kernel line',
    'CLOCK n=1 rt=1000 mono=10 raw=9 boot=11',
    'CLOCK n=2 rt=1100 mono=110 raw=109 bo[   13.0] torn by a kernel line',
    'CLOCK n=3 rt=6200 mono=210 raw=209 boot=211',
    'CLOCK n=4 rt=6300 mono=5310 raw=5309 boot=5311',
    'CLOCK-BACKWARDS clock=mono prev=5310 now=5300',
    'CLOCK-SPLAT watchdog: BUG: soft lockup - CPU#0 stuck for 5s! [sh:1]',
    'CLOCK-END backwards=1 splats=1',
    'CLOCK n=5 rt=1 mono=1 raw=1 boot=1',
  ].join('\n');
  const report = parseClockReport(text);
  assert.deepEqual(
    report.samples.map((s) => s.n),
    [1, 3, 4],
    'the torn line and the unfinished last line are skipped',
  );
  assert.equal(report.backwards.length, 1);
  assert.match(report.splats[0]!, /soft lockup/);
  assert.deepEqual(report.end, { backwards: 1, splats: 1 });
  // The pause is the pair that goes furthest beyond the intervals (100 ns here).
  const pause = pauseAround(report.samples, 1, 4, 100n);
  assert.deepEqual([pause?.before.n, pause?.after.n], [3, 4]);
  assert.equal(pause?.beyond.monotonic, 5000n);
  assert.equal(pause?.beyond.realtime, 0n);
  assert.equal(pauseAround(report.samples, 5, 9, 100n), undefined, 'no pair in the window');
});
