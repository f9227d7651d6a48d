/**
 * tsvmm's main, loaded by the entry point (main.ts): QEMU's main →
 * qemu_init → qemu_main_loop → qemu_cleanup: parse the options, build the
 * machine, start the monitors, start the VM (unless -S), run the main
 * loop, and clean up on quit.
 */
import { closeSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { CLOCK_REALTIME, clockGettimeNs, exitImmediately } from '../accel/kvm/ffi.js';
import { prestartedWorkersSettled } from '../accel/kvm/vcpu-prestart.js';
import type { GuestRequest } from '../accel/kvm/vcpu-threads.js';
import { parseKernelImage } from '../hw/i386/boot/kernel-image.js';
import type { GuestBoot } from '../hw/i386/guest-boot.js';
import { X86Machine } from '../hw/i386/machine.js';
import { x86MigrationHost } from '../hw/i386/machine-migration-host.js';
import { kvmDirtyLog } from '../migration/kvm-dirty-log.js';
import { MachineMigration } from '../migration/machine-migration.js';
import { registerStandardCommands } from '../monitor/commands.js';
import { HmpMonitor } from '../monitor/hmp.js';
import { HmpInterpreter } from '../monitor/hmp-interpreter.js';
import { QmpCommandRegistry } from '../monitor/qmp-registry.js';
import { QmpServer } from '../monitor/qmp-server.js';
import { qmpVersionInfo, tsvmmVersion } from '../monitor/version.js';
import { contCommand } from '../monitor/vm-control.js';
import { MainLoop, runUntilShutdown, SHUTDOWN_SIGNALS } from '../system/main-loop.js';
import { setUpTracing, type TracingSetup } from '../trace/options.js';
import { TsvmmError } from '../util/errors.js';
import { ExitGuard } from './exit-guard.js';
import { helpText, versionText } from './help.js';
import {
  createTimeline,
  registerKvmclockCommands,
  sanitizerOptions,
  timelineObserver,
  violationEventData,
  violationLine,
} from './kvmclock-control.js';
import { parseCommandLine, type VmConfig } from './options.js';
import { attachSerialStdio } from './serial-stdio.js';
import { UsageError } from './usage-error.js';
import { machineVmControl } from './vm-control.js';

/** Host CLOCK_REALTIME in ns, as the kvmclock readings stamp it. */
function wallClockNs(): bigint {
  return clockGettimeNs(CLOCK_REALTIME);
}

function fail(message: string): number {
  say(message);
  return 1;
}

/** Reads a file named on the command line, or says which option named it and why it cannot be read. */
function readOptionFile(option: string, path: string): Uint8Array {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new UsageError(`${option} ${path}: ${(err as NodeJS.ErrnoException).message}`);
  }
}

/** The probe guest, or the Linux kernel of -kernel with its -initrd and -append. */
function guestBoot(config: VmConfig): GuestBoot {
  if (config.kernel === undefined) return { kind: 'probe', image: 'probe' };
  const kernel = readOptionFile('-kernel', config.kernel);
  // Refuse a file that is not a kernel now, before any VM exists.
  parseKernelImage(kernel);
  return {
    kind: 'linux',
    kernel,
    ...(config.initrd !== undefined ? { initrd: readOptionFile('-initrd', config.initrd) } : {}),
    cmdline: config.append ?? '',
  };
}

/** Stdout or stderr went away (a closed pipe): nothing more can be said there, and that is no reason to stop. */
function ignoreStdioErrors(): void {
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {});
}

/** Writes to stderr, never throwing: stderr may be a closed pipe. */
function say(message: string): void {
  try {
    process.stderr.write(`tsvmm: ${message}\n`);
  } catch {
    // Nobody to tell.
  }
}

