import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { describe, it } from 'node:test';
import { HMP_PROMPT, HmpMonitor } from './hmp.js';
import { HmpInterpreter } from './hmp-interpreter.js';
import { TestVmControl } from './test-vm-control.js';
import { qmpVersionInfo } from './version.js';

function interpreter(vm = new TestVmControl({ name: 'vm1' })) {
  return { vm, hmp: new HmpInterpreter({ vm, version: qmpVersionInfo() }) };
}

async function out(hmp: HmpInterpreter, line: string): Promise<string> {
  return (await hmp.execute(line)).output;
}

describe('HMP interpreter (test double VM)', () => {
  it('prints info status as QEMU does for each state', async () => {
    const { vm, hmp } = interpreter();
    assert.equal(await out(hmp, 'info status'), 'VM status: paused (prelaunch)\r\n');
    vm.state = 'running';
    assert.equal(await out(hmp, 'info status'), 'VM status: running\r\n');
    vm.state = 'paused';
    assert.equal(await out(hmp, '  info   status  '), 'VM status: paused\r\n');
    vm.state = 'postmigrate';
    assert.equal(await out(hmp, 'info status'), 'VM status: paused (postmigrate)\r\n');
  });

  it('stops and continues, with the short names, and reports refusals as Error:', async () => {
    const { vm, hmp } = interpreter();
    assert.equal(await out(hmp, 'c'), '');
    assert.equal(vm.state, 'running');
    assert.equal(await out(hmp, 'stop'), '');
    assert.equal(vm.state, 'paused');
    assert.equal(await out(hmp, 'cont'), '');
    assert.equal(await out(hmp, 's'), '');
    assert.equal(vm.state, 'paused');
    vm.state = 'shutdown';
    assert.equal(await out(hmp, 'cont'), 'Error: Resetting the Virtual Machine is required\r\n');
    assert.equal(await out(hmp, 'system_reset'), '');
    assert.equal(vm.resets, 1);
  });

  it('answers info version, kvm, name, cpus, trace-events', async () => {
    const { hmp } = interpreter();
    assert.match(await out(hmp, 'info version'), /^\d+\.\d+\.\d+ \(tsvmm .+\)\r\n$/);
    assert.equal(await out(hmp, 'info kvm'), 'kvm support: enabled\r\n');
    assert.equal(await out(hmp, 'info name'), 'vm1\r\n');
    assert.equal(
      await out(hmp, 'info cpus'),
      '* CPU #0: thread_id=1000\r\n  CPU #1: thread_id=1001\r\n',
    );
    assert.equal(await out(hmp, 'trace-event kvm_run_exit on'), '');
    assert.match(await out(hmp, 'info trace-events kvm_run*'), /^kvm_run_exit : state 1\r\n$/);
    assert.equal(await out(hmp, 'trace-event nope on'), 'Error: unknown event "nope"\r\n');
  });

  it('answers info registers for the first CPU or all (-a), and info lapic by apic-id', async () => {
    const vm = new TestVmControl({ name: 'vm1' });
    const { hmp } = interpreter(vm);
    assert.equal(
      await out(hmp, 'info registers'),
      'Error: no vCPU to read the registers of\r\n',
      'a VM without vCPU access says so',
    );
    const reads: number[] = [];
    Object.assign(vm, {
      cpuRegisters: async (i: number) => {
        reads.push(i);
        return `RIP=${i}\nRFL=2`;
      },
      cpuLapic: async (i: number) => `LAPIC ID=${i}`,
    });
    assert.equal(await out(hmp, 'info registers'), 'RIP=0\r\nRFL=2\r\n');
    assert.equal(
      await out(hmp, 'info registers -a'),
      '\r\nCPU#0\r\nRIP=0\r\nRFL=2\r\n\r\nCPU#1\r\nRIP=1\r\nRFL=2\r\n',
    );
    assert.deepEqual(reads, [0, 0, 1]);
    assert.equal(
      await out(hmp, 'info registers -x'),
      "info registers: expected -a or nothing, not '-x'\r\n",
    );
    assert.equal(await out(hmp, 'info lapic'), 'LAPIC ID=0\r\n');
    assert.equal(await out(hmp, 'info lapic 1'), 'LAPIC ID=1\r\n');
    assert.equal(await out(hmp, 'info lapic 7'), 'Error: no CPU with apic-id 7\r\n');
    assert.equal(await out(hmp, 'info lapic one'), 'Error: no CPU with apic-id one\r\n');
  });

  it("answers unknown commands with QEMU's message, and refuses extra arguments", async () => {
    const { hmp } = interpreter();
    assert.equal(await out(hmp, 'frob'), "unknown command: 'frob'\r\n");
    assert.equal(await out(hmp, 'info frob'), "unknown command: 'info frob'\r\n");
    assert.equal(await out(hmp, 'stop now'), 'stop: extraneous characters at the end of line\r\n');
    assert.equal(await out(hmp, ''), '');
  });

  it('lists commands in help, and info subcommands in info', async () => {
    const { hmp } = interpreter();
    const help = await out(hmp, 'help');
    for (const name of ['cont|c', 'stop|s', 'quit|q', 'system_reset', 'info']) {
      assert.ok(help.includes(name), `help lists ${name}`);
    }
    assert.match(await out(hmp, 'info'), /info status/);
    assert.equal((await hmp.execute('q')).quit, true);
    assert.equal((await hmp.execute('quit')).quit, true);
    assert.equal((await hmp.execute('info status')).quit, false);
  });
});

describe('HMP on a stream pair (-monitor stdio)', () => {
  it('prints the banner and (qemu) prompt, runs lines in order, quits after printing', async () => {
    const { vm, hmp } = interpreter();
    const input = new PassThrough();
    const output = new PassThrough();
    let text = '';
    output.on('data', (chunk: Buffer) => {
      text += chunk.toString();
    });
    const quit = new Promise<string>((resolve) => {
      const monitor = new HmpMonitor({
        input,
        output,
        interpreter: hmp,
        terminal: false,
        banner: 'tsvmm monitor - type "help" for more information',
        onQuit: () => resolve(text),
      });
      monitor.start();
    });
    input.write('info status\ncont\ninfo status\n');
    input.write('quit\n');
    const seen = await quit;
    assert.equal(HMP_PROMPT, '(qemu) ');
    assert.equal(
      seen,
      'tsvmm monitor - type "help" for more information\r\n' +
        '(qemu) VM status: paused (prelaunch)\r\n' +
        '(qemu) (qemu) VM status: running\r\n' +
        '(qemu) ',
    );
    assert.equal(vm.state, 'running');
    input.destroy();
    output.destroy();
  });

  it('reports end of input to onClose', async () => {
    const { hmp } = interpreter();
    const input = new PassThrough();
    const output = new PassThrough();
    output.resume();
    const closed = new Promise<void>((resolve) => {
      new HmpMonitor({
        input,
        output,
        interpreter: hmp,
        terminal: false,
        onQuit: () => {},
        onClose: resolve,
      }).start();
    });
    input.end();
    await closed;
    output.destroy();
  });
});
