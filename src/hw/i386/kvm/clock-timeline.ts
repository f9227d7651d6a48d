/**
 * The kvmclock timeline (`-kvmclock timeline=FILE.html|FILE.svg`): host
 * time across the VM's life on x, each vCPU's guest kvmclock on y, every
 * lifecycle event a vertical mark. One self-contained file, inline SVG, no
 * script, no network: open it in any browser.
 *
 * Guest time comes from the sanitizer's readings (clock-check.ts), taken at
 * each transition; between two readings the vCPU either ran (the line
 * climbs) or was stopped (under freeze it stays flat).
 */
import { writeFileSync } from 'node:fs';

/** A lifecycle event the timeline marks. */
export type TimelineMarkKind =
  | 'start'
  | 'stop'
  | 'cont'
  | 'migrate'
  | 'incoming'
  | 'quit'
  | 'CTRL'
  | 'reset';

/** Each mark kind's colour: distinct, so a picture (or a test) tells them apart. */
export const TIMELINE_MARK_COLOURS: Readonly<Record<TimelineMarkKind, string>> = {
  start: '#00a000',
  stop: '#d00000',
  cont: '#0050ff',
  migrate: '#a000c0',
  incoming: '#00b0b0',
  quit: '#000000',
  CTRL: '#ff8000',
  reset: '#806000',
};

const VCPU_COLOURS = ['#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02'];

/** The plot's geometry, in CSS pixels (written on the <svg> so a reader can map times to x). */
export const TIMELINE_LAYOUT = {
  width: 960,
  height: 540,
  left: 80,
  right: 900,
  top: 40,
  bottom: 460,
} as const;

export interface TimelineMark {
  readonly kind: TimelineMarkKind;
  /** Host CLOCK_REALTIME ns. */
  readonly hostNs: bigint;
}

export interface TimelineSample {
  readonly cpu: number;
  readonly hostNs: bigint;
  readonly guestNs: bigint;
}

/** Collects marks and samples over a VM's life and writes the picture. */
export class KvmClockTimeline {
  readonly marks: TimelineMark[] = [];
  readonly samples: TimelineSample[] = [];

  mark(kind: TimelineMarkKind, hostNs: bigint): void {
    this.marks.push({ kind, hostNs });
  }

  sample(cpu: number, hostNs: bigint, guestNs: bigint): void {
    this.samples.push({ cpu, hostNs, guestNs });
  }

  /** Writes the picture to `path`: SVG if it ends in .svg, else an HTML page around it. */
  write(path: string, title = 'tsvmm kvmclock timeline'): void {
    const svg = renderTimelineSvg(this.marks, this.samples, title);
    writeFileSync(path, path.endsWith('.svg') ? svg : wrapHtml(svg, title));
  }
}

