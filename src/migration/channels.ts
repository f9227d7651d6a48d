import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fsync, openSync, renameSync } from 'node:fs';
import { type FileHandle, lstat, open, unlink } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { basename, dirname, join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { MigrationChannelError } from './errors.js';
import type { ByteSink, ByteSource } from './qemu-file.js';

/** A parsed migration URI, QEMU's forms for `migrate` and `-incoming`. */
export type MigrationUri =
  | { kind: 'file'; path: string; offset: number }
  | { kind: 'exec'; command: string }
  | { kind: 'unix'; path: string }
  | { kind: 'tcp'; host: string; port: number };

const ACCEPTED = 'accepted forms: file:PATH[,offset=N], exec:COMMAND, unix:PATH, tcp:HOST:PORT';

function badUri(uri: string, why: string): MigrationChannelError {
  return new MigrationChannelError(
    'MIGRATION_BAD_URI',
    `bad migration URI '${uri}': ${why}; ${ACCEPTED}`,
  );
}

const SIZE_SUFFIX: Record<string, number> = { b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 };

/** Parses a size as QEMU's qemu_strtosz does for integers: 4096, 0x1000, 4k, 1M. */
function parseSize(text: string): number | undefined {
  const m = /^(0x[0-9a-f]+|\d+)([bkmgtpe])?$/i.exec(text.trim());
  if (!m) return undefined;
  const base = Number(m[1]!);
  const shift = m[2] ? SIZE_SUFFIX[m[2].toLowerCase()]! : 0;
  const v = base * 2 ** shift;
  return Number.isSafeInteger(v) ? v : undefined;
}

/**
 * Parses `file:PATH[,offset=N]`, `exec:CMD`, `unix:PATH` or
 * `tcp:HOST:PORT` (HOST may be `[v6addr]`, or empty to listen on all
 * addresses). Anything else is MIGRATION_BAD_URI naming the accepted forms.
 */
export function parseMigrationUri(uri: string): MigrationUri {
  const colon = uri.indexOf(':');
  if (colon < 0) throw badUri(uri, 'no transport prefix');
  const scheme = uri.slice(0, colon);
  const rest = uri.slice(colon + 1);
  switch (scheme) {
    case 'file': {
      const at = rest.lastIndexOf(',offset=');
      const path = at >= 0 ? rest.slice(0, at) : rest;
      let offset = 0;
      if (at >= 0) {
        const v = parseSize(rest.slice(at + ',offset='.length));
        if (v === undefined)
          throw badUri(uri, 'the offset is not a size (like 4096, 0x1000 or 4k)');
        offset = v;
      }
      if (!path) throw badUri(uri, 'the file path is empty');
      return { kind: 'file', path, offset };
    }
    case 'exec':
      if (!rest.trim()) throw badUri(uri, 'the command is empty');
      return { kind: 'exec', command: rest };
    case 'unix':
      if (!rest) throw badUri(uri, 'the socket path is empty');
      return { kind: 'unix', path: rest };
    case 'tcp': {
      const m = /^(\[[^\]]*\]|[^:[\]]*):(\d+)$/.exec(rest);
      if (!m) throw badUri(uri, 'expected tcp:HOST:PORT');
      const port = Number(m[2]);
      if (port > 65535) throw badUri(uri, `port ${port} is out of range`);
      const host = m[1]!.startsWith('[') ? m[1]!.slice(1, -1) : m[1]!;
      return { kind: 'tcp', host, port };
    }
    default:
      throw badUri(uri, `unknown transport '${scheme}'`);
  }
}

/** The URI text of a parsed URI. */
export function formatMigrationUri(u: MigrationUri): string {
  switch (u.kind) {
    case 'file':
      return u.offset ? `file:${u.path},offset=${u.offset}` : `file:${u.path}`;
    case 'exec':
      return `exec:${u.command}`;
    case 'unix':
      return `unix:${u.path}`;
    case 'tcp':
      return `tcp:${u.host.includes(':') ? `[${u.host}]` : u.host}:${u.port}`;
  }
}

