import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import {
  FileHandleSink,
  listenIncoming,
  type MigrationUri,
  openIncoming,
  openOutgoing,
  parseMigrationUri,
  withOutgoing,
} from './channels.js';
import { MigrationChannelError } from './errors.js';
import { loadVmState, saveVmState } from './stream.js';
import { type FixtureMachine, fixtureMachine } from './test-fixtures.js';

const MACHINE = 'pc';
const dir = mkdtempSync(join(tmpdir(), 'tsvmm-channels-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function channelCode(code: string) {
  return (e: unknown) => e instanceof MigrationChannelError && e.code === code;
}

function save(m: FixtureMachine) {
  return (sink: Parameters<typeof saveVmState>[0]['sink']) =>
    saveVmState({
      sink,
      machineType: MACHINE,
      vcpus: m.cpus.length,
      ram: m.ram,
      devices: m.devices,
    });
}

/** Loads the stream of an opened incoming channel into `dst`, then closes the channel. */
async function loadInto(ch: Awaited<ReturnType<typeof openIncoming>>, dst: FixtureMachine) {
  try {
    return await loadVmState({
      source: ch.source,
      machineType: MACHINE,
      vcpus: dst.cpus.length,
      ram: dst.ram,
      devices: dst.devices,
    });
  } finally {
    await ch.close();
  }
}

async function loadFrom(uri: string, dst: FixtureMachine) {
  return loadInto(await openIncoming(uri), dst);
}

/** Accepts one connection on a listening endpoint and loads its stream into `dst`. */
async function receiveInto(ep: Awaited<ReturnType<typeof listenIncoming>>, dst: FixtureMachine) {
  return loadInto(await ep.accept(), dst);
}

function assertLoaded(dst: FixtureMachine, src: FixtureMachine): void {
  assert.deepEqual(dst.cpus, src.cpus);
  assert.deepEqual(dst.clock, src.clock);
  assert.ok(Buffer.from(dst.ram.memory.get('pc.ram')!).equals(src.ram.memory.get('pc.ram')!));
}

describe('migration URIs', () => {
  test('the four transports parse as QEMU spells them', () => {
    const cases: [string, MigrationUri][] = [
      ['file:/var/tmp/vm.state', { kind: 'file', path: '/var/tmp/vm.state', offset: 0 }],
      ['file:/a/b,offset=4096', { kind: 'file', path: '/a/b', offset: 4096 }],
      ['file:/a/b,offset=0x1000', { kind: 'file', path: '/a/b', offset: 4096 }],
      ['file:/a/b,offset=4k', { kind: 'file', path: '/a/b', offset: 4096 }],
      ['exec:cat > /tmp/x', { kind: 'exec', command: 'cat > /tmp/x' }],
      ['unix:/run/mig.sock', { kind: 'unix', path: '/run/mig.sock' }],
      ['tcp:10.0.0.2:4444', { kind: 'tcp', host: '10.0.0.2', port: 4444 }],
      ['tcp:[::1]:4444', { kind: 'tcp', host: '::1', port: 4444 }],
      ['tcp::4444', { kind: 'tcp', host: '', port: 4444 }],
    ];
    for (const [uri, parsed] of cases) assert.deepEqual(parseMigrationUri(uri), parsed, uri);
  });

  test('anything else is MIGRATION_BAD_URI naming the accepted forms', () => {
    for (const uri of [
      'http://x',
      'file:',
      'file:/a,offset=lots',
      'exec:',
      'tcp:host',
      'tcp:h:99999',
      'vm.state',
      'rdma:1:2',
    ]) {
      assert.throws(
        () => parseMigrationUri(uri),
        (e: unknown) =>
          channelCode('MIGRATION_BAD_URI')(e) &&
          /file:PATH\[,offset=N\], exec:COMMAND, unix:PATH, tcp:HOST:PORT/.test(
            (e as Error).message,
          ),
        uri,
      );
    }
  });
});

describe('file: channel', () => {
  test('writes go to a temporary name; close() fsyncs and renames into place', async () => {
    const path = join(dir, 'state.qevm');
    const ch = await openOutgoing(`file:${path}`);
    await ch.sink.write(Buffer.from('QEVM-partial'));
    assert.equal(existsSync(path), false, 'no file at the final path while writing');
    const temps = readdirSync(dir).filter((f) => f.startsWith('.state.qevm.'));
    assert.equal(temps.length, 1);
    await ch.sink.write(Buffer.from('-rest'));
    await ch.close();
    assert.equal(readFileSync(path, 'utf8'), 'QEVM-partial-rest');
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.startsWith('.state.qevm.')),
      [],
    );
  });

  test('abort() leaves neither the final file nor the temporary one', async () => {
    const path = join(dir, 'aborted.qevm');
    const ch = await openOutgoing(`file:${path}`);
    await ch.sink.write(Buffer.alloc(100_000, 1));
    await ch.abort();
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.includes('aborted')),
      [],
    );
  });

  test('an existing file is replaced only once the new stream is complete', async () => {
    const path = join(dir, 'replace.qevm');
    await withOutgoing(`file:${path}`, async (sink) => sink.write(Buffer.from('old')));
    await assert.rejects(
      withOutgoing(`file:${path}`, async (sink) => {
        await sink.write(Buffer.from('new, but'));
        throw new Error('cancelled halfway');
      }),
      /cancelled halfway/,
    );
    assert.equal(readFileSync(path, 'utf8'), 'old');
  });

  test(',offset=N writes the stream N bytes in and reads it back from there', async () => {
    const src = fixtureMachine(true, { ramPages: 32 });
    const path = join(dir, 'offset.qevm');
    const stats = await withOutgoing(`file:${path},offset=4k`, save(src));
    const raw = readFileSync(path);
    assert.equal(raw.length, 4096 + stats.bytes);
    assert.ok(raw.subarray(0, 4096).every((b) => b === 0));
    assert.equal(raw.subarray(4096, 4100).toString('latin1'), 'QEVM');
    const dst = fixtureMachine(false, { ramPages: 32 });
    await loadFrom(`file:${path},offset=4096`, dst);
    assertLoaded(dst, src);
  });

  test('a missing file or directory is MIGRATION_OPEN_FAILED', async () => {
    await assert.rejects(
      openIncoming(join(dir, 'nope')).then(() => undefined),
      channelCode('MIGRATION_BAD_URI'),
    );
    await assert.rejects(
      openIncoming(`file:${join(dir, 'nope')}`),
      channelCode('MIGRATION_OPEN_FAILED'),
    );
    await assert.rejects(
      openOutgoing(`file:${join(dir, 'no/such/dir/x')}`),
      channelCode('MIGRATION_OPEN_FAILED'),
    );
  });

  test('a full disk (ENOSPC) is MIGRATION_NO_SPACE', async () => {
    const fh = await open('/dev/full', 'w');
    try {
      const sink = new FileHandleSink(fh, 0, '/dev/full');
      await assert.rejects(sink.write(Buffer.alloc(8192, 1)), channelCode('MIGRATION_NO_SPACE'));
    } finally {
      await fh.close();
    }
  });

  test('a full filesystem fails the save with MIGRATION_NO_SPACE and leaves no file', async (t) => {
    const mnt = join(dir, 'small-fs');
    mkdirSync(mnt);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', mnt], { stdio: 'ignore' });
    } catch {
      t.skip('mounting a small tmpfs needs root with CAP_SYS_ADMIN');
      return;
    }
    try {
      const src = fixtureMachine(true, { ramPages: 256 });
      await assert.rejects(
        withOutgoing(`file:${join(mnt, 'vm.state')}`, save(src)),
        channelCode('MIGRATION_NO_SPACE'),
      );
      assert.deepEqual(readdirSync(mnt), []);
    } finally {
      execFileSync('umount', [mnt]);
    }
  });
});

