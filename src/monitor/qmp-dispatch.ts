import { isJsonObject, type JsonObject, type JsonValue } from './json-value.js';
import { QmpError } from './qmp-error.js';
import type { QmpCommandContext, QmpCommandRegistry } from './qmp-registry.js';
import { validateArgs } from './qmp-schema.js';

/**
 * Runs one parsed request against `registry` and returns the response
 * object, following QEMU's rules (qapi/qmp-dispatch.c):
 * - the request must be an object with a string `execute`, an optional
 *   object `arguments` and an optional `id` of any JSON type, nothing else;
 * - before negotiation, any command other than the ones allowed then is
 *   answered CommandNotFound "Expecting capabilities negotiation with
 *   'qmp_capabilities'";
 * - the arguments are checked against the command's schema before the
 *   handler runs, so a bad request has no side effect;
 * - `id`, when the client sent one and the request was an object, is
 *   echoed in the response whatever its type.
 */
export async function dispatchQmpRequest(
  registry: QmpCommandRegistry,
  request: JsonValue,
  ctx: QmpCommandContext,
  log: (message: string) => void = () => {},
): Promise<JsonObject> {
  if (!isJsonObject(request)) {
    return errorResponse('GenericError', 'QMP input must be a JSON object');
  }
  const hasId = Object.hasOwn(request, 'id');
  const withId = (response: JsonObject): JsonObject => {
    if (hasId) response.id = request.id!;
    return response;
  };
  try {
    const name = checkRequest(request);
    const command = registry.get(name);
    if (!ctx.session.negotiated && !command?.allowedBeforeNegotiation) {
      throw new QmpError(
        'CommandNotFound',
        "Expecting capabilities negotiation with 'qmp_capabilities'",
      );
    }
    if (command === undefined) {
      throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
    }
    const args = (request.arguments as JsonObject | undefined) ?? {};
    validateArgs(command.args ?? {}, args);
    const result = await command.handler(args, ctx);
    // A command without a return value answers an empty object.
    return withId({ return: result === undefined ? {} : result });
  } catch (e) {
    if (e instanceof QmpError) return withId(errorResponse(e.errorClass, e.message));
    // A handler failing in a way it did not plan for is still answered, and
    // logged, since the message alone may not be enough to find the cause.
    const message = e instanceof Error ? e.message : String(e);
    log(
      `QMP ${ctx.session.id}: command failed: ${e instanceof Error ? (e.stack ?? message) : message}`,
    );
    return withId(errorResponse('GenericError', message));
  }
}

/** A QMP error response without `id`. */
export function errorResponse(errorClass: string, desc: string): JsonObject {
  return { error: { class: errorClass, desc } };
}

/** Checks the request's members; returns the command name. */
function checkRequest(request: JsonObject): string {
  let name: string | undefined;
  for (const [member, value] of Object.entries(request)) {
    if (member === 'execute') {
      if (typeof value !== 'string') {
        throw new QmpError('GenericError', "QMP input member 'execute' must be a string");
      }
      name = value;
    } else if (member === 'arguments') {
      if (!isJsonObject(value)) {
        throw new QmpError('GenericError', "QMP input member 'arguments' must be an object");
      }
    } else if (member !== 'id') {
      // 'exec-oob' lands here too: we never offer the oob capability.
      throw new QmpError('GenericError', `QMP input member '${member}' is unexpected`);
    }
  }
  if (name === undefined) throw new QmpError('GenericError', "QMP input lacks member 'execute'");
  return name;
}