function esc(text: string): string {
  return text.replace(/[<>&"]/g, (c) => `&#${c.charCodeAt(0)};`);
}

function wrapHtml(svg: string, title: string): string {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>html,body{margin:0;padding:0;background:#fff}</style></head>
<body>${svg}</body></html>
`;
}

/** The smallest (`sign` -1) or largest (1) of `values` (Math.min/max take no bigints). */
function extreme(values: readonly bigint[], sign: -1 | 1): bigint | undefined {
  let best: bigint | undefined;
  for (const v of values) {
    if (best === undefined || (sign < 0 ? v < best : v > best)) best = v;
  }
  return best;
}

/** A time step of 1, 2 or 5 × 10^n seconds giving about `want` ticks over `span` s. */
function niceStep(span: number, want: number): number {
  const raw = span / want;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/**
 * The SVG of a timeline. The root carries `data-t0-ns` and `data-t1-ns`
 * (host realtime at the left and right edges of the plot) and `data-x0`,
 * `data-x1` (their x), so x = x0 + (t - t0) / (t1 - t0) * (x1 - x0).
 */
export function renderTimelineSvg(
  marks: readonly TimelineMark[],
  samples: readonly TimelineSample[],
  title: string,
): string {
  const L = TIMELINE_LAYOUT;
  const hostTimes = [...marks.map((m) => m.hostNs), ...samples.map((s) => s.hostNs)];
  const t0 = extreme(hostTimes, -1) ?? 0n;
  let t1 = extreme(hostTimes, 1) ?? 1n;
  if (t1 <= t0) t1 = t0 + 1_000_000_000n;
  const guest = samples.map((s) => s.guestNs);
  const g0 = extreme(guest, -1) ?? 0n;
  let g1 = extreme(guest, 1) ?? 1n;
  if (g1 <= g0) g1 = g0 + 1_000_000_000n;
  const x = (t: bigint) => L.left + (Number(t - t0) / Number(t1 - t0)) * (L.right - L.left);
  const y = (g: bigint) => L.bottom - (Number(g - g0) / Number(g1 - g0)) * (L.bottom - L.top);
  const f = (n: number) => n.toFixed(2);
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${L.width}" height="${L.height}" viewBox="0 0 ${L.width} ${L.height}" font-family="sans-serif" font-size="12" data-t0-ns="${t0}" data-t1-ns="${t1}" data-x0="${L.left}" data-x1="${L.right}">`,
    `<title>${esc(title)}</title>`,
    `<rect x="0" y="0" width="${L.width}" height="${L.height}" fill="#ffffff"/>`,
    `<text x="${L.left}" y="20" font-size="14">${esc(title)}</text>`,
    // Axes.
    `<line x1="${L.left}" y1="${L.bottom}" x2="${L.right}" y2="${L.bottom}" stroke="#888"/>`,
    `<line x1="${L.left}" y1="${L.top}" x2="${L.left}" y2="${L.bottom}" stroke="#888"/>`,
    `<text x="${(L.left + L.right) / 2}" y="${L.bottom + 36}" text-anchor="middle">host time (s since the first event)</text>`,
    `<text x="18" y="${(L.top + L.bottom) / 2}" text-anchor="middle" transform="rotate(-90 18 ${(L.top + L.bottom) / 2})">guest kvmclock (s)</text>`,
  );
  const spanS = Number(t1 - t0) / 1e9;
  const stepS = niceStep(spanS, 8);
  for (let s = 0; s <= spanS + 1e-9; s += stepS) {
    const xs = x(t0 + BigInt(Math.round(s * 1e9)));
    parts.push(
      `<line x1="${f(xs)}" y1="${L.bottom}" x2="${f(xs)}" y2="${L.bottom + 5}" stroke="#888"/>`,
      `<text x="${f(xs)}" y="${L.bottom + 18}" text-anchor="middle">${Number(s.toFixed(6))}</text>`,
    );
  }
  const gSpanS = Number(g1 - g0) / 1e9;
  const gStep = niceStep(gSpanS, 6);
  const gFirst = Math.ceil(Number(g0) / 1e9 / gStep) * gStep;
  for (let s = gFirst; s <= Number(g1) / 1e9 + 1e-9; s += gStep) {
    const ys = y(BigInt(Math.round(s * 1e9)));
    parts.push(
      `<line x1="${L.left - 5}" y1="${f(ys)}" x2="${L.left}" y2="${f(ys)}" stroke="#888"/>`,
      `<text x="${L.left - 8}" y="${f(ys + 4)}" text-anchor="end">${Number(s.toFixed(3))}</text>`,
    );
  }
  // Marks: a full-height line of the kind's colour, and a label box at the top.
  marks.forEach((m, i) => {
    const xm = f(x(m.hostNs));
    const colour = TIMELINE_MARK_COLOURS[m.kind];
    parts.push(
      `<g class="mark" data-kind="${m.kind}" data-host-ns="${m.hostNs}">`,
      `<line x1="${xm}" y1="${L.top}" x2="${xm}" y2="${L.bottom}" stroke="${colour}" stroke-width="3"/>`,
      `<text x="${xm}" y="${L.top - 4 - (i % 2) * 12}" text-anchor="middle" fill="${colour}">${esc(m.kind)}</text>`,
      '</g>',
    );
  });
  // One line per vCPU through its readings, in host-time order.
  const cpus = [...new Set(samples.map((s) => s.cpu))].sort((a, b) => a - b);
  for (const cpu of cpus) {
    const pts = samples
      .filter((s) => s.cpu === cpu)
      .sort((a, b) => (a.hostNs < b.hostNs ? -1 : a.hostNs > b.hostNs ? 1 : 0));
    const colour = VCPU_COLOURS[cpu % VCPU_COLOURS.length]!;
    parts.push(
      `<polyline class="vcpu" data-cpu="${cpu}" fill="none" stroke="${colour}" stroke-width="2" points="${pts.map((p) => `${f(x(p.hostNs))},${f(y(p.guestNs))}`).join(' ')}"/>`,
    );
    for (const p of pts) {
      parts.push(
        `<circle cx="${f(x(p.hostNs))}" cy="${f(y(p.guestNs))}" r="2.5" fill="${colour}"/>`,
      );
    }
  }
  // Legend.
  const legend = [
    ...cpus.map((c) => ({ label: `vCPU ${c}`, colour: VCPU_COLOURS[c % VCPU_COLOURS.length]! })),
  ];
  legend.forEach((item, i) => {
    const ly = L.bottom + 56;
    const lx = L.left + i * 90;
    parts.push(
      `<rect x="${lx}" y="${ly - 9}" width="14" height="4" fill="${item.colour}"/>`,
      `<text x="${lx + 18}" y="${ly - 4}">${esc(item.label)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}
