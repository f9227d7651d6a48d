import type { JsonObject, JsonValue } from './json-value.js';
import { QmpRegistryError } from './qmp-error.js';
import type { QmpArgsSchema } from './qmp-schema.js';

/** The per-connection protocol state a handler may look at. */
export interface QmpSessionState {
  /** The client's name for logs: the listener's address and a number. */
  readonly id: string;
  /** Whether `qmp_capabilities` has succeeded on this connection. */
  negotiated: boolean;
}

/** What a handler learns about the request it serves. */
export interface QmpCommandContext {
  readonly session: QmpSessionState;
  /**
   * Runs `fn` once this command's reply has been handed to the socket
   * (`quit` uses it so the client sees `{"return": {}}` before the VM goes).
   */
  afterReply(fn: () => void): void;
}

/** A QMP command handler: the validated `arguments` in, the `return` value out. */
export type QmpHandler = (
  args: JsonObject,
  ctx: QmpCommandContext,
) => JsonValue | Promise<JsonValue>;

/** One command as registered. */
export interface QmpCommandDefinition {
  /** The `execute` name, QAPI's spelling (`query-status`, `migrate_cancel`). */
  name: string;
  /** The accepted arguments; omitted means the command takes none. */
  args?: QmpArgsSchema;
  handler: QmpHandler;
  /**
   * Whether a client may run it before `qmp_capabilities`. In QEMU only
   * `qmp_capabilities` itself may.
   */
  allowedBeforeNegotiation?: boolean;
}

/**
 * The commands a QMP server offers. Each module registers its own (the
 * standard set in commands.ts, migration's when it is present), so the
 * server knows nothing about any particular command.
 */
export class QmpCommandRegistry {
  private readonly commands = new Map<string, QmpCommandDefinition>();

  /** Adds a command. Throws {@link QmpRegistryError} if the name is taken. */
  register(definition: QmpCommandDefinition): void {
    if (!/^[A-Za-z_][A-Za-z0-9_.-]*$/.test(definition.name)) {
      throw new QmpRegistryError(
        `invalid QMP command name '${definition.name}': use letters, digits, '-', '_' and '.'`,
      );
    }
    if (this.commands.has(definition.name)) {
      throw new QmpRegistryError(
        `QMP command '${definition.name}' is already registered: each command has one owner`,
      );
    }
    this.commands.set(definition.name, definition);
  }

  /** Removes a command; returns whether it was there. */
  unregister(name: string): boolean {
    return this.commands.delete(name);
  }

  /** The command named `name`, if registered. */
  get(name: string): QmpCommandDefinition | undefined {
    return this.commands.get(name);
  }

  /** Every registered name, in registration order. */
  names(): string[] {
    return [...this.commands.keys()];
  }
}