describe('exec: channel', () => {
  test("'exec:cat > FILE' then 'exec:cat FILE' round-trips a machine", async () => {
    const src = fixtureMachine(true, { ramPages: 128 });
    const path = join(dir, 'exec.qevm');
    await withOutgoing(`exec:cat > '${path}'`, save(src));
    assert.equal(readFileSync(path).subarray(0, 4).toString('latin1'), 'QEVM');
    const dst = fixtureMachine(false, { ramPages: 128 });
    await loadFrom(`exec:cat '${path}'`, dst);
    assertLoaded(dst, src);
  });

  test('a command that fails is MIGRATION_EXEC_FAILED with its status and stderr', async () => {
    const src = fixtureMachine(true, { ramPages: 8 });
    await assert.rejects(
      withOutgoing(`exec:cat > '${join(dir, 'no/such/dir/x')}'`, save(src)),
      (e: unknown) =>
        e instanceof MigrationChannelError &&
        (e.code === 'MIGRATION_EXEC_FAILED' || e.code === 'MIGRATION_BROKEN_PIPE'),
    );
    const dst = fixtureMachine(false, { ramPages: 8 });
    await assert.rejects(
      loadFrom(`exec:cat '${join(dir, 'missing.qevm')}'`, dst),
      (e: unknown) =>
        channelCode('MIGRATION_EXEC_FAILED')(e) &&
        /status 1.*No such file/s.test((e as Error).message),
    );
  });

  test('a reader that exits early gives MIGRATION_BROKEN_PIPE (EPIPE), not a crash', async () => {
    const ch = await openOutgoing('exec:exec true');
    await assert.rejects(
      (async () => {
        for (let i = 0; i < 64; i++) await ch.sink.write(Buffer.alloc(1 << 20));
      })(),
      channelCode('MIGRATION_BROKEN_PIPE'),
    );
    await ch.abort();
  });
});

