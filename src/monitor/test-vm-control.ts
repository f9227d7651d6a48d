import type { JsonObject } from './json-value.js';
import type { VmControl, VmCpuInfo, VmTraceEventInfo } from './vm-control.js';

/**
 * A VmControl test double for protocol tests (no KVM): it keeps a real run
 * state with QEMU's stop/start rules and emits the events the lifecycle
 * would (STOP, RESUME, RESET, SHUTDOWN) through `emit`, but runs no guest.
 */
export class TestVmControl implements VmControl {
  state: string;
  autostart = true;
  quitCalls = 0;
  resets = 0;
  readonly name?: string;
  readonly kvm = { enabled: true, present: true };
  /** Where events go; the test points it at `QmpServer.broadcast`. */
  emit: (event: string, data?: JsonObject) => void = () => {};
  /** Called by quit, after the reply; tests observe ordering with it. */
  onQuit: () => void = () => {};
  private readonly events = new Map<string, VmTraceEventInfo>();

  constructor(options: { state?: string; name?: string } = {}) {
    this.state = options.state ?? 'prelaunch';
    if (options.name !== undefined) this.name = options.name;
    for (const name of ['kvm_run_exit', 'kvm_vcpu_ioctl', 'vm_state_notify']) {
      this.events.set(name, { name, state: 'disabled', vcpu: false });
    }
    this.events.set('kvmclock_ctrl', { name: 'kvmclock_ctrl', state: 'disabled', vcpu: true });
    this.events.set('tcg_only', { name: 'tcg_only', state: 'unavailable', vcpu: false });
  }

  status(): { running: boolean; status: string } {
    return { running: this.state === 'running', status: this.state };
  }

  async stop(): Promise<void> {
    if (this.state !== 'running') return;
    this.state = 'paused';
    this.emit('STOP');
  }

  async cont(): Promise<void> {
    if (this.state === 'running') return;
    this.state = 'running';
    this.emit('RESUME');
  }

  setAutostart(enabled: boolean): void {
    this.autostart = enabled;
  }

  quit(): void {
    this.quitCalls++;
    this.state = 'shutdown';
    this.emit('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
    this.onQuit();
  }

  async systemReset(): Promise<void> {
    this.resets++;
    this.emit('RESET', { guest: false, reason: 'host-qmp-system-reset' });
  }

  cpus(): VmCpuInfo[] {
    return [0, 1].map((i) => ({
      cpuIndex: i,
      threadId: 1000 + i,
      qomPath: `/machine/unattached/device[${i}]`,
      target: 'x86_64',
      props: { socketId: 0, coreId: i, threadId: 0 },
    }));
  }

  readonly traceEvents = {
    list: (pattern: string): VmTraceEventInfo[] => {
      const re = globToRegExp(pattern);
      return [...this.events.values()].filter((e) => re.test(e.name)).map((e) => ({ ...e }));
    },
    set: (pattern: string, enable: boolean): void => {
      const re = globToRegExp(pattern);
      for (const e of this.events.values()) {
        if (re.test(e.name) && e.state !== 'unavailable') e.state = enable ? 'enabled' : 'disabled';
      }
    },
  };
}

function globToRegExp(pattern: string): RegExp {
  const body = pattern
    .replace(/[.+^${}()|[\]\\]/g, '\\$&')
    .replace(/\*/g, '.*')
    .replace(/\?/g, '.');
  return new RegExp(`^${body}$`);
}
