import { parseMemorySize } from '../accel/kvm/memory/parse-size.js';
import {
  CpuFeatureError,
  type CpuFeatureSetting,
  cpuHelpText,
  lookupFeature,
} from '../hw/i386/cpu-features.js';
import { KVMCLOCK_POLICIES, type KvmClockPolicy } from '../hw/i386/kvm/clock.js';
import type { QmpListenSpec } from '../monitor/qmp-server.js';
import { TRACE_EVENT_NAMES } from '../trace/events.js';
import { TsvmmError } from '../util/errors.js';
import { onlyProps, parseQemuBool, parseQemuOpts } from './qemu-opts.js';
import { parseQmpSpec } from './qmp-spec.js';
import { UsageError } from './usage-error.js';

/** Where the guest's serial port (COM1) goes. */
export type SerialConfig = { kind: 'stdio' } | { kind: 'file'; path: string } | { kind: 'none' };

/** The vCPU topology, completed the way QEMU completes `-smp`. */
/**
 * How long the clean shutdown may take before the exit is forced, so that
 * tsvmm is gone within 2 s of a signal or `quit` whatever it was doing.
 */
export const DEFAULT_SHUTDOWN_DEADLINE_MS = 1500;

export interface SmpConfig {
  /** vCPUs present at start. */
  cpus: number;
  maxcpus: number;
  sockets: number;
  dies: number;
  cores: number;
  threads: number;
}

/** Everything a command line asks for, typed. Produced by {@link parseCommandLine}. */
export interface VmConfig {
  /** Always KVM: tsvmm has no other accelerator. */
  accel: 'kvm';
  /** The machine name given (`pc`, `q35`, versioned names): all are our one x86 machine. */
  machine: string;
  /** `-cpu host[,FLAGS]`: the model, and CPUID flags switched on or off, in the order given. */
  cpu: { model: 'host'; features: CpuFeatureSetting[] };
  smp: SmpConfig;
  /** Guest RAM in bytes (QEMU's default 128 MiB), rounded up to 8 KiB as QEMU does. */
  memoryBytes: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  /** `-S`: stay in prelaunch until `cont`. */
  startPaused: boolean;
  qmp: QmpListenSpec[];
  /** The human monitor: on stdio or none (the default). */
  monitor: 'stdio' | 'none';
  /**
   * The serial port. Default: stdio, unless the monitor is on stdio (then
   * none): tsvmm has no graphical console to put it on, so stdio is where
   * it is useful.
   */
  serial: SerialConfig;
  /** `-nographic` was given. */
  nographic: boolean;
  /** `-no-reboot`: a guest reboot exits instead. */
  noReboot: boolean;
  /** `-mem-prealloc`: fault all guest RAM in before the guest starts. */
  memPrealloc: boolean;
  /** `-incoming URI` or `-incoming defer`. */
  incoming?: { kind: 'uri'; uri: string } | { kind: 'defer' };
  /** `-name NAME` or `-name guest=NAME`. */
  name?: string;
  /** `-name ...,process=NAME`: the process name to show. */
  processName?: string;
  /** `-name ...,debug-threads=on`: name each thread after its role. */
  debugThreads: boolean;
  trace: {
    /** Event name patterns to enable (`-trace PATTERN`, `-trace enable=PATTERN`). */
    enable: string[];
    /** Files listing events to enable, one pattern a line (`-trace events=FILE`). */
    eventFiles: string[];
    /** Where trace output goes (`-trace file=FILE`); default: the log (-D) or stderr. */
    file?: string;
    /** `-trace-backtrace`: print a backtrace with each trace event. */
    backtrace: boolean;
  };
  /** `-D FILE`: the log file. */
  logFile?: string;
  /** `-pidfile FILE`. */
  pidfile?: string;
  /** tsvmm's fault injection, to reproduce failure modes on purpose. */
  faults: {
    /** `-x-no-kvmclock-ctrl`: act as if the host lacked KVM_CAP_KVMCLOCK_CTRL. */
    noKvmclockCtrl: boolean;
    /** `-x-unreliable-get-clock`: act as if KVM_GET_CLOCK were not TSC-stable. */
    unreliableGetClock: boolean;
    /** `-x-vcpu-ignores-kicks`: vCPU threads cannot be kicked out of KVM_RUN. */
    vcpuIgnoresKicks: boolean;
    /** `-x-shutdown-deadline MS`: how long the clean shutdown may take before the exit is forced. */
    shutdownDeadlineMs: number;
    /** `-x-skip-set-clock-on-restore`: the first start after a load skips KVM_SET_CLOCK. */
    skipSetClockOnRestore: boolean;
    /** `-x-clock-set-backwards NS`: every start sets the clock NS ns too early. */
    setClockBackwardsNs: bigint;
  };
  /** COM1's options (`-global isa-serial.PROP=VALUE`). */
  serialDevice: {
    /** x-coalesce-tx: KVM queues transmit-register writes in the coalesced ring (default on). */
    coalesceTx: boolean;
  };
  /** kvmclock device options (`-global kvmclock.PROP=VALUE`). */
  kvmclock: {
    /** x-mach-use-reliable-get-clock (default on). */
    machUseReliableGetClock: boolean;
    /** policy: freeze (default) or realtime. */
    policy: KvmClockPolicy;
    /** check: the kvmclock sanitizer (default off). */
    check: boolean;
    /** `-kvmclock timeline=FILE`: where to write the timeline at exit. */
    timeline?: string;
  };
}