/** Maps a system write error to a typed one: disk full, broken pipe, other. */
export function writeError(err: unknown, where: string): MigrationChannelError {
  if (err instanceof MigrationChannelError) return err;
  const code = (err as { code?: string } | null)?.code ?? '';
  const detail = err instanceof Error ? err.message : String(err);
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') {
    return new MigrationChannelError(
      'MIGRATION_NO_SPACE',
      `no space left writing ${where} (${code}): free disk space or choose another place`,
      { cause: err },
    );
  }
  if (code === 'EPIPE' || code === 'ECONNRESET' || code === 'ERR_STREAM_DESTROYED') {
    return new MigrationChannelError(
      'MIGRATION_BROKEN_PIPE',
      `the receiver of ${where} went away (${code}): check that the destination is still running`,
      { cause: err },
    );
  }
  return new MigrationChannelError('MIGRATION_WRITE_FAILED', `writing ${where} failed: ${detail}`, {
    cause: err,
  });
}

function openError(err: unknown, what: string): MigrationChannelError {
  const detail = err instanceof Error ? err.message : String(err);
  return new MigrationChannelError('MIGRATION_OPEN_FAILED', `cannot open ${what}: ${detail}`, {
    cause: err,
  });
}

/** The sending end of a migration: write the stream to `sink`, then close() or abort(). */
export interface OutgoingChannel {
  readonly uri: MigrationUri;
  readonly sink: ByteSink;
  /** Finishes: file renamed into place and synced, command exited 0, socket flushed. */
  close(): Promise<void>;
  /**
   * Starts making what was written so far durable, where that means
   * anything (file: fdatasync), so that close() has little left to do.
   * Called while the guest still runs, before the stop of a live migration.
   */
  flush?(): Promise<void>;
  /** Gives up: no file is left behind, the command is killed, the socket dropped. */
  abort(): Promise<void>;
}

/** The receiving end: read the stream from `source`, then close(). */
export interface IncomingChannel {
  readonly uri: MigrationUri;
  readonly source: ByteSource;
  close(): Promise<void>;
}

/** A prepared `-incoming` endpoint; for tcp: and unix: it is already listening. */
export interface IncomingEndpoint {
  /** The URI with what was resolved at listen time, such as the port for tcp:HOST:0. */
  readonly uri: MigrationUri;
  /** Waits for the stream: opens the file, starts the command or accepts one connection. */
  accept(): Promise<IncomingChannel>;
  /** Stops listening (and removes a unix: socket file). */
  close(): Promise<void>;
}

// ------------------------------------------------------------------ file:

/**
 * A sink writing at increasing positions of a file handle; seekable: it
 * can leave holes (skip) and write at given positions (writeAt), which
 * the mapped-ram layout needs.
 */
export class FileHandleSink implements ByteSink {
  /** Where the stream starts in the file. */
  readonly fileOffset: number;

  constructor(
    private readonly fh: FileHandle,
    private position: number,
    private readonly where: string,
  ) {
    this.fileOffset = position;
  }

  async write(buf: Uint8Array): Promise<void> {
    await this.writeFully(buf, this.position);
    this.position += buf.length;
  }

  skip(n: number): void {
    this.position += n;
  }

  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    await this.writeFully(buf, this.fileOffset + position);
  }

  private async writeFully(buf: Uint8Array, at: number): Promise<void> {
    let off = 0;
    try {
      while (off < buf.length) {
        const { bytesWritten } = await this.fh.write(buf, off, buf.length - off, at + off);
        off += bytesWritten;
      }
    } catch (err) {
      throw writeError(err, this.where);
    }
  }
}

/**
 * fsync of a directory. Its open and close are synchronous: each call of
 * fs/promises is a round trip through libuv's thread pool, and this runs
 * while the migrated VM is stopped.
 */
async function fsyncDir(dir: string): Promise<void> {
  const fd = openSync(dir, 'r');
  try {
    await new Promise<void>((resolve, reject) =>
      fsync(fd, (err) => (err ? reject(err) : resolve())),
    );
  } finally {
    closeSync(fd);
  }
}

/** The temporary name a file: migration writes to before the rename. */
export function tempPathFor(path: string): string {
  return join(
    dirname(path),
    `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tsvmm-tmp`,
  );
}

