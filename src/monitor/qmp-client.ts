import { connect, type Socket } from 'node:net';
import { TsvmmError } from '../util/errors.js';
import { isJsonObject, type JsonObject, type JsonValue } from './json-value.js';

/** The client saw something a QMP server must not send, or the connection ended. */
export class QmpClientError extends TsvmmError {
  constructor(message: string) {
    super('QMP_CLIENT', message);
  }
}

/** Where to connect: a unix socket path, or a TCP host and port. */
export type QmpClientTarget = { path: string } | { host: string; port: number };

/**
 * A minimal QMP client, for tests and tools: reads the server's output as
 * CRLF-terminated JSON lines and hands out messages in order. It does no
 * negotiation by itself, so tests can see every step of the protocol.
 *
 * @example
 * const c = await QmpClient.connect({ path: '/tmp/qmp.sock' });
 * await c.greeting();
 * await c.execute('qmp_capabilities');
 * const status = await c.execute('query-status');
 * c.close();
 */
export class QmpClient {
  readonly socket: Socket;
  private buffer = '';
  private readonly messages: JsonObject[] = [];
  private readonly waiters: {
    match: (m: JsonObject) => boolean;
    resolve: (m: JsonObject) => void;
    reject: (e: Error) => void;
  }[] = [];
  private ended = false;
  private endError: Error | undefined;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.onData(text));
    socket.on('error', (err) => this.onEnd(err));
    socket.on('close', () => this.onEnd(undefined));
  }

  /** Connects; resolves once the connection is up (before the greeting is read). */
  static connect(target: QmpClientTarget): Promise<QmpClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? connect(target.path) : connect(target.port, target.host);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new QmpClient(socket));
      });
      socket.once('error', reject);
    });
  }

  /** The greeting (the first message). */
  greeting(): Promise<JsonObject> {
    return this.next((m) => 'QMP' in m);
  }

  /** Sends raw bytes: for tests of framing and malformed input. */
  sendRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Sends a command object without waiting. */
  send(command: JsonObject): void {
    this.socket.write(`${JSON.stringify(command)}\n`);
  }

  /**
   * Runs a command and resolves with its whole response (`return` or
   * `error`, and `id` if one was sent); events received meanwhile stay
   * queued for {@link nextEvent}.
   */
  async request(execute: string, args?: JsonObject, id?: JsonValue): Promise<JsonObject> {
    const command: JsonObject = { execute };
    if (args !== undefined) command.arguments = args;
    if (id !== undefined) command.id = id;
    this.send(command);
    return this.nextResponse();
  }

  /** Runs a command and resolves with its `return` value; a QMP error rejects. */
  async execute(execute: string, args?: JsonObject): Promise<JsonValue> {
    const response = await this.request(execute, args);
    if ('error' in response) {
      throw new QmpClientError(`${execute}: ${JSON.stringify(response.error)}`);
    }
    return response.return!;
  }

  /** The next response (a message with `return` or `error`). */
  nextResponse(): Promise<JsonObject> {
    return this.next((m) => 'return' in m || 'error' in m);
  }

  /** The next event, optionally the next one named `name`. */
  nextEvent(name?: string): Promise<JsonObject> {
    return this.next(
      (m) => typeof m.event === 'string' && (name === undefined || m.event === name),
    );
  }

  /** Events received and not yet taken. */
  pendingEvents(): JsonObject[] {
    return this.messages.filter((m) => 'event' in m);
  }

  /** Resolves when the server has closed the connection. */
  closed(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => this.socket.once('close', () => resolve()));
  }

  /** Closes the connection at once. */
  close(): void {
    this.socket.destroy();
  }

  private next(match: (m: JsonObject) => boolean): Promise<JsonObject> {
    const index = this.messages.findIndex(match);
    if (index >= 0) return Promise.resolve(this.messages.splice(index, 1)[0]!);
    if (this.ended) {
      return Promise.reject(
        new QmpClientError(`connection closed${this.endError ? `: ${this.endError.message}` : ''}`),
      );
    }
    return new Promise((resolve, reject) => this.waiters.push({ match, resolve, reject }));
  }

  private onData(text: string): void {
    this.buffer += text;
    for (;;) {
      const end = this.buffer.indexOf('\r\n');
      if (end < 0) break;
      const line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const parsed: unknown = JSON.parse(line);
      if (!isJsonObject(parsed as JsonValue)) {
        this.onEnd(new QmpClientError(`server sent a line that is not a JSON object: ${line}`));
        return;
      }
      this.deliver(parsed as JsonObject);
    }
  }

  private deliver(message: JsonObject): void {
    const index = this.waiters.findIndex((w) => w.match(message));
    if (index >= 0) this.waiters.splice(index, 1)[0]!.resolve(message);
    else this.messages.push(message);
  }

  private onEnd(err: Error | undefined): void {
    if (this.ended) return;
    this.ended = true;
    this.endError = err;
    for (const w of this.waiters.splice(0)) {
      w.reject(new QmpClientError(`connection closed${err ? `: ${err.message}` : ''}`));
    }
  }
}
