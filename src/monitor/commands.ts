import { HmpInterpreter } from './hmp-interpreter.js';
import type { JsonObject, JsonValue } from './json-value.js';
import { QmpError } from './qmp-error.js';
import type { QmpCommandRegistry } from './qmp-registry.js';
import type { QmpVersionInfo } from './version.js';
import {
  contCommand,
  isTracePattern,
  type MigrationControl,
  stopCommand,
  type VmControl,
  type VmCpuInfo,
  type VmTraceEventInfo,
} from './vm-control.js';

/** Options of {@link registerStandardCommands}. */
export interface StandardCommandsOptions {
  vm: VmControl;
  version: QmpVersionInfo;
  /** When given, the migration commands are registered too. */
  migration?: MigrationControl;
}

/**
 * Registers QEMU's standard commands on `registry`: query-status, stop,
 * cont, quit, system_reset, query-version, query-name, query-kvm,
 * query-commands, query-cpus-fast, trace-event-get-state,
 * trace-event-set-state, human-monitor-command, and the migration commands
 * (migrate, migrate-incoming, query-migrate, migrate_cancel,
 * migrate-continue, migrate-set-parameters, query-migrate-parameters,
 * migrate-set-capabilities, query-migrate-capabilities) when `migration`
 * is given. (qmp_capabilities belongs to the protocol and
 * is registered by QmpServer.)
 */
export function registerStandardCommands(
  registry: QmpCommandRegistry,
  options: StandardCommandsOptions,
): void {
  const { vm, version, migration } = options;
  const hmp = new HmpInterpreter({ vm, version });

  registry.register({
    name: 'query-status',
    handler: () => {
      const { running, status } = vm.status();
      return { running, status };
    },
  });
  registry.register({
    name: 'stop',
    handler: async () => {
      await stopCommand(vm);
      return {};
    },
  });
  registry.register({
    name: 'cont',
    handler: async () => {
      await contCommand(vm);
      return {};
    },
  });
  registry.register({
    name: 'quit',
    handler: (_args, ctx) => {
      // The client sees {"return": {}} first, then SHUTDOWN, then the hang-up.
      ctx.afterReply(() => vm.quit());
      return {};
    },
  });
  registry.register({
    name: 'system_reset',
    handler: async () => {
      await vm.systemReset();
      return {};
    },
  });
  registry.register({ name: 'query-version', handler: () => version });
  registry.register({
    name: 'query-name',
    handler: (): JsonObject => (vm.name !== undefined ? { name: vm.name } : {}),
  });
  registry.register({
    name: 'query-kvm',
    handler: () => ({ enabled: vm.kvm.enabled, present: vm.kvm.present }),
  });
  registry.register({
    name: 'query-commands',
    handler: () => registry.names().map((name) => ({ name })),
  });
  registry.register({
    name: 'query-cpus-fast',
    handler: () => vm.cpus().map(cpuInfoFast),
  });
  registry.register({
    name: 'trace-event-get-state',
    args: { name: 'str', '*vcpu': 'int' },
    handler: (args) => {
      const name = args.name as string;
      const vcpu = args.vcpu as number | undefined;
      const events = checkTraceEvents(vm, name, vcpu, true);
      return events
        .filter((e) => vcpu === undefined || e.vcpu === true)
        .map((e) => ({ name: e.name, state: e.state, vcpu: e.vcpu === true }));
    },
  });
  registry.register({
    name: 'trace-event-set-state',
    args: { name: 'str', enable: 'bool', '*ignore-unavailable': 'bool', '*vcpu': 'int' },
    handler: (args) => {
      const name = args.name as string;
      const vcpu = args.vcpu as number | undefined;
      const ignoreUnavailable = args['ignore-unavailable'] === true;
      const events = checkTraceEvents(vm, name, vcpu, ignoreUnavailable);
      for (const e of events) {
        if (e.state === 'unavailable' || (vcpu !== undefined && e.vcpu !== true)) continue;
        vm.traceEvents.set(e.name, args.enable as boolean);
      }
      return {};
    },
  });
  registry.register({
    name: 'human-monitor-command',
    args: { 'command-line': 'str', '*cpu-index': 'int' },
    handler: async (args, ctx) => {
      const cpuIndex = args['cpu-index'] as number | undefined;
      if (cpuIndex !== undefined && !vm.cpus().some((c) => c.cpuIndex === cpuIndex)) {
        throw new QmpError('GenericError', `CPU ${cpuIndex} is not present`);
      }
      const result = await hmp.execute(args['command-line'] as string);
      if (result.quit) ctx.afterReply(() => vm.quit());
      return result.output;
    },
  });

  if (migration !== undefined) registerMigrationCommands(registry, migration);
}

