import type { Duplex } from 'node:stream';
import { JsonMessageStream, type JsonStreamEvent, type JsonStreamLimits } from './json-stream.js';
import type { JsonObject } from './json-value.js';
import { writeJson } from './json-writer.js';
import { dispatchQmpRequest, errorResponse } from './qmp-dispatch.js';
import type { QmpCommandRegistry, QmpSessionState } from './qmp-registry.js';

/** What a session needs from the server that owns it. */
export interface QmpSessionHost {
  readonly registry: QmpCommandRegistry;
  /** The greeting object to send on connect. */
  greeting(): JsonObject;
  /** Runs `fn` after every command queued before it, across all sessions. */
  serialize(fn: () => Promise<void>): Promise<void>;
  /** The session has ended; forget it. */
  sessionClosed(session: QmpSession): void;
  log(message: string): void;
  readonly limits: Partial<JsonStreamLimits>;
}

/**
 * Requests a client may have parsed and waiting before we stop reading its
 * socket. QEMU without OOB reads no further than one pending command; a few
 * more lets a client pipeline without letting it queue without bound.
 */
const MAX_QUEUED_REQUESTS = 8;

/**
 * Output a client may leave unread before we drop it. Events go to every
 * negotiated client, so one that never reads would otherwise make us buffer
 * without bound.
 */
const MAX_UNREAD_OUTPUT = 16 * 1024 * 1024;

/**
 * One QMP connection: greeting, capabilities negotiation, a JSON stream in,
 * responses and events out. Requests are run one at a time, in order, so
 * responses come back in the order the commands were sent (QMP without OOB).
 * Nothing that happens on this connection (bad input, a write error, the
 * client vanishing mid-command) throws into the server.
 */
export class QmpSession implements QmpSessionState {
  readonly id: string;
  negotiated = false;
  private readonly socket: Duplex;
  private readonly host: QmpSessionHost;
  private readonly stream: JsonMessageStream;
  private readonly queue: JsonStreamEvent[] = [];
  private running = false;
  private closed = false;
  private inputEnded = false;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;

  constructor(socket: Duplex, id: string, host: QmpSessionHost) {
    this.socket = socket;
    this.id = id;
    this.host = host;
    this.stream = new JsonMessageStream((event) => this.enqueue(event), host.limits);
    this.closedPromise = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  /** Sends the greeting and starts reading. */
  start(): void {
    this.socket.on('data', (chunk: Buffer | string) => {
      if (this.closed) return;
      this.stream.feed(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    });
    this.socket.on('error', (err: Error) => {
      this.host.log(`QMP ${this.id}: connection error: ${err.message}`);
      this.finish();
    });
    // The client shut its sending side: answer what it sent, then hang up.
    // (Listeners are created with allowHalfOpen so the replies can still go.)
    this.socket.on('end', () => {
      this.inputEnded = true;
      if (!this.running) this.endOutput();
    });
    this.socket.on('close', () => this.finish());
    this.socket.on('drain', () => this.maybeResume());
    this.send(this.host.greeting());
  }

  /** Whether the connection has ended. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Resolves when the connection has ended. */
  whenClosed(): Promise<void> {
    return this.closedPromise;
  }

  /** Sends an event line, if this client has negotiated (QMP sends none before). */
  sendEvent(line: string): void {
    if (this.negotiated) this.writeLine(line);
  }

  /**
   * Ends the connection once pending output is handed to the kernel, or at
   * once after `graceMs` (a client that reads nothing). Either way the
   * socket is closed from our side then: a client that never closes its
   * end, or stopped halfway through a command, cannot hold the server open.
   * Used when the server closes.
   */
  async close(graceMs: number): Promise<void> {
    if (!this.closed) {
      const destroy = () => {
        if (!this.socket.destroyed) this.socket.destroy();
      };
      if (this.socket.writableEnded) {
        if (this.socket.writableFinished) destroy();
        else this.socket.once('finish', destroy);
      } else {
        this.socket.end(destroy);
      }
      const timer = setTimeout(destroy, graceMs);
      await this.closedPromise;
      clearTimeout(timer);
    }
  }

  private enqueue(event: JsonStreamEvent): void {
    if (this.closed) return;
    this.queue.push(event);
    if (this.queue.length >= MAX_QUEUED_REQUESTS) this.socket.pause();
    if (!this.running) void this.drainQueue();
  }

  private async drainQueue(): Promise<void> {
    this.running = true;
    while (this.queue.length > 0 && !this.closed) {
      const event = this.queue.shift()!;
      this.maybeResume();
      await this.host.serialize(() => this.handle(event));
      // Commands that answer at once would otherwise run back to back in
      // microtasks: one chunk holds thousands, and the main loop (signals,
      // timers, the shutdown deadline) would get no turn until all ran.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    this.running = false;
    if (this.inputEnded) this.endOutput();
  }

  private endOutput(): void {
    if (!this.closed && !this.socket.writableEnded) this.socket.end();
  }

  private async handle(event: JsonStreamEvent): Promise<void> {
    if (this.closed) return; // the client left while this request waited
    if ('error' in event) {
      // A parse error cannot be tied to a request, so it never carries an id.
      this.send(errorResponse('GenericError', event.error));
      return;
    }
    const after: (() => void)[] = [];
    const response = await dispatchQmpRequest(
      this.host.registry,
      event.value,
      { session: this, afterReply: (fn) => after.push(fn) },
      (message) => this.host.log(message),
    );
    this.send(response, after);
  }

  private send(response: JsonObject, after: (() => void)[] = []): void {
    this.writeLine(`${writeJson(response)}\r\n`, after);
  }

  /** Writes one line; `after` runs once it has been handed off, or at once if it cannot be. */
  private writeLine(line: string, after: (() => void)[] = []): void {
    const runAfter = (): void => {
      for (const fn of after) {
        try {
          fn();
        } catch (e) {
          this.host.log(`QMP ${this.id}: after-reply action failed: ${String(e)}`);
        }
      }
    };
    if (this.closed || this.socket.destroyed || !this.socket.writable) {
      runAfter();
      return;
    }
    try {
      const flowing = this.socket.write(line, () => runAfter());
      if (!flowing) {
        // Stop reading until the client reads what we sent.
        this.socket.pause();
        if (this.socket.writableLength > MAX_UNREAD_OUTPUT) {
          this.host.log(`QMP ${this.id}: client reads nothing back; disconnecting it`);
          this.socket.destroy();
          this.finish();
        }
      }
    } catch (e) {
      this.host.log(`QMP ${this.id}: write failed: ${String(e)}`);
      this.socket.destroy();
      this.finish();
      runAfter();
    }
  }

  private maybeResume(): void {
    if (
      !this.closed &&
      this.queue.length < MAX_QUEUED_REQUESTS &&
      !this.socket.writableNeedDrain &&
      this.socket.isPaused()
    ) {
      this.socket.resume();
    }
  }

  private finish(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.length = 0;
    if (!this.socket.destroyed) this.socket.destroy();
    this.host.sessionClosed(this);
    this.resolveClosed();
  }
}
