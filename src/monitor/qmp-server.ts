import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { JsonStreamLimits } from './json-stream.js';
import type { JsonObject } from './json-value.js';
import { writeJson } from './json-writer.js';
import { QmpError, QmpListenError } from './qmp-error.js';
import type { QmpCommandRegistry } from './qmp-registry.js';
import { QmpSession, type QmpSessionHost } from './qmp-session.js';
import type { QmpVersionInfo } from './version.js';

/**
 * Where a QMP server listens, as `-qmp` gives it:
 * `unix:PATH,server=on,wait=off` or `tcp:HOST:PORT,server=on,wait=off`.
 * `wait` (QEMU's default when not given is on): the VM should not start
 * until a first client connects; see {@link QmpListener.waitForClient}.
 */
export type QmpListenSpec =
  | { kind: 'unix'; path: string; wait: boolean }
  | { kind: 'tcp'; host: string; port: number; wait: boolean };

/** A listening endpoint of the server. */
export interface QmpListener {
  readonly spec: QmpListenSpec;
  /** `unix:/path` or `tcp:HOST:PORT` with the port actually bound. */
  readonly address: string;
  /** The bound TCP port (useful with port 0); undefined for unix sockets. */
  readonly port: number | undefined;
  /** Resolves when the first client has connected (for `wait=on`). */
  waitForClient(): Promise<void>;
}

/** Options of {@link QmpServer}. */
export interface QmpServerOptions {
  registry: QmpCommandRegistry;
  /** The version in the greeting (see version.ts `qmpVersionInfo`). */
  version: QmpVersionInfo;
  /** Where protocol trouble is reported (write errors, handler crashes); default: nowhere. */
  log?: (message: string) => void;
  /** Bounds on one incoming JSON value; defaults in json-stream.ts. */
  limits?: Partial<JsonStreamLimits>;
}

/**
 * How long {@link QmpServer.close} lets a client that is not reading take
 * its last output. Short: it is part of tsvmm's shutdown, which must end
 * within 2 s whatever the clients do.
 */
const CLOSE_GRACE_MS = 500;

interface ListenerState extends QmpListener {
  server: Server;
  /** For unix sockets: the inode we created, so we never remove someone else's file. */
  inode?: number;
}

/**
 * A QMP server: any number of unix and TCP listeners, any number of clients
 * on each, one command registry. Commands from all clients run one at a
 * time in arrival order, as QEMU's main loop runs them, so a `stop` and a
 * `cont` from two clients cannot interleave inside the VM.
 *
 * Registers `qmp_capabilities` itself (it is part of the protocol, not of
 * the VM): it takes QEMU's optional `enable` list; we offer no capability
 * (no `oob`), so enabling one is refused as QEMU refuses one not offered.
 *
 * @example
 * const server = new QmpServer({ registry, version: qmpVersionInfo() });
 * await server.listen({ kind: 'unix', path: '/tmp/qmp.sock', wait: false });
 * server.broadcast('STOP');
 * await server.close();
 */
export class QmpServer {
  private readonly options: QmpServerOptions;
  private readonly listeners: ListenerState[] = [];
  private readonly sessions = new Set<QmpSession>();
  private chain: Promise<void> = Promise.resolve();
  private nextClient = 1;
  private closing = false;
  private readonly host: QmpSessionHost;

  constructor(options: QmpServerOptions) {
    this.options = options;
    this.host = {
      registry: options.registry,
      limits: options.limits ?? {},
      greeting: () => ({ QMP: { version: this.options.version, capabilities: [] } }),
      serialize: (fn) => this.serialize(fn),
      sessionClosed: (session) => {
        this.sessions.delete(session);
      },
      log: (message) => this.log(message),
    };
    if (options.registry.get('qmp_capabilities') === undefined) {
      options.registry.register({
        name: 'qmp_capabilities',
        args: { '*enable': { array: { enum: ['oob'] } } },
        allowedBeforeNegotiation: true,
        handler: (args, ctx) => {
          if (ctx.session.negotiated) {
            throw new QmpError(
              'CommandNotFound',
              'Capabilities negotiation is already complete, command ignored',
            );
          }
          const wanted = (args.enable as string[] | undefined) ?? [];
          if (wanted.length > 0) {
            throw new QmpError('GenericError', `Capability ${wanted.join(', ')} not available`);
          }
          ctx.session.negotiated = true;
          return {};
        },
      });
    }
  }

  /** Number of connected clients. */
  get clientCount(): number {
    return this.sessions.size;
  }

  /** The listeners set up so far. */
  get addresses(): readonly QmpListener[] {
    return this.listeners;
  }

