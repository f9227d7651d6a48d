// Live migration end to end: tsvmm processes (`node dist/cli/main.cjs`)
// running the probe OS while it dirties memory at up to 32 MiB/s, migrated over
// tcp and unix on loopback, and between two network namespaces of the
// test's own, driven over QMP as a management tool would. Also a cancel in
// the middle of the completion, and a destination killed mid-stream.
//
// Every test needs a real /dev/kvm (requireKvm fails without one). Each
// child is killed by its pid and every temp dir, namespace and veth pair is
// removed in after hooks, pass or fail.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isJsonObject, type JsonObject } from '../monitor/json-value.js';
import type { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';
import { waitFor } from '../test-support/machine.js';
import { matchProbeSum } from '../test-support/probe-os-sum.js';
import { scaled } from '../test-support/time-scale.js';
import {
  deathSignalPrefix,
  killByPid,
  ProcessScope,
  type TsvmmProcess,
  within as withinMs,
} from '../test-support/tsvmm-process.js';

const PROBE_OS = fileURLToPath(new URL('../../guests/probe-os/probe-os.elf', import.meta.url));
const MiB = 2 ** 20;
const CPUS = 2;
const QMP_MS = scaled(15_000);
const MIGRATE_MS = scaled(120_000);
const TEST_TIMEOUT = scaled(240_000);

/**
 * MiB the probe OS dirties in the migrations that check the destination's
 * memory: its `sum` and a pass of its dirtier run in the guest, and where
 * the host emulates the guest kernel (PVM-backed KVM: about a microsecond
 * an instruction, ~2.3 MiB/s for the dirtier, ~14 s a pass of 32 MiB) a
 * larger area makes each of them take tens of seconds.
 */
const CHECKED_DIRTY_MB = 16;
/** MiB dirtied in the cancel and the killed-destination tests, which need a long completion. */
const BULK_DIRTY_MB = 64;

/** The guest both ends run; the destination must have the same shape. */
function guestArgs(dirtyMb: number): string[] {
  return [
    '-smp',
    String(CPUS),
    '-m',
    '256M',
    '-kernel',
    PROBE_OS,
    '-append',
    // The watchdog's threshold (1 s by default) stretches with the time
    // scale: under emulation a vCPU can wait that long for a host CPU.
    `console=ttyS0 probe.tick_ms=${scaled(50)} probe.dirty_mb=${dirtyMb} probe.dirty_rate_mb=32 probe.watchdog_ms=${scaled(1000)}`,
    '-serial',
    'stdio',
  ];
}

/** One tsvmm child; its stdout is the guest's serial console, its stdin the console's input. */
type Vmm = TsvmmProcess;

/** What one test made, torn down after it in every outcome (test-support/tsvmm-process.ts). */
class Scope extends ProcessScope {
  readonly dir: string;

  constructor(t: TestContext) {
    super(t);
    // Short: unix socket paths must stay under 108 bytes.
    this.dir = this.tempDir('tsvmm-live-');
  }

  /** A tsvmm whose stdin is a pipe (the guest's console); `prefix` runs it (`ip netns exec NS`). */
  vmm(args: readonly string[], prefix: readonly string[] = []): Vmm {
    return this.start(args, { prefix, stdin: 'pipe' });
  }

  /**
   * A destination waiting on `uri` and a source, both running the guest,
   * each with its negotiated QMP client.
   */
  async startPair(
    uri: string,
    dirtyMb: number,
  ): Promise<{ src: Vmm; srcQmp: QmpClient; dst: Vmm; dstQmp: QmpClient }> {
    const dstSock = join(this.dir, 'dst.qmp');
    const srcSock = join(this.dir, 'src.qmp');
    const dst = this.vmm([
      ...guestArgs(dirtyMb),
      '-incoming',
      uri,
      '-qmp',
      `unix:${dstSock},server=on,wait=off`,
    ]);
    const src = this.vmm([...guestArgs(dirtyMb), '-qmp', `unix:${srcSock},server=on,wait=off`]);
    return { src, srcQmp: await this.qmp(srcSock, src), dst, dstQmp: await this.qmp(dstSock, dst) };
  }

  server(s: Server): Server {
    this.onClose(() => {
      s.close();
    });
    return s;
  }

  /** A negotiated QMP client of `vmm`. */
  async qmp(path: string, vmm: Vmm): Promise<QmpClient> {
    const c = await this.connect(path, vmm);
    await within(c.greeting(), 'the QMP greeting');
    await within(c.execute('qmp_capabilities'), 'qmp_capabilities');
    return c;
  }
}

function within<T>(p: Promise<T>, what: string, ms = QMP_MS): Promise<T> {
  return withinMs(p, what, ms);
}

async function status(qmp: QmpClient): Promise<string> {
  const r = await within(qmp.execute('query-status'), 'query-status');
  assert.ok(isJsonObject(r));
  return r.status as string;
}

async function waitStatus(qmp: QmpClient, want: string, ms = QMP_MS): Promise<void> {
  const deadline = Date.now() + ms;
  let now = await status(qmp);
  while (now !== want) {
    if (Date.now() > deadline) throw new Error(`run state still ${now}, not ${want}`);
    await sleep(50);
    now = await status(qmp);
  }
}

async function queryMigrate(qmp: QmpClient): Promise<JsonObject> {
  const r = await within(qmp.execute('query-migrate'), 'query-migrate');
  assert.ok(isJsonObject(r));
  return r;
}

async function waitMigrateStatus(
  qmp: QmpClient,
  want: string,
  ms = MIGRATE_MS,
): Promise<JsonObject> {
  const deadline = Date.now() + ms;
  for (;;) {
    const info = await queryMigrate(qmp);
    if (info.status === want) return info;
    if (Date.now() > deadline) {
      throw new Error(`query-migrate still ${JSON.stringify(info)}, not status ${want}`);
    }
    await sleep(100);
  }
}

/** Turns on the `events` capability (QEMU sends MIGRATION events only with it) and checks it took. */
async function enableMigrationEvents(qmp: QmpClient): Promise<void> {
  const capabilities = [{ capability: 'events', state: true }];
  await within(qmp.execute('migrate-set-capabilities', { capabilities }), 'set capabilities');
  const caps = await within(qmp.execute('query-migrate-capabilities'), 'query capabilities');
  assert.ok(Array.isArray(caps), JSON.stringify(caps));
  assert.deepEqual(
    caps.filter((c) => isJsonObject(c) && c.state === true),
    capabilities,
  );
}

/** MIGRATION statuses and MIGRATION_PASS numbers, in order, until `last` (or a failure). */
async function migrationEvents(qmp: QmpClient, last: string): Promise<string[]> {
  const seen: string[] = [];
  const deadline = Date.now() + MIGRATE_MS;
  for (;;) {
    const e = await within(
      qmp.nextEvent(),
      `MIGRATION ${last}`,
      Math.max(1, deadline - Date.now()),
    );
    const data = isJsonObject(e.data ?? null) ? (e.data as JsonObject) : {};
    if (e.event === 'MIGRATION') {
      seen.push(String(data.status));
      if (data.status === last) return seen;
      if (data.status === 'failed' && last !== 'failed') {
        throw new Error(`the migration failed: ${JSON.stringify(await queryMigrate(qmp))}`);
      }
    } else if (e.event === 'MIGRATION_PASS') {
      seen.push(`pass ${String(data.pass)}`);
    } else {
      seen.push(String(e.event));
    }
  }
}

interface ProbeEvent {
  cpu: number;
  event: string;
  fields: Record<string, string>;
}

/** The probe OS's `probe cpu=N event k=v...` lines; other lines (a torn first line) are skipped. */
function probeEvents(lines: readonly string[]): ProbeEvent[] {
  const out: ProbeEvent[] = [];
  for (const line of lines) {
    const m = /^probe cpu=(\d+) (\w+)((?: [\w]+=\S+)*)$/.exec(line);
    if (!m) continue;
    const fields: Record<string, string> = {};
    for (const kv of m[3]!.trim().split(' ').filter(Boolean)) {
      const at = kv.indexOf('=');
      fields[kv.slice(0, at)] = kv.slice(at + 1);
    }
    out.push({ cpu: Number(m[1]), event: m[2]!, fields });
  }
  return out;
}

function count(vmm: Vmm, event: string, cpu?: number): number {
  return probeEvents(vmm.lines()).filter(
    (e) => e.event === event && (cpu === undefined || e.cpu === cpu),
  ).length;
}

/** The dirty area, and how long the source's guest took for its first pass, by its own clock. */
interface DirtyArea {
  base: number;
  bytes: number;
  passMs: number;
}

/** Waits until the source's guest is up on every CPU and its dirtier has done a whole pass; returns the area. */
async function waitDirtying(src: Vmm, dirtyMb: number): Promise<DirtyArea> {
  await waitFor(
    'every CPU ready and a first dirty pass',
    () =>
      count(src, 'ready') === CPUS &&
      probeEvents(src.lines()).some((e) => e.event === 'dirty' && 'pass' in e.fields),
    60_000,
  );
  const area = probeEvents(src.lines()).find((e) => e.event === 'dirty' && 'base' in e.fields);
  assert.ok(area, 'the dirtier reported its area');
  const base = Number.parseInt(area.fields.base!.replace(/^0x/, ''), 16);
  const bytes = Number(area.fields.mb) * MiB;
  assert.equal(
    bytes,
    dirtyMb * MiB,
    `the whole ${dirtyMb} MiB fits in 256 MiB: ${JSON.stringify(area.fields)}`,
  );
  const first = probeEvents(src.lines()).find((e) => e.event === 'dirty' && e.fields.pass === '1');
  assert.ok(first, 'the dirtier reported its first pass');
  const passMs = (Number(first.fields.ns) - Number(area.fields.ns)) / 1e6;
  assert.ok(passMs > 0, `the first pass took ${passMs} ms of the guest's clock`);
  return { base, bytes, passMs };
}

/**
 * After a completed migration: the destination's guest goes on. Every vCPU
 * ticks again and reports `stopped` (KVMCLOCK_CTRL after the load), no
 * watchdog fires, no clock goes backwards, and the dirty area's sum is the
 * dirtier's pattern for some pass and cursor near the pass it reports.
 */
async function checkDestinationGuest(dst: Vmm, area: DirtyArea): Promise<void> {
  await waitFor(
    'three ticks and `stopped` on every vCPU of the destination',
    () =>
      Array.from({ length: CPUS }, (_, c) => c).every(
        (c) => count(dst, 'tick', c) >= 3 && count(dst, 'stopped', c) >= 1,
      ),
    30_000,
  );
  // The destination goes on in the middle of a pass and reports the next
  // one that ends a second or more after its last report: within two
  // passes. The sum reads the area once (fewer instructions a word than a
  // pass writes). Both bounds come from the source guest's own first pass,
  // so that a guest ten times slower here (PVM) is not taken for a hang.
  const guestMs = Math.max(30_000, Math.ceil(3 * area.passMs) + 10_000);
  await waitFor('a dirty pass on the destination', () => count(dst, 'dirty') >= 1, guestMs);
  const before = dst.lines().length;
  dst.type('sum');
  let sumLine = -1;
  await waitFor(
    'the answer to `sum`',
    () => {
      sumLine = dst
        .lines()
        .findIndex((l, i) => i >= before && /^probe mem sum=[0-9a-f]{16}$/.test(l));
      return sumLine >= 0;
    },
    guestMs,
  );
  const lines = dst.lines();
  const sum = BigInt(`0x${lines[sumLine]!.slice('probe mem sum='.length)}`);
  const passes = probeEvents(lines.slice(0, sumLine))
    .filter((e) => e.event === 'dirty' && 'pass' in e.fields)
    .map((e) => Number(e.fields.pass));
  const done = passes.at(-1)!;
  // Pass `done` is complete; the one under way is done+1. A catch-up burst after the downtime may skip reports.
  const candidates = Array.from({ length: 6 }, (_, i) => done + 1 + i);
  const match = matchProbeSum(area.base, area.bytes, sum, candidates);
  assert.ok(
    match,
    `the destination's memory holds the dirtier's pattern (sum ${sum.toString(16)}, passes tried ${candidates.join(',')})`,
  );
  const events = probeEvents(dst.lines());
  for (const bad of ['softlockup', 'backwards', 'exception']) {
    assert.deepEqual(
      events.filter((e) => e.event === bad),
      [],
      `no ${bad} on the destination`,
    );
  }
}

/** A free TCP port on `host` (closed again at once; the destination binds it next). */
async function freePort(host: string): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.listen(0, host, resolve);
  });
  const addr = s.address();
  await new Promise((r) => s.close(r));
  assert.ok(addr && typeof addr === 'object');
  return addr.port;
}

