/**
 * The x86 machine: one KVM VM with its RAM, in-kernel irqchip and PIT, a
 * COM1 UART, the kvmclock device, one thread per vCPU, and the VM lifecycle
 * that ties them together. This is what `tsvmm` builds from its options.
 */

import { kvmHostCapabilities } from '../../accel/kvm/capabilities.js';
import { mapCoalescedRing } from '../../accel/kvm/coalesced-ring.js';
import { type CpuSavedState, MSR_IA32_TSC } from '../../accel/kvm/cpu-state.js';
import { CLOCK_REALTIME, clockGettimeNs } from '../../accel/kvm/ffi.js';
import { KVM_CAP, KVM_CLOCK_REALTIME } from '../../accel/kvm/ioctls.js';
import { GuestMemory } from '../../accel/kvm/memory/guest-memory.js';
import { KVM_COALESCED_RING_BYTES } from '../../accel/kvm/structs/coalesced-mmio.js';
import { Kvm } from '../../accel/kvm/system.js';
import { type GuestRequest, VcpuThreads } from '../../accel/kvm/vcpu-threads.js';
import type { KvmVm } from '../../accel/kvm/vm.js';
import { type CpuController, VmLifecycle } from '../../system/cpus.js';
import { TsvmmError } from '../../util/errors.js';
import { writeOrDrop } from '../../util/fd-writer.js';
import { kvmIsPvm } from '../../util/kvm-gate.js';
import {
  COM1_BASE,
  COM1_IRQ,
  createSerialState,
  Serial16550,
  UART_RBR_THR_DLL,
} from '../char/serial.js';
import { CoalescedIo, CoalescedIoPoller, createCoalescedIoState } from '../coalesced-io.js';
import { type CpuFeatureSetting, hiddenFlagsKvmDoesNotList } from './cpu-features.js';
import { buildGuestCpuid } from './cpuid.js';
import { bootGuest, type GuestBoot } from './guest-boot.js';
import { KvmClockDevice, type KvmClockFaults, type KvmClockPolicy } from './kvm/clock.js';
import { KvmClockSanitizer, type KvmClockSanitizerOptions } from './kvm/clock-check.js';
import { MSR_KVM_SYSTEM_TIME_NEW, pvclockNsAt, readPvclock } from './kvm/pvclock.js';
import { MPTABLE_MAX_CPUS } from './mptable.js';
import { PROBE_MAX_CPUS, probeMemoryNeeded } from './probe-boot.js';

/** Where KVM may put the three pages Intel VMX needs for real mode: just below the BIOS. */
const TSS_ADDR = 0xfffbd000;
/** The port the I/O-loop guest writes to (bench/exit-rate). */
export const COUNTING_PORT = 0x500;

export interface MachineOptions {
  cpus: number;
  memoryBytes: number;
  /** Fault all RAM in before the guest runs (`-mem-prealloc`). */
  memPrealloc?: boolean;
  /** What to boot: a probe guest, or a Linux kernel. */
  boot: GuestBoot;
  /**
   * The VM waits for an incoming migration (`-incoming`): its RAM and vCPU
   * state come from the stream, so the guest is not loaded now, as QEMU
   * runs no firmware then. RAM stays untouched, which spares the load
   * (10-20 ms for the probe OS on a PVM host) and lets the stream's loader
   * skip every zero page without reading it. A reset loads the guest, as
   * it always does; a VM in inmigrate runs only after the stream is in.
   */
  incoming?: boolean;
  /** Where the UART's output goes: an fd, or null to drop it (`-serial none`). */
  serialFd: number | null;
  /** Queue the UART's transmit-register writes in KVM's coalesced ring where KVM can (default true). */
  coalesceSerialTx?: boolean;
  /** `-cpu host,...` CPUID flags, for every vCPU. */
  cpuFeatures?: readonly CpuFeatureSetting[];
  /** kvmclock's `x-mach-use-reliable-get-clock`. */
  useReliableGetClock?: boolean;
  faults?: MachineFaults;
  /** kvmclock's `policy` (default freeze). */
  kvmclockPolicy?: KvmClockPolicy;
  /**
   * Reads every vCPU's pvclock at each transition (the sanitizer). With
   * `report` it checks them (`kvmclock.check=on`); without, it only records
   * them (for the timeline). Absent: nothing is read (the seed's path).
   */
  kvmclockCheck?: KvmClockSanitizerOptions;
  kvmPath?: string;
  /** Called on the main thread when a vCPU reports a guest power-off, reset or a failure. */
  onGuestRequest?: (request: GuestRequest) => void;
  /** Where warnings about the configuration go (none are given without it). */
  warn?: (message: string) => void;
}

