#!/usr/bin/env node
/**
 * tsvmm's entry point, QEMU's main → qemu_init → qemu_main_loop →
 * qemu_cleanup: parse the options, build the machine, start the monitors,
 * start the VM (unless -S), run the main loop, and clean up on quit.
 */
import { closeSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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
import {
  installSignalHandlers,
  MainLoop,
  runUntilShutdown,
  SHUTDOWN_SIGNALS,
} from '../system/main-loop.js';
import { setUpTracing, type TracingSetup } from '../trace/options.js';
import { TsvmmError } from '../util/errors.js';
import { helpText, versionText } from './help.js';
import { parseCommandLine, type VmConfig } from './options.js';
import { attachSerialStdio } from './serial-stdio.js';
import { UsageError } from './usage-error.js';
import { machineVmControl } from './vm-control.js';

function fail(message: string): number {
  process.stderr.write(`tsvmm: ${message}\n`);
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

async function run(config: VmConfig): Promise<number> {
  let tracing: TracingSetup | undefined;
  let serialFd: number | null = null;
  let ownSerialFd = false;
  let pidfileWritten = false;
  let machine: X86Machine | undefined;
  const registry = new QmpCommandRegistry();
  const server = new QmpServer({
    registry,
    version: qmpVersionInfo(),
    log: (m) => process.stderr.write(`tsvmm: qmp: ${m}\n`),
  });
  // -name ...,process=NAME: what ps and top show for this process.
  if (config.processName !== undefined) process.title = config.processName;
  // A signal that comes while the machine is still being built is held
  // and carried out as soon as the main loop exists, so start-up is never
  // cut short without cleanup.
  let earlySignal: NodeJS.Signals | undefined;
  const holdSignal = (signal: NodeJS.Signals) => {
    earlySignal ??= signal;
  };
  for (const s of SHUTDOWN_SIGNALS) process.on(s, holdSignal);
  const releaseEarlySignals = () => {
    for (const s of SHUTDOWN_SIGNALS) process.off(s, holdSignal);
  };
  try {
    tracing = setUpTracing({
      trace: [...config.trace.enable, ...config.trace.eventFiles.map((f) => `events=${f}`)],
      ...(config.trace.file !== undefined || config.logFile !== undefined
        ? { logFile: (config.trace.file ?? config.logFile)! }
        : {}),
      backtrace: config.trace.backtrace,
    });
    for (const w of tracing.warnings) process.stderr.write(`tsvmm: warning: ${w}\n`);

    if (config.serial.kind === 'stdio') serialFd = 1;
    else if (config.serial.kind === 'file') {
      serialFd = openSync(config.serial.path, 'w');
      ownSerialFd = true;
    }

    let loop: MainLoop | undefined;
    const onGuestRequest = (request: GuestRequest) => {
      if (!loop) return;
      if (request.type === 'guest-shutdown') {
        if (request.reason === 'guest-reset') loop.requestReset('guest-reset');
        else loop.requestShutdown(request.reason);
      } else {
        const text = request.type === 'internal-error' ? request.description : request.message;
        process.stderr.write(`tsvmm: vCPU ${request.cpu}: ${text}\n`);
        loop.requestVmStop('internal-error');
      }
    };
    machine = await X86Machine.create({
      cpus: config.smp.cpus,
      memoryBytes: config.memoryBytes,
      cpuFeatures: config.cpu.features,
      boot: guestBoot(config),
      serialFd,
      useReliableGetClock: config.kvmclock.machUseReliableGetClock,
      faults: config.faults,
      onGuestRequest,
    });
    loop = new MainLoop({ lifecycle: machine.lifecycle, noReboot: config.noReboot });
    const lifecycle = machine.lifecycle;
    const removeSignals = installSignalHandlers(loop);
    releaseEarlySignals();
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
    lifecycle.events.on('STOP', () => server.broadcast('STOP'));
    lifecycle.events.on('RESUME', () => server.broadcast('RESUME'));
    lifecycle.events.on('SHUTDOWN', (d) => server.broadcast('SHUTDOWN', { ...d }));
    lifecycle.events.on('RESET', (d) => server.broadcast('RESET', { ...d }));
    for (const spec of config.qmp) {
      const listener = await server.listen(spec);
      if (spec.wait) await listener.waitForClient();
    }
    if (config.pidfile !== undefined) {
      writeFileSync(config.pidfile, `${process.pid}\n`);
      pidfileWritten = true;
    }

    const detachSerial =
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
    const status = await runUntilShutdown(loop, lifecycle, async () => {
      removeSignals();
      detachSerial?.();
      await migration.close();
      await server.close();
      await m.destroy();
    });
    // A failed incoming migration ends the process as a shutdown, but it is a failure.
    return incomingFailed ? 1 : status;
  } catch (err) {
    await server.close().catch(() => {});
    await machine?.destroy().catch(() => {});
    throw err;
  } finally {
    releaseEarlySignals();
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

process.exitCode = await main(process.argv.slice(2));
// The vCPU threads, sockets and files are closed by now; leave even if a
// stray handle (a TTY in raw mode, say) would keep Node's loop alive.
process.exit();
