/**
 * `-monitor stdio` driven through a pseudo-terminal, as a person types
 * into it. Python's pty module gives the terminal (it is on every machine
 * we run on); tsvmm sees a TTY on stdin and stdout.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import { requireKvm } from '../test-support/kvm.js';
import { waitFor } from '../test-support/machine.js';
import { scaled } from '../test-support/time-scale.js';
import { deathSignalPrefix, killByPid, TSVMM_MAIN } from '../test-support/tsvmm-process.js';

const PTY_SPAWN = 'import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)';

test('the human monitor on a terminal: info status, cont, stop, info registers and lapic, quit', {
  timeout: scaled(60_000),
}, async (t) => {
  if (!requireKvm(t)) return;
  // tsvmm is python's child, not ours: the kernel kills it when python
  // dies (setpriv's PR_SET_PDEATHSIG), and python when this process dies,
  // so killing python by its pid on the way out ends both.
  const argv = [
    ...deathSignalPrefix(),
    'python3',
    '-c',
    PTY_SPAWN,
    ...deathSignalPrefix(),
    process.execPath,
    TSVMM_MAIN,
    '-S',
    '-monitor',
    'stdio',
    '-serial',
    'none',
  ];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  t.after(() => killByPid(child, 'SIGKILL'));
  let screen = '';
  child.stdout.on('data', (d: Buffer) => {
    screen += d.toString('utf8');
  });
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  );
  const type = async (line: string, expect: RegExp) => {
    const from = screen.length;
    child.stdin.write(`${line}\r`);
    await waitFor(
      `${JSON.stringify(line)} to answer ${expect}`,
      () => expect.test(screen.slice(from)),
      15_000,
    );
  };

  await waitFor('the prompt', () => screen.includes('(qemu) '), 20_000);
  await type('info status', /VM status: paused \(prelaunch\)/);
  await type('cont', /\(qemu\) /);
  await type('info status', /VM status: running/);
  await type('stop', /\(qemu\) /);
  await type('info status', /VM status: paused/);
  // The probe guest runs in 64-bit mode, so EFER has LME and LMA (0x500).
  await type(
    'info registers',
    /RIP=[0-9a-f]{16} RFL=[0-9a-f]{8} CPL=0 HLT=[01] MP=\w+[\s\S]*EFER=0{13}[5d]00/,
  );
  await type('info lapic', /LAPIC ID=0 [\s\S]*LVTT=[0-9a-f]{8} \(/);
  child.stdin.write('quit\r');
  assert.equal(await exited, 0);
});