/** Fault injection for the machine: kvmclock's, and `-x-vcpu-ignores-kicks`. */
export interface MachineFaults extends KvmClockFaults {
  /** The vCPU threads cannot be kicked out of KVM_RUN (to exercise the forced exit). */
  readonly vcpuIgnoresKicks?: boolean;
}

export class MachineError extends TsvmmError {}

/** The main thread's consumer of the coalesced ring, and what ends it. */
interface MainCoalescedIo {
  readonly io: CoalescedIo;
  readonly poller: CoalescedIoPoller;
  readonly unmap: () => void;
}

/**
 * Has KVM queue the guest's writes to the UART's transmit register in the
 * coalesced ring rather than exit for each, where KVM offers coalesced port
 * I/O and the ring lies in the vCPU mapping. A console line then costs the
 * guest one exit (the read that follows it), not one per byte: most of
 * what printing costs a guest under nested or emulated KVM. Undefined
 * where KVM cannot: every write exits as before.
 */
function coalesceUartWrites(
  kvm: Kvm,
  vm: KvmVm,
  runMmapSize: number,
): { ringPage: number; state: SharedArrayBuffer } | undefined {
  const ringPage = kvm.checkExtension(KVM_CAP.COALESCED_MMIO);
  if (ringPage <= 0 || kvm.checkExtension(KVM_CAP.COALESCED_PIO) <= 0) return undefined;
  if ((ringPage + 1) * KVM_COALESCED_RING_BYTES > runMmapSize) return undefined;
  vm.registerCoalescedPio(COM1_BASE + UART_RBR_THR_DLL, 1);
  return { ringPage, state: createCoalescedIoState() };
}

/** A created, not yet started VM (it sits in prelaunch until vmStart). */
export class X86Machine {
  private constructor(
    readonly kvm: Kvm,
    readonly vm: KvmVm,
    readonly memory: GuestMemory,
    readonly vcpus: VcpuThreads,
    readonly lifecycle: VmLifecycle,
    readonly kvmclock: KvmClockDevice,
    /** The main thread's handle on the UART, for console input. */
    readonly serial: Serial16550,
    /** Each vCPU's TSC as read at the current stop, if the VM is stopped and kvmclock saved the clock. */
    readonly tscAtStop: readonly (bigint | undefined)[],
    /** Each vCPU's TSC as last loaded from a migration stream. */
    readonly restoredTsc: (bigint | undefined)[],
    /** The kvmclock sanitizer, when asked for. */
    readonly kvmclockSanitizer: KvmClockSanitizer | undefined,
    private readonly coalescedIo: MainCoalescedIo | undefined,
  ) {}

  /** Serves the UART writes KVM queued so far (before the UART's state is read). */
  flushCoalescedIo(): void {
    this.coalescedIo?.io.flush();
  }

