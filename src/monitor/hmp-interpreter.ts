import { QmpError } from './qmp-error.js';
import type { QmpVersionInfo } from './version.js';
import { contCommand, isTracePattern, stopCommand, type VmControl } from './vm-control.js';

/** The outcome of one HMP command line. */
export interface HmpResult {
  /** What the monitor prints, lines ended by "\r\n" as QEMU's monitor writes them. */
  output: string;
  /** The command was quit: the caller exits once the output is delivered. */
  quit: boolean;
}

interface HmpCommand {
  names: string[];
  params: string;
  help: string;
  run(args: string): Promise<string> | string;
}

/**
 * A small human monitor (HMP) with QEMU's command names and output:
 * `info status|version|kvm|name|cpus|registers|lapic|trace-events`, `stop`, `cont`/`c`,
 * `system_reset`, `trace-event NAME on|off`, `quit`/`q`, `help`/`?`.
 * Unknown commands get QEMU's "unknown command: 'x'". Used both by
 * `-monitor stdio` (hmp.ts) and by the QMP command human-monitor-command.
 */
export class HmpInterpreter {
  private readonly vm: VmControl;
  private readonly version: QmpVersionInfo;
  private readonly commands: HmpCommand[];
  private readonly infoCommands: HmpCommand[];

  constructor(options: { vm: VmControl; version: QmpVersionInfo }) {
    this.vm = options.vm;
    this.version = options.version;
    const vm = this.vm;
    this.infoCommands = [
      {
        names: ['status'],
        params: '',
        help: 'show the current VM status (running|paused)',
        run: () => {
          const { running, status } = vm.status();
          // QEMU names the state only when it is not plain running or paused.
          const detail = !running && status !== 'paused' ? ` (${status})` : '';
          return `VM status: ${running ? 'running' : 'paused'}${detail}\n`;
        },
      },
      {
        names: ['version'],
        params: '',
        help: 'show the version of QEMU this VMM reproduces, and its own',
        run: () => {
          const { major, minor, micro } = this.version.qemu;
          return `${major}.${minor}.${micro} (${this.version.package})\n`;
        },
      },
      {
        names: ['kvm'],
        params: '',
        help: 'show KVM information',
        run: () => {
          const { enabled, present } = vm.kvm;
          return `kvm support: ${present ? (enabled ? 'enabled' : 'disabled') : 'not compiled'}\n`;
        },
      },
      {
        names: ['name'],
        params: '',
        help: 'show the current VM name',
        run: () => (vm.name !== undefined ? `${vm.name}\n` : ''),
      },
      {
        names: ['cpus'],
        params: '',
        help: 'show infos for each CPU',
        run: () =>
          vm
            .cpus()
            .map((c, i) => `${i === 0 ? '*' : ' '} CPU #${c.cpuIndex}: thread_id=${c.threadId}\n`)
            .join(''),
      },
      {
        names: ['registers'],
        params: '[-a]',
        help: 'show the cpu registers (-a: all CPUs)',
        run: (args) => this.perCpu('registers', args === '-a', args, (i) => vm.cpuRegisters?.(i)),
      },
      {
        names: ['lapic'],
        params: '[apic-id]',
        help: 'show the local APIC state (apic-id: that CPU, else the first)',
        run: (args) => this.perCpu('lapic', false, args, (i) => vm.cpuLapic?.(i)),
      },
      {
        names: ['trace-events'],
        params: '[name]',
        help: 'show available trace-events & their state',
        run: (args) =>
          vm.traceEvents
            .list(args === '' ? '*' : args)
            .map((e) => `${e.name} : state ${e.state === 'enabled' ? 1 : 0}\n`)
            .join(''),
      },
    ];
    this.commands = [
      {
        names: ['help', '?'],
        params: '[cmd]',
        help: 'show the help',
        run: (args) => this.help(args),
      },
      {
        names: ['info'],
        params: '[subcommand]',
        help: 'show various information about the system state',
        run: () => this.helpTable(this.infoCommands, 'info '),
      },
      {
        names: ['stop', 's'],
        params: '',
        help: 'stop emulation',
        run: async () => {
          await stopCommand(vm);
          return '';
        },
      },
      {
        names: ['cont', 'c'],
        params: '',
        help: 'resume emulation',
        run: async () => {
          await contCommand(vm);
          return '';
        },
      },
      {
        names: ['system_reset'],
        params: '',
        help: 'reset the system',
        run: async () => {
          await vm.systemReset();
          return '';
        },
      },
      {
        names: ['trace-event'],
        params: 'name on|off',
        help: 'changes status of a specific trace event',
        run: (args) => this.traceEvent(args),
      },
      {
        names: ['quit', 'q'],
        params: '',
        help: 'quit the emulator',
        run: () => '',
      },
    ];
  }

