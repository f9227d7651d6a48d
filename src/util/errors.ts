/**
 * The base of every error tsvmm throws on purpose. `code` is stable: callers
 * and tests match on it, never on the message, which is for people.
 */
export class TsvmmError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}