async function run(config: VmConfig): Promise<number> {
  let tracing: TracingSetup | undefined;
  let serialFd: number | null = null;
  let ownSerialFd = false;
  let pidfileWritten = false;
  let machine: X86Machine | undefined;
  let detachSerial: (() => void) | undefined;
  const registry = new QmpCommandRegistry();
  const server = new QmpServer({
    registry,
    version: qmpVersionInfo(),
    log: (m) => say(`qmp: ${m}`),
  });
  // -name ...,process=NAME: what ps and top show for this process.
  if (config.processName !== undefined) process.title = config.processName;

  // The forced exit: what the clean path would not finish. Kick every vCPU
  // out of KVM_RUN, remove the files others look for (pidfile, QMP
  // sockets), give the terminal back, and end the process without waiting
  // for anything (process.exit would wait for a vCPU stuck in KVM_RUN).
  const forceExit = (why: string): void => {
    say(`${why}; exiting now`);
    machine?.vcpus.requestExit();
    try {
      if (pidfileWritten) rmSync(config.pidfile!, { force: true });
      server.removeSocketFiles();
      detachSerial?.();
    } finally {
      exitImmediately(1);
    }
  };
  const guard = new ExitGuard({ deadlineMs: config.faults.shutdownDeadlineMs, force: forceExit });

  // Signals are taken for the whole run. A signal that comes while the
  // machine is still being built is held and carried out as soon as the
  // main loop exists, so start-up is never cut short without cleanup; a
  // second one, or the deadline, ends the process anyway.
  let loop: MainLoop | undefined;
  let earlySignal: NodeJS.Signals | undefined;
  let signalled!: () => void;
  const firstSignal = new Promise<void>((resolve) => {
    signalled = resolve;
  });
  const onSignal = (signal: NodeJS.Signals) => {
    if (!guard.signal(signal)) return;
    signalled();
    if (loop) loop.requestShutdown('host-signal', signal);
    else earlySignal = signal;
  };
  for (const s of SHUTDOWN_SIGNALS) process.on(s, onSignal);
  try {
    tracing = setUpTracing({
      trace: [...config.trace.enable, ...config.trace.eventFiles.map((f) => `events=${f}`)],
      ...(config.trace.file !== undefined || config.logFile !== undefined
        ? { logFile: (config.trace.file ?? config.logFile)! }
        : {}),
      backtrace: config.trace.backtrace,
    });
    for (const w of tracing.warnings) say(`warning: ${w}`);

    if (config.serial.kind === 'stdio') serialFd = 1;
    else if (config.serial.kind === 'file') {
      serialFd = openSync(config.serial.path, 'w');
      ownSerialFd = true;
    }

    const onGuestRequest = (request: GuestRequest) => {
      if (!loop) return;
      if (request.type === 'guest-shutdown') {
        if (request.reason === 'guest-reset') loop.requestReset('guest-reset');
        else loop.requestShutdown(request.reason);
      } else {
        const text = request.type === 'internal-error' ? request.description : request.message;
        say(`vCPU ${request.cpu}: ${text}`);
        loop.requestVmStop('internal-error');
      }
    };
    const timeline = createTimeline(config.kvmclock.timeline);
    const kvmclockCheck = sanitizerOptions({
      check: config.kvmclock.check,
      timeline,
      onViolation: (v) => {
        process.stderr.write(violationLine(v));
        server.broadcast('KVMCLOCK_VIOLATION', violationEventData(v));
      },
    });
    machine = await X86Machine.create({
      cpus: config.smp.cpus,
      memoryBytes: config.memoryBytes,
      memPrealloc: config.memPrealloc,
      cpuFeatures: config.cpu.features,
      warn: (m) => say(`warning: ${m}`),
      boot: guestBoot(config),
      incoming: config.incoming !== undefined,
      serialFd,
      coalesceSerialTx: config.serialDevice.coalesceTx,
      useReliableGetClock: config.kvmclock.machUseReliableGetClock,
      faults: {
        noKvmclockCtrl: config.faults.noKvmclockCtrl,
        unreliableGetClock: config.faults.unreliableGetClock,
        skipSetClockOnRestore: config.faults.skipSetClockOnRestore,
        setClockBackwardsNs: config.faults.setClockBackwardsNs,
        vcpuIgnoresKicks: config.faults.vcpuIgnoresKicks,
      },
      kvmclockPolicy: config.kvmclock.policy,
      ...(kvmclockCheck ? { kvmclockCheck } : {}),
      onGuestRequest,
    });
    if (timeline) {
      machine.kvmclock.addObserver(timelineObserver(timeline, () => wallClockNs()));
      machine.lifecycle.events.on('RESET', () => timeline.mark('reset', wallClockNs()));
      machine.lifecycle.events.on('SHUTDOWN', () => timeline.mark('quit', wallClockNs()));
    }
    loop = new MainLoop({
      lifecycle: machine.lifecycle,
      noReboot: config.noReboot,
      log: say,
      onShutdownRequest: () => guard.shutdownRequested(),
    });
    const lifecycle = machine.lifecycle;
    if (earlySignal) loop.requestShutdown('host-signal', earlySignal);

    const vm = machineVmControl({
      machine,
      loop,
      ...(config.name !== undefined ? { name: config.name } : {}),
    });
    let incomingFailed = false;
    const migration = new MachineMigration(
      x86MigrationHost(machine, {
        scheduleBottomHalf: (name, fn) => loop!.newBottomHalf(name, fn).schedule(),
        emitEvent: (e) => server.broadcast(e.event, { ...e.data }),
        autostart: () => vm.autostart,
        // Precopy: RAM goes out while the guest runs, then only what it dirtied.
        dirtyLog: kvmDirtyLog(machine.vm, machine.memory),
      }),
      {
        onIncomingFailed: () => {
          incomingFailed = true;
          loop!.requestShutdown('host-error');
        },
      },
    );
    registerStandardCommands(registry, { vm, version: qmpVersionInfo(), migration });
    registerKvmclockCommands(
      registry,
      machine.kvmclock,
      machine.kvmclockSanitizer,
      config.kvmclock.check,
    );
    lifecycle.events.on('STOP', () => server.broadcast('STOP'));
    lifecycle.events.on('RESUME', () => server.broadcast('RESUME'));
    lifecycle.events.on('SHUTDOWN', (d) => server.broadcast('SHUTDOWN', { ...d }));
    lifecycle.events.on('RESET', (d) => server.broadcast('RESET', { ...d }));
    for (const spec of config.qmp) {
      const listener = await server.listen(spec);
      // wait=on: no start before a client comes, but a signal ends the wait.
      if (spec.wait) await Promise.race([listener.waitForClient(), firstSignal]);
    }
    if (config.pidfile !== undefined) {
      writeFileSync(config.pidfile, `${process.pid}\n`);
      pidfileWritten = true;
    }

    detachSerial =
      config.serial.kind === 'stdio' && config.monitor !== 'stdio'
        ? attachSerialStdio(machine.serial, () => loop!.requestShutdown('host-signal', 'SIGINT'))
        : undefined;
    if (config.monitor === 'stdio') {
      new HmpMonitor({
        input: process.stdin,
        output: process.stdout,
        interpreter: new HmpInterpreter({ vm, version: qmpVersionInfo() }),
        banner: `tsvmm ${tsvmmVersion()} monitor - type 'help' for more information`,
        onQuit: () => vm.quit(),
      }).start();
    }

    if (config.incoming) {
      // The VM starts when the stream is in (unless -S): QEMU's autostart.
      vm.setAutostart(!config.startPaused);
      await migration.startIncoming(
        config.incoming.kind === 'defer' ? 'defer' : config.incoming.uri,
      );
    } else if (!config.startPaused) {
      // QEMU leaves preconfig by running `cont` unless -S was given.
      await contCommand(vm);
    }

    const m = machine;
    const status = await runUntilShutdown(
      loop,
      lifecycle,
      async () => {
        detachSerial?.();
        await migration.close();
        await server.close();
        await m.destroy();
      },
      say,
    );
    if (timeline && config.kvmclock.timeline !== undefined) {
      timeline.write(config.kvmclock.timeline);
    }
    // A failed incoming migration ends the process as a shutdown, but it is a failure.
    return incomingFailed ? 1 : status;
  } catch (err) {
    await server.close().catch(() => {});
    await machine?.destroy().catch(() => {});
    throw err;
  } finally {
    // The signal handlers stay until the process ends: a signal during
    // the cleanup above still counts as the second one.
    if (pidfileWritten) rmSync(config.pidfile!, { force: true });
    if (ownSerialFd && serialFd !== null) closeSync(serialFd);
    tracing?.close();
  }
}

async function main(argv: readonly string[]): Promise<number> {
  try {
    const action = parseCommandLine(argv);
    switch (action.action) {
      case 'help':
        process.stdout.write(helpText());
        return 0;
      case 'version':
        process.stdout.write(versionText());
        return 0;
      case 'list':
        process.stdout.write(action.text);
        return 0;
      case 'run':
        return await run(action.config);
    }
  } catch (err) {
    if (err instanceof TsvmmError) return fail(err.message);
    return fail(
      `internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`,
    );
  }
}

/**
 * How long an exit waits for vCPU threads started ahead that are still
 * loading (a run that ended before it built its VM). Loading takes tens of
 * milliseconds; the bound only keeps a wedged load from holding the exit.
 */
const PRESTARTED_SETTLE_MS = 5_000;

/** Runs tsvmm with the command line `argv` (without node and the script) and exits with its status. */
export async function runTsvmm(argv: readonly string[]): Promise<never> {
  ignoreStdioErrors();
  process.exitCode = await main(argv);
  await prestartedWorkersSettled(PRESTARTED_SETTLE_MS);
  // The vCPU threads, sockets and files are closed by now; leave even if a
  // stray handle (a TTY in raw mode, say) would keep Node's loop alive.
  process.exit();
}