  /** Runs one command line. Never throws: errors are printed, as in QEMU. */
  async execute(line: string): Promise<HmpResult> {
    const output = await this.run(line);
    const name = line.trim().split(/\s+/)[0] ?? '';
    return { output: output.replace(/\r?\n/g, '\r\n'), quit: name === 'quit' || name === 'q' };
  }

  private async run(line: string): Promise<string> {
    const { word, rest } = splitWord(line);
    if (word === '') return '';
    const command = find(this.commands, word);
    if (command === undefined)
      return `unknown command: '${line.slice(0, line.indexOf(word) + word.length)}'\n`;
    let target = command;
    let args = rest;
    if (command.names[0] === 'info' && rest !== '') {
      const sub = splitWord(rest);
      const info = find(this.infoCommands, sub.word);
      if (info === undefined) {
        const end = line.indexOf(sub.word, line.indexOf(word) + word.length) + sub.word.length;
        return `unknown command: '${line.slice(0, end)}'\n`;
      }
      target = info;
      args = sub.rest;
    }
    if (target.params === '' && args !== '') {
      return `${target.names[0]}: extraneous characters at the end of line\n`;
    }
    try {
      return await target.run(args);
    } catch (e) {
      // QEMU prints a failed command's error with this prefix.
      const message = e instanceof QmpError || e instanceof Error ? e.message : String(e);
      return `Error: ${message}\n`;
    }
  }

  /**
   * `info registers` and `info lapic`: one CPU (the first, or the one an
   * apic-id names; tsvmm's APIC ids are the CPU indexes) or, with `all`,
   * each CPU under QEMU's "CPU#N" heading.
   */
  private async perCpu(
    what: string,
    all: boolean,
    args: string,
    read: (cpuIndex: number) => Promise<string> | undefined,
  ): Promise<string> {
    const cpus = this.vm.cpus().map((c) => c.cpuIndex);
    let chosen = cpus.slice(0, 1);
    if (all) chosen = cpus;
    else if (args !== '' && what === 'lapic') {
      const id = Number(args);
      if (!/^\d+$/.test(args) || !cpus.includes(id)) return `Error: no CPU with apic-id ${args}\n`;
      chosen = [id];
    } else if (args !== '') {
      return `info ${what}: expected -a or nothing, not '${args}'\n`;
    }
    const parts: string[] = [];
    for (const cpu of chosen) {
      const text = await read(cpu);
      if (text === undefined) return `Error: no vCPU to read the ${what} of\n`;
      parts.push(all ? `\nCPU#${cpu}\n${text}\n` : `${text}\n`);
    }
    return parts.join('');
  }

  private traceEvent(args: string): string {
    const parts = args.split(/\s+/).filter((p) => p !== '');
    const [name, state] = parts;
    if (parts.length !== 2 || (state !== 'on' && state !== 'off')) {
      return 'trace-event: expected a name and on|off, for example: trace-event kvm_run on\n';
    }
    const events = this.vm.traceEvents.list(name!);
    if (!isTracePattern(name!) && events.length === 0) return `Error: unknown event "${name}"\n`;
    const unavailable = events.find((e) => e.state === 'unavailable');
    if (unavailable !== undefined) return `Error: event "${unavailable.name}" is disabled\n`;
    this.vm.traceEvents.set(name!, state === 'on');
    return '';
  }

  private help(args: string): string {
    if (args === '') return this.helpTable(this.commands, '');
    if (args === 'info') return this.helpTable(this.infoCommands, 'info ');
    const command = find(this.commands, args);
    if (command === undefined) return `unknown command: '${args}'\n`;
    return this.helpTable([command], '');
  }

  private helpTable(commands: HmpCommand[], prefix: string): string {
    return commands.map((c) => `${prefix}${c.names.join('|')} ${c.params} -- ${c.help}\n`).join('');
  }
}

function find(commands: HmpCommand[], word: string): HmpCommand | undefined {
  return commands.find((c) => c.names.includes(word));
}

function splitWord(text: string): { word: string; rest: string } {
  const trimmed = text.trimStart();
  const match = /^\S+/.exec(trimmed);
  const word = match?.[0] ?? '';
  return { word, rest: trimmed.slice(word.length).trim() };
}
