/**
 * The promise that tsvmm ends soon after it is asked to, whatever state
 * the VM, its vCPUs or its clients are in.
 *
 * The first request (a signal, `quit`, a guest power-off) starts the clean
 * shutdown and arms a deadline. If the clean path has not ended the
 * process when the deadline passes, or if a second signal comes, the exit
 * is forced: `force` kicks the vCPUs, removes what must not be left behind
 * and ends the process at once (see main.ts).
 */

/** What an ExitGuard is built from. */
export interface ExitGuardOptions {
  /** How long the clean shutdown may take once asked for. */
  readonly deadlineMs: number;
  /** Ends the process now; `why` says what forced it. Never returns in tsvmm. */
  readonly force: (why: string) => void;
}

/** Arms the shutdown deadline and counts the signals that ask for the exit. */
export class ExitGuard {
  private timer: NodeJS.Timeout | undefined;
  private signals = 0;
  private forced = false;

  constructor(private readonly options: ExitGuardOptions) {}

  /** Whether the deadline runs. */
  get armed(): boolean {
    return this.timer !== undefined;
  }

  /**
   * A shutdown was asked for: starts the deadline (once; later requests
   * do not extend it).
   */
  shutdownRequested(): void {
    if (this.timer || this.forced) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.force(`the shutdown did not finish within ${this.options.deadlineMs} ms`);
    }, this.options.deadlineMs);
  }

  /**
   * A shutdown signal came. Returns true for the first one, which the
   * caller turns into a clean shutdown request; a second one forces the
   * exit at once (the user insists) and returns false.
   */
  signal(signal: NodeJS.Signals): boolean {
    this.signals++;
    if (this.signals === 1) {
      this.shutdownRequested();
      return true;
    }
    this.force(`${signal} again while shutting down`);
    return false;
  }

  /** The clean path is done: the deadline no longer applies. */
  disarm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private force(why: string): void {
    if (this.forced) return;
    this.forced = true;
    this.disarm();
    this.options.force(why);
  }
}
