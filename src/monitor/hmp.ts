import { createInterface, type Interface } from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import type { HmpInterpreter } from './hmp-interpreter.js';

/**
 * The prompt. Users' expect scripts and test harnesses wait for QEMU's
 * `(qemu) ` before typing, so we print exactly that rather than our own name.
 */
export const HMP_PROMPT = '(qemu) ';

/** Options of {@link HmpMonitor}. */
export interface HmpMonitorOptions {
  input: Readable;
  output: Writable;
  interpreter: HmpInterpreter;
  /** Printed once before the first prompt (QEMU prints "QEMU x.y.z monitor - type 'help' ..."). */
  banner?: string;
  /** Line editing and history; default: whether `output` is a TTY. */
  terminal?: boolean;
  /** Called after `quit`'s output has been written: shut down and exit. */
  onQuit: () => void;
  /** Called when the input ends (EOF) without quit. */
  onClose?: () => void;
}

/**
 * The human monitor on a stream pair (`-monitor stdio`): prints the
 * banner and `(qemu) `, runs each line through the interpreter one at a
 * time (lines typed meanwhile wait their turn), prints the output and the
 * next prompt.
 */
export class HmpMonitor {
  private readonly options: HmpMonitorOptions;
  private rl: Interface | undefined;
  private readonly lines: string[] = [];
  private busy = false;
  private stopped = false;

  constructor(options: HmpMonitorOptions) {
    this.options = options;
  }

  /** Prints the banner and the first prompt and starts reading. */
  start(): void {
    const { input, output, banner } = this.options;
    const terminal = this.options.terminal ?? (output as { isTTY?: boolean }).isTTY === true;
    this.rl = createInterface({ input, output, terminal, prompt: HMP_PROMPT });
    this.rl.on('line', (line) => {
      this.lines.push(line);
      void this.drain();
    });
    this.rl.on('close', () => {
      if (this.stopped) return;
      this.stopped = true;
      this.options.onClose?.();
    });
    if (banner !== undefined) output.write(`${banner}\r\n`);
    this.rl.prompt();
  }

  /** Stops reading; the streams are left open (they may be the process's stdio). */
  stop(): void {
    this.stopped = true;
    this.rl?.close();
  }

  private async drain(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    while (this.lines.length > 0 && !this.stopped) {
      const line = this.lines.shift()!;
      const result = await this.options.interpreter.execute(line);
      if (this.stopped) break;
      this.options.output.write(result.output);
      if (result.quit) {
        this.stop();
        this.options.onQuit();
        break;
      }
      this.rl?.prompt();
    }
    this.busy = false;
  }
}
