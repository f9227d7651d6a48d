import { closeSync, openSync, readFileSync } from 'node:fs';
import { TsvmmError } from '../util/errors.js';
import {
  createTraceConfig,
  installTraceConfig,
  type TraceConfig,
  type TraceRule,
} from './control.js';

/** A `-trace` argument could not be understood. */
export class InvalidTraceOptionError extends TsvmmError {
  constructor(arg: string, why: string) {
    super(
      'INVALID_TRACE_OPTION',
      `invalid -trace '${arg}': ${why}; use -trace [enable=]PATTERN[,events=FILE][,file=FILE][,backtrace=on|off]`,
    );
  }
}

/** A trace events file could not be read, or the trace output file could not be opened. */
export class TraceFileError extends TsvmmError {
  constructor(what: string, path: string, cause: unknown) {
    const reason = cause instanceof Error ? cause.message : String(cause);
    super(
      'TRACE_FILE_ERROR',
      `cannot ${what} '${path}': ${reason}; check the path and its permissions`,
      {
        cause,
      },
    );
  }
}

/** What one `-trace` argument asks for. */
export interface TraceArg {
  readonly rules: TraceRule[];
  /** `file=`: where records go, like `-D`. */
  readonly file?: string;
}

/**
 * Parses a trace events file: one pattern per line, `#` starts a comment,
 * blank lines are skipped, a leading `-` turns the matching events off.
 */
export function parseTraceEventsFile(text: string, backtrace = false): TraceRule[] {
  const rules: TraceRule[] = [];
  for (const raw of text.split('\n')) {
    const hash = raw.indexOf('#');
    const line = (hash >= 0 ? raw.slice(0, hash) : raw).trim();
    if (line) rules.push(patternRule(line, backtrace));
  }
  return rules;
}

function patternRule(pattern: string, backtrace: boolean): TraceRule {
  if (pattern.startsWith('-')) return { pattern: pattern.slice(1), enable: false };
  return { pattern, enable: true, backtrace };
}

/**
 * Parses one `-trace` argument: `[enable=]PATTERN`, `events=FILE`,
 * `file=FILE` and `backtrace=on|off`, comma separated. The rules of the
 * argument come out in the order given (the pattern first, then the file's).
 */
export function parseTraceArg(
  arg: string,
  readFile: (path: string) => string = (p) => readFileSync(p, 'utf8'),
): TraceArg {
  let pattern: string | undefined;
  let eventsFile: string | undefined;
  let file: string | undefined;
  let backtrace = false;
  arg.split(',').forEach((part, i) => {
    const eq = part.indexOf('=');
    const key = eq >= 0 ? part.slice(0, eq) : '';
    const value = eq >= 0 ? part.slice(eq + 1) : part;
    if (key === '' && i === 0) pattern = value;
    else if (key === 'enable') pattern = value;
    else if (key === 'events') eventsFile = value;
    else if (key === 'file') file = value;
    else if (key === 'backtrace') {
      if (value !== 'on' && value !== 'off')
        throw new InvalidTraceOptionError(arg, 'backtrace takes on or off');
      backtrace = value === 'on';
    } else throw new InvalidTraceOptionError(arg, `unknown parameter '${part}'`);
  });
  if (pattern === '') throw new InvalidTraceOptionError(arg, 'empty pattern');
  const rules: TraceRule[] = [];
  if (pattern !== undefined) rules.push(patternRule(pattern, backtrace));
  if (eventsFile !== undefined) {
    let text: string;
    try {
      text = readFile(eventsFile);
    } catch (err) {
      throw new TraceFileError('read trace events file', eventsFile, err);
    }
    rules.push(...parseTraceEventsFile(text, backtrace));
  }
  if (!rules.length && file === undefined)
    throw new InvalidTraceOptionError(arg, 'nothing to trace');
  return file === undefined ? { rules } : { rules, file };
}

/** The tracing options of the command line. */
export interface TraceCommandLine {
  /** Every `-trace` argument, in order. */
  readonly trace?: readonly string[];
  /** `-D FILE`: records go there instead of stderr. */
  readonly logFile?: string;
  /** `-trace-backtrace`: a JS backtrace after every record. */
  readonly backtrace?: boolean;
}

/** Tracing as set up for this process. */
export interface TracingSetup {
  readonly config: TraceConfig;
  /** Patterns that named no event; print them as warnings. */
  readonly warnings: string[];
  /** Closes the `-D` file, if one was opened. Call it last, after every thread stopped. */
  close(): void;
}

/**
 * Parses the command line's tracing options, opens the output file
 * (truncating it, as QEMU's -D does) and installs the result on the calling
 * (main) thread. Hand `config` to every worker.
 */
export function setUpTracing(cmd: TraceCommandLine): TracingSetup {
  const rules: TraceRule[] = [];
  let logFile = cmd.logFile;
  for (const arg of cmd.trace ?? []) {
    const parsed = parseTraceArg(arg);
    rules.push(...parsed.rules);
    if (parsed.file !== undefined) logFile = parsed.file;
  }
  let fd = 2;
  if (logFile !== undefined) {
    try {
      fd = openSync(logFile, 'w');
    } catch (err) {
      throw new TraceFileError('open trace output file', logFile, err);
    }
  }
  const { config, warnings } = createTraceConfig({ rules, fd, backtrace: cmd.backtrace ?? false });
  installTraceConfig(config, 'main');
  let open = fd !== 2;
  return {
    config,
    warnings,
    close() {
      if (!open) return;
      open = false;
      // Point this thread back at stderr first: a closed fd number is soon
      // reused, and a late record must not land in someone else's file.
      installTraceConfig({ ...config, fd: 2 });
      closeSync(fd);
    },
  };
}
