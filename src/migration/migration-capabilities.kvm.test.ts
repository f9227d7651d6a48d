// Migration capabilities on real KVM, end to end over QMP: two tsvmm
// processes (`node dist/cli/main.cjs`) running the probe guest, the source
// with `events` and `pause-before-switchover` on, migrated over a unix
// socket. The source must stop in pre-switchover until migrate-continue,
// report every status change as a MIGRATION event, and the destination must
// run the guest on. Each child is killed by its pid in an after hook, pass
// or fail, and the temp dir removed.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isJsonObject, type JsonObject } from '../monitor/json-value.js';
import { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';

const MAIN = fileURLToPath(new URL('../cli/main.cjs', import.meta.url));
// Generous: in the KVM-in-a-VM runner under load, a tsvmm start alone can take a minute.
const STEP_MS = 180_000;

/** A tsvmm child with the probe guest; its serial output is collected. */
class Vmm {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private readonly closed: Promise<void>;

  constructor(args: readonly string[]) {
    const argv = ['-smp', '1', '-m', '64M', '-serial', 'stdio', ...args];
    this.child = spawn(process.execPath, [MAIN, ...argv], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdin!.on('error', () => {});
    this.child.stdout!.setEncoding('utf8').on('data', (s: string) => {
      this.stdout += s;
    });
    this.child.stderr!.setEncoding('utf8').on('data', (s: string) => {
      this.stderr += s;
    });
    this.closed = new Promise((resolve) => this.child.once('close', () => resolve()));
  }

  get exited(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  /** SIGKILL by this child's own pid if it still runs; waits for it to end. */
  async kill(): Promise<void> {
    if (!this.exited && this.child.pid !== undefined) {
      try {
        process.kill(this.child.pid, 'SIGKILL');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
      }
    }
    await Promise.race([this.closed, sleep(10_000)]);
  }
}

async function within<T>(p: Promise<T>, what: string, ms = STEP_MS): Promise<T> {
  const timer = sleep(ms, 'timeout' as const, { ref: false });
  const r = await Promise.race([p, timer]);
  if (r === 'timeout') throw new Error(`timed out after ${ms} ms waiting for ${what}`);
  return r as T;
}

/** Connects and negotiates, retrying until the socket is up or the child exited. */
async function connect(path: string, vmm: Vmm, clients: QmpClient[]): Promise<QmpClient> {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    if (vmm.exited) throw new Error(`tsvmm exited before its QMP socket was up:\n${vmm.stderr}`);
    try {
      const c = await QmpClient.connect({ path });
      clients.push(c);
      await within(c.greeting(), 'the QMP greeting');
      await within(c.execute('qmp_capabilities'), 'qmp_capabilities');
      return c;
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`no QMP at ${path}: ${(err as Error).message}`);
      await sleep(100);
    }
  }
}

async function runState(qmp: QmpClient): Promise<string> {
  const r = await within(qmp.execute('query-status'), 'query-status');
  assert.ok(isJsonObject(r));
  return String(r.status);
}

async function waitRunState(qmp: QmpClient, want: string): Promise<void> {
  const deadline = Date.now() + STEP_MS;
  for (let now = await runState(qmp); now !== want; now = await runState(qmp)) {
    if (Date.now() > deadline) throw new Error(`run state still ${now}, not ${want}`);
    await sleep(100);
  }
}

/** The MIGRATION statuses (and MIGRATION_PASS as `pass N`) until `last`. */
async function migrationEvents(qmp: QmpClient, last: string): Promise<string[]> {
  const seen: string[] = [];
  for (;;) {
    const e = await within(qmp.nextEvent(), `MIGRATION ${last} (seen: ${seen.join(', ')})`);
    const data = isJsonObject(e.data ?? null) ? (e.data as JsonObject) : {};
    if (e.event === 'MIGRATION') {
      seen.push(String(data.status));
      if (data.status === last || data.status === 'failed') return seen;
    } else if (e.event === 'MIGRATION_PASS') {
      seen.push(`pass ${String(data.pass)}`);
    }
  }
}

/** Whole tick lines of vCPU 0 (the last piece may still be being written). */
function ticks(vmm: Vmm): number {
  return vmm.stdout
    .split('\n')
    .slice(0, -1)
    .filter((l) => /^probe cpu=0 tick ns=\d+\r?$/.test(l)).length;
}

function scope(t: TestContext): { dir: string; vmms: Vmm[]; clients: QmpClient[] } {
  const s = {
    dir: mkdtempSync(join(tmpdir(), 'tsvmm-caps-')),
    vmms: [] as Vmm[],
    clients: [] as QmpClient[],
  };
  t.after(async () => {
    for (const c of s.clients) c.close();
    for (const v of s.vmms) await v.kill();
    rmSync(s.dir, { recursive: true, force: true });
  });
  return s;
}

test('events and pause-before-switchover: MIGRATION at each status, the source waits in pre-switchover for migrate-continue', {
  timeout: 900_000,
}, async (t) => {
  if (!requireKvm(t)) return;
  const { dir, vmms, clients } = scope(t);
  const uri = `unix:${join(dir, 'mig.sock')}`;
  const dst = new Vmm([
    '-incoming',
    uri,
    '-qmp',
    `unix:${join(dir, 'dst.qmp')},server=on,wait=off`,
  ]);
  vmms.push(dst);
  const dstQmp = await connect(join(dir, 'dst.qmp'), dst, clients);
  const src = new Vmm(['-qmp', `unix:${join(dir, 'src.qmp')},server=on,wait=off`]);
  vmms.push(src);
  const srcQmp = await connect(join(dir, 'src.qmp'), src, clients);
  const deadline = Date.now() + STEP_MS;
  while (ticks(src) < 2) {
    if (Date.now() > deadline) throw new Error(`the source guest does not tick:\n${src.stdout}`);
    await sleep(100);
  }

  const capabilities = [
    { capability: 'events', state: true },
    { capability: 'pause-before-switchover', state: true },
  ];
  await within(srcQmp.execute('migrate-set-capabilities', { capabilities }), 'set capabilities');
  const caps = await within(srcQmp.execute('query-migrate-capabilities'), 'query capabilities');
  assert.ok(Array.isArray(caps));
  assert.equal(caps.length, 22);
  assert.deepEqual(
    caps.filter((c) => isJsonObject(c) && c.state === true),
    capabilities,
  );
  // On the destination too, so it reports its own statuses.
  await within(
    dstQmp.execute('migrate-set-capabilities', { capabilities: [capabilities[0]!] }),
    'set capabilities on the destination',
  );

  assert.deepEqual(await within(srcQmp.execute('migrate', { uri }), 'migrate'), {});
  const upToPause = await migrationEvents(srcQmp, 'pre-switchover');
  const statuses = (seen: string[]) => seen.filter((s) => !s.startsWith('pass '));
  assert.deepEqual(statuses(upToPause), ['setup', 'active', 'pre-switchover'], upToPause.join());
  assert.ok(upToPause.includes('pass 1'), upToPause.join());

  // Paused: the guest is stopped, the destination still waits, and it stays so.
  assert.equal(await runState(srcQmp), 'finish-migrate');
  const refused = await srcQmp.request('migrate-set-capabilities', { capabilities });
  assert.deepEqual(refused.error, {
    class: 'GenericError',
    desc: "There's a migration process in progress",
  });
  const wrong = await srcQmp.request('migrate-continue', { state: 'active' });
  assert.deepEqual(wrong.error, {
    class: 'GenericError',
    desc: 'Migration not in expected state: pre-switchover',
  });
  await sleep(1000);
  const paused = await within(srcQmp.execute('query-migrate'), 'query-migrate');
  assert.ok(isJsonObject(paused));
  assert.equal(paused.status, 'pre-switchover');
  assert.equal(await runState(dstQmp), 'inmigrate');

  assert.deepEqual(
    await within(srcQmp.execute('migrate-continue', { state: 'pre-switchover' }), 'continue'),
    {},
  );
  const rest = await migrationEvents(srcQmp, 'completed');
  assert.deepEqual(statuses(rest), ['device', 'completed'], rest.join());
  await waitRunState(srcQmp, 'postmigrate');

  await waitRunState(dstQmp, 'running');
  const dstSeen = await migrationEvents(dstQmp, 'completed');
  assert.deepEqual(statuses(dstSeen).at(-1), 'completed', dstSeen.join());
  const before = ticks(dst);
  const until = Date.now() + STEP_MS;
  while (ticks(dst) <= before + 1) {
    if (Date.now() > until) throw new Error(`the destination guest does not tick:\n${dst.stdout}`);
    await sleep(100);
  }
  assert.doesNotMatch(src.stderr, /migration failed/);
  assert.doesNotMatch(dst.stderr, /load of migration failed/);
});