/**
 * A whole live migration from `src` to `dst` (already waiting with
 * -incoming), checked on both sides.
 */
async function migrateAndCheck(
  src: Vmm,
  srcQmp: QmpClient,
  dst: Vmm,
  dstQmp: QmpClient,
  uri: string,
): Promise<void> {
  const area = await waitDirtying(src, CHECKED_DIRTY_MB);
  assert.equal(await status(dstQmp), 'inmigrate');
  await within(srcQmp.execute('migrate-set-parameters', { 'downtime-limit': 300 }), 'set params');
  const params = await within(srcQmp.execute('query-migrate-parameters'), 'query params');
  assert.ok(isJsonObject(params) && params['downtime-limit'] === 300);
  await enableMigrationEvents(srcQmp);
  assert.deepEqual(await within(srcQmp.execute('migrate', { uri }), 'migrate'), {});
  const seen = await migrationEvents(srcQmp, 'completed');
  const statuses = seen.filter((s) => !s.startsWith('pass ') && s !== 'STOP' && s !== 'RESUME');
  assert.deepEqual(statuses, ['setup', 'active', 'completed'], `events: ${seen.join(', ')}`);
  assert.ok(seen.includes('pass 1'), `at least one MIGRATION_PASS: ${seen.join(', ')}`);
  assert.ok(seen.includes('STOP'), 'the completion stopped the source');

  const info = await queryMigrate(srcQmp);
  assert.equal(info.status, 'completed');
  const ram = info.ram as JsonObject;
  assert.ok((ram.transferred as number) >= area.bytes, `transferred ${ram.transferred}`);
  assert.ok((ram.normal as number) >= area.bytes / 4096, 'at least the dirty area went as pages');
  assert.equal(ram.total, 256 * MiB);
  assert.equal(typeof info.downtime, 'number');
  assert.equal(typeof info['total-time'], 'number');
  await waitStatus(srcQmp, 'postmigrate');

  await waitStatus(dstQmp, 'running', 60_000);
  const dinfo = await waitMigrateStatus(dstQmp, 'completed', 30_000);
  assert.ok(((dinfo.ram as JsonObject).transferred as number) > 0);
  await checkDestinationGuest(dst, area);
  assert.doesNotMatch(src.stderr, /migration failed/);
  assert.doesNotMatch(dst.stderr, /load of migration failed/);
}