  static async create(options: MachineOptions): Promise<X86Machine> {
    const maxCpus = options.boot.kind === 'probe' ? PROBE_MAX_CPUS : MPTABLE_MAX_CPUS;
    if (options.cpus < 1 || options.cpus > maxCpus) {
      throw new MachineError(
        'MACHINE_CPUS',
        `-smp ${options.cpus}: this guest supports 1 to ${maxCpus} vCPUs`,
      );
    }
    const needed = options.boot.kind === 'probe' ? probeMemoryNeeded(options.cpus) : 0;
    if (options.memoryBytes < needed) {
      throw new MachineError(
        'MACHINE_MEMORY',
        `-m ${options.memoryBytes} bytes is too small for ${options.cpus} vCPUs: give at least ${Math.ceil(needed / 2 ** 20)} MiB`,
      );
    }
    const cleanups: (() => void | Promise<void>)[] = [];
    const undo = async () => {
      for (const fn of cleanups.reverse()) await fn();
    };
    try {
      const kvm = Kvm.open(options.kvmPath ? { path: options.kvmPath } : {});
      cleanups.push(() => kvm.close());
      const vm = kvm.createVm();
      cleanups.push(() => vm.close());
      vm.setTssAddr(TSS_ADDR);
      vm.createIrqchip();
      vm.createPit2();

      const memory = GuestMemory.create(options.memoryBytes, {
        prealloc: options.memPrealloc ?? false,
      });
      cleanups.push(() => memory.close());
      memory.register(vm);

      const serialState = createSerialState();
      const runMmapSize = kvm.getVcpuMmapSize();
      const coalesced =
        options.coalesceSerialTx === false ? undefined : coalesceUartWrites(kvm, vm, runMmapSize);
      // The vCPU threads finish starting while this thread loads the guest.
      const vcpus = VcpuThreads.launch({
        vm,
        count: options.cpus,
        runMmapSize,
        devices: {
          serial: { state: serialState, base: COM1_BASE, irq: COM1_IRQ, outFd: options.serialFd },
          countingPort: COUNTING_PORT,
          ...(coalesced ? { coalesced } : {}),
        },
        onGuestRequest: (request) => options.onGuestRequest?.(request),
        ...(options.faults?.vcpuIgnoresKicks ? { ignoreKicks: true } : {}),
      });
      cleanups.push(() => vcpus.end());
      // The main thread's handle on the UART: console input, migration, and
      // the writes it takes from the coalesced ring.
      const serialFd = options.serialFd;
      const serial = new Serial16550(serialState, {
        transmit: (bytes) => {
          if (serialFd !== null) writeOrDrop(serialFd, bytes);
        },
        setIrq: (level) => vm.irqLine(COM1_IRQ, level ? 1 : 0),
      });
      let mainCoalesced: MainCoalescedIo | undefined;
      if (coalesced) {
        const mapped = mapCoalescedRing(vcpus.vcpuFd(0), coalesced.ringPage);
        const io = new CoalescedIo(mapped.ring, coalesced.state, (port, bytes) =>
          serial.writeMany(port - COM1_BASE, bytes),
        );
        const poller = new CoalescedIoPoller(io);
        mainCoalesced = { io, poller, unmap: mapped.unmap };
        cleanups.push(() => {
          poller.stop();
          mapped.unmap();
        });
      }
      // Every vCPU gets the host's CPUID with its own APIC id and the KVM
      // paravirtual leaves (so a guest finds kvm-clock), and a PC's boot state.
      const supported = kvm.getSupportedCpuid();
      if (options.warn && options.cpuFeatures && kvmIsPvm()) {
        for (const name of hiddenFlagsKvmDoesNotList(options.cpuFeatures, supported)) {
          options.warn(
            `-cpu host,-${name}: this host's KVM is PVM-backed, where the guest reads the host CPU's own ${name} flag: hiding it has no effect`,
          );
        }
      }
      const caps = kvmHostCapabilities(kvm);
      let leaf1 = { eax: 0, edx: 0 };
      // Each vCPU's state at power-on, before any guest is loaded: a reset
      // puts it back, so the LAPIC, the MSRs and the MP state (the APs wait
      // for INIT/SIPI again) are as a fresh machine's. The TSC is left out:
      // it keeps counting across a reset, and kvmclock relies on that.
      // The three steps go to every vCPU thread at once, and the guest is
      // loaded on this thread while they run: each vCPU thread runs its
      // queue in order (the guest's entry state comes after them), so
      // this is the sequence it was one step at a time, without waiting
      // out three round trips per vCPU before the guest load (nor blocking
      // for their answers: queueOnCpu).
      const setUps: Promise<CpuSavedState>[] = [];
      for (let cpu = 0; cpu < options.cpus; cpu++) {
        const cpuid = buildGuestCpuid(supported, {
          cpuIndex: cpu,
          cpuCount: options.cpus,
          tscDeadlineTimer: caps.tscDeadlineTimer,
          ...(options.cpuFeatures ? { features: options.cpuFeatures } : {}),
        });
        leaf1 = cpuid.find((e) => e.function === 1) ?? leaf1;
        setUps.push(
          Promise.all([
            vcpus.queueOnCpu(cpu, 'set_cpuid', cpuid),
            vcpus.queueOnCpu(cpu, 'init_x86'),
            vcpus.queueOnCpu(cpu, 'get_cpu_state'),
          ]).then(([, , state]) => state as CpuSavedState),
        );
      }
      const setUpsDone = Promise.all(setUps);
      // Awaited after the guest load; until then a failure is not unhandled.
      setUpsDone.catch(() => {});
      const loadGuest = () =>
        bootGuest(
          {
            memory,
            cpus: options.cpus,
            cpuSignature: leaf1.eax,
            cpuFeatures: leaf1.edx,
            startLongMode: async (cpu, entry) => {
              await vcpus.runOnCpu(cpu, 'start_long_mode', entry);
            },
          },
          options.boot,
        );
      // A thread that cannot start fails the creation at once (its queued
      // work would only fail when it ends).
      const started = vcpus.started();
      try {
        await Promise.all([started, options.incoming ? undefined : loadGuest()]);
      } catch (err) {
        // The cause, in order: a thread that could not start; a vCPU whose
        // set-up failed (its guest entry fails too); the guest's load.
        await started;
        await setUpsDone;
        throw err;
      }
      const powerOnState: CpuSavedState[] = (await setUpsDone).map((state) => ({
        ...state,
        msrs: state.msrs.filter((m) => m.index !== MSR_IA32_TSC),
      }));

      // The sanitizer looks at the guest's pvclock right after the vCPUs
      // resume, so the lifecycle resumes them through this hook.
      let sanitizer: KvmClockSanitizer | undefined;
      const cpus: CpuController = {
        get count() {
          return vcpus.count;
        },
        pauseAll: () => vcpus.pauseAll(),
        resumeAll: async () => {
          await vcpus.resumeAll();
          await sanitizer?.afterResume();
        },
        runOnCpu: (cpu, op, arg) => vcpus.runOnCpu(cpu, op, arg),
        asyncRunOnCpu: (cpu, op, arg) => vcpus.asyncRunOnCpu(cpu, op, arg),
      };
      const lifecycle = new VmLifecycle({ cpus: options.kvmclockCheck ? cpus : vcpus });
      const restoredTsc: (bigint | undefined)[] = [];
      // Each vCPU's TSC read when kvmclock saved the clock at a stop (QEMU's
      // kvm_synchronize_all_tsc), so a migration saves TSCs and clock of
      // the same moment. Forgotten when the VM runs again, but only after
      // kvmclock's start handler (priority 0), which may compute the guest's
      // clock at these TSCs: priority 1 runs later on start.
      const tscAtStop: (bigint | undefined)[] = [];
      lifecycle.notifiers.add({
        name: 'tsc-snapshot',
        priority: 1,
        callback: (running) => {
          if (running) tscAtStop.length = 0;
        },
      });
      // The sanitizer reads where the guest got to before a reset wipes the MSRs.
      lifecycle.addResetHandler(async () => {
        await sanitizer?.reset();
      });
      // A reset (system_reset, or a guest's reboot) starts the guest afresh
      // on every vCPU, and lets vCPUs parked by the guest's request run again.
      lifecycle.addResetHandler(async () => {
        for (let cpu = 0; cpu < options.cpus; cpu++) {
          await vcpus.runOnCpu(cpu, 'set_cpu_state', powerOnState[cpu]);
        }
        await loadGuest();
        for (let cpu = 0; cpu < options.cpus; cpu++) await vcpus.runOnCpu(cpu, 'unpark');
      });
      const kvmclock = new KvmClockDevice(
        {
          getClock: () => vm.getClock(),
          setClock: (clock, realtime) =>
            realtime === undefined
              ? vm.setClock({ clock })
              : vm.setClock({ clock, flags: KVM_CLOCK_REALTIME, realtime }),
          hasRealtimeClock: caps.clockRealtime,
          hostRealtimeNs: () => clockGettimeNs(CLOCK_REALTIME),
          hasKvmclockCtrl: caps.kvmclockCtrl,
          clockIsReliableFromHost: caps.clockTscStable,
          readGuestPvclockNs: (restored) =>
            readGuestKvmclock(vcpus, memory, restored ? restoredTsc[0] : tscAtStop[0]),
          // Every vCPU thread reads its own TSC; the reads are queued on all
          // threads at once, so the stop waits one round trip, not one per vCPU.
          synchronizeTscs: async () => {
            const reads: Promise<bigint | undefined>[] = [];
            for (let cpu = 0; cpu < options.cpus; cpu++) reads.push(readTsc(vcpus, cpu));
            const tscs = await Promise.all(reads);
            for (let cpu = 0; cpu < options.cpus; cpu++) tscAtStop[cpu] = tscs[cpu];
          },
        },
        vcpus,
        {
          ...(options.useReliableGetClock !== undefined
            ? { useReliableGetClock: options.useReliableGetClock }
            : {}),
          ...(options.faults ? { faults: options.faults } : {}),
          ...(options.kvmclockPolicy ? { policy: options.kvmclockPolicy } : {}),
        },
      );
      kvmclock.realize(lifecycle.notifiers);
      if (options.kvmclockCheck) {
        sanitizer = new KvmClockSanitizer(
          {
            count: options.cpus,
            readMsrs: async (cpu) => {
              const msrs = (await vcpus.runOnCpu(cpu, 'get_msrs', [
                MSR_KVM_SYSTEM_TIME_NEW,
                MSR_IA32_TSC,
              ])) as { index: number; data: bigint }[];
              return {
                systemTime: msrs.find((m) => m.index === MSR_KVM_SYSTEM_TIME_NEW)?.data ?? 0n,
                tsc: msrs.find((m) => m.index === MSR_IA32_TSC)?.data ?? 0n,
              };
            },
            readGuest: (gpa, length) => memory.read(gpa, length),
            tscAtStop: (cpu) => tscAtStop[cpu] ?? restoredTsc[cpu],
            hostRealtimeNs: () => clockGettimeNs(CLOCK_REALTIME),
            hostHasCtrl: caps.kvmclockCtrl,
          },
          kvmclock,
          options.kvmclockCheck,
        );
      }
      return new X86Machine(
        kvm,
        vm,
        memory,
        vcpus,
        lifecycle,
        kvmclock,
        serial,
        tscAtStop,
        restoredTsc,
        sanitizer,
        mainCoalesced,
      );
    } catch (err) {
      await undo();
      throw err;
    }
  }

