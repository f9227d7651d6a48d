// mapped-ram on real KVM, end to end over QMP: the probe OS writes its
// pattern over 2 MiB and answers `sum`; the source saves with the
// mapped-ram capability to a file; a new tsvmm process started with
// `-incoming defer` turns the capability on and restores from the file,
// which maps the pages MAP_PRIVATE over guest RAM. The guest must go on
// (ticks, GUEST_STOPPED seen, the same sum), the file must be mapped in the
// destination (/proc/PID/maps), and it must be byte for byte unchanged
// after the guest ran on it. A destination without the capability refuses
// the file. Every child is killed by its pid and the temp dir removed, pass
// or fail.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isJsonObject } from '../monitor/json-value.js';
import type { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';
import { waitFor } from '../test-support/machine.js';
import { matchProbeSum } from '../test-support/probe-os-sum.js';
import { scaled } from '../test-support/time-scale.js';
import {
  negotiate,
  ProcessScope,
  type TsvmmProcess,
  waitRunning,
  within,
} from '../test-support/tsvmm-process.js';

const PROBE_OS = fileURLToPath(new URL('../../guests/probe-os/probe-os.elf', import.meta.url));
const MiB = 2 ** 20;
const MIGRATE_MS = scaled(120_000);
const DIRTY_MB = 2;

function guestArgs(): string[] {
  return [
    '-smp',
    '1',
    '-m',
    '256M',
    '-kernel',
    PROBE_OS,
    '-append',
    // One pass of the dirty pattern over 2 MiB, then the area stays as it
    // is. Small: on the mapped destination each 4 KiB page the sum reads is
    // a first touch (a nested page fault, slow in the emulated test VM).
    `console=ttyS0 probe.tick_ms=${scaled(50)} probe.dirty_mb=${DIRTY_MB} probe.watchdog_ms=${scaled(1000)}`,
    '-serial',
    'stdio',
  ];
}

const lineRe = (re: RegExp) => (vmm: TsvmmProcess) => vmm.lines().filter((l) => re.test(l)).length;
const ticks = lineRe(/^probe cpu=0 tick ns=\d+$/);

/**
 * Types `sum` on the console and returns the answer and how long it took.
 * A line that got no answer within 10 s (scaled) is typed again, after an
 * empty line that clears what the guest may hold of it: input typed at
 * the console can be lost (a full UART), which is not what this checks.
 */
async function sum(vmm: TsvmmProcess): Promise<{ sum: bigint; ms: number }> {
  const before = vmm.lines().length;
  const t0 = Date.now();
  let answer: string | undefined;
  const answered = () => {
    answer = vmm
      .lines()
      .slice(before)
      .find((l) => /^probe mem sum=[0-9a-f]{16}$/.test(l));
    return answer !== undefined;
  };
  let lastError: unknown;
  for (let attempt = 0; attempt < 4 && !answered(); attempt++) {
    vmm.type(attempt === 0 ? 'sum' : '\rsum');
    try {
      await waitFor('the answer to `sum`', answered, 10_000);
    } catch (err) {
      lastError = err;
    }
  }
  if (!answered()) {
    throw new Error(
      `${(lastError as Error).message} (typed 4 times); the console's last lines:\n` +
        `${vmm.lines().slice(-8).join('\n')}\nstderr:\n${vmm.stderr}`,
    );
  }
  return { sum: BigInt(`0x${answer!.slice('probe mem sum='.length)}`), ms: Date.now() - t0 };
}

async function waitMigrate(qmp: QmpClient, want: string): Promise<void> {
  const deadline = Date.now() + MIGRATE_MS;
  for (;;) {
    const r = await within(qmp.execute('query-migrate'), 'query-migrate');
    assert.ok(isJsonObject(r));
    if (r.status === want) return;
    if (r.status === 'failed') throw new Error(`migration failed: ${String(r['error-desc'])}`);
    if (Date.now() > deadline) throw new Error(`migration still ${String(r.status)}`);
    await sleep(50);
  }
}

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

test('mapped-ram: save to file, restore in a new process by mapping the file; the guest goes on, the file is unchanged', {
  timeout: scaled(300_000),
}, async (t) => {
  if (!requireKvm(t)) return;
  const scope = new ProcessScope(t);
  const dir = scope.tempDir('tsvmm-mr-');
  const path = join(dir, 'vm.state');
  const capability = { capabilities: [{ capability: 'mapped-ram', state: true }] };

  // The source: the pattern written once, its sum asked.
  const srcSock = join(dir, 'src.qmp');
  const src = scope.start([...guestArgs(), '-qmp', `unix:${srcSock},server=on,wait=off`], {
    stdin: 'pipe',
  });
  const srcQmp = await scope.connect(srcSock, src);
  await negotiate(srcQmp);
  await waitFor(
    'the first dirty pass',
    () => lineRe(/^probe cpu=0 dirty pass=1 /)(src) > 0,
    60_000,
  );
  const area = /^probe cpu=0 dirty base=0x([0-9a-f]+) mb=(\d+) /.exec(
    src.lines().find((l) => l.startsWith('probe cpu=0 dirty base=')) ?? '',
  );
  assert.ok(area, 'the dirtier reported its area');
  const base = Number.parseInt(area[1]!, 16);
  assert.equal(Number(area[2]) * MiB, DIRTY_MB * MiB);
  const { sum: before, ms: srcMs } = await sum(src);
  assert.ok(
    matchProbeSum(base, DIRTY_MB * MiB, before, [2]),
    'the source holds pass 1 of the pattern',
  );

  // A stream URI is refused with the capability on, as QEMU refuses it.
  await within(srcQmp.execute('migrate-set-capabilities', capability), 'set mapped-ram');
  await assert.rejects(
    within(srcQmp.execute('migrate', { uri: `unix:${join(dir, 'none.sock')}` }), 'migrate unix:'),
    /requires seekable transport/,
  );
  assert.deepEqual(await within(srcQmp.execute('migrate', { uri: `file:${path}` }), 'migrate'), {});
  await waitMigrate(srcQmp, 'completed');
  await within(srcQmp.execute('quit'), 'quit');
  await src.waitExit(scaled(20_000));

  const st = statSync(path);
  assert.ok(st.size > 256 * MiB, `the file holds the 256 MiB pages region (${st.size} bytes)`);
  assert.ok(
    st.blocks * 512 < 128 * MiB,
    `zero pages are holes: ${st.blocks * 512} bytes allocated of ${st.size}`,
  );
  const hash = sha256(path);

  // A destination without the capability refuses the file and never runs.
  const plain = scope.start([...guestArgs(), '-incoming', `file:${path}`]);
  const exit = await plain.waitExit(scaled(60_000));
  assert.notEqual(exit.code, 0);
  assert.match(plain.stderr, /Capability mapped-ram is off, but received capability is on/);
  assert.equal(ticks(plain), 0, 'the refused guest never ran');

  // -incoming defer, the capability, then migrate-incoming.
  const dstSock = join(dir, 'dst.qmp');
  const dst = scope.start(
    [...guestArgs(), '-incoming', 'defer', '-qmp', `unix:${dstSock},server=on,wait=off`],
    { stdin: 'pipe' },
  );
  const dstQmp = await scope.connect(dstSock, dst);
  await negotiate(dstQmp);
  await within(dstQmp.execute('migrate-set-capabilities', capability), 'set mapped-ram');
  await within(dstQmp.execute('migrate-incoming', { uri: `file:${path}` }), 'migrate-incoming');
  await waitMigrate(dstQmp, 'completed');
  await waitRunning(dstQmp);

  // Guest RAM is the file, mapped privately.
  const maps = readFileSync(`/proc/${dst.pid}/maps`, 'utf8');
  assert.ok(
    maps.split('\n').some((l) => l.endsWith(` ${realpathSync(path)}`)),
    'the destination maps the state file',
  );
  const ticksAtStart = ticks(dst);
  await waitFor(
    'ticks and GUEST_STOPPED on the destination',
    () => ticks(dst) >= ticksAtStart + 3 && lineRe(/^probe cpu=0 stopped /)(dst) >= 1,
    30_000,
  );
  const { sum: after, ms: dstMs } = await sum(dst);
  t.diagnostic(`sum over ${DIRTY_MB} MiB: source ${srcMs} ms, mapped destination ${dstMs} ms`);
  assert.equal(after, before, 'the guest reads the RAM it had');
  for (const bad of [/softlockup/, /backwards/, /exception/]) {
    assert.equal(lineRe(bad)(dst), 0, `no ${bad.source} on the destination`);
  }
  await within(dstQmp.execute('quit'), 'quit');
  await dst.waitExit(scaled(20_000));
  assert.equal(sha256(path), hash, 'the guest ran on the mapping; the file did not change');
});