/** What the command line asks tsvmm to do. */
export type CliAction =
  | { action: 'run'; config: VmConfig }
  | { action: 'help' }
  | { action: 'version' }
  /** `-machine help` and friends: print `text` and exit 0. */
  | { action: 'list'; text: string };

/** The largest -smp tsvmm accepts; the VM also checks KVM's own limit when it starts. */
export const MAX_VCPUS = 255;

/** One option of the table; `arg` names its argument in the help, absent for flags. */
export interface OptionSpec {
  names: readonly string[];
  arg?: string;
  help: string;
}

interface OptionDef extends OptionSpec {
  apply(state: ParseState, value: string, spelled: string): CliAction | undefined;
}

interface ParseState {
  config: VmConfig;
  serialGiven: boolean;
}

const MACHINES = ['pc', 'q35'];
const MACHINE_VERSIONED = /^pc-(i440fx|q35)-\d+\.\d+$/;

function defaultConfig(): VmConfig {
  return {
    accel: 'kvm',
    machine: 'pc',
    cpu: { model: 'host', features: [] },
    smp: { cpus: 1, maxcpus: 1, sockets: 1, dies: 1, cores: 1, threads: 1 },
    memoryBytes: 128 * 2 ** 20,
    startPaused: false,
    qmp: [],
    monitor: 'none',
    serial: { kind: 'stdio' },
    nographic: false,
    noReboot: false,
    memPrealloc: false,
    debugThreads: false,
    trace: { enable: [], eventFiles: [], backtrace: false },
    faults: {
      noKvmclockCtrl: false,
      unreliableGetClock: false,
      vcpuIgnoresKicks: false,
      shutdownDeadlineMs: DEFAULT_SHUTDOWN_DEADLINE_MS,
      skipSetClockOnRestore: false,
      setClockBackwardsNs: 0n,
    },
    serialDevice: { coalesceTx: true },
    kvmclock: { machUseReliableGetClock: true, policy: 'freeze', check: false },
  };
}

function flag(names: string[], help: string, set: (s: ParseState) => void): OptionDef {
  return {
    names,
    help,
    apply: (s) => {
      set(s);
      return undefined;
    },
  };
}

function valued(
  names: string[],
  arg: string,
  help: string,
  set: (s: ParseState, value: string, spelled: string) => void,
): OptionDef {
  return {
    names,
    arg,
    help,
    apply: (s, value, spelled) => {
      set(s, value, spelled);
      return undefined;
    },
  };
}

