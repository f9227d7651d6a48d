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

/** The largest step between consecutive samples of one clock, and where it was. */
export interface ClockStep {
  /** The sample before the step. */
  before: ClockSample;
  /** The sample after it. */
  after: ClockSample;
  /** after − before on the chosen clock, in nanoseconds. */
  stepNs: bigint;
}

/**
 * The largest forward step of `clock` between consecutive samples (by
 * sequence number) among `samples`: across a pause, that is the step the
 * guest saw the pause as.
 */
export function largestStep(
  samples: readonly ClockSample[],
  clock: 'realtime' | 'monotonic' | 'raw' | 'boottime',
): ClockStep | undefined {
  let best: ClockStep | undefined;
  for (let i = 1; i < samples.length; i++) {
    const before = samples[i - 1]!;
    const after = samples[i]!;
    if (after.n !== before.n + 1) continue;
    const stepNs = after[clock] - before[clock];
    if (!best || stepNs > best.stepNs) best = { before, after, stepNs };
  }
  return best;
}
