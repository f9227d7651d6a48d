import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { TRACE_EVENT_NAMES } from '../trace/events.js';
import { helpText, versionText } from './help.js';
import { type CliAction, OPTION_SPECS, parseCommandLine, type VmConfig } from './options.js';
import { parseQmpSpec } from './qmp-spec.js';
import { UsageError } from './usage-error.js';

const MiB = 2 ** 20;

function run(...argv: string[]): VmConfig {
  const action: CliAction = parseCommandLine(argv);
  assert.equal(action.action, 'run');
  return (action as { config: VmConfig }).config;
}

/** Asserts a UsageError (code CLI_USAGE) whose message matches. */
function refuses(argv: string[], message: RegExp): void {
  assert.throws(
    () => parseCommandLine(argv),
    (e: unknown) => {
      assert.ok(e instanceof UsageError, `UsageError for ${argv.join(' ')}`);
      assert.equal(e.code, 'CLI_USAGE');
      assert.match(e.message, message);
      return true;
    },
  );
}

describe('command line: defaults', () => {
  it('runs a KVM pc machine with one host vCPU, 128 MiB, serial on stdio, no monitor', () => {
    const c = run();
    assert.equal(c.accel, 'kvm');
    assert.equal(c.machine, 'pc');
    assert.deepEqual(c.cpu, { model: 'host', features: [] });
    assert.deepEqual(c.smp, { cpus: 1, maxcpus: 1, sockets: 1, dies: 1, cores: 1, threads: 1 });
    assert.equal(c.memoryBytes, 128 * MiB);
    assert.equal(c.startPaused, false);
    assert.deepEqual(c.qmp, []);
    assert.equal(c.monitor, 'none');
    assert.deepEqual(c.serial, { kind: 'stdio' });
    assert.equal(c.kernel, undefined);
    assert.equal(c.incoming, undefined);
    assert.deepEqual(c.faults, {
      noKvmclockCtrl: false,
      unreliableGetClock: false,
      vcpuIgnoresKicks: false,
      shutdownDeadlineMs: 1500,
      skipSetClockOnRestore: false,
      setClockBackwardsNs: 0n,
    });
    assert.deepEqual(c.kvmclock, {
      machUseReliableGetClock: true,
      policy: 'freeze',
      check: false,
    });
  });
});

