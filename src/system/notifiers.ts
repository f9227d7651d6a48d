import { traceEvent } from '../trace/control.js';
import type { RunState } from './runstate.js';

/**
 * A change-state callback. It may return a Promise: the notifier waits for
 * it before calling the next handler, because handlers depend on one another
 * by priority (kvmclock's start handler waits for work it queued on every
 * vCPU thread, as QEMU's run_on_cpu does).
 */
export type VmChangeStateCallback = (running: boolean, state: RunState) => void | Promise<void>;

/** What `VmChangeStateNotifiers.add` takes. */
export interface VmChangeStateHandlerOptions {
  /** Called in the main phase. */
  readonly callback: VmChangeStateCallback;
  /** Called in the prepare phase, before any handler's main callback. */
  readonly prepare?: VmChangeStateCallback;
  /** Lower runs earlier on start and later on stop. Default 0. */
  readonly priority?: number;
  /** A name for error messages and debugging. */
  readonly name?: string;
}

/** A registered handler; pass it to `remove`. */
export interface VmChangeStateEntry {
  readonly callback: VmChangeStateCallback;
  readonly prepare: VmChangeStateCallback | undefined;
  readonly priority: number;
  readonly name: string;
}

const traceVmStateNotify = traceEvent('vm_state_notify');

/**
 * The VM change-state handlers (QEMU's vm_change_state_head), kept sorted by
 * ascending priority; handlers of equal priority keep their registration
 * order.
 */
export class VmChangeStateNotifiers {
  private entries: VmChangeStateEntry[] = [];

  /** Registers a handler and returns its entry. */
  add(options: VmChangeStateHandlerOptions): VmChangeStateEntry {
    const entry: VmChangeStateEntry = {
      callback: options.callback,
      prepare: options.prepare,
      priority: options.priority ?? 0,
      name: options.name ?? (options.callback.name || 'anonymous'),
    };
    // Insert before the first entry of strictly higher priority: stable for equals.
    const at = this.entries.findIndex((e) => entry.priority < e.priority);
    if (at < 0) this.entries.push(entry);
    else this.entries.splice(at, 0, entry);
    return entry;
  }

  /** Unregisters a handler; returns whether it was registered. */
  remove(entry: VmChangeStateEntry): boolean {
    const at = this.entries.indexOf(entry);
    if (at < 0) return false;
    this.entries.splice(at, 1);
    return true;
  }

  /** The registered handlers, in ascending priority. */
  list(): readonly VmChangeStateEntry[] {
    return [...this.entries];
  }

  /**
   * Tells every handler the VM starts (`running` true: prepare phase then
   * main phase, ascending priority) or stops (both phases descending). Each
   * call is awaited before the next; the first failure stops the walk and
   * is thrown. The walk uses the handlers registered when it began: a
   * handler may remove itself (or another) without upsetting it.
   */
  async notify(running: boolean, state: RunState): Promise<void> {
    traceVmStateNotify.emit({ running, state });
    const order = running ? [...this.entries] : [...this.entries].reverse();
    for (const e of order) if (e.prepare) await e.prepare(running, state);
    for (const e of order) await e.callback(running, state);
  }
}