const OPTIONS: readonly OptionDef[] = [
  { names: ['-h', '-help'], help: 'show this help and exit', apply: () => ({ action: 'help' }) },
  {
    names: ['-version'],
    help: 'show the version and exit',
    apply: () => ({ action: 'version' }),
  },
  {
    names: ['-accel'],
    arg: 'kvm[,kernel-irqchip=on]',
    help: 'the accelerator: KVM is the only one',
    apply: (s, value) => applyAccel(s, value),
  },
  flag(['-enable-kvm'], 'same as -accel kvm', (s) => {
    s.config.accel = 'kvm';
  }),
  {
    names: ['-machine', '-M'],
    arg: '[type=]pc|q35[,accel=kvm]',
    help: 'the machine; pc, q35 and their versioned names are all our one x86 machine',
    apply: (s, value, spelled) => applyMachine(s, value, spelled),
  },
  {
    names: ['-cpu'],
    arg: 'host[,+FLAG|-FLAG|FLAG=on|off...] | help',
    help: "the vCPU model: the host's CPU as KVM offers it; flags change CPUID for every vCPU (-cpu help lists them)",
    apply: (s, value) => applyCpu(s, value),
  },
  valued(
    ['-smp'],
    '[cpus=]N[,maxcpus=N][,sockets=N][,dies=N][,cores=N][,threads=N]',
    `number of vCPUs and their topology (1 to ${MAX_VCPUS})`,
    (s, value) => {
      s.config.smp = parseSmp(value);
    },
  ),
  valued(
    ['-m'],
    '[size=]SIZE',
    'guest RAM; a plain number is MiB, suffixes K, M, G, T (default 128M)',
    (s, value) => {
      s.config.memoryBytes = parseMemory(value);
    },
  ),
  valued(
    ['-kernel'],
    'FILE',
    'the Linux kernel to boot (bzImage or ELF vmlinux, 64-bit boot protocol); default: the probe guest',
    (s, v) => {
      s.config.kernel = v;
    },
  ),
  valued(['-initrd'], 'FILE', 'an initial ram disk for -kernel', (s, v) => {
    s.config.initrd = v;
  }),
  valued(['-append'], 'CMDLINE', 'the kernel command line for -kernel', (s, v) => {
    s.config.append = v;
  }),
  flag(['-S'], 'do not start the guest: wait for "cont" on the monitor or QMP', (s) => {
    s.config.startPaused = true;
  }),
  valued(
    ['-qmp'],
    'unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off',
    'a QMP server (repeatable); TCP has no authentication: bind 127.0.0.1',
    (s, v) => {
      s.config.qmp.push(parseQmpSpec(v));
    },
  ),
  valued(['-monitor'], 'stdio|none', 'the human monitor, prompt "(qemu) "', (s, v) => {
    if (v !== 'stdio' && v !== 'none') {
      throw new UsageError(`-monitor ${v}: tsvmm offers the human monitor on stdio or none`);
    }
    s.config.monitor = v;
  }),
  valued(
    ['-serial'],
    'stdio|file:PATH|none',
    'where the serial port goes (default stdio)',
    (s, v) => {
      if (s.serialGiven)
        throw new UsageError(`-serial ${v}: tsvmm has one serial port; give -serial once`);
      s.serialGiven = true;
      s.config.serial = parseSerial(v);
    },
  ),
  flag(['-nographic'], 'no graphics (tsvmm has none): serial port on stdio', (s) => {
    s.config.nographic = true;
  }),
  valued(['-display'], 'none', 'tsvmm has no display; only "none" is accepted', (_s, v) => {
    if (v !== 'none') {
      throw new UsageError(`-display ${v}: tsvmm has no display; use -display none or -nographic`);
    }
  }),
  flag(['-no-reboot'], 'exit instead of rebooting when the guest reboots', (s) => {
    s.config.noReboot = true;
  }),
  flag(
    ['-mem-prealloc'],
    'fault all guest RAM in at start (fails at once if the host lacks it)',
    (s) => {
      s.config.memPrealloc = true;
    },
  ),
  valued(
    ['-incoming'],
    'URI|defer',
    'wait for an incoming migration from URI (file:, exec:, unix:, tcp:), or for migrate-incoming (defer)',
    (s, v) => {
      s.config.incoming = parseIncoming(v);
    },
  ),
  valued(
    ['-name'],
    '[guest=]NAME[,process=NAME][,debug-threads=on|off]',
    'the VM name (query-name, window and log prefixes)',
    (s, v) => applyName(s, v),
  ),
  {
    names: ['-trace'],
    arg: '[enable=]PATTERN | events=FILE | file=FILE | help',
    help: 'enable trace events matching PATTERN, or those listed in FILE (repeatable); help lists the events',
    apply: (s, value) => applyTrace(s, value),
  },
  flag(['-trace-backtrace'], 'print a backtrace with each trace event (tsvmm)', (s) => {
    s.config.trace.backtrace = true;
  }),
  valued(['-D'], 'FILE', 'write the log (and trace output) to FILE', (s, v) => {
    s.config.logFile = v;
  }),
  valued(['-pidfile'], 'FILE', 'write the process id to FILE', (s, v) => {
    s.config.pidfile = v;
  }),
  valued(
    ['-global'],
    'DRIVER.PROP=VALUE',
    'set a device property. kvmclock: policy=freeze|realtime (guest clock across a stop or save: frozen as QEMU, or advanced by the wall time), check=on|off (the kvmclock sanitizer), x-mach-use-reliable-get-clock=on|off. isa-serial (COM1): x-coalesce-tx=on|off (KVM queues console bytes without an exit each; default on)',
    (s, v) => applyGlobal(s, v),
  ),
  valued(
    ['-kvmclock'],
    'timeline=FILE.html|FILE.svg',
    'write a picture of host time against each vCPU guest time, with every lifecycle event, to FILE at exit',
    (s, v) => applyKvmclock(s, v),
  ),
  flag(
    ['-x-no-kvmclock-ctrl'],
    'fault injection: behave as if the host had no KVM_CAP_KVMCLOCK_CTRL',
    (s) => {
      s.config.faults.noKvmclockCtrl = true;
    },
  ),
  flag(
    ['-x-unreliable-get-clock'],
    'fault injection: behave as if KVM_GET_CLOCK were not reliable (not TSC-stable)',
    (s) => {
      s.config.faults.unreliableGetClock = true;
    },
  ),
  flag(
    ['-x-vcpu-ignores-kicks'],
    'fault injection: vCPUs cannot be kicked out of KVM_RUN (only the forced exit ends tsvmm)',
    (s) => {
      s.config.faults.vcpuIgnoresKicks = true;
    },
  ),
  valued(
    ['-x-shutdown-deadline'],
    'MS',
    `testing: the clean shutdown may take MS ms before the exit is forced (default ${DEFAULT_SHUTDOWN_DEADLINE_MS}; the test suite stretches it under emulation)`,
    (s, v) => {
      if (!/^\d+$/.test(v) || Number(v) === 0) {
        throw new UsageError(
          `-x-shutdown-deadline ${v}: expected a positive number of milliseconds`,
        );
      }
      s.config.faults.shutdownDeadlineMs = Number(v);
    },
  ),
  flag(
    ['-x-skip-set-clock-on-restore'],
    'fault injection: the first start after an incoming migration skips KVM_SET_CLOCK',
    (s) => {
      s.config.faults.skipSetClockOnRestore = true;
    },
  ),
  valued(
    ['-x-clock-set-backwards'],
    'NS',
    'fault injection: every start sets the guest clock NS nanoseconds earlier than it should',
    (s, v) => {
      if (!/^\d+$/.test(v) || BigInt(v) === 0n) {
        throw new UsageError(
          `-x-clock-set-backwards ${v}: expected a positive number of nanoseconds`,
        );
      }
      s.config.faults.setClockBackwardsNs = BigInt(v);
    },
  ),
];