describe('command line: each option', () => {
  it('-accel kvm, -accel kvm,kernel-irqchip=on, -enable-kvm', () => {
    assert.equal(run('-accel', 'kvm').accel, 'kvm');
    assert.equal(run('-accel', 'kvm,kernel-irqchip=on').accel, 'kvm');
    assert.equal(run('-accel', 'accel=kvm').accel, 'kvm');
    assert.equal(run('-enable-kvm').accel, 'kvm');
  });

  it('-machine / -M with pc, q35, versioned names, type= and accel=kvm', () => {
    assert.equal(run('-machine', 'q35').machine, 'q35');
    assert.equal(run('-M', 'pc').machine, 'pc');
    assert.equal(run('-machine', 'type=q35,accel=kvm').machine, 'q35');
    assert.equal(run('-machine', 'pc-q35-9.2').machine, 'pc-q35-9.2');
    assert.equal(run('-machine', 'pc-i440fx-8.0').machine, 'pc-i440fx-8.0');
    assert.equal(run('-machine', 'accel=kvm').machine, 'pc');
  });

  it('-cpu host', () => {
    assert.deepEqual(run('-cpu', 'host').cpu, { model: 'host', features: [] });
  });

  it('-cpu host with flags: +NAME, -NAME, NAME=on|off, in order, QEMU spellings folded', () => {
    assert.deepEqual(run('-cpu', 'host,-cx16,+x2apic,xsave=off,sse4.1=on,SSE4_2=no').cpu, {
      model: 'host',
      features: [
        { name: 'cx16', on: false },
        { name: 'x2apic', on: true },
        { name: 'xsave', on: false },
        { name: 'sse4-1', on: true },
        { name: 'sse4-2', on: false },
      ],
    });
    // A flag may come twice; both are kept and the later one wins when applied.
    assert.deepEqual(run('-cpu', 'host,-cx16,cx16=on').cpu.features, [
      { name: 'cx16', on: false },
      { name: 'cx16', on: true },
    ]);
    // Aliases: sse3 is pni, xd is nx.
    assert.deepEqual(run('-cpu', 'host,-sse3,-xd').cpu.features, [
      { name: 'pni', on: false },
      { name: 'nx', on: false },
    ]);
  });

  it('-cpu help lists the model and the flags, with an example', () => {
    const action = parseCommandLine(['-cpu', 'help']);
    assert.equal(action.action, 'list');
    const text = (action as { text: string }).text;
    assert.match(text, /^x86 host /m);
    assert.match(text, /-cpu host,-cx16,-xsave/);
    for (const flag of ['cx16', 'xsave', 'x2apic', 'kvmclock', 'avx2', 'invtsc']) {
      assert.match(text, new RegExp(`\\s${flag}(\\s|$)`), `${flag} listed`);
    }
  });

  it('-smp N and the topology forms', () => {
    assert.deepEqual(run('-smp', '4').smp, {
      cpus: 4,
      maxcpus: 4,
      sockets: 1,
      dies: 1,
      cores: 4,
      threads: 1,
    });
    assert.deepEqual(run('-smp', 'cpus=2,sockets=2').smp, {
      cpus: 2,
      maxcpus: 2,
      sockets: 2,
      dies: 1,
      cores: 1,
      threads: 1,
    });
    assert.deepEqual(run('-smp', 'sockets=2,cores=2,threads=2').smp, {
      cpus: 8,
      maxcpus: 8,
      sockets: 2,
      dies: 1,
      cores: 2,
      threads: 2,
    });
    assert.deepEqual(run('-smp', '2,maxcpus=4').smp, {
      cpus: 2,
      maxcpus: 4,
      sockets: 1,
      dies: 1,
      cores: 4,
      threads: 1,
    });
    assert.equal(run('-smp', '255').smp.cpus, 255);
  });

  it('-m with QEMU suffixes; a plain number is MiB; size=', () => {
    assert.equal(run('-m', '512').memoryBytes, 512 * MiB);
    assert.equal(run('-m', '2G').memoryBytes, 2048 * MiB);
    assert.equal(run('-m', '2g').memoryBytes, 2048 * MiB);
    assert.equal(run('-m', '1.5G').memoryBytes, 1536 * MiB);
    assert.equal(run('-m', '65536K').memoryBytes, 64 * MiB);
    assert.equal(run('-m', 'size=1T').memoryBytes, 1024 * 1024 * MiB);
    assert.equal(run('-m', '256M').memoryBytes, 256 * MiB);
    // Rounded up to 8 KiB as QEMU does.
    assert.equal(run('-m', '12289B').memoryBytes, 16384);
  });

  it('-kernel, -initrd, -append', () => {
    const c = run(
      '-kernel',
      '/b/bzImage',
      '-initrd',
      '/b/initrd',
      '-append',
      'console=ttyS0 quiet',
    );
    assert.equal(c.kernel, '/b/bzImage');
    assert.equal(c.initrd, '/b/initrd');
    assert.equal(c.append, 'console=ttyS0 quiet');
  });

  it('-S', () => {
    assert.equal(run('-S').startPaused, true);
  });

  it('-qmp unix and tcp, repeatable, with wait defaulting to on as in QEMU', () => {
    const c = run(
      '-qmp',
      'unix:/tmp/a.sock,server=on,wait=off',
      '-qmp',
      'tcp:127.0.0.1:4444,server=on,wait=off',
      '-qmp',
      'unix:/tmp/b,,c.sock,server,nowait',
      '-qmp',
      'tcp::5555,server=on',
      '-qmp',
      'tcp:[::1]:0,server=on,wait=off',
    );
    assert.deepEqual(c.qmp, [
      { kind: 'unix', path: '/tmp/a.sock', wait: false },
      { kind: 'tcp', host: '127.0.0.1', port: 4444, wait: false },
      { kind: 'unix', path: '/tmp/b,c.sock', wait: false },
      { kind: 'tcp', host: '', port: 5555, wait: true },
      { kind: 'tcp', host: '::1', port: 0, wait: false },
    ]);
  });

  it('-monitor stdio|none; the monitor on stdio moves the default serial off it', () => {
    const c = run('-monitor', 'stdio');
    assert.equal(c.monitor, 'stdio');
    assert.deepEqual(c.serial, { kind: 'none' });
    assert.equal(run('-monitor', 'none').monitor, 'none');
    const both = run('-monitor', 'stdio', '-serial', 'file:/tmp/serial.log');
    assert.deepEqual(both.serial, { kind: 'file', path: '/tmp/serial.log' });
  });

  it('-serial stdio|file:PATH|none', () => {
    assert.deepEqual(run('-serial', 'stdio').serial, { kind: 'stdio' });
    assert.deepEqual(run('-serial', 'none').serial, { kind: 'none' });
    assert.deepEqual(run('-serial', 'file:/tmp/s.log').serial, {
      kind: 'file',
      path: '/tmp/s.log',
    });
  });

  it('-nographic, -display none, -no-reboot', () => {
    const c = run('-nographic', '-display', 'none', '-no-reboot');
    assert.equal(c.nographic, true);
    assert.deepEqual(c.serial, { kind: 'stdio' });
    assert.equal(c.noReboot, true);
    assert.equal(c.memPrealloc, false);
  });

  it('-mem-prealloc', () => {
    assert.equal(run('-mem-prealloc').memPrealloc, true);
  });

  it('-incoming URI|defer', () => {
    assert.deepEqual(run('-incoming', 'defer').incoming, { kind: 'defer' });
    assert.deepEqual(run('-incoming', 'file:/tmp/vm.state').incoming, {
      kind: 'uri',
      uri: 'file:/tmp/vm.state',
    });
    assert.deepEqual(run('-incoming', 'tcp:0:4444').incoming, { kind: 'uri', uri: 'tcp:0:4444' });
  });

  it('-name NAME and -name guest=NAME,process=P,debug-threads=on', () => {
    assert.equal(run('-name', 'vm1').name, 'vm1');
    const c = run('-name', 'guest=vm2,process=tsvmm-vm2,debug-threads=on');
    assert.equal(c.name, 'vm2');
    assert.equal(c.processName, 'tsvmm-vm2');
    assert.equal(c.debugThreads, true);
  });

  it('-trace PATTERN|enable=|events=|file= (repeatable), -trace-backtrace, -D', () => {
    const c = run(
      '-trace',
      'kvm_*',
      '-trace',
      'enable=vm_state_notify',
      '-trace',
      'events=/tmp/events',
      '-trace',
      'file=/tmp/trace.log',
      '-trace-backtrace',
      '-D',
      '/tmp/tsvmm.log',
    );
    assert.deepEqual(c.trace, {
      enable: ['kvm_*', 'vm_state_notify'],
      eventFiles: ['/tmp/events'],
      file: '/tmp/trace.log',
      backtrace: true,
    });
    assert.equal(c.logFile, '/tmp/tsvmm.log');
  });

  it('-pidfile', () => {
    assert.equal(run('-pidfile', '/run/vm.pid').pidfile, '/run/vm.pid');
  });

  it('fault injection and the kvmclock global, both spellings', () => {
    const c = run('-x-no-kvmclock-ctrl', '-x-unreliable-get-clock', '-x-vcpu-ignores-kicks');
    assert.deepEqual(c.faults, {
      noKvmclockCtrl: true,
      unreliableGetClock: true,
      vcpuIgnoresKicks: true,
      shutdownDeadlineMs: 1500,
      skipSetClockOnRestore: false,
      setClockBackwardsNs: 0n,
    });
    assert.equal(
      run('-global', 'kvmclock.x-mach-use-reliable-get-clock=off').kvmclock.machUseReliableGetClock,
      false,
    );
    assert.equal(run().serialDevice.coalesceTx, true, 'console bytes are coalesced by default');
    assert.equal(run('-global', 'isa-serial.x-coalesce-tx=off').serialDevice.coalesceTx, false);
    assert.equal(
      run('-global', 'driver=kvmclock,property=x-mach-use-reliable-get-clock,value=on').kvmclock
        .machUseReliableGetClock,
      true,
    );
  });

  it('kvmclock policy, check and timeline; the new faults', () => {
    const c = run(
      '-global',
      'kvmclock.policy=realtime',
      '-global',
      'driver=kvmclock,property=check,value=on',
      '-kvmclock',
      'timeline=/tmp/t.html',
      '-x-skip-set-clock-on-restore',
      '-x-clock-set-backwards',
      '1000000000',
    );
    assert.deepEqual(c.kvmclock, {
      machUseReliableGetClock: true,
      policy: 'realtime',
      check: true,
      timeline: '/tmp/t.html',
    });
    assert.equal(c.faults.skipSetClockOnRestore, true);
    assert.equal(run('-x-shutdown-deadline', '12000').faults.shutdownDeadlineMs, 12000);
    assert.equal(c.faults.setClockBackwardsNs, 1_000_000_000n);
    assert.equal(run('-global', 'kvmclock.policy=freeze').kvmclock.policy, 'freeze');
    assert.equal(run('-kvmclock', 'timeline=x.svg').kvmclock.timeline, 'x.svg');
  });

  it('-h/--help/-help and -version/--version', () => {
    for (const a of ['-h', '--help', '-help', '--h'])
      assert.deepEqual(parseCommandLine([a]), { action: 'help' });
    for (const a of ['-version', '--version']) {
      assert.deepEqual(parseCommandLine([a]), { action: 'version' });
    }
    // Help wins wherever it appears, as soon as it is reached.
    assert.deepEqual(parseCommandLine(['-m', '1G', '--help', '-bogus']), { action: 'help' });
  });

  it('machine, cpu and accel "help" list what is supported', () => {
    for (const argv of [
      ['-machine', 'help'],
      ['-cpu', 'help'],
      ['-accel', 'help'],
    ]) {
      const action = parseCommandLine(argv);
      assert.equal(action.action, 'list');
      assert.ok((action as { text: string }).text.length > 0);
    }
  });

  it('-trace help lists every trace event, one a line, as QEMU does', () => {
    const action = parseCommandLine(['-trace', 'help']);
    assert.equal(action.action, 'list');
    const lines = (action as { text: string }).text.trimEnd().split('\n');
    assert.equal(lines[0], 'Possible trace events:');
    assert.deepEqual(lines.slice(1), [...TRACE_EVENT_NAMES]);
    assert.ok(lines.includes('kvmclock_ctrl'));
  });
});