/**
 * Two network namespaces of this test joined by a veth pair, 10.213.7.1 in
 * the first and 10.213.7.2 in the second (addresses only inside them), all
 * deleted when `scope` closes; undefined (and the test skipped, saying why)
 * where `ip netns` is not permitted.
 */
function namespacePair(t: TestContext, scope: Scope): [string, string] | undefined {
  const id = `${process.pid % 100_000}${String.fromCharCode(97 + (namespaceSerial++ % 26))}`;
  const nsA = `tsvmm-src-${id}`;
  const nsB = `tsvmm-dst-${id}`;
  const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  try {
    ip('netns', 'add', nsA);
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    t.skip(
      `NOT RUN: 'ip netns add' is not permitted here: ${(e.stderr?.toString() || e.message).trim()}`,
    );
    return undefined;
  }
  scope.onClose(() => ip('netns', 'del', nsA));
  ip('netns', 'add', nsB);
  scope.onClose(() => ip('netns', 'del', nsB));
  // Both ends are made inside the namespaces; deleting a namespace deletes its end, and so the pair.
  const vethA = `tva${id}`;
  const vethB = `tvb${id}`;
  ip('link', 'add', vethA, 'netns', nsA, 'type', 'veth', 'peer', 'name', vethB, 'netns', nsB);
  scope.onClose(() => ip('-n', nsA, 'link', 'del', vethA));
  ip('-n', nsA, 'addr', 'add', '10.213.7.1/24', 'dev', vethA);
  ip('-n', nsB, 'addr', 'add', '10.213.7.2/24', 'dev', vethB);
  for (const [ns, dev] of [
    [nsA, vethA],
    [nsB, vethB],
  ] as const) {
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    ip('-n', ns, 'link', 'set', dev, 'up');
  }
  return [nsA, nsB];
}