/** The options tsvmm understands, for the help text. */
export const OPTION_SPECS: readonly OptionSpec[] = OPTIONS;

/**
 * Parses a QEMU-style command line (without the program name). Options
 * may be spelled `-opt` or `--opt`; each value is the next argument, as in
 * QEMU. Anything tsvmm does not support is a {@link UsageError} naming it.
 *
 * @example
 * parseCommandLine(['-accel', 'kvm', '-m', '1G', '-smp', '2', '-S']);
 */
export function parseCommandLine(argv: readonly string[]): CliAction {
  const state: ParseState = { config: defaultConfig(), serialGiven: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('-') || arg === '-' || arg === '--') {
      throw new UsageError(
        `${arg}: unexpected argument; tsvmm has no disk images, and options start with '-' (see --help)`,
      );
    }
    // QEMU accepts --opt for every -opt.
    const name = arg.startsWith('--') ? arg.slice(1) : arg;
    const def = OPTIONS.find((o) => o.names.includes(name));
    if (def === undefined) throw new UsageError(`${arg}: invalid option (see --help)`);
    let value = '';
    if (def.arg !== undefined) {
      const next = argv[i + 1];
      if (next === undefined) throw new UsageError(`${arg}: requires an argument`);
      value = next;
      i++;
    }
    const action = def.apply(state, value, name);
    if (action !== undefined) return action;
  }
  return { action: 'run', config: finish(state) };
}