describe('command line: combinations', () => {
  it('the command line of the issue: double dashes, many options, order free', () => {
    const c = run(
      '--accel',
      'kvm',
      '--machine',
      'q35,accel=kvm',
      '--cpu',
      'host',
      '--smp',
      '2',
      '--m',
      '1G',
      '--kernel',
      'bz',
      '--append',
      'console=ttyS0',
      '-S',
      '--qmp',
      'unix:/tmp/q.sock,server=on,wait=off',
      '--nographic',
      '--no-reboot',
      '--name',
      'vm',
    );
    assert.equal(c.machine, 'q35');
    assert.equal(c.smp.cpus, 2);
    assert.equal(c.memoryBytes, 1024 * MiB);
    assert.equal(c.startPaused, true);
    assert.equal(c.qmp.length, 1);
    assert.equal(c.nographic, true);
    assert.equal(c.name, 'vm');
  });

  it('a later scalar option wins, as in QEMU', () => {
    assert.equal(run('-m', '1G', '-m', '2G').memoryBytes, 2048 * MiB);
    assert.equal(run('-name', 'a', '-name', 'b').name, 'b');
  });

  it('-incoming with -S and QMP, as a migration destination is started', () => {
    const c = run('-incoming', 'defer', '-S', '-qmp', 'unix:/tmp/d.sock,server=on,wait=off');
    assert.deepEqual(c.incoming, { kind: 'defer' });
    assert.equal(c.startPaused, true);
  });
});

