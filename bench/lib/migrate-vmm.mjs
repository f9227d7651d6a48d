// bench/lib/migrate-vmm.mjs: a VMM process (tsvmm or QEMU) driven over QMP
// for bench/migrate: started with a unix QMP socket and its serial console
// on stdout, probe-OS lines waited for, `migrate` timed to `completed`, a
// destination started with `-incoming` and timed to the end of the load.
// Every child goes through common.mjs (killed by pid on every way out);
// every wait has a timeout.
import { readdirSync, rmSync, statSync, watch } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../../dist/monitor/qmp-client.js';
import { BenchError, collectTail, sleep, spawnTracked, stopChild, withTimeout } from './common.mjs';

// Generous: a Node process under nested emulation can take a minute to start.
const CONNECT_TIMEOUT_MS = 180_000;
const COMMAND_TIMEOUT_MS = 30_000;
const POLL_MS = 5;

/**
 * A started VMM. `lines` holds its serial output, line by line; `t0` is
 * process.hrtime.bigint() taken just before the spawn.
 */
export class Vmm {
  constructor(label, child, socket, t0) {
    this.label = label;
    this.child = child;
    this.socket = socket;
    this.t0 = t0;
    this.client = undefined;
    this.lines = [];
    this.waiters = [];
    this.err = collectTail(child.stderr);
    let partial = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      partial += chunk;
      const parts = partial.split(/\r?\n/);
      partial = parts.pop() ?? '';
      for (const line of parts) {
        this.lines.push(line);
        for (const w of [...this.waiters]) w();
      }
      if (this.lines.length > 20_000) this.lines.splice(0, 10_000);
    });
    this.spawnError = new Promise((_, reject) =>
      child.once('error', (e) => reject(new BenchError(`${label}: cannot start: ${e.message}`))),
    );
    this.spawnError.catch(() => {});
  }

  get running() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Why the process is gone, with the end of what it wrote. */
  died() {
    const tail = `${this.lines.slice(-10).join('\n')}\n${this.err.text}`.trim();
    return new BenchError(
      `${this.label} exited (status ${this.child.exitCode ?? this.child.signalCode})${tail ? `:\n${tail}` : ' (no output)'}`,
    );
  }

  /** Waits for a serial line matching `re`; resolves with the match. */
  waitLine(re, ms, what) {
    const found = () => {
      for (const l of this.lines) {
        const m = re.exec(l);
        if (m) return m;
      }
      return undefined;
    };
    const p = new Promise((resolve, reject) => {
      const check = () => {
        const m = found();
        if (m) {
          this.waiters = this.waiters.filter((w) => w !== check);
          resolve(m);
        } else if (!this.running) {
          this.waiters = this.waiters.filter((w) => w !== check);
          reject(this.died());
        }
      };
      this.waiters.push(check);
      this.child.once('exit', () => setTimeout(check, 50));
      check();
    });
    return withTimeout(p, ms, `${this.label}: ${what}`);
  }

  /** A QMP command; a QMP error is a BenchError unless `allowError`. */
  async call(cmd, args, { allowError = false, timeoutMs = COMMAND_TIMEOUT_MS } = {}) {
    if (!this.client) throw new BenchError(`${this.label}: no QMP session`);
    let response;
    try {
      response = await Promise.race([
        withTimeout(this.client.request(cmd, args), timeoutMs, `${this.label}: ${cmd}`),
        this.spawnError,
      ]);
    } catch (e) {
      await sleep(100);
      if (!this.running) throw this.died();
      if (e instanceof BenchError) throw e;
      throw new BenchError(`${this.label}: ${cmd}: ${e.message}`);
    }
    if ('error' in response && !allowError) {
      throw new BenchError(`${this.label}: ${cmd} failed: ${JSON.stringify(response.error)}`);
    }
    return response;
  }

  /** quit, then SIGKILL if it has not gone within 10 s; the socket file is removed. */
  async quit() {
    try {
      if (this.client && this.running) {
        await this.call('quit', undefined, { allowError: true, timeoutMs: 5000 }).catch(() => {});
      }
    } finally {
      this.client?.close();
      await stopChild(this.child, { signal: 'SIGTERM', graceMs: 10_000 });
      rmSync(this.socket, { force: true });
    }
  }

  /** SIGKILL now (for an error path). */
  async kill() {
    this.client?.close();
    await stopChild(this.child, { signal: 'SIGKILL', graceMs: 5000 });
    rmSync(this.socket, { force: true });
  }
}

/**
 * Starts `command args` with `-qmp unix:<dir>/<name>.sock` and negotiates
 * QMP. The child is killed if this fails.
 */