let namespaceSerial = 0;

/** Whether network namespace `ns` still exists. */
function namespaceExists(ns: string): boolean {
  return execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
    .split('\n')
    .some((l) => l.split(' ')[0] === ns);
}

describe('the two-host plumbing of the namespace test (no KVM needed)', () => {
  test('a TCP stream crosses the veth pair between the namespaces; both are gone afterwards', {
    timeout: 60_000,
  }, async (t) => {
    let names: [string, string] | undefined;
    await t.test('inside the namespaces', async (st) => {
      const scope = new Scope(st);
      names = namespacePair(st, scope);
      if (!names) return;
      const [nsA, nsB] = names;
      // A one-shot server in the second namespace that echoes the byte count back.
      const serverJs =
        "const s=require('net').createServer(c=>{let n=0;c.on('data',d=>{n+=d.length});c.on('end',()=>{c.end(String(n));s.close()})});s.listen(4447,'10.213.7.2',()=>console.log('up'))";
      const argv = [...deathSignalPrefix(), 'ip', 'netns', 'exec', nsB, process.execPath, '-e'];
      const srv = spawn(argv[0]!, [...argv.slice(1), serverJs], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      scope.onClose(() => killByPid(srv, 'SIGKILL'));
      let up = '';
      srv.stdout!.setEncoding('utf8').on('data', (d: string) => {
        up += d;
      });
      await waitFor('the server in the destination namespace', () => up.includes('up'), 10_000);
      const clientJs =
        "const c=require('net').connect(4447,'10.213.7.2',()=>{c.end(Buffer.alloc(1<<20,7))});let r='';c.on('data',d=>{r+=d});c.on('end',()=>console.log(r))";
      const out = execFileSync('ip', ['netns', 'exec', nsA, process.execPath, '-e', clientJs], {
        encoding: 'utf8',
        timeout: 20_000,
      });
      assert.equal(out.trim(), String(1 << 20));
    });
    if (names) {
      for (const ns of names) assert.equal(namespaceExists(ns), false, `${ns} was deleted`);
    }
  });
});

describe('live migration between tsvmm processes (needs KVM)', () => {
  for (const transport of ['tcp', 'unix'] as const) {
    test(`over ${transport} on this host: precopy while the probe OS dirties memory`, {
      timeout: TEST_TIMEOUT,
    }, async (t) => {
      if (!requireKvm(t)) return;
      const scope = new Scope(t);
      const uri =
        transport === 'tcp'
          ? `tcp:127.0.0.1:${await freePort('127.0.0.1')}`
          : `unix:${join(scope.dir, 'mig.sock')}`;
      const { src, srcQmp, dst, dstQmp } = await scope.startPair(uri, CHECKED_DIRTY_MB);
      await migrateAndCheck(src, srcQmp, dst, dstQmp, uri);
    });
  }

  test('between two network namespaces joined by a veth pair', {
    timeout: TEST_TIMEOUT,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const ns = namespacePair(t, scope);
    if (!ns) return;
    const [nsA, nsB] = ns;
    const uri = 'tcp:10.213.7.2:4446';
    const dstSock = join(scope.dir, 'dst.qmp');
    const srcSock = join(scope.dir, 'src.qmp');
    // QMP stays on unix sockets: a path works across network namespaces.
    const dst = scope.vmm(
      [
        ...guestArgs(CHECKED_DIRTY_MB),
        '-incoming',
        uri,
        '-qmp',
        `unix:${dstSock},server=on,wait=off`,
      ],
      ['ip', 'netns', 'exec', nsB],
    );
    const src = scope.vmm(
      [...guestArgs(CHECKED_DIRTY_MB), '-qmp', `unix:${srcSock},server=on,wait=off`],
      ['ip', 'netns', 'exec', nsA],
    );
    const dstQmp = await scope.qmp(dstSock, dst);
    const srcQmp = await scope.qmp(srcSock, src);
    await migrateAndCheck(src, srcQmp, dst, dstQmp, uri);
  });

  test('migrate_cancel during the completion resumes the source (RESUME, running)', {
    timeout: TEST_TIMEOUT,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    // The destination is this test: it reads at 8 MiB/s, so the first pass
    // (64 MiB of dirtied pages) takes ~8 s, after which all 64 MiB are dirty
    // again; with a generous downtime limit the completion stops the VM and
    // has ~8 s of sending to do. That is when the cancel comes.
    const path = join(scope.dir, 'slow.sock');
    const RATE = 8 * MiB;
    const sockets: Socket[] = [];
    const server = scope.server(
      createServer((s) => {
        sockets.push(s);
        s.on('error', () => {});
        s.on('data', (chunk: Buffer) => {
          s.pause();
          setTimeout(() => s.resume(), (chunk.length / RATE) * 1000).unref();
        });
      }),
    );
    scope.onClose(() => {
      for (const s of sockets) s.destroy();
    });
    await new Promise<void>((resolve) => server.listen(path, resolve));
    const srcSock = join(scope.dir, 'src.qmp');
    const src = scope.vmm([
      ...guestArgs(BULK_DIRTY_MB),
      '-qmp',
      `unix:${srcSock},server=on,wait=off`,
    ]);
    const qmp = await scope.qmp(srcSock, src);
    await waitDirtying(src, BULK_DIRTY_MB);
    await within(
      qmp.execute('migrate-set-parameters', { 'downtime-limit': 120_000, 'max-bandwidth': 0 }),
      'set params',
    );
    await enableMigrationEvents(qmp);
    await within(qmp.execute('migrate', { uri: `unix:${path}` }), 'migrate');
    await within(qmp.nextEvent('STOP'), 'the completion to stop the source', MIGRATE_MS);
    assert.equal((await queryMigrate(qmp)).status, 'active', 'still sending');
    const ticks = count(src, 'tick');
    assert.deepEqual(await within(qmp.execute('migrate_cancel'), 'migrate_cancel'), {});
    const seen = await migrationEvents(qmp, 'cancelled');
    assert.ok(seen.includes('cancelling'), seen.join(', '));
    // RESUME comes after `cancelled` (the resume follows the status change); take it wherever it is.
    if (!seen.includes('RESUME')) await within(qmp.nextEvent('RESUME'), 'RESUME after the cancel');
    await waitStatus(qmp, 'running');
    const info = await queryMigrate(qmp);
    assert.equal(info.status, 'cancelled');
    await waitFor(
      'the source guest ticking again',
      () => count(src, 'tick') >= ticks + 2 * CPUS,
      20_000,
    );
    assert.equal(count(src, 'softlockup'), 0);
  });

  test('a destination killed mid-stream fails the migration; the source keeps running', {
    timeout: TEST_TIMEOUT,
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const uri = `unix:${join(scope.dir, 'mig.sock')}`;
    const { src, srcQmp: qmp, dst, dstQmp } = await scope.startPair(uri, BULK_DIRTY_MB);
    await waitDirtying(src, BULK_DIRTY_MB);
    assert.equal(await status(dstQmp), 'inmigrate');
    // 8 MiB/s: the first pass alone takes ~8 s.
    await within(qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * MiB }), 'set params');
    await enableMigrationEvents(qmp);
    await within(qmp.execute('migrate', { uri }), 'migrate');
    const deadline = Date.now() + MIGRATE_MS;
    for (;;) {
      const info = await queryMigrate(qmp);
      assert.equal(info.status === 'completed', false, 'the migration must still be under way');
      if (info.status === 'active' && ((info.ram as JsonObject).transferred as number) > 4 * MiB)
        break;
      if (Date.now() > deadline) throw new Error(`no progress: ${JSON.stringify(info)}`);
      await sleep(50);
    }
    await dst.kill('SIGKILL');
    const seen = await migrationEvents(qmp, 'failed');
    assert.ok(!seen.includes('completed'), seen.join(', '));
    const info = await queryMigrate(qmp);
    assert.equal(info.status, 'failed');
    assert.equal(typeof info['error-desc'], 'string');
    assert.match(src.stderr, /migration failed: /);
    await waitStatus(qmp, 'running');
    const ticks = count(src, 'tick');
    await waitFor(
      'the source guest ticking on',
      () => count(src, 'tick') >= ticks + 2 * CPUS,
      20_000,
    );
    assert.equal(count(src, 'softlockup'), 0);
  });
});
