/**
 * The monitor's view of a running tsvmm (monitor/vm-control.ts's VmControl)
 * over the machine, the lifecycle and the main loop.
 */
import { DESCRIBE_LAPIC_OP, DESCRIBE_REGISTERS_OP } from '../accel/kvm/vcpu-ops.js';
import type { X86Machine } from '../hw/i386/machine.js';
import type { VmControl, VmCpuInfo } from '../monitor/vm-control.js';
import type { MainLoop } from '../system/main-loop.js';
import { traceEventGetState, traceEventSetState } from '../trace/control.js';

export interface MachineVmControlOptions {
  machine: X86Machine;
  loop: MainLoop;
  name?: string;
}

/** VmControl for one machine: stop/cont through the lifecycle, quit and reset through the main loop. */
export function machineVmControl({
  machine,
  loop,
  name,
}: MachineVmControlOptions): VmControl & { readonly autostart: boolean } {
  const lifecycle = machine.lifecycle;
  let autostart = true;
  const traceEvents: VmControl['traceEvents'] = {
    list: (pattern) => traceEventGetState(pattern),
    set: (pattern, enable) => {
      traceEventSetState(pattern, enable);
    },
  };
  return {
    /** Whether an incoming migration starts the VM when it completes (QEMU's autostart). */
    get autostart() {
      return autostart;
    },
    status: () => ({ running: lifecycle.runstate.isRunning(), status: lifecycle.runstate.current }),
    stop: () => lifecycle.vmStop('paused'),
    cont: async () => {
      await lifecycle.vmStart();
    },
    setAutostart: (enabled) => {
      autostart = enabled;
    },
    quit: () => loop.requestShutdown('host-qmp-quit'),
    systemReset: async () => loop.requestReset('host-qmp-system-reset'),
    ...(name !== undefined ? { name } : {}),
    cpus: (): VmCpuInfo[] =>
      machine.vcpus.threadIds.map((threadId, cpuIndex) => ({
        cpuIndex,
        threadId,
        qomPath: `/machine/unattached/device[${cpuIndex}]`,
        target: 'x86_64',
        props: { socketId: cpuIndex, coreId: 0, threadId: 0 },
      })),
    cpuRegisters: async (cpuIndex) =>
      (await machine.vcpus.runOnCpu(cpuIndex, DESCRIBE_REGISTERS_OP)) as string,
    cpuLapic: async (cpuIndex) =>
      (await machine.vcpus.runOnCpu(cpuIndex, DESCRIBE_LAPIC_OP)) as string,
    kvm: { enabled: true, present: true },
    traceEvents,
  };
}
