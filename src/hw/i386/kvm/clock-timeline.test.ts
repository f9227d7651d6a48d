// The kvmclock timeline rendered by a real browser: headless Chromium
// (Debian's `chromium` package) takes a screenshot of the HTML file, and
// each lifecycle mark must be drawn, in its own colour, at the x where its
// event happened on the host-time axis.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { decodePng } from '../../../test-support/png.js';
import {
  KvmClockTimeline,
  TIMELINE_LAYOUT,
  TIMELINE_MARK_COLOURS,
  type TimelineMarkKind,
} from './clock-timeline.js';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
const S = 1_000_000_000n;
const T0 = 1_764_000_000n * S;

/** A VM's life: started, stopped 2 s, continued, migrated, quit; samples every 0.5 s while running. */
function recordLife(): { timeline: KvmClockTimeline; events: [TimelineMarkKind, bigint][] } {
  const events: [TimelineMarkKind, bigint][] = [
    ['start', T0],
    ['CTRL', T0 + S / 2n],
    ['stop', T0 + 2n * S],
    ['cont', T0 + 4n * S],
    ['CTRL', T0 + 4n * S + S / 2n],
    ['migrate', T0 + 6n * S],
    ['incoming', T0 + 7n * S],
    ['reset', T0 + 8n * S],
    ['quit', T0 + 9n * S],
  ];
  const timeline = new KvmClockTimeline();
  for (const [kind, at] of events) timeline.mark(kind, at);
  // Guest time: runs 0..2 s, frozen 2..4 s, runs again 4..10 s.
  for (let ms = 0n; ms <= 10_000n; ms += 500n) {
    const host = T0 + ms * 1_000_000n;
    const guest = ms <= 2000n ? ms : ms <= 4000n ? 2000n : ms - 2000n;
    for (const cpu of [0, 1]) timeline.sample(cpu, host, 5n * S + guest * 1_000_000n);
  }
  return { timeline, events };
}

function hex(colour: string): [number, number, number] {
  const n = Number.parseInt(colour.slice(1), 16);
  return [(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
}

function near(a: readonly number[], b: readonly number[], tol = 12): boolean {
  return a.every((v, i) => Math.abs(v - b[i]!) <= tol);
}

test('the timeline is one self-contained file: inline SVG, nothing to fetch', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-timeline-'));
  try {
    const { timeline } = recordLife();
    timeline.write(join(dir, 't.svg'));
    timeline.write(join(dir, 't.html'));
    const svg = readFileSync(join(dir, 't.svg'), 'utf8');
    const html = readFileSync(join(dir, 't.html'), 'utf8');
    assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    assert.ok(html.includes(svg), 'the HTML page carries the same SVG inline');
    for (const text of [svg, html]) {
      assert.doesNotMatch(text, /<script|href=|src=|url\(|@import/i, 'no script, link or fetch');
    }
    assert.equal([...svg.matchAll(/class="mark"/g)].length, 9);
    assert.equal([...svg.matchAll(/class="vcpu"/g)].length, 2);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('headless Chromium draws every mark where its event happened', { timeout: 120_000 }, () => {
  assert.ok(
    CHROMIUM,
    "this test needs Debian's chromium package: apt-get update && apt-get install -y chromium",
  );
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-timeline-'));
  try {
    const { timeline, events } = recordLife();
    const page = join(dir, 'timeline.html');
    timeline.write(page);
    const shot = join(dir, 'shot.png');
    const L = TIMELINE_LAYOUT;
    const run = spawnSync(
      CHROMIUM,
      [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--hide-scrollbars',
        '--force-device-scale-factor=1',
        `--user-data-dir=${join(dir, 'profile')}`,
        `--window-size=${L.width},${L.height}`,
        `--screenshot=${shot}`,
        pathToFileURL(page).href,
      ],
      { encoding: 'utf8', timeout: 90_000, killSignal: 'SIGKILL' },
    );
    assert.ok(
      existsSync(shot),
      `chromium wrote no screenshot (status ${run.status}):\n${run.stderr}`,
    );
    const png = decodePng(readFileSync(shot));
    assert.equal(png.width, L.width);
    // Host time 0..10 s spans the plot's width (the last sample is at 10 s).
    const t1 = T0 + 10n * S;
    const y = L.top + 8;
    for (const [kind, at] of events) {
      const x = L.left + (Number(at - T0) / Number(t1 - T0)) * (L.right - L.left);
      const colour = hex(TIMELINE_MARK_COLOURS[kind]);
      const xs = Math.round(x);
      assert.ok(
        near(png.pixel(xs, y), colour),
        `${kind} at ${Number(at - T0) / 1e9} s: expected its colour ${TIMELINE_MARK_COLOURS[kind]} at x=${xs}, found rgb(${png.pixel(xs, y).join(',')})`,
      );
      for (const dx of [-6, 6]) {
        assert.ok(
          !near(png.pixel(xs + dx, y), colour),
          `${kind}: the mark is a thin line at x=${xs}, not at x=${xs + dx}`,
        );
      }
    }
    // The vCPU lines are drawn (vCPU 1's on top: both have the same samples).
    let seen = false;
    for (let yy = L.top; yy < L.bottom && !seen; yy++) {
      for (let xx = L.left; xx < L.right && !seen; xx++) {
        if (near(png.pixel(xx, yy), hex('#d95f02'), 6)) seen = true;
      }
    }
    assert.ok(seen, "vCPU 1's line is on the picture");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
