/**
 * Reads what guests/clock-reporter prints on a Linux guest's console: its
 * clock lines, the backwards steps and watchdog splats it saw, and its end
 * line. Lines are matched anywhere in the text, so kernel messages and a
 * line torn by a stop in between do no harm: a torn line is skipped.
 */

/** One `CLOCK n=... rt=... mono=... raw=... boot=...` line, in nanoseconds. */
export interface ClockSample {
  /** The reporter's sequence number, from 1. */
  n: number;
  realtime: bigint;
  monotonic: bigint;
  /** CLOCK_MONOTONIC_RAW: the clocksource (kvm-clock) without NTP slewing. */
  raw: bigint;
  boottime: bigint;
}

/** What the reporter said so far. */
export interface ClockReport {
  samples: ClockSample[];
  /** `CLOCK-BACKWARDS` lines, as printed. */
  backwards: string[];
  /** `CLOCK-SPLAT` lines: the kernel's watchdog records, as printed. */
  splats: string[];
  /** The `CLOCK-END` counts, once the reporter has ended. */
  end?: { backwards: number; splats: number };
}

const SAMPLE = /^CLOCK n=(\d+) rt=(\d+) mono=(\d+) raw=(\d+) boot=(\d+)\r?$/;
const END = /^CLOCK-END backwards=(\d+) splats=(\d+)\r?$/;

/** Parses the reporter's lines out of a console log. */
export function parseClockReport(text: string): ClockReport {
  const report: ClockReport = { samples: [], backwards: [], splats: [] };
  const lines = text.split('\n');
  // The last line may still be being written.
  if (!text.endsWith('\n')) lines.pop();
  for (const line of lines) {
    const sample = SAMPLE.exec(line);
    if (sample) {
      report.samples.push({
        n: Number(sample[1]),
        realtime: BigInt(sample[2]!),
        monotonic: BigInt(sample[3]!),
        raw: BigInt(sample[4]!),
        boottime: BigInt(sample[5]!),
      });
      continue;
    }
    if (line.startsWith('CLOCK-BACKWARDS ')) report.backwards.push(line.trimEnd());
    else if (line.startsWith('CLOCK-SPLAT ')) report.splats.push(line.trimEnd());
    const end = END.exec(line);
    if (end) report.end = { backwards: Number(end[1]), splats: Number(end[2]) };
  }
  return report;
}

/** The four clocks of a sample. */
export type ClockName = 'realtime' | 'monotonic' | 'raw' | 'boottime';
export const CLOCK_NAMES: readonly ClockName[] = ['realtime', 'monotonic', 'raw', 'boottime'];

/**
 * How the guest saw a pause: two successive samples and, per clock, the
 * step between them beyond the reporter's own intervals (after.n − before.n
 * of them). A clock frozen across the pause shows about 0 there; one that
 * followed the host shows the pause, less up to one interval (a clock that
 * jumps past the reporter's next deadline wakes it at once).
 */
export interface PauseSeen {
  before: ClockSample;
  after: ClockSample;
  beyond: Record<ClockName, bigint>;
}

/** The step from `before` to `after` beyond `intervalNs` per sample between them. */
export function pauseBetween(
  before: ClockSample,
  after: ClockSample,
  intervalNs: bigint,
): PauseSeen {
  const intervals = BigInt(after.n - before.n) * intervalNs;
  const beyond = Object.fromEntries(
    CLOCK_NAMES.map((c) => [c, after[c] - before[c] - intervals]),
  ) as Record<ClockName, bigint>;
  return { before, after, beyond };
}

/**
 * The pause among the samples numbered `fromN`..`toN`: the pair of
 * successive samples (by number; a sample lost to a torn line is skipped
 * over) whose monotonic step goes furthest beyond the intervals. Where the
 * console lags the guest, or a restored guest finishes lines it wrote
 * before the save, the pause is not where the last line seen at the stop
 * suggests, but it is the largest step around it.
 */
export function pauseAround(
  samples: readonly ClockSample[],
  fromN: number,
  toN: number,
  intervalNs: bigint,
): PauseSeen | undefined {
  const window = [...samples]
    .filter((s) => s.n >= fromN && s.n <= toN)
    .sort((a, b) => a.n - b.n)
    .filter((s, i, all) => i === 0 || s.n !== all[i - 1]!.n);
  let best: PauseSeen | undefined;
  for (let i = 1; i < window.length; i++) {
    const seen = pauseBetween(window[i - 1]!, window[i]!, intervalNs);
    if (!best || seen.beyond.monotonic > best.beyond.monotonic) best = seen;
  }
  return best;
}
