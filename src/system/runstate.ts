import { traceEvent } from '../trace/control.js';
import { TsvmmError } from '../util/errors.js';

/** Every run state, with QEMU's names (QAPI RunState). */
export const RUN_STATES = [
  'prelaunch',
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'finish-migrate',
  'restore-vm',
  'colo',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
] as const;

/** A run state of the VM. */
export type RunState = (typeof RUN_STATES)[number];

/** The allowed transitions, from → to (QEMU's runstate_transitions_def). */
export const RUNSTATE_TRANSITIONS: Readonly<Record<RunState, readonly RunState[]>> = {
  prelaunch: ['inmigrate', 'suspended', 'running', 'finish-migrate'],
  debug: ['running', 'finish-migrate', 'prelaunch', 'suspended'],
  inmigrate: [
    'internal-error',
    'io-error',
    'paused',
    'running',
    'shutdown',
    'suspended',
    'watchdog',
    'guest-panicked',
    'finish-migrate',
    'prelaunch',
    'postmigrate',
    'colo',
  ],
  'internal-error': ['paused', 'finish-migrate', 'prelaunch'],
  'io-error': ['running', 'finish-migrate', 'prelaunch'],
  paused: ['running', 'finish-migrate', 'postmigrate', 'prelaunch', 'colo', 'suspended'],
  postmigrate: ['running', 'finish-migrate', 'prelaunch'],
  'finish-migrate': [
    'running',
    'paused',
    'postmigrate',
    'prelaunch',
    'colo',
    'internal-error',
    'io-error',
    'shutdown',
    'suspended',
    'watchdog',
    'guest-panicked',
  ],
  'restore-vm': ['running', 'prelaunch', 'suspended'],
  colo: ['running', 'prelaunch', 'shutdown'],
  running: [
    'debug',
    'internal-error',
    'io-error',
    'paused',
    'finish-migrate',
    'restore-vm',
    'save-vm',
    'shutdown',
    'watchdog',
    'guest-panicked',
    'colo',
    'suspended',
  ],
  'save-vm': ['running', 'suspended'],
  shutdown: ['paused', 'finish-migrate', 'prelaunch', 'colo'],
  suspended: [
    'running',
    'finish-migrate',
    'prelaunch',
    'colo',
    'paused',
    'save-vm',
    'restore-vm',
    'shutdown',
  ],
  watchdog: ['running', 'finish-migrate', 'prelaunch', 'colo'],
  'guest-panicked': ['running', 'finish-migrate', 'prelaunch'],
};

const allowed: ReadonlyMap<RunState, ReadonlySet<RunState>> = new Map(
  RUN_STATES.map((s) => [s, new Set(RUNSTATE_TRANSITIONS[s])]),
);

/** Whether `to` may follow `from`. Staying in the same state is always allowed (a no-op). */
export function isValidRunStateTransition(from: RunState, to: RunState): boolean {
  return from === to || allowed.get(from)!.has(to);
}

/** Whether a string is a run state name. */
export function isRunState(name: string): name is RunState {
  return (RUN_STATES as readonly string[]).includes(name);
}

/**
 * A run state change that the transition table forbids. This is a bug in
 * tsvmm (QEMU aborts here); the message names both states.
 */
export class InvalidRunStateTransitionError extends TsvmmError {
  constructor(
    readonly from: RunState,
    readonly to: RunState,
  ) {
    super(
      'INVALID_RUNSTATE_TRANSITION',
      `invalid runstate transition: '${from}' -> '${to}'; this is a bug in tsvmm, please report it with the commands that led here`,
    );
  }
}

const traceRunstateSet = traceEvent('runstate_set');

/** The VM's current run state and the only way to change it. */
export class RunStateMachine {
  private state: RunState;

  constructor(initial: RunState = 'prelaunch') {
    this.state = initial;
  }

  /** The current run state. */
  get current(): RunState {
    return this.state;
  }

  /** Whether the current state is `state` (QEMU's runstate_check). */
  check(state: RunState): boolean {
    return this.state === state;
  }

  /**
   * Moves to `state`. Setting the current state again is a no-op (traced
   * all the same, as QEMU does); a transition the table forbids throws
   * `InvalidRunStateTransitionError` and leaves the state unchanged.
   */
  set(state: RunState): void {
    traceRunstateSet.emit({ from: this.state, to: state });
    if (state === this.state) return;
    if (!allowed.get(this.state)!.has(state)) {
      throw new InvalidRunStateTransitionError(this.state, state);
    }
    this.state = state;
  }

  /** Whether the vCPUs are meant to run. */
  isRunning(): boolean {
    return this.state === 'running';
  }

  /** Whether the VM must be reset before it can run again (QEMU's runstate_needs_reset). */
  needsReset(): boolean {
    return (
      this.state === 'internal-error' ||
      this.state === 'shutdown' ||
      this.state === 'guest-panicked'
    );
  }
}