export async function startVmm({ label, command, args, dir, name }) {
  const socket = join(dir, `${name}.sock`);
  rmSync(socket, { force: true });
  const argv = [...args, '-qmp', `unix:${socket},server=on,wait=off`];
  const t0 = process.hrtime.bigint();
  const child = spawnTracked(command, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
  const vmm = new Vmm(label, child, socket, t0);
  try {
    vmm.client = await Promise.race([
      withTimeout(connectQmp(vmm), CONNECT_TIMEOUT_MS, `${label}: QMP session`),
      vmm.spawnError,
    ]);
  } catch (e) {
    await vmm.kill();
    throw e;
  }
  return vmm;
}

async function connectQmp(vmm) {
  let client;
  for (;;) {
    if (!vmm.running) throw vmm.died();
    try {
      client = await QmpClient.connect({ path: vmm.socket });
      break;
    } catch (e) {
      if (e.code !== 'ENOENT' && e.code !== 'ECONNREFUSED') {
        throw new BenchError(`${vmm.label}: cannot connect to ${vmm.socket}: ${e.message}`);
      }
      await sleep(2);
    }
  }
  const greeting = await client.greeting();
  if (!greeting.QMP)
    throw new BenchError(`${vmm.label}: unexpected greeting ${JSON.stringify(greeting)}`);
  const caps = await client.request('qmp_capabilities');
  if ('error' in caps)
    throw new BenchError(`${vmm.label}: qmp_capabilities: ${JSON.stringify(caps.error)}`);
  return client;
}

const msSince = (t0) => Number(process.hrtime.bigint() - t0) / 1e6;

/** Wall-clock milliseconds with sub-millisecond resolution. */
const wallMs = () => performance.timeOrigin + performance.now();

/** An event's own time stamp (the VMM's wall clock), in milliseconds. */
function eventMs(e) {
  return e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
}

/**
 * Watches `dir` (inotify) for the first write to a file whose name passes
 * `match` and resolves with the wall time (ms) it was seen non-empty.
 * `stop()` ends the watch.
 */
function watchFirstByte(dir, match) {
  let watcher;
  let resolveSeen;
  const seen = new Promise((resolve) => {
    resolveSeen = resolve;
  });
  const check = () => {
    try {
      for (const name of readdirSync(dir)) {
        if (match(name) && statSync(`${dir}/${name}`).size > 0) {
          resolveSeen(wallMs());
          watcher?.close();
          return;
        }
      }
    } catch {
      // renamed or removed between readdir and stat: the next event looks again
    }
  };
  watcher = watch(dir, { persistent: false }, (_type, name) => {
    if (name && match(name)) check();
  });
  return { seen, stop: () => watcher.close() };
}

/**
 * `migrate uri` timed from sending the command to query-migrate saying
 * `completed` (polled every 5 ms). Resolves with the wall time, the last
 * query-migrate answer (QEMU's and tsvmm's own total-time, setup-time,
 * downtime) and, from the QMP events (the `events` capability is turned on
 * first), the time from the STOP event to MIGRATION `completed` by their
 * own time stamps. With `firstByte: { dir, match }`, also the time from
 * sending `migrate` to the first byte of the file (inotify on `dir`).
 */
export async function timedMigrate(vmm, uri, timeoutMs, { firstByte } = {}) {
  await vmm.call('migrate-set-capabilities', {
    capabilities: [{ capability: 'events', state: true }],
  });
  // Events of earlier commands would be taken for this migration's.
  while (vmm.client.pendingEvents().length) await vmm.client.nextEvent();
  const watcher = firstByte ? watchFirstByte(firstByte.dir, firstByte.match) : undefined;
  try {
    const sentAt = wallMs();
    const t0 = process.hrtime.bigint();
    await vmm.call('migrate', { uri });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = (await vmm.call('query-migrate')).return;
      if (info.status === 'completed') {
        const ms = msSince(t0);
        const events = vmm.client.pendingEvents();
        const stop = events.filter((e) => e.event === 'STOP').at(-1);
        const done = events.find((e) => e.event === 'MIGRATION' && e.data?.status === 'completed');
        const stopToCompletedMs = stop && done ? eventMs(done) - eventMs(stop) : undefined;
        let firstByteMs;
        if (watcher) {
          const at = await withTimeout(
            watcher.seen,
            5000,
            `${vmm.label}: the first byte of the file`,
          );
          firstByteMs = at - sentAt;
        }
        // Take the events, so the next migration's are not mixed with these.
        while (vmm.client.pendingEvents().length) await vmm.client.nextEvent();
        return { ms, info, stopToCompletedMs, firstByteMs };
      }
      if (info.status === 'failed' || info.status === 'cancelled') {
        throw new BenchError(
          `${vmm.label}: migrate ${uri}: ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
        );
      }
      if (Date.now() > deadline) {
        throw new BenchError(
          `${vmm.label}: migrate ${uri} not completed within ${timeoutMs} ms (status ${info.status})`,
        );
      }
      await sleep(POLL_MS);
    }
  } finally {
    watcher?.stop();
  }
}

/**
 * Starts a destination (`args` already hold `-incoming ...`) and times it
 * from just before the spawn until query-status leaves `inmigrate`: to
 * `running`, or, when `pausedOk` (the source was paused, so QEMU keeps the
 * destination paused), to `paused`. Resolves with the VMM (still running)
 * and the time.
 */
export async function timedIncoming({ label, command, args, dir, name, timeoutMs, pausedOk }) {
  const vmm = await startVmm({ label, command, args, dir, name });
  try {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const status = (await vmm.call('query-status')).return.status;
      if (status === 'running' || (pausedOk && status === 'paused')) {
        return { vmm, ms: msSince(vmm.t0), status };
      }
      if (status !== 'inmigrate' && status !== 'prelaunch') {
        throw new BenchError(`${label}: after -incoming, run state ${status}`);
      }
      if (Date.now() > deadline) {
        throw new BenchError(`${label}: still ${status} ${timeoutMs} ms after the start`);
      }
      await sleep(POLL_MS);
    }
  } catch (e) {
    await vmm.kill();
    throw e;
  }
}
