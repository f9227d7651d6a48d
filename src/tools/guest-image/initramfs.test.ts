import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import {
  BUSYBOX_APPLETS,
  buildInitramfs,
  GUEST_READY_MARKER,
  INIT_SCRIPT,
  initramfsEntries,
} from './initramfs.js';

const FAKE_BUSYBOX = Buffer.from('\x7fELF not really busybox\n', 'latin1');

test('the initramfs holds busybox, /init, /dev/console and the applet links', () => {
  const entries = initramfsEntries({ busybox: FAKE_BUSYBOX });
  const byPath = new Map(entries.map((e) => [e.path, e]));
  const busybox = byPath.get('bin/busybox');
  assert.ok(busybox?.kind === 'file' && busybox.mode === 0o755 && busybox.data === FAKE_BUSYBOX);
  const init = byPath.get('init');
  assert.ok(init?.kind === 'file' && init.mode === 0o755);
  assert.equal(Buffer.from(init.data).toString('utf8'), INIT_SCRIPT);
  assert.deepEqual(byPath.get('dev/console'), {
    kind: 'chardev',
    path: 'dev/console',
    mode: 0o600,
    major: 5,
    minor: 1,
  });
  for (const dir of ['proc', 'sys', 'dev', 'tmp', 'bin'])
    assert.equal(byPath.get(dir)?.kind, 'dir');
  for (const applet of ['sh', 'mount', 'nproc', 'cat', 'echo', 'setsid', 'cttyhack', 'poweroff']) {
    assert.ok(BUSYBOX_APPLETS.includes(applet), applet);
    assert.deepEqual(byPath.get(`bin/${applet}`), {
      kind: 'symlink',
      path: `bin/${applet}`,
      target: 'busybox',
    });
  }
  assert.equal(byPath.has('script'), false, 'no /script unless given');
});

test('a given script becomes an executable /script', () => {
  const script = Buffer.from('echo hello from the guest\n');
  const entries = initramfsEntries({ busybox: FAKE_BUSYBOX, script });
  const entry = entries.find((e) => e.path === 'script');
  assert.ok(entry?.kind === 'file' && entry.mode === 0o755);
  assert.deepEqual(Buffer.from(entry.data), script);
});

test('a given clock reporter becomes an executable /bin/clock-reporter', () => {
  const clockReporter = Buffer.from('\x7fELF fake');
  const entry = initramfsEntries({ busybox: FAKE_BUSYBOX, clockReporter }).find(
    (e) => e.path === 'bin/clock-reporter',
  );
  assert.ok(entry && entry.kind === 'file');
  assert.equal(entry.mode, 0o755);
  assert.deepEqual(Buffer.from(entry.data), clockReporter);
  assert.equal(
    initramfsEntries({ busybox: FAKE_BUSYBOX }).some((e) => e.path === 'bin/clock-reporter'),
    false,
  );
});

test('/init mounts proc, sys and devtmpfs, prints the marker, then runs /script or a shell', () => {
  const lines = INIT_SCRIPT.split('\n');
  assert.equal(lines[0], '#!/bin/sh');
  const at = (needle: string) => {
    const i = lines.findIndex((l) => l.includes(needle));
    assert.ok(i >= 0, needle);
    return i;
  };
  const marker = at(`echo "${GUEST_READY_MARKER} nproc=$(nproc)"`);
  assert.ok(at('mount -t proc proc /proc') < marker);
  assert.ok(at('mount -t sysfs sysfs /sys') < marker);
  assert.ok(at('mount -t devtmpfs devtmpfs /dev') < marker);
  assert.ok(at('sh /script') > marker);
  assert.equal(lines.at(-2), 'exec setsid cttyhack sh');
});

test('/init is valid POSIX shell (checked by the host sh -n)', () => {
  const r = spawnSync('sh', ['-n'], { input: INIT_SCRIPT, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
});

test('/init prints the ready marker and takes the /script branch under a host shell', () => {
  // Run /init's text with every command it calls stubbed, to see the control flow.
  const stubs = `
mount() { :; }
nproc() { echo 3; }
reboot() { echo REBOOT; exit 0; }
poweroff() { echo POWEROFF; exit 0; }
setsid() { echo SHELL; exit 0; }
cat() { echo "console=ttyS0 tsvmm.exit=reboot"; }
`;
  const withScript = INIT_SCRIPT.replace('#!/bin/sh', stubs)
    .replaceAll('/script', '"$SCRIPT"')
    .replace('export PATH=/bin', '')
    // exec would look past the stub for a real program.
    .replace('exec setsid', 'setsid');
  const r = spawnSync('sh', ['-c', withScript], {
    encoding: 'utf8',
    env: { SCRIPT: '/dev/null', PATH: process.env.PATH ?? '/usr/bin:/bin' },
  });
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(r.stdout.trim().split('\n'), [
    `${GUEST_READY_MARKER} nproc=3`,
    'TSVMM-GUEST-SCRIPT-DONE status=0',
    'REBOOT',
  ]);
  const noScript = spawnSync('sh', ['-c', withScript], {
    encoding: 'utf8',
    env: { SCRIPT: '/nonexistent/tsvmm-script', PATH: process.env.PATH ?? '/usr/bin:/bin' },
  });
  assert.deepEqual(noScript.stdout.trim().split('\n'), [`${GUEST_READY_MARKER} nproc=3`, 'SHELL']);
});

test('the initramfs is byte-identical across builds', () => {
  const a = buildInitramfs({ busybox: FAKE_BUSYBOX, script: Buffer.from('true\n') });
  const b = buildInitramfs({ busybox: Buffer.from(FAKE_BUSYBOX), script: Buffer.from('true\n') });
  assert.ok(a.equals(b));
});