function registerMigrationCommands(
  registry: QmpCommandRegistry,
  migration: MigrationControl,
): void {
  registry.register({
    name: 'migrate',
    args: { uri: 'str', '*detach': 'bool', '*resume': 'bool' },
    handler: async (args) => {
      const options: { detach?: boolean; resume?: boolean } = {};
      if (args.detach !== undefined) options.detach = args.detach as boolean;
      if (args.resume !== undefined) options.resume = args.resume as boolean;
      await migration.migrate(args.uri as string, options);
      return {};
    },
  });
  registry.register({
    name: 'migrate-incoming',
    args: { uri: 'str', '*exit-on-error': 'bool' },
    handler: async (args) => {
      const options: { exitOnError?: boolean } = {};
      if (args['exit-on-error'] !== undefined) {
        options.exitOnError = args['exit-on-error'] as boolean;
      }
      await migration.migrateIncoming(args.uri as string, options);
      return {};
    },
  });
  registry.register({ name: 'query-migrate', handler: () => migration.queryMigrate() });
  registry.register({
    name: 'migrate_cancel',
    handler: async () => {
      await migration.cancel();
      return {};
    },
  });
  registry.register({
    name: 'migrate-set-parameters',
    args: migration.parameterSchema,
    handler: (args) => {
      migration.setParameters(args);
      return {};
    },
  });
  registry.register({
    name: 'query-migrate-parameters',
    handler: () => migration.queryParameters(),
  });
  registry.register({
    name: 'migrate-set-capabilities',
    args: {
      capabilities: {
        array: { struct: { capability: { enum: migration.capabilityNames }, state: 'bool' } },
      },
    },
    handler: (args) => {
      const list = (args.capabilities as JsonObject[]).map((entry) => ({
        capability: entry.capability as string,
        state: entry.state as boolean,
      }));
      migration.setCapabilities(list);
      return {};
    },
  });
  registry.register({
    name: 'query-migrate-capabilities',
    handler: () => migration.queryCapabilities().map((c) => ({ ...c })),
  });
  registry.register({
    name: 'migrate-continue',
    args: { state: { enum: migration.statusNames } },
    handler: (args) => {
      migration.migrateContinue(args.state as string);
      return {};
    },
  });
}

/** query-cpus-fast's CpuInfoFast, QEMU's member names. */
function cpuInfoFast(cpu: VmCpuInfo): JsonObject {
  const info: JsonObject = {
    'cpu-index': cpu.cpuIndex,
    'qom-path': cpu.qomPath,
    'thread-id': cpu.threadId,
  };
  if (cpu.props !== undefined) {
    const props: JsonObject = {};
    const names: [keyof NonNullable<VmCpuInfo['props']>, string][] = [
      ['nodeId', 'node-id'],
      ['socketId', 'socket-id'],
      ['dieId', 'die-id'],
      ['clusterId', 'cluster-id'],
      ['moduleId', 'module-id'],
      ['coreId', 'core-id'],
      ['threadId', 'thread-id'],
    ];
    for (const [key, member] of names) {
      const value: JsonValue | undefined = cpu.props[key];
      if (value !== undefined) props[member] = value;
    }
    info.props = props;
  }
  info.target = cpu.target;
  return info;
}

/**
 * QEMU's checks before reading or changing trace events (trace/qmp.c):
 * an exact name must exist (`unknown event "x"`), be per-vCPU when a vCPU
 * is named, and be available unless unavailable ones are ignored
 * (`event "x" is disabled`); a pattern may match nothing.
 */
function checkTraceEvents(
  vm: VmControl,
  name: string,
  vcpu: number | undefined,
  ignoreUnavailable: boolean,
): VmTraceEventInfo[] {
  if (vcpu !== undefined && !vm.cpus().some((c) => c.cpuIndex === vcpu)) {
    throw new QmpError('GenericError', `invalid vCPU index ${vcpu}`);
  }
  const events = vm.traceEvents.list(name);
  if (!isTracePattern(name)) {
    const event = events.find((e) => e.name === name);
    if (event === undefined) throw new QmpError('GenericError', `unknown event "${name}"`);
    if (vcpu !== undefined && event.vcpu !== true) {
      throw new QmpError('GenericError', `event "${name}" is not vCPU-specific`);
    }
  }
  if (!ignoreUnavailable) {
    const unavailable = events.find((e) => e.state === 'unavailable');
    if (unavailable !== undefined) {
      throw new QmpError('GenericError', `event "${unavailable.name}" is disabled`);
    }
  }
  return events;
}