describe('socket channels', () => {
  test('unix: round-trips a machine and removes its socket file', async () => {
    const sock = join(dir, 'mig.sock');
    const ep = await listenIncoming(`unix:${sock}`);
    const src = fixtureMachine(true, { ramPages: 256 });
    const dst = fixtureMachine(false, { ramPages: 256 });
    const receive = receiveInto(ep, dst);
    await withOutgoing(`unix:${sock}`, save(src));
    await receive;
    await ep.close();
    assertLoaded(dst, src);
    assert.equal(existsSync(sock), false);
  });

  test('tcp: on loopback round-trips a machine, with port 0 resolved at listen time', async () => {
    const ep = await listenIncoming('tcp:127.0.0.1:0');
    assert.equal(ep.uri.kind, 'tcp');
    const port = ep.uri.kind === 'tcp' ? ep.uri.port : 0;
    assert.ok(port > 0);
    const src = fixtureMachine(true, { ramPages: 256 });
    const dst = fixtureMachine(false, { ramPages: 256 });
    const [, res] = await Promise.all([
      withOutgoing(`tcp:127.0.0.1:${port}`, save(src)),
      receiveInto(ep, dst),
    ]);
    await ep.close();
    assertLoaded(dst, src);
    assert.ok(res.normalPages > 0);
  });

  test('a destination that hangs up once it has the whole stream does not fail the source', async () => {
    // The destination completes and closes before the source ends its side:
    // the source's socket has then ended by itself, with everything sent.
    const sock = join(dir, 'hangup.sock');
    const ep = await listenIncoming(`unix:${sock}`);
    const src = fixtureMachine(true, { ramPages: 64 });
    const dst = fixtureMachine(false, { ramPages: 64 });
    const out = await openOutgoing(`unix:${sock}`);
    const receive = receiveInto(ep, dst);
    await save(src)(out.sink);
    await receive;
    await new Promise((r) => setTimeout(r, 100));
    await out.close();
    await ep.close();
    assertLoaded(dst, src);
  });

  test('connecting where nobody listens is MIGRATION_OPEN_FAILED', async () => {
    const ep = await listenIncoming('tcp:127.0.0.1:0');
    const port = ep.uri.kind === 'tcp' ? ep.uri.port : 0;
    await ep.close();
    await assert.rejects(
      openOutgoing(`tcp:127.0.0.1:${port}`),
      channelCode('MIGRATION_OPEN_FAILED'),
    );
    await assert.rejects(
      openOutgoing(`unix:${join(dir, 'nobody.sock')}`),
      channelCode('MIGRATION_OPEN_FAILED'),
    );
  });
});