async function openFileOutgoing(u: MigrationUri & { kind: 'file' }): Promise<OutgoingChannel> {
  const tmp = tempPathFor(u.path);
  let fh: FileHandle;
  try {
    fh = await open(tmp, 'wx', 0o600);
  } catch (err) {
    throw openError(err, `a temporary file next to ${u.path}`);
  }
  let closed = false;
  const abort = async (): Promise<void> => {
    if (!closed) {
      closed = true;
      await fh.close().catch(() => undefined);
    }
    await unlink(tmp).catch(() => undefined);
  };
  return {
    uri: u,
    sink: new FileHandleSink(fh, u.offset, u.path),
    async flush() {
      try {
        await fh.datasync();
      } catch (err) {
        throw writeError(err, u.path);
      }
    },
    async close() {
      try {
        // Data on disk, then the name: a crash leaves either no file at
        // the final path or the complete one, never a partial one. This
        // runs while the VM is stopped: the rename (metadata, microseconds)
        // is synchronous, and the file's close overlaps the directory's
        // fsync, so two trips through libuv's thread pool are waited for
        // instead of six.
        await fh.sync();
        renameSync(tmp, u.path);
        closed = true;
        await Promise.all([fh.close(), fsyncDir(dirname(u.path))]);
      } catch (err) {
        await abort();
        throw writeError(err, u.path);
      }
    },
    abort,
  };
}

/** Reads a file from a position on; seekable (skip, readAt) and with its fd for mmap. */
class FileSource implements ByteSource {
  constructor(
    private readonly fh: FileHandle,
    private position: number,
    private readonly path: string,
  ) {}

  get fd(): number {
    return this.fh.fd;
  }

  skip(n: number): void {
    this.position += n;
  }

  async read(into: Uint8Array): Promise<number> {
    const n = await this.readAt(into, this.position);
    this.position += n;
    return n;
  }

  async readAt(into: Uint8Array, position: number): Promise<number> {
    try {
      const { bytesRead } = await this.fh.read(into, 0, into.length, position);
      return bytesRead;
    } catch (err) {
      throw new MigrationChannelError(
        'MIGRATION_READ_FAILED',
        `reading ${this.path} failed: ${String(err)}`,
        {
          cause: err,
        },
      );
    }
  }
}

// -------------------------------------------------------- streams, sockets

const HIGH_WATER = 8 << 20;

/** Adapts a Node readable (socket, pipe) to a ByteSource with back-pressure. */
class ReadableSource implements ByteSource {
  private readonly queue: Buffer[] = [];
  private queued = 0;
  private ended = false;
  private error: Error | undefined;
  private wake: (() => void) | undefined;

