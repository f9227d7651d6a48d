// End-to-end tests of the tsvmm command line that need no KVM: each spawns
// `node dist/cli/main.cjs` (test-support/tsvmm-process.ts). The VM tests are
// in main.kvm.test.ts.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  assertCleanError,
  QUICK_EXIT_MS,
  runToExit,
  TSVMM_MAIN,
} from '../test-support/tsvmm-process.js';
import { versionText } from './help.js';
import { OPTION_SPECS } from './options.js';

describe('tsvmm command line (no KVM needed)', () => {
  test('--help prints the usage with every option and exits 0', async (t) => {
    const r = await runToExit(t, ['--help']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
    assert.match(r.stdout, /^usage: tsvmm \[options\]\n/);
    const lines = r.stdout.split('\n');
    for (const spec of OPTION_SPECS) {
      const row = `  ${spec.names.join(', ')}${spec.arg !== undefined ? ` ${spec.arg}` : ''}`;
      assert.ok(lines.includes(row), `the help lists ${JSON.stringify(row)}`);
      assert.ok(lines.includes(`        ${spec.help}`), `the help explains ${spec.names[0]}`);
    }
  });

  test('-version prints the version and exits 0', async (t) => {
    const r = await runToExit(t, ['-version']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, versionText());
    assert.match(r.stdout, /^tsvmm version \S+ \(QMP and command line of QEMU \d+\.\d+\.\d+\)\n$/);
    assert.equal(r.stderr, '');
  });

  test('an unknown option exits 1 naming it', async (t) => {
    const r = await runToExit(t, ['-m', '256', '-no-such-option']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, 'tsvmm: -no-such-option: invalid option (see --help)\n');
  });

  test('-smp 0 exits 1: CPU topology parameters must be greater than zero', async (t) => {
    const r = await runToExit(t, ['-smp', '0']);
    assert.equal(r.code, 1);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: -smp 0: invalid CPU topology: .*greater than zero\n$/);
    // Refused while parsing, before any attempt to open KVM.
    assert.doesNotMatch(r.stderr, /\/dev\/kvm/);
  });

  test('a -kernel that is missing or not a kernel is refused before KVM is opened', async (t) => {
    const missing = await runToExit(t, ['-kernel', '/nonexistent/bzImage']);
    assert.equal(missing.code, 1);
    assertCleanError(missing.stderr);
    assert.match(missing.stderr, /^tsvmm: -kernel \/nonexistent\/bzImage: ENOENT/);
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-kernel-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const corrupt = join(dir, 'bzImage');
    writeFileSync(corrupt, Buffer.alloc(8192, 0x5a));
    const r = await runToExit(t, ['-kernel', corrupt]);
    assert.equal(r.code, 1);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: .*not a Linux kernel/);
    assert.doesNotMatch(r.stderr, /\/dev\/kvm/);
  });

  test('-append without -kernel is refused', async (t) => {
    const r = await runToExit(t, ['-append', 'console=ttyS0']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'tsvmm: -append only allowed with -kernel option\n');
  });

  test('without KVM, running a VM exits 1 naming /dev/kvm, with no stack trace', () => {
    // Run where /dev/kvm cannot be found whatever the host has: in a mount
    // namespace of our own with an empty /dev (needs root, as CI is).
    const r = spawnSync(
      'unshare',
      [
        '--mount',
        '--propagation',
        'private',
        'sh',
        '-c',
        'mount -t tmpfs tmpfs /dev && exec "$0" "$@"',
        process.execPath,
        TSVMM_MAIN,
      ],
      { encoding: 'utf8', timeout: QUICK_EXIT_MS },
    );
    assert.equal(r.status, 1, r.stderr);
    assertCleanError(r.stderr);
    assert.match(r.stderr, /^tsvmm: cannot open \/dev\/kvm \(ENOENT\): /);
    assert.equal(r.stderr.split('\n').length, 2, 'one line');
  });
});
