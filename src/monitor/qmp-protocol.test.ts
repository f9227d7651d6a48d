// QMP protocol tests over real sockets, driving the server as a management
// tool does. The VM is a test double with a real run state (no KVM needed):
// these prove the protocol, not the VM.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { registerStandardCommands } from './commands.js';
import type { JsonObject } from './json-value.js';
import { QmpClient } from './qmp-client.js';
import { QmpListenError } from './qmp-error.js';
import { QmpCommandRegistry } from './qmp-registry.js';
import { QmpServer } from './qmp-server.js';
import { TestVmControl } from './test-vm-control.js';
import { qmpVersionInfo } from './version.js';
import type { MigrationControl } from './vm-control.js';

interface Fixture {
  dir: string;
  path: string;
  server: QmpServer;
  vm: TestVmControl;
  registry: QmpCommandRegistry;
  clients: QmpClient[];
  connect(): Promise<QmpClient>;
  negotiated(): Promise<QmpClient>;
  close(): Promise<void>;
}

async function startFixture(options: { migration?: MigrationControl } = {}): Promise<Fixture> {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-qmp-'));
  const path = join(dir, 'qmp.sock');
  const registry = new QmpCommandRegistry();
  const vm = new TestVmControl({ name: 'guest1' });
  const version = qmpVersionInfo();
  const server = new QmpServer({ registry, version });
  registerStandardCommands(registry, { vm, version, ...options });
  vm.emit = (event, data) => server.broadcast(event, data);
  // A command that takes a while, to disconnect in the middle of.
  registry.register({
    name: 'x-test-sleep',
    args: { ms: 'int' },
    handler: (args) =>
      new Promise((resolve) => setTimeout(() => resolve({ slept: args.ms! }), args.ms as number)),
  });
  await server.listen({ kind: 'unix', path, wait: false });
  const clients: QmpClient[] = [];
  const fixture: Fixture = {
    dir,
    path,
    server,
    vm,
    registry,
    clients,
    async connect() {
      const c = await QmpClient.connect({ path });
      clients.push(c);
      return c;
    },
    async negotiated() {
      const c = await fixture.connect();
      await c.greeting();
      assert.deepEqual(await c.execute('qmp_capabilities'), {});
      return c;
    },
    async close() {
      for (const c of clients) c.close();
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return fixture;
}

describe('QMP protocol (test double VM, no KVM)', { timeout: 30_000 }, () => {
  let f: Fixture;
  before(async () => {
    f = await startFixture();
  });
  after(async () => {
    await f.close();
  });

  it('greets with QEMU version, our package, no capabilities, CRLF-terminated', async () => {
    const c = await f.connect();
    const raw = await new Promise<string>((resolve) => {
      let text = '';
      c.socket.on('data', (chunk: string) => {
        text += chunk;
        if (text.includes('\r\n')) resolve(text);
      });
    });
    assert.ok(raw.endsWith('\r\n'), 'the greeting ends with CRLF');
    const greeting = JSON.parse(raw);
    assert.deepEqual(Object.keys(greeting), ['QMP']);
    assert.deepEqual(greeting.QMP.capabilities, []);
    assert.deepEqual(Object.keys(greeting.QMP.version.qemu).sort(), ['major', 'micro', 'minor']);
    assert.match(greeting.QMP.version.package, /^tsvmm /);
    // QEMU's spacing, which some scripts match byte for byte.
    assert.ok(raw.startsWith('{"QMP": {"version": {"qemu": {'));
  });

  it('refuses every command before qmp_capabilities, as QEMU does', async () => {
    const c = await f.connect();
    await c.greeting();
    for (const name of ['query-status', 'no-such-command', 'stop']) {
      assert.deepEqual(await c.request(name, undefined, 7), {
        error: {
          class: 'CommandNotFound',
          desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        id: 7,
      });
    }
    assert.equal(f.vm.state, 'prelaunch', 'the refused stop did nothing');
    // Malformed requests keep their own errors in negotiation mode too.
    c.send({ arguments: {} });
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" },
    });
    assert.deepEqual(await c.request('qmp_capabilities', { enable: ['oob'] }), {
      error: { class: 'GenericError', desc: 'Capability oob not available' },
    });
    assert.deepEqual(await c.request('qmp_capabilities', { enable: ['bogus'] }), {
      // QEMU names a list element 'null' here (its visitor has no name for it).
      error: { class: 'GenericError', desc: "Parameter 'null' does not accept value 'bogus'" },
    });
    assert.deepEqual(await c.request('qmp_capabilities', undefined, 'neg'), {
      return: {},
      id: 'neg',
    });
    assert.deepEqual(await c.request('qmp_capabilities'), {
      error: {
        class: 'CommandNotFound',
        desc: 'Capabilities negotiation is already complete, command ignored',
      },
    });
    assert.deepEqual(await c.execute('query-status'), { running: false, status: 'prelaunch' });
  });

  it('starts from prelaunch with cont and stops with stop; STOP/RESUME go to negotiated clients only', async () => {
    const a = await f.negotiated();
    const b = await f.negotiated();
    const shy = await f.connect(); // never negotiates
    await shy.greeting();
    assert.deepEqual(await a.execute('query-status'), { running: false, status: 'prelaunch' });
    assert.deepEqual(await a.execute('cont'), {});
    for (const c of [a, b]) {
      const ev = await c.nextEvent('RESUME');
      assert.equal(ev.data, undefined, 'RESUME carries no data member');
      const ts = ev.timestamp as { seconds: number; microseconds: number };
      assert.ok(Number.isInteger(ts.seconds) && Math.abs(ts.seconds - Date.now() / 1000) < 60);
      assert.ok(Number.isInteger(ts.microseconds) && ts.microseconds >= 0 && ts.microseconds < 1e6);
    }
    assert.deepEqual(await b.execute('query-status'), { running: true, status: 'running' });
    assert.deepEqual(await b.execute('stop'), {});
    await a.nextEvent('STOP');
    await b.nextEvent('STOP');
    assert.deepEqual(await a.execute('query-status'), { running: false, status: 'paused' });
    assert.deepEqual(await a.execute('stop'), {}, 'stop when paused is a no-op');
    assert.deepEqual(await a.execute('cont'), {});
    await a.nextEvent('RESUME');
    await b.nextEvent('RESUME');
    // The shy client got nothing but its greeting; prove it still works.
    assert.deepEqual(shy.pendingEvents(), []);
    assert.deepEqual(await shy.request('query-status'), {
      error: {
        class: 'CommandNotFound',
        desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
      },
    });
    assert.deepEqual(shy.pendingEvents(), [], 'no event reached the un-negotiated client');
    await a.execute('stop');
    await a.nextEvent('STOP');
    await b.nextEvent('STOP');
  });

  it('refuses cont where QEMU does and only sets autostart during an incoming migration', async () => {
    const c = await f.negotiated();
    const saved = f.vm.state;
    try {
      f.vm.state = 'shutdown';
      assert.deepEqual(await c.request('cont'), {
        error: { class: 'GenericError', desc: 'Resetting the Virtual Machine is required' },
      });
      f.vm.state = 'finish-migrate';
      assert.deepEqual(await c.request('cont'), {
        error: { class: 'GenericError', desc: 'Migration is not finalized yet' },
      });
      f.vm.state = 'inmigrate';
      assert.deepEqual(await c.execute('stop'), {});
      assert.equal(f.vm.autostart, false);
      assert.deepEqual(await c.execute('cont'), {});
      assert.equal(f.vm.autostart, true);
      assert.equal(f.vm.state, 'inmigrate', 'cont during inmigrate does not start the VM');
      f.vm.state = 'postmigrate';
      assert.deepEqual(await c.execute('cont'), {});
      assert.equal(f.vm.state, 'running', 'cont after an outgoing migration starts the VM');
      await c.nextEvent('RESUME');
    } finally {
      f.vm.state = saved;
    }
  });

  it('echoes id of any JSON type on success and on error', async () => {
    const c = await f.negotiated();
    for (const id of ['abc', 42, -1.5, { tag: [1, 'x'] }, [null, true], null, false]) {
      assert.deepEqual(await c.request('query-kvm', undefined, id), {
        return: { enabled: true, present: true },
        id,
      });
      assert.deepEqual(await c.request('no-such', undefined, id), {
        error: { class: 'CommandNotFound', desc: 'The command no-such has not been found' },
        id,
      });
    }
    // An id next to a bad member is still echoed: the request was an object.
    c.sendRaw('{"execute": "query-kvm", "id": 5, "bogus": 1}');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "QMP input member 'bogus' is unexpected" },
      id: 5,
    });
  });

  it('recovers from malformed JSON and answers the next good command', async () => {
    const c = await f.negotiated();
    c.sendRaw('{"execute": }\n');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: 'JSON parse error, expecting value' },
    });
    c.sendRaw('{"execute": "query-kvm", "id": 1 @@@ }\n');
    const stray = await c.nextResponse();
    assert.equal((stray.error as { desc: string }).desc, "JSON parse error, stray '@'");
    assert.equal(stray.id, undefined, 'a parse error never carries an id');
    // As in QEMU, the lexer resynchronises at the '}', which then stands alone.
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: 'JSON parse error, expecting value' },
    });
    // A 0xFF byte is QMP's documented way to force the parser back to a known
    // state, here in the middle of a string.
    c.sendRaw(Buffer.from([0x7b, 0x22, 0x65, 0xff]));
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "JSON parse error, stray '\"e\u00ff'" },
    });
    // Recovery skips to the next control character or structural one.
    c.sendRaw('skipped\nnonsense\n');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'nonsense'" },
    });
    c.sendRaw('[1, 2]\n');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: 'QMP input must be a JSON object' },
    });
    c.sendRaw('{"execute": 1}');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" },
    });
    c.sendRaw('{"execute": "stop", "arguments": []}');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" },
    });
    c.sendRaw('{"exec-oob": "stop"}');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" },
    });
    assert.deepEqual(await c.request('query-kvm', undefined, 'after'), {
      return: { enabled: true, present: true },
      id: 'after',
    });
  });

  it('splits several commands in one chunk and joins one command split byte by byte', async () => {
    const c = await f.negotiated();
    c.sendRaw(
      '{"execute":"query-kvm","id":1}{"execute":"query-name","id":2} {"execute":\'query-kvm\',"id":3}',
    );
    assert.equal((await c.nextResponse()).id, 1);
    assert.deepEqual(await c.nextResponse(), { return: { name: 'guest1' }, id: 2 });
    assert.equal((await c.nextResponse()).id, 3);
    const text = Buffer.from('{"execute": "query-name", "id": "\u00e9t\u00e9 \ud83d\ude00"}');
    for (const byte of text) {
      c.sendRaw(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    const response = await c.nextResponse();
    assert.equal(response.id, '\u00e9t\u00e9 \ud83d\ude00');
  });

  it('answers a 1 MiB command and writes non-ASCII as \\u escapes', async () => {
    const c = await f.negotiated();
    const big = `${'x'.repeat(1024 * 1024)}\u00e9`;
    let raw = '';
    c.socket.on('data', (chunk: string) => {
      raw += chunk;
    });
    const response = await c.request('query-kvm', undefined, big);
    assert.equal(response.id, big);
    assert.ok(raw.includes('\\u00E9"'), 'QEMU writes ASCII only, upper-case escapes');
  });

  it('refuses an oversized value with one error, keeps the connection, and other clients carry on', async () => {
    const c = await f.negotiated();
    const other = await f.negotiated();
    // 17 MiB in one string: over the 16 MiB limit.
    const huge = Buffer.alloc(17 * 1024 * 1024, 0x61);
    c.sendRaw('{"execute": "query-kvm", "id": "');
    c.sendRaw(huge);
    c.sendRaw('"}');
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: 'JSON token size limit exceeded' },
    });
    assert.deepEqual(await c.request('query-kvm', undefined, 'still here'), {
      return: { enabled: true, present: true },
      id: 'still here',
    });
    // Nesting beyond QEMU's 1024 levels.
    c.sendRaw(`${'['.repeat(2000)}${']'.repeat(2000)}`);
    assert.deepEqual(await c.nextResponse(), {
      error: { class: 'GenericError', desc: 'JSON nesting depth limit exceeded' },
    });
    assert.equal((await c.request('query-kvm', undefined, 9)).id, 9);
    assert.deepEqual(await other.execute('query-name'), { name: 'guest1' });
  });

  it('checks argument types, missing and unexpected arguments, in QEMU words', async () => {
    const c = await f.negotiated();
    const cases: [string, Record<string, unknown> | undefined, string][] = [
      ['trace-event-get-state', {}, "Parameter 'name' is missing"],
      ['trace-event-get-state', { name: 5 }, "Invalid parameter type for 'name', expected: string"],
      [
        'trace-event-set-state',
        { name: 'kvm_run_exit', enable: 'yes' },
        "Invalid parameter type for 'enable', expected: boolean",
      ],
      [
        'trace-event-get-state',
        { name: 'x', vcpu: 1.5 },
        "Invalid parameter type for 'vcpu', expected: integer",
      ],
      ['trace-event-get-state', { name: 'x', bogus: 1 }, "Parameter 'bogus' is unexpected"],
      ['stop', { force: true }, "Parameter 'force' is unexpected"],
      ['human-monitor-command', {}, "Parameter 'command-line' is missing"],
    ];
    for (const [name, args, desc] of cases) {
      assert.deepEqual(
        await c.request(name, args as never),
        { error: { class: 'GenericError', desc } },
        `${name} ${JSON.stringify(args)}`,
      );
    }
    assert.equal(f.vm.state === 'running' || f.vm.state === 'paused', true);
    assert.deepEqual(await c.request('query-everything'), {
      error: { class: 'CommandNotFound', desc: 'The command query-everything has not been found' },
    });
  });

  it('answers the query commands in QEMU shapes', async () => {
    const c = await f.negotiated();
    const version = (await c.execute('query-version')) as { qemu: object; package: string };
    assert.deepEqual(Object.keys(version).sort(), ['package', 'qemu']);
    assert.deepEqual(await c.execute('query-name'), { name: 'guest1' });
    assert.deepEqual(await c.execute('query-kvm'), { enabled: true, present: true });
    const names = ((await c.execute('query-commands')) as { name: string }[]).map((x) => x.name);
    for (const n of [
      'qmp_capabilities',
      'query-status',
      'stop',
      'cont',
      'quit',
      'query-cpus-fast',
    ]) {
      assert.ok(names.includes(n), `query-commands lists ${n}`);
    }
    assert.ok(!names.includes('migrate'), 'no migration commands without a MigrationControl');
    assert.deepEqual(await c.execute('query-cpus-fast'), [
      {
        'cpu-index': 0,
        'qom-path': '/machine/unattached/device[0]',
        'thread-id': 1000,
        props: { 'socket-id': 0, 'core-id': 0, 'thread-id': 0 },
        target: 'x86_64',
      },
      {
        'cpu-index': 1,
        'qom-path': '/machine/unattached/device[1]',
        'thread-id': 1001,
        props: { 'socket-id': 0, 'core-id': 1, 'thread-id': 0 },
        target: 'x86_64',
      },
    ]);
  });

  it('reads and sets trace event state with QEMU errors', async () => {
    const c = await f.negotiated();
    assert.deepEqual(await c.execute('trace-event-get-state', { name: 'kvm_run_exit' }), [
      { name: 'kvm_run_exit', state: 'disabled', vcpu: false },
    ]);
    assert.deepEqual(await c.execute('trace-event-set-state', { name: 'kvm_*', enable: true }), {});
    const states = (await c.execute('trace-event-get-state', { name: 'kvm*' })) as {
      name: string;
      state: string;
    }[];
    assert.deepEqual(
      states.map((s) => [s.name, s.state]),
      [
        ['kvm_run_exit', 'enabled'],
        ['kvm_vcpu_ioctl', 'enabled'],
        ['kvmclock_ctrl', 'disabled'],
      ],
    );
    assert.deepEqual(await c.request('trace-event-get-state', { name: 'nope' }), {
      error: { class: 'GenericError', desc: 'unknown event "nope"' },
    });
    assert.deepEqual(await c.request('trace-event-set-state', { name: 'tcg_only', enable: true }), {
      error: { class: 'GenericError', desc: 'event "tcg_only" is disabled' },
    });
    assert.deepEqual(
      await c.execute('trace-event-set-state', {
        name: 'tcg_only',
        enable: true,
        'ignore-unavailable': true,
      }),
      {},
    );
    assert.deepEqual(await c.request('trace-event-get-state', { name: 'kvm_run_exit', vcpu: 0 }), {
      error: { class: 'GenericError', desc: 'event "kvm_run_exit" is not vCPU-specific' },
    });
    assert.deepEqual(await c.request('trace-event-get-state', { name: 'kvm*', vcpu: 9 }), {
      error: { class: 'GenericError', desc: 'invalid vCPU index 9' },
    });
    await c.execute('trace-event-set-state', {
      name: '*',
      enable: false,
      'ignore-unavailable': true,
    });
  });

  it('runs HMP through human-monitor-command', async () => {
    const c = await f.negotiated();
    f.vm.state = 'paused';
    assert.equal(
      await c.execute('human-monitor-command', { 'command-line': 'info status' }),
      'VM status: paused\r\n',
    );
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'c' }), '');
    await c.nextEvent('RESUME');
    assert.equal(
      await c.execute('human-monitor-command', { 'command-line': 'info status' }),
      'VM status: running\r\n',
    );
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'stop' }), '');
    await c.nextEvent('STOP');
    assert.equal(
      await c.execute('human-monitor-command', { 'command-line': 'frobnicate now' }),
      "unknown command: 'frobnicate'\r\n",
    );
    assert.equal(
      await c.execute('human-monitor-command', { 'command-line': 'info kvm' }),
      'kvm support: enabled\r\n',
    );
  });

  it('carries on when a client disconnects in the middle of a command', async () => {
    const leaver = await f.negotiated();
    const stayer = await f.negotiated();
    const before = f.server.clientCount;
    leaver.send({ execute: 'x-test-sleep', arguments: { ms: 100 } });
    await new Promise((r) => setTimeout(r, 20));
    leaver.close();
    // Queued behind the sleeping command (commands run one at a time), then answered.
    assert.deepEqual(await stayer.execute('x-test-sleep', { ms: 1 }), { slept: 1 });
    assert.deepEqual(await stayer.execute('query-name'), { name: 'guest1' });
    for (let i = 0; i < 50 && f.server.clientCount !== before - 1; i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(f.server.clientCount, before - 1, 'the server forgot the client that left');
  });

  it('answers a client that sends its commands and shuts its sending side', async () => {
    const c = await f.connect();
    c.sendRaw('{"execute": "qmp_capabilities"}{"execute": "query-name", "id": "last"}');
    c.socket.end();
    await c.greeting();
    assert.deepEqual(await c.nextResponse(), { return: {} });
    assert.deepEqual(await c.nextResponse(), { return: { name: 'guest1' }, id: 'last' });
    await c.closed();
  });

  it('serves 100 clients at once, each negotiating and querying', async () => {
    const results = await Promise.all(
      Array.from({ length: 100 }, async (_, i) => {
        const c = await f.negotiated();
        const response = await c.request('query-status', undefined, i);
        c.close();
        return response;
      }),
    );
    results.forEach((r, i) => {
      assert.equal(r.id, i);
      assert.ok('return' in r);
    });
  });

  it('creates the unix socket with mode 0600', () => {
    assert.equal(statSync(f.path).mode & 0o777, 0o600);
  });

  it('hands the reply to quit to the socket before quitting', async () => {
    // A stream we control, so "handed to the socket" can be observed exactly.
    const written: string[] = [];
    const stream = new Duplex({
      read() {},
      write(chunk: Buffer, _encoding, callback) {
        written.push(chunk.toString());
        callback();
      },
    });
    const quitCalled = new Promise<string[]>((resolve) => {
      f.vm.onQuit = () => resolve([...written]);
    });
    f.server.attach(stream, 'test');
    stream.push('{"execute": "qmp_capabilities"}{"execute": "quit", "id": "q"}');
    const seenAtQuit = await quitCalled;
    f.vm.onQuit = () => {};
    const reply = seenAtQuit.indexOf('{"return": {}, "id": "q"}\r\n');
    assert.ok(reply >= 0, 'the reply was written before quit ran');
    // The double's quit emits SHUTDOWN, which therefore follows the reply.
    const shutdown = JSON.parse(seenAtQuit[reply + 1]!);
    assert.equal(shutdown.event, 'SHUTDOWN');
    assert.deepEqual(shutdown.data, { guest: false, reason: 'host-qmp-quit' });
    stream.destroy();
  });
});