  constructor(
    private readonly stream: Readable,
    private readonly where: string,
    private readonly atEnd?: () => Promise<void>,
  ) {
    stream.on('data', (c: Buffer) => {
      this.queue.push(c);
      this.queued += c.length;
      if (this.queued > HIGH_WATER) stream.pause();
      this.notify();
    });
    stream.on('end', () => {
      this.ended = true;
      this.notify();
    });
    stream.on('close', () => {
      this.ended = true;
      this.notify();
    });
    stream.on('error', (e: Error) => {
      this.error = e;
      this.notify();
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  async read(into: Uint8Array): Promise<number> {
    while (this.queued === 0) {
      if (this.error) {
        throw new MigrationChannelError(
          'MIGRATION_READ_FAILED',
          `reading ${this.where} failed: ${this.error.message}`,
          { cause: this.error },
        );
      }
      if (this.ended) {
        await this.atEnd?.();
        return 0;
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
    let n = 0;
    while (n < into.length && this.queue.length > 0) {
      const head = this.queue[0]!;
      const take = Math.min(head.length, into.length - n);
      into.set(head.subarray(0, take), n);
      n += take;
      if (take === head.length) this.queue.shift();
      else this.queue[0] = head.subarray(take);
    }
    this.queued -= n;
    if (this.queued < HIGH_WATER / 2 && this.stream.isPaused()) this.stream.resume();
    return n;
  }
}

/** A sink over a Node writable; each write resolves once the data left our buffers. */
class WritableSink implements ByteSink {
  private failure: Error | undefined;
  aborted = false;

  constructor(
    private readonly stream: Writable,
    private readonly where: string,
  ) {
    // Without a listener an EPIPE would crash the process.
    stream.on('error', (e: Error) => {
      this.failure ??= e;
    });
  }

  write(buf: Uint8Array): Promise<void> {
    if (this.aborted) return Promise.reject(cancelled(this.where));
    if (this.failure) return Promise.reject(writeError(this.failure, this.where));
    return new Promise((resolve, reject) => {
      this.stream.write(buf, (err) => {
        if (this.aborted) reject(cancelled(this.where));
        else if (err) reject(writeError(err, this.where));
        else resolve();
      });
    });
  }

  async end(): Promise<void> {
    if (this.failure) throw writeError(this.failure, this.where);
    await new Promise<void>((resolve, reject) => {
      this.stream.end((err?: Error | null) => {
        // A destination that has read the whole stream may hang up first;
        // a socket then ends its own writing side, once everything we
        // wrote had left. That is a finished stream, not a failed one.
        if (!err || (err as NodeJS.ErrnoException).code === 'ERR_STREAM_ALREADY_FINISHED') {
          resolve();
        } else reject(writeError(err, this.where));
      });
    });
    if (this.failure) throw writeError(this.failure, this.where);
  }
}

function cancelled(where: string): MigrationChannelError {
  return new MigrationChannelError(
    'MIGRATION_CANCELLED',
    `the migration to ${where} was cancelled`,
  );
}

// ------------------------------------------------------------------ exec:

const STDERR_TAIL = 2048;

interface Reaped {
  code: number | null;
  signal: NodeJS.Signals | null;
}

function spawnShell(
  command: string,
  stdio: 'in' | 'out',
): {
  child: ChildProcess;
  exited: Promise<Reaped>;
  stderr: () => string;
} {
  const child = spawn('/bin/sh', ['-c', command], {
    stdio: stdio === 'in' ? ['pipe', 'ignore', 'pipe'] : ['ignore', 'pipe', 'pipe'],
  });
  let tail = '';
  child.stderr?.on('data', (c: Buffer) => {
    tail = (tail + c.toString('utf8')).slice(-STDERR_TAIL);
  });
  const exited = new Promise<Reaped>((resolve) => {
    child.on('error', () => resolve({ code: -1, signal: null }));
    child.on('close', (code, signal) => resolve({ code, signal }));
  });
  return { child, exited, stderr: () => tail.trim() };
}

function execFailure(command: string, r: Reaped, stderr: string): MigrationChannelError {
  const how = r.signal
    ? `was killed by ${r.signal}`
    : r.code === -1
      ? 'could not start'
      : `exited with status ${r.code}`;
  return new MigrationChannelError(
    'MIGRATION_EXEC_FAILED',
    `migration command '${command}' ${how}${stderr ? `: ${stderr}` : ''}`,
  );
}

function openExecOutgoing(u: MigrationUri & { kind: 'exec' }): OutgoingChannel {
  const { child, exited, stderr } = spawnShell(u.command, 'in');
  const sink = new WritableSink(child.stdin!, `command '${u.command}'`);
  return {
    uri: u,
    sink,
    async close() {
      let endErr: unknown;
      try {
        await sink.end();
      } catch (err) {
        endErr = err;
      }
      const r = await exited;
      if (r.code !== 0) throw execFailure(u.command, r, stderr());
      if (endErr) throw endErr;
    },
    async abort() {
      sink.aborted = true;
      child.stdin?.destroy();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

function openExecIncoming(u: MigrationUri & { kind: 'exec' }): IncomingChannel {
  const { child, exited, stderr } = spawnShell(u.command, 'out');
  const source = new ReadableSource(child.stdout!, `command '${u.command}'`, async () => {
    // End of output: the command's status decides whether it was all.
    const r = await exited;
    if (r.code !== 0) throw execFailure(u.command, r, stderr());
  });
  return {
    uri: u,
    source,
    async close() {
      child.stdout?.destroy();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

// --------------------------------------------------------- unix:, tcp:

function socketOutgoing(u: MigrationUri & { kind: 'unix' | 'tcp' }): Promise<OutgoingChannel> {
  const where = formatMigrationUri(u);
  return new Promise((resolve, reject) => {
    const sock: Socket =
      u.kind === 'unix'
        ? connect({ path: u.path })
        : connect({ host: u.host || 'localhost', port: u.port });
    const onError = (err: Error) => reject(openError(err, where));
    sock.once('error', onError);
    sock.once('connect', () => {
      sock.off('error', onError);
      sock.setNoDelay(true);
      const sink = new WritableSink(sock, where);
      resolve({
        uri: u,
        sink,
        async close() {
          try {
            await sink.end();
          } finally {
            sock.destroy();
          }
        },
        async abort() {
          sink.aborted = true;
          sock.destroy();
        },
      });
    });
  });
}

async function listenSocket(u: MigrationUri & { kind: 'unix' | 'tcp' }): Promise<IncomingEndpoint> {
  if (u.kind === 'unix') {
    // A stale socket from an earlier run would make bind() fail; QEMU
    // removes it too. Anything that is not a socket is left alone.
    const st = await lstat(u.path).catch(() => undefined);
    if (st?.isSocket()) await unlink(u.path);
  }
  const server: Server = createServer({ pauseOnConnect: true });
  let connection: Promise<Socket> | undefined;
  const first = new Promise<Socket>((resolve, reject) => {
    server.once('connection', (sock: Socket) => {
      // One stream per -incoming, as QEMU accepts one connection.
      server.close();
      resolve(sock);
    });
    server.once('error', reject);
  });
  first.catch(() => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(openError(err, formatMigrationUri(u))));
    if (u.kind === 'unix') server.listen(u.path, resolve);
    else server.listen(u.port, u.host || undefined, resolve);
  });
  let resolved: MigrationUri = u;
  const addr = server.address();
  if (u.kind === 'tcp' && addr && typeof addr === 'object') {
    resolved = { kind: 'tcp', host: u.host, port: addr.port };
  }
  const cleanup = async (): Promise<void> => {
    if (server.listening) await new Promise<void>((r) => server.close(() => r()));
    if (u.kind === 'unix') await unlink(u.path).catch(() => undefined);
  };
  return {
    uri: resolved,
    async accept() {
      connection ??= first;
      const sock = await connection;
      await cleanup();
      const source = new ReadableSource(sock, formatMigrationUri(resolved));
      sock.resume();
      return {
        uri: resolved,
        source,
        async close() {
          sock.destroy();
        },
      };
    },
    close: cleanup,
  };
}

// ------------------------------------------------------------- entry points

/**
 * Opens the sending end of `uri`. `file:` writes to a temporary name in the
 * same directory, made durable and renamed into place by close(); at
 * `,offset=N` the stream starts N bytes into the file (the bytes before are
 * zero, as with QEMU, which truncates the file).
 */
export async function openOutgoing(uri: string | MigrationUri): Promise<OutgoingChannel> {
  const u = typeof uri === 'string' ? parseMigrationUri(uri) : uri;
  switch (u.kind) {
    case 'file':
      return openFileOutgoing(u);
    case 'exec':
      return openExecOutgoing(u);
    case 'unix':
    case 'tcp':
      return socketOutgoing(u);
  }
}

/** Prepares the receiving end of `uri`; tcp: and unix: listen at once. */
export async function listenIncoming(uri: string | MigrationUri): Promise<IncomingEndpoint> {
  const u = typeof uri === 'string' ? parseMigrationUri(uri) : uri;
  switch (u.kind) {
    case 'file':
      return {
        uri: u,
        async accept() {
          let fh: FileHandle;
          try {
            fh = await open(u.path, 'r');
          } catch (err) {
            throw openError(err, u.path);
          }
          return { uri: u, source: new FileSource(fh, u.offset, u.path), close: () => fh.close() };
        },
        async close() {},
      };
    case 'exec':
      return {
        uri: u,
        accept: async () => openExecIncoming(u),
        async close() {},
      };
    case 'unix':
    case 'tcp':
      return listenSocket(u);
  }
}

/** Opens `uri` and waits for the stream in one step (file:, exec:, or an already known socket). */
export async function openIncoming(uri: string | MigrationUri): Promise<IncomingChannel> {
  return (await listenIncoming(uri)).accept();
}

/**
 * Runs `send` against the sink of `uri`, then closes the channel; if
 * `send` or the close fails, aborts it (no partial file is left) and
 * rethrows.
 */
export async function withOutgoing<T>(
  uri: string | MigrationUri,
  send: (sink: ByteSink) => Promise<T>,
): Promise<T> {
  const ch = await openOutgoing(uri);
  let result: T;
  try {
    result = await send(ch.sink);
  } catch (err) {
    await ch.abort();
    throw err;
  }
  await ch.close();
  return result;
}