  /** Ends the vCPU threads (kicking each out of KVM_RUN) and releases RAM and fds. */
  async destroy(): Promise<void> {
    await this.vcpus.end();
    if (this.coalescedIo) {
      // What the guest wrote last still goes out.
      this.coalescedIo.poller.stop();
      this.coalescedIo.unmap();
    }
    this.kvmclock.unrealize(this.lifecycle.notifiers);
    this.memory.close();
    this.vm.close();
    this.kvm.close();
  }
}

/** vCPU `cpu`'s TSC now, read on its own thread. */
async function readTsc(vcpus: VcpuThreads, cpu: number): Promise<bigint | undefined> {
  const msrs = (await vcpus.runOnCpu(cpu, 'get_msrs', [MSR_IA32_TSC])) as { data: bigint }[];
  return msrs[0]?.data;
}

/**
 * The guest's kvmclock as vCPU 0 saw it at `tscAtStop` (its TSC when the VM
 * last ran; vCPU 0's TSC now if none was kept): its pvclock page read at
 * that TSC. 0 if kvmclock is off.
 */
async function readGuestKvmclock(
  vcpus: VcpuThreads,
  memory: GuestMemory,
  tscAtStop: bigint | undefined,
): Promise<bigint> {
  const msrs = (await vcpus.runOnCpu(0, 'get_msrs', [MSR_KVM_SYSTEM_TIME_NEW, MSR_IA32_TSC])) as {
    index: number;
    data: bigint;
  }[];
  const systemTime = msrs.find((m) => m.index === MSR_KVM_SYSTEM_TIME_NEW)?.data ?? 0n;
  const tsc = tscAtStop ?? msrs.find((m) => m.index === MSR_IA32_TSC)?.data;
  if ((systemTime & 1n) === 0n || tsc === undefined) return 0n;
  const gpa = systemTime & ~1n;
  const info = readPvclock(() => memory.read(gpa, 32));
  return pvclockNsAt(info, tsc);
}