describe('QMP listeners (real sockets)', { timeout: 10_000 }, () => {
  it('listens on tcp 127.0.0.1 port 0 and reports the bound port', async () => {
    const registry = new QmpCommandRegistry();
    const server = new QmpServer({ registry, version: qmpVersionInfo() });
    try {
      const listener = await server.listen({
        kind: 'tcp',
        host: '127.0.0.1',
        port: 0,
        wait: false,
      });
      assert.ok(listener.port !== undefined && listener.port > 0);
      assert.equal(listener.address, `tcp:127.0.0.1:${listener.port}`);
      const c = await QmpClient.connect({ host: '127.0.0.1', port: listener.port });
      await c.greeting();
      assert.deepEqual(await c.execute('qmp_capabilities'), {});
      // A bare registry has only the protocol's own command.
      assert.equal(
        ((await c.request('query-status')).error as { class: string }).class,
        'CommandNotFound',
      );
      await listener.waitForClient();
      c.close();
    } finally {
      await server.close();
    }
  });

  it('serves several listeners at once, broadcasting to all', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-qmp-'));
    const registry = new QmpCommandRegistry();
    const server = new QmpServer({ registry, version: qmpVersionInfo() });
    try {
      const u1 = join(dir, 'a.sock');
      const u2 = join(dir, 'b.sock');
      await server.listen({ kind: 'unix', path: u1, wait: false });
      await server.listen({ kind: 'unix', path: u2, wait: false });
      const t = await server.listen({ kind: 'tcp', host: '127.0.0.1', port: 0, wait: false });
      const clients = await Promise.all([
        QmpClient.connect({ path: u1 }),
        QmpClient.connect({ path: u2 }),
        QmpClient.connect({ host: '127.0.0.1', port: t.port! }),
      ]);
      for (const c of clients) {
        await c.greeting();
        await c.execute('qmp_capabilities');
      }
      server.broadcast('MIGRATION', { status: 'active' });
      for (const c of clients) {
        assert.deepEqual((await c.nextEvent('MIGRATION')).data, { status: 'active' });
        c.close();
      }
    } finally {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('replaces a stale socket, refuses a live one or a plain file, removes its own on close', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-qmp-'));
    const registry = new QmpCommandRegistry();
    const server = new QmpServer({ registry, version: qmpVersionInfo() });
    const other = createServer();
    try {
      // A stale socket: its owner was killed and could not remove it.
      const stale = join(dir, 'stale.sock');
      const owner = spawn(
        process.execPath,
        [
          '-e',
          `require('net').createServer().listen(${JSON.stringify(stale)}, () => console.log('up'))`,
        ],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      await new Promise<void>((r) => owner.stdout.once('data', () => r()));
      const exited = new Promise<void>((r) => owner.once('exit', () => r()));
      owner.kill('SIGKILL');
      await exited;
      assert.ok(statSync(stale).isSocket(), 'the killed owner left its socket file behind');
      await server.listen({ kind: 'unix', path: stale, wait: false });
      const c = await QmpClient.connect({ path: stale });
      assert.ok('QMP' in (await c.greeting()));
      c.close();

      const live = join(dir, 'live.sock');
      await new Promise<void>((r) => other.listen(live, () => r()));
      await assert.rejects(server.listen({ kind: 'unix', path: live, wait: false }), (e) => {
        assert.ok(e instanceof QmpListenError);
        assert.equal(e.code, 'QMP_LISTEN');
        assert.match(e.message, /another process is listening/);
        return true;
      });

      const plain = join(dir, 'plain');
      writeFileSync(plain, 'keep me');
      await assert.rejects(
        server.listen({ kind: 'unix', path: plain, wait: false }),
        /not a socket/,
      );
      assert.equal(statSync(plain).size, 7, 'the plain file is untouched');

      await server.close();
      assert.throws(() => statSync(stale), /ENOENT/, 'the socket file is removed on close');
    } finally {
      await server.close();
      await new Promise<void>((r) => other.close(() => r()));
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('QMP migration commands', { timeout: 10_000 }, () => {
  it('are registered only with a MigrationControl, and validated against its parameter schema', async () => {
    const calls: string[] = [];
    const migration: MigrationControl = {
      migrate: async (uri, options) => {
        calls.push(`migrate ${uri} ${JSON.stringify(options)}`);
      },
      migrateIncoming: async (uri) => {
        calls.push(`incoming ${uri}`);
      },
      queryMigrate: () => ({ status: 'completed' }),
      cancel: async () => {
        calls.push('cancel');
      },
      parameterSchema: { '*downtime-limit': 'int', '*max-bandwidth': 'int' },
      setParameters: (p) => {
        calls.push(`set ${JSON.stringify(p)}`);
      },
      queryParameters: () => ({ 'downtime-limit': 300 }),
      capabilityNames: ['events', 'xbzrle'],
      setCapabilities: (list) => {
        calls.push(`caps ${JSON.stringify(list)}`);
      },
      queryCapabilities: () => [{ capability: 'events', state: false }],
      statusNames: ['none', 'pre-switchover'],
      migrateContinue: (state) => {
        calls.push(`continue ${state}`);
      },
    };
    const f = await startFixture({ migration });
    try {
      const c = await f.negotiated();
      assert.deepEqual(await c.execute('migrate', { uri: 'file:/tmp/x', detach: true }), {});
      assert.deepEqual(await c.request('migrate', {}), {
        error: { class: 'GenericError', desc: "Parameter 'uri' is missing" },
      });
      assert.deepEqual(await c.execute('migrate-incoming', { uri: 'tcp:0:4444' }), {});
      assert.deepEqual(await c.execute('query-migrate'), { status: 'completed' });
      assert.deepEqual(await c.execute('migrate_cancel'), {});
      assert.deepEqual(await c.execute('migrate-set-parameters', { 'downtime-limit': 10 }), {});
      assert.deepEqual(await c.request('migrate-set-parameters', { 'downtime-limit': 'x' }), {
        error: {
          class: 'GenericError',
          desc: "Invalid parameter type for 'downtime-limit', expected: integer",
        },
      });
      assert.deepEqual(await c.request('migrate-set-parameters', { 'bogus-param': 1 }), {
        error: { class: 'GenericError', desc: "Parameter 'bogus-param' is unexpected" },
      });
      assert.deepEqual(await c.execute('query-migrate-parameters'), { 'downtime-limit': 300 });
      const caps = [{ capability: 'events', state: true }];
      assert.deepEqual(await c.execute('migrate-set-capabilities', { capabilities: caps }), {});
      // QEMU 7.2's own texts, checked against qemu-system-x86_64 7.2 (nested names
      // for types and missing members; the bare member name for a bad enum value).
      const refusals: [JsonObject, string][] = [
        [
          { capabilities: [{ capability: 'foo', state: true }] },
          "Parameter 'capability' does not accept value 'foo'",
        ],
        [
          { capabilities: [{ capability: 'events', state: 'x' }] },
          "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ],
        [
          { capabilities: [{ capability: 'events' }] },
          "Parameter 'capabilities[0].state' is missing",
        ],
        [
          { capabilities: [{ capability: 'events', state: true, x: 1 }] },
          "Parameter 'capabilities[0].x' is unexpected",
        ],
        [{ capabilities: {} }, "Invalid parameter type for 'capabilities', expected: array"],
        [{}, "Parameter 'capabilities' is missing"],
      ];
      for (const [args, desc] of refusals) {
        assert.deepEqual(await c.request('migrate-set-capabilities', args), {
          error: { class: 'GenericError', desc },
        });
      }
      assert.deepEqual(await c.execute('query-migrate-capabilities'), [
        { capability: 'events', state: false },
      ]);
      assert.deepEqual(await c.execute('migrate-continue', { state: 'pre-switchover' }), {});
      assert.deepEqual(await c.request('migrate-continue', { state: 'bogus' }), {
        error: { class: 'GenericError', desc: "Parameter 'state' does not accept value 'bogus'" },
      });
      assert.deepEqual(await c.request('migrate-continue', {}), {
        error: { class: 'GenericError', desc: "Parameter 'state' is missing" },
      });
      assert.deepEqual(calls, [
        'migrate file:/tmp/x {"detach":true}',
        'incoming tcp:0:4444',
        'cancel',
        'set {"downtime-limit":10}',
        'caps [{"capability":"events","state":true}]',
        'continue pre-switchover',
      ]);
    } finally {
      await f.close();
    }
  });
});