describe('command line: errors name the option', () => {
  const cases: [string[], RegExp][] = [
    [['-bogus'], /^-bogus: invalid option/],
    [['--bogus'], /^--bogus: invalid option/],
    [['disk.img'], /^disk\.img: unexpected argument/],
    [['-m'], /^-m: requires an argument$/],
    [['-kernel'], /^-kernel: requires an argument$/],
    [['-accel', 'tcg'], /^-accel tcg: tsvmm runs guests with KVM only/],
    [['-accel', 'kvm,kernel-irqchip=split'], /kernel-irqchip=on/],
    [['-accel', 'kvm,thread=multi'], /-accel: property 'thread' is not supported/],
    [['-machine', 'virt'], /unsupported machine type 'virt'/],
    [['-M', 'microvm'], /^-M microvm: unsupported machine type/],
    [['-machine', 'q35,accel=tcg'], /accel=tcg: tsvmm runs guests with KVM only/],
    [['-machine', 'q35,usb=off'], /property 'usb' is not supported/],
    [['-cpu', 'max'], /^-cpu max: tsvmm passes the host CPU through/],
    [
      ['-cpu', 'host,+cx61'],
      /^-cpu host,\+cx61: CPU feature 'cx61' is unknown; did you mean 'cx16'\?/,
    ],
    [['-cpu', 'host,xsav=off'], /CPU feature 'xsav' is unknown; did you mean 'xsave'\?/],
    [['-cpu', 'host,-avx-512f'], /CPU feature 'avx-512f' is unknown; did you mean 'avx512f'\?/],
    [['-cpu', 'host,-qwertyuiop'], /CPU feature 'qwertyuiop' is unknown \(-cpu help lists them\)$/],
    [['-cpu', 'host,cx16'], /'cx16': write \+cx16, -cx16 or cx16=on\|off/],
    [['-cpu', 'host,cx16=maybe'], /cx16=maybe: expected 'on' or 'off'/],
    [['-cpu', 'host,+cx16=on'], /'\+cx16=on': write \+NAME, -NAME or NAME=on\|off, not both/],
    [['-cpu', 'host,,-cx16'], /empty item/],
    [['-cpu', 'max,-cx16'], /^-cpu max,-cx16: tsvmm passes the host CPU through/],
    [['-smp', '0x2'], /-smp: cpus=0x2: expected a whole number/],
    [['-smp', '0'], /-smp 0: invalid CPU topology: cpus=0: .*greater than zero/],
    [['-smp', '2,threads=0'], /threads=0: .*greater than zero/],
    [['-smp', '256'], /at most 255 vCPUs/],
    [['-smp', '4,sockets=3'], /invalid CPU topology/],
    [['-smp', '8,maxcpus=4'], /cpus \(8\) must not exceed maxcpus \(4\)/],
    [['-smp', '2,clusters=1'], /property 'clusters' is not supported/],
    [['-m', '1X'], /^-m 1X: invalid memory size '1X'/],
    [['-m', '0'], /^-m 0: memory size '0' is zero/],
    [['-m', '1.5B'], /^-m 1.5B: .*cannot have a fraction/],
    [['-m', '1G,maxmem=4G'], /property 'maxmem' is not supported/],
    [['-initrd', 'x'], /^-initrd only allowed with -kernel option$/],
    [['-append', 'x'], /^-append only allowed with -kernel option$/],
    [['-qmp', 'unix:/tmp/x'], /server=on/],
    [['-qmp', 'unix:/tmp/x,server=off'], /server=on/],
    [['-qmp', 'stdio'], /unsupported character device 'stdio'/],
    [['-qmp', 'tcp:localhost,server=on'], /expected tcp:HOST:PORT/],
    [['-qmp', 'tcp:h:70000,server=on'], /out of range/],
    [['-qmp', 'unix:,server=on'], /path is empty/],
    [['-qmp', 'unix:/x,server=on,wait=maybe'], /wait=maybe: expected 'on' or 'off'/],
    [['-qmp', 'unix:/x,server=on,telnet=on'], /property 'telnet' is not supported/],
    [['-monitor', 'vc'], /^-monitor vc:/],
    [['-serial', 'pty'], /^-serial pty: use stdio, file:PATH or none/],
    [['-serial', 'stdio', '-serial', 'none'], /give -serial once/],
    [['-monitor', 'stdio', '-serial', 'stdio'], /cannot use stdio by multiple character devices/],
    [['-display', 'gtk'], /^-display gtk: tsvmm has no display/],
    [['-incoming', 'somewhere'], /unknown migration protocol/],
    [['-name', 'guest=a,color=red'], /property 'color' is not supported/],
    [['-name', 'a,debug-threads=maybe'], /expected 'on' or 'off'/],
    [['-trace', 'bogus=1'], /property 'bogus' is not supported/],
    [['-global', 'e1000.mac=x'], /unknown driver 'e1000'; .*policy, check.* isa-serial/],
    [
      ['-global', 'isa-serial.baud=9600'],
      /isa-serial has no property 'baud'; it has x-coalesce-tx/,
    ],
    [['-global', 'isa-serial.x-coalesce-tx=sometimes'], /expected 'on' or 'off'/],
    [['-global', 'kvmclock.speed=2'], /kvmclock has no property 'speed'; it has policy, check/],
    [
      ['-global', 'kvmclock.policy=smear'],
      /invalid kvmclock policy 'smear'; use freeze or realtime/,
    ],
    [['-global', 'kvmclock.check=maybe'], /check=maybe: expected 'on' or 'off'/],
    [['-kvmclock', 'timeline=out.png'], /name the file FILE\.html or FILE\.svg/],
    [['-kvmclock', 'timeline'], /give timeline=FILE/],
    [['-kvmclock', 'graph=x.svg'], /property 'graph' is not supported/],
    [['-x-clock-set-backwards', '-5'], /expected a positive number of nanoseconds/],
    [['-x-shutdown-deadline', '0'], /expected a positive number of milliseconds/],
    [['-global', 'kvmclock.x-mach-use-reliable-get-clock=sometimes'], /expected 'on' or 'off'/],
    [['-global', 'nonsense'], /expected DRIVER\.PROPERTY=VALUE/],
  ];
  for (const [argv, message] of cases) {
    it(`${argv.join(' ')}`, () => refuses(argv, message));
  }
});

describe('command line: help and version text', () => {
  it('the help lists every option the parser accepts', () => {
    const text = helpText();
    for (const spec of OPTION_SPECS) {
      for (const name of spec.names) assert.ok(text.includes(name), `help mentions ${name}`);
    }
    assert.match(text, /^usage: tsvmm/);
  });

  it('the version names tsvmm and the QEMU release it follows', () => {
    assert.match(
      versionText(),
      /^tsvmm version \d+\.\d+\.\d+ \(QMP and command line of QEMU \d+\.\d+\.\d+\)\n$/,
    );
  });

  it('parseQmpSpec is usable alone', () => {
    assert.deepEqual(parseQmpSpec('unix:/run/q,server=on,wait=off'), {
      kind: 'unix',
      path: '/run/q',
      wait: false,
    });
  });
});