/** Cross-option checks and defaults that depend on several options. */
function finish(state: ParseState): VmConfig {
  const { config } = state;
  if (config.kernel === undefined) {
    if (config.initrd !== undefined)
      throw new UsageError('-initrd only allowed with -kernel option');
    if (config.append !== undefined)
      throw new UsageError('-append only allowed with -kernel option');
  }
  if (!state.serialGiven && config.monitor === 'stdio') config.serial = { kind: 'none' };
  if (config.monitor === 'stdio' && config.serial.kind === 'stdio') {
    throw new UsageError(
      'cannot use stdio by multiple character devices: -monitor stdio and -serial stdio; move one of them (-serial file:PATH)',
    );
  }
  return config;
}

function applyAccel(s: ParseState, value: string): CliAction | undefined {
  const opts = parseQemuOpts('-accel', value, 'accel');
  const accel = opts.implied ?? opts.props.get('accel');
  opts.props.delete('accel');
  if (accel === 'help') return { action: 'list', text: 'Accelerators supported in tsvmm:\nkvm\n' };
  if (accel !== 'kvm') {
    throw new UsageError(
      `-accel ${value}: tsvmm runs guests with KVM only; use -accel kvm (or -enable-kvm)`,
    );
  }
  onlyProps('-accel', opts, ['kernel-irqchip']);
  const irqchip = opts.props.get('kernel-irqchip');
  if (irqchip !== undefined && irqchip !== 'on') {
    throw new UsageError(
      `-accel ${value}: tsvmm always uses KVM's in-kernel irqchip; only kernel-irqchip=on is accepted`,
    );
  }
  s.config.accel = 'kvm';
  return undefined;
}

function applyMachine(s: ParseState, value: string, spelled: string): CliAction | undefined {
  const opts = parseQemuOpts(spelled, value, 'type');
  const type = opts.implied ?? opts.props.get('type');
  opts.props.delete('type');
  if (type === 'help' || type === '?') {
    return {
      action: 'list',
      text: 'Supported machines are:\npc    Standard PC (our x86 machine)\nq35   Standard PC (alias of pc in tsvmm)\n',
    };
  }
  onlyProps(spelled, opts, ['accel']);
  const accel = opts.props.get('accel');
  if (accel !== undefined && accel !== 'kvm') {
    throw new UsageError(
      `${spelled} ${value}: accel=${accel}: tsvmm runs guests with KVM only; use accel=kvm`,
    );
  }
  if (type !== undefined && type !== '') {
    if (!MACHINES.includes(type) && !MACHINE_VERSIONED.test(type)) {
      throw new UsageError(
        `${spelled} ${value}: unsupported machine type '${type}'; use pc or q35 (both are tsvmm's one x86 machine)`,
      );
    }
    s.config.machine = type;
  }
  return undefined;
}

function applyCpu(s: ParseState, value: string): CliAction | undefined {
  if (value === 'help' || value === '?') return { action: 'list', text: cpuHelpText() };
  // QEMU's -cpu list: the model, then flags as +NAME, -NAME or NAME=on|off.
  // Parsed here rather than with parseQemuOpts: "+x" and "-x" are not
  // key=value items, and a flag may be named twice (the last one wins).
  const items = value.split(',');
  const model = items.shift();
  if (model !== 'host') {
    throw new UsageError(
      `-cpu ${value}: tsvmm passes the host CPU through; use -cpu host (with flags: -cpu host,-cx16)`,
    );
  }
  const features: CpuFeatureSetting[] = [];
  for (const item of items) {
    let name: string;
    let on: boolean;
    const eq = item.indexOf('=');
    if (item.startsWith('+') || item.startsWith('-')) {
      if (eq >= 0) {
        throw new UsageError(
          `-cpu ${value}: '${item}': write +NAME, -NAME or NAME=on|off, not both forms`,
        );
      }
      name = item.slice(1);
      on = item.startsWith('+');
    } else if (eq > 0) {
      name = item.slice(0, eq);
      on = parseQemuBool('-cpu', name, item.slice(eq + 1));
    } else {
      throw new UsageError(
        item === ''
          ? `-cpu ${value}: empty item in the list`
          : `-cpu ${value}: '${item}': write +${item}, -${item} or ${item}=on|off`,
      );
    }
    try {
      features.push({ name: lookupFeature(name), on });
    } catch (err) {
      if (err instanceof CpuFeatureError) throw new UsageError(`-cpu ${value}: ${err.message}`);
      throw err;
    }
  }
  s.config.cpu = { model: 'host', features };
  return undefined;
}