  /**
   * Starts listening. Unix sockets are created with mode 0600 (QMP has no
   * authentication: the file mode is the access control); a stale socket
   * file left by a dead process is replaced, a live one or a file that is
   * not a socket is refused. TCP has no authentication at all: bind it to
   * 127.0.0.1 unless the network is trusted.
   * Throws {@link QmpListenError}.
   */
  async listen(spec: QmpListenSpec): Promise<QmpListener> {
    if (this.closing) throw new QmpListenError('the QMP server is closed');
    const server = createServer({ allowHalfOpen: true });
    let firstClient!: () => void;
    const firstClientPromise = new Promise<void>((resolve) => {
      firstClient = resolve;
    });
    let address: string;
    let port: number | undefined;
    let inode: number | undefined;
    if (spec.kind === 'unix') {
      await removeStaleSocket(spec.path);
      await listenUnix(server, spec.path);
      address = `unix:${spec.path}`;
      inode = lstatSync(spec.path).ino;
    } else {
      await listenTcp(server, spec.host, spec.port);
      const bound = server.address();
      port = typeof bound === 'object' && bound !== null ? bound.port : spec.port;
      address = `tcp:${formatHost(spec.host)}:${port}`;
    }
    server.on('connection', (socket: Socket) => {
      firstClient();
      this.attach(socket, address);
    });
    server.on('error', (err) => this.log(`QMP ${address}: listener error: ${err.message}`));
    const listener: ListenerState = {
      spec,
      address,
      port,
      server,
      inode,
      waitForClient: () => firstClientPromise,
    };
    this.listeners.push(listener);
    return listener;
  }

  /**
   * Runs a QMP session on any byte stream (a socket, a pipe pair, stdio).
   * The session ends when the stream closes.
   */
  attach(stream: Duplex, label = 'stream'): void {
    if (this.closing) {
      stream.destroy();
      return;
    }
    const session = new QmpSession(stream, `${label}#${this.nextClient++}`, this.host);
    this.sessions.add(session);
    session.start();
  }

  /**
   * Sends an event to every negotiated client:
   * `{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}`.
   * `data` is left out when not given, as QEMU does for events without data
   * (STOP, RESUME). Never throws because of a client.
   */
  broadcast(event: string, data?: JsonObject): void {
    const message: JsonObject = { event };
    if (data !== undefined) message.data = data;
    message.timestamp = qmpTimestamp();
    const line = `${writeJson(message)}\r\n`;
    for (const session of this.sessions) session.sendEvent(line);
  }

  /**
   * Stops listening, lets each client read its pending output (up to half
   * a second), closes the connections and removes the unix socket files.
   */
  async close(): Promise<void> {
    this.closing = true;
    const listeners = this.listeners.splice(0);
    // Stop accepting at once; net.Server's callback waits for every
    // connection to end, so the sessions are closed alongside.
    const stopped = listeners.map(
      (l) =>
        new Promise<void>((resolve) => {
          l.server.close(() => resolve());
        }),
    );
    for (const l of listeners) {
      if (l.spec.kind === 'unix') removeOwnSocket(l.spec.path, l.inode);
    }
    await Promise.all([...this.sessions].map((s) => s.close(CLOSE_GRACE_MS)));
    await Promise.all(stopped);
  }

  /**
   * Removes the unix socket files this server created, synchronously and
   * nothing else: for a forced exit, which has no time to close clients.
   */
  removeSocketFiles(): void {
    for (const l of this.listeners) {
      if (l.spec.kind === 'unix') removeOwnSocket(l.spec.path, l.inode);
    }
  }

  private serialize(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(fn, fn);
    // The chain itself never rejects, so one failure cannot stall the rest.
    this.chain = run.catch((e) => this.log(`QMP: internal error: ${String(e)}`));
    return this.chain;
  }

  private log(message: string): void {
    try {
      this.options.log?.(message);
    } catch {
      // A broken logger must not break the monitor.
    }
  }
}

/** QMP's event timestamp: wall-clock seconds and microseconds since the epoch. */
export function qmpTimestamp(): { seconds: number; microseconds: number } {
  const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  return { seconds: Math.floor(micros / 1e6), microseconds: micros % 1e6 };
}

function formatHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return; // nothing there
  }
  if (!isSocket) {
    throw new QmpListenError(
      `cannot create QMP socket ${path}: a file that is not a socket is in the way; remove it or choose another path`,
    );
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) {
    throw new QmpListenError(
      `cannot create QMP socket ${path}: another process is listening on it; stop it or choose another path`,
    );
  }
  try {
    unlinkSync(path);
  } catch (e) {
    throw new QmpListenError(`cannot remove stale QMP socket ${path}: ${String(e)}`, { cause: e });
  }
}

function listenUnix(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      reject(
        new QmpListenError(`cannot listen on QMP socket ${path}: ${err.message}`, { cause: err }),
      );
    };
    server.once('error', onError);
    // The socket is created by bind(), inside listen(); a restrictive umask
    // for that moment means it is never reachable by others, even briefly.
    const previous = process.umask(0o177);
    try {
      server.listen(path, () => {
        server.off('error', onError);
        try {
          chmodSync(path, 0o600);
          resolve();
        } catch (e) {
          reject(new QmpListenError(`cannot set the mode of QMP socket ${path}: ${String(e)}`));
        }
      });
    } finally {
      process.umask(previous);
    }
  });
}

function listenTcp(server: Server, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      reject(
        new QmpListenError(
          `cannot listen for QMP on tcp:${formatHost(host)}:${port}: ${err.message}`,
          { cause: err },
        ),
      );
    };
    server.once('error', onError);
    const done = (): void => {
      server.off('error', onError);
      resolve();
    };
    // An empty host means every interface, as in QEMU's `tcp::4444`.
    if (host === '') server.listen(port, done);
    else server.listen(port, host, done);
  });
}

function removeOwnSocket(path: string, inode: number | undefined): void {
  try {
    const st = lstatSync(path);
    if (st.isSocket() && st.ino === inode) unlinkSync(path);
  } catch {
    // Already gone.
  }
}