function parseCount(option: string, key: string, text: string): number {
  if (!/^\d+$/.test(text)) {
    throw new UsageError(`${option}: ${key}=${text}: expected a whole number`);
  }
  return Number(text);
}

/**
 * Completes a `-smp` topology as QEMU does for current machine types:
 * missing threads and dies are 1; with cores missing, sockets default to 1
 * and cores take the rest ("prefer cores"); maxcpus defaults to cpus.
 */
export function parseSmp(value: string): SmpConfig {
  const opts = parseQemuOpts('-smp', value, 'cpus');
  onlyProps('-smp', opts, ['cpus', 'maxcpus', 'sockets', 'dies', 'cores', 'threads']);
  const get = (key: string): number | undefined => {
    const text = key === 'cpus' ? (opts.implied ?? opts.props.get('cpus')) : opts.props.get(key);
    if (text === undefined || text === '') return undefined;
    const n = parseCount('-smp', key, text);
    // QEMU 9.0 removed the old reading of 0 as "not given": it is an error now.
    if (n === 0) {
      throw new UsageError(
        `-smp ${value}: invalid CPU topology: ${key}=0: CPU topology parameters must be greater than zero`,
      );
    }
    return n;
  };
  const threads = get('threads') ?? 1;
  const dies = get('dies') ?? 1;
  let sockets = get('sockets');
  let cores = get('cores');
  let cpus = get('cpus');
  let maxcpus = get('maxcpus');
  if (cpus === undefined && maxcpus === undefined) {
    cpus = (sockets ?? 1) * dies * (cores ?? 1) * threads;
  }
  maxcpus ??= cpus!;
  cpus ??= maxcpus;
  if (cores === undefined) {
    sockets ??= 1;
    cores = Math.floor(maxcpus / (sockets * dies * threads)) || 1;
  } else if (sockets === undefined) {
    sockets = Math.floor(maxcpus / (cores * dies * threads)) || 1;
  }
  const product = sockets * dies * cores * threads;
  if (product !== maxcpus) {
    throw new UsageError(
      `-smp ${value}: invalid CPU topology: sockets (${sockets}) * dies (${dies}) * cores (${cores}) * threads (${threads}) != maxcpus (${maxcpus})`,
    );
  }
  if (cpus > maxcpus) {
    throw new UsageError(`-smp ${value}: cpus (${cpus}) must not exceed maxcpus (${maxcpus})`);
  }
  if (maxcpus > MAX_VCPUS) {
    throw new UsageError(`-smp ${value}: at most ${MAX_VCPUS} vCPUs are supported`);
  }
  return { cpus, maxcpus, sockets, dies, cores, threads };
}

function parseMemory(value: string): number {
  // `-m 512` and `-m size=512` both; QEMU's slots and maxmem need hotplug, which we lack.
  const opts = parseQemuOpts('-m', value, 'size');
  onlyProps('-m', opts, ['size']);
  const text = opts.implied ?? opts.props.get('size');
  if (text === undefined || text === '') throw new UsageError(`-m ${value}: no size given`);
  try {
    return parseMemorySize(text);
  } catch (err) {
    if (err instanceof TsvmmError) throw new UsageError(`-m ${value}: ${err.message}`);
    throw err;
  }
}

function parseSerial(value: string): SerialConfig {
  if (value === 'stdio') return { kind: 'stdio' };
  if (value === 'none') return { kind: 'none' };
  if (value.startsWith('file:') && value.length > 'file:'.length) {
    return { kind: 'file', path: value.slice('file:'.length) };
  }
  throw new UsageError(`-serial ${value}: use stdio, file:PATH or none`);
}

function parseIncoming(value: string): NonNullable<VmConfig['incoming']> {
  if (value === 'defer') return { kind: 'defer' };
  if (!/^[a-z][a-z0-9+.-]*:./.test(value)) {
    throw new UsageError(
      `-incoming ${value}: unknown migration protocol; use defer or a URI such as tcp:HOST:PORT, unix:PATH, file:PATH or exec:COMMAND`,
    );
  }
  return { kind: 'uri', uri: value };
}

function applyName(s: ParseState, value: string): void {
  const opts = parseQemuOpts('-name', value, 'guest');
  onlyProps('-name', opts, ['guest', 'process', 'debug-threads']);
  const guest = opts.implied ?? opts.props.get('guest');
  if (guest !== undefined && guest !== '') s.config.name = guest;
  const process = opts.props.get('process');
  if (process !== undefined) s.config.processName = process;
  const debug = opts.props.get('debug-threads');
  if (debug !== undefined) s.config.debugThreads = parseQemuBool('-name', 'debug-threads', debug);
}

function applyTrace(s: ParseState, value: string): CliAction | undefined {
  if (value === 'help' || value === '?') {
    return { action: 'list', text: `Possible trace events:\n${TRACE_EVENT_NAMES.join('\n')}\n` };
  }
  const opts = parseQemuOpts('-trace', value, 'enable');
  onlyProps('-trace', opts, ['enable', 'events', 'file']);
  const enable = opts.implied ?? opts.props.get('enable');
  if (enable !== undefined && enable !== '') s.config.trace.enable.push(enable);
  const events = opts.props.get('events');
  if (events !== undefined) s.config.trace.eventFiles.push(events);
  const file = opts.props.get('file');
  if (file !== undefined) s.config.trace.file = file;
  if (enable === undefined && events === undefined && file === undefined) {
    throw new UsageError(`-trace ${value}: give an event pattern, events=FILE or file=FILE`);
  }
  return undefined;
}

function applyGlobal(s: ParseState, value: string): void {
  // Two spellings, as QEMU: DRIVER.PROP=VALUE and driver=D,property=P,value=V.
  let driver: string | undefined;
  let property: string | undefined;
  let setting: string | undefined;
  const short = /^([^.=,]+)\.([^=,]+)=(.*)$/.exec(value);
  if (!value.includes('=')) {
    throw new UsageError(`-global ${value}: expected DRIVER.PROPERTY=VALUE`);
  }
  if (short !== null) {
    [, driver, property, setting] = short;
  } else {
    const opts = parseQemuOpts('-global', value);
    onlyProps('-global', opts, ['driver', 'property', 'value']);
    driver = opts.props.get('driver');
    property = opts.props.get('property');
    setting = opts.props.get('value');
  }
  if (driver === undefined || property === undefined || setting === undefined) {
    throw new UsageError(`-global ${value}: expected DRIVER.PROPERTY=VALUE`);
  }
  if (driver === 'isa-serial') {
    if (property !== 'x-coalesce-tx') {
      throw new UsageError(
        `-global ${value}: isa-serial has no property '${property}'; it has x-coalesce-tx`,
      );
    }
    s.config.serialDevice.coalesceTx = parseQemuBool('-global', property, setting);
    return;
  }
  if (driver !== 'kvmclock') {
    throw new UsageError(
      `-global ${value}: unknown driver '${driver}'; tsvmm has global properties for kvmclock (${KVMCLOCK_GLOBALS.join(', ')}) and isa-serial (x-coalesce-tx)`,
    );
  }
  switch (property) {
    case 'x-mach-use-reliable-get-clock':
      s.config.kvmclock.machUseReliableGetClock = parseQemuBool('-global', property, setting);
      return;
    case 'check':
      s.config.kvmclock.check = parseQemuBool('-global', property, setting);
      return;
    case 'policy':
      if (!(KVMCLOCK_POLICIES as readonly string[]).includes(setting)) {
        throw new UsageError(
          `-global ${value}: invalid kvmclock policy '${setting}'; use ${KVMCLOCK_POLICIES.join(' or ')}`,
        );
      }
      s.config.kvmclock.policy = setting as KvmClockPolicy;
      return;
    default:
      throw new UsageError(
        `-global ${value}: kvmclock has no property '${property}'; it has ${KVMCLOCK_GLOBALS.join(', ')}`,
      );
  }
}

const KVMCLOCK_GLOBALS = ['policy', 'check', 'x-mach-use-reliable-get-clock'];

function applyKvmclock(s: ParseState, value: string): void {
  const opts = parseQemuOpts('-kvmclock', value);
  onlyProps('-kvmclock', opts, ['timeline']);
  const file = opts.props.get('timeline');
  if (file === undefined || file === '' || file === 'on') {
    throw new UsageError(`-kvmclock ${value}: give timeline=FILE.html or timeline=FILE.svg`);
  }
  if (!/\.(html?|svg)$/i.test(file)) {
    throw new UsageError(
      `-kvmclock ${value}: the timeline is written as HTML or SVG; name the file FILE.html or FILE.svg`,
    );
  }
  s.config.kvmclock.timeline = file;
}
