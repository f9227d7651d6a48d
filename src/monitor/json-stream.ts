import { JsonLexer, type JsonLexerSink, type JsonToken, type JsonTokenType } from './json-lexer.js';
import { parseJsonTokens } from './json-parser.js';
import type { JsonValue } from './json-value.js';

/** Bounds on one top-level JSON value, so no client can exhaust memory. */
export interface JsonStreamLimits {
  /** Total bytes of the tokens of one value. */
  maxValueBytes: number;
  /** Number of tokens in one value. */
  maxTokens: number;
  /** Depth of nested objects and arrays. */
  maxNesting: number;
}

/**
 * Defaults. QEMU allows 64 MiB and 2 Mi tokens per value; QMP commands are
 * small, so we allow 16 MiB (a 1 MiB command fits with room to spare) and
 * keep QEMU's nesting limit of 1024.
 */
export const DEFAULT_JSON_STREAM_LIMITS: JsonStreamLimits = {
  maxValueBytes: 16 * 1024 * 1024,
  maxTokens: 1024 * 1024,
  maxNesting: 1024,
};

/** What the stream hands its owner: each value, or each error, in input order. */
export type JsonStreamEvent = { value: JsonValue } | { error: string };

/**
 * Splits a byte stream into top-level JSON values the way QEMU's JSON
 * streamer does: a value ends when its braces and brackets balance (a
 * scalar ends at once), several values may share a chunk and one value may
 * span many chunks; there is no framing by newlines.
 *
 * Errors are reported with QEMU's descriptions ("JSON parse error, ...",
 * "JSON token size limit exceeded", ...) and the stream carries on. One
 * deliberate difference: when a value breaks a limit, the rest of that value
 * is skipped (its brackets still counted, its bytes not kept) and reported
 * once, where QEMU would start parsing in the middle of it and send an error
 * for each fragment. A lexical error (for example a 0xFF byte, QMP's way to
 * resynchronise) ends the skipping.
 */
export class JsonMessageStream implements JsonLexerSink {
  private readonly lexer = new JsonLexer(this);
  private readonly limits: JsonStreamLimits;
  private readonly onEvent: (event: JsonStreamEvent) => void;
  private tokens: JsonToken[] = [];
  private valueBytes = 0;
  private braces = 0;
  private brackets = 0;
  private skipping = false;

  constructor(onEvent: (event: JsonStreamEvent) => void, limits: Partial<JsonStreamLimits> = {}) {
    this.onEvent = onEvent;
    this.limits = { ...DEFAULT_JSON_STREAM_LIMITS, ...limits };
    this.lexer.maxTokenBytes = this.limits.maxValueBytes;
  }

  /** Feeds one chunk; values and errors are reported synchronously. */
  feed(chunk: Buffer): void {
    this.lexer.feed(chunk);
  }

  /** @internal Called by the lexer for each token. */
  token(type: JsonTokenType, raw: Buffer, length: number): void {
    if (type === 'error') {
      this.resetValue();
      this.report({ error: `JSON parse error, stray '${raw.toString('latin1')}'` });
      return;
    }
    this.count(type);
    if (this.skipping) {
      if (this.braces <= 0 && this.brackets <= 0) this.resetValue();
      return;
    }
    let limitError: string | undefined;
    if (this.valueBytes + length > this.limits.maxValueBytes) {
      limitError = 'JSON token size limit exceeded';
    } else if (this.tokens.length + 1 > this.limits.maxTokens) {
      limitError = 'JSON token count limit exceeded';
    } else if (this.braces + this.brackets > this.limits.maxNesting) {
      limitError = 'JSON nesting depth limit exceeded';
    }
    if (limitError !== undefined) {
      this.refuse(limitError, false);
      return;
    }
    this.tokens.push({ type, raw });
    this.valueBytes += length;
    this.lexer.maxTokenBytes = this.limits.maxValueBytes - this.valueBytes;
    if (this.braces > 0 || this.brackets > 0) {
      if (this.braces >= 0 && this.brackets >= 0) return; // value not finished
    }
    const tokens = this.tokens;
    this.resetValue();
    const parsed = parseJsonTokens(tokens);
    this.report(parsed.ok ? { value: parsed.value } : { error: parsed.error });
  }

  /** @internal Called by the lexer when one token alone breaks the size limit. */
  tokenTooLarge(): void {
    this.refuse('JSON token size limit exceeded', true);
  }

  private count(type: JsonTokenType): void {
    if (type === 'lcurly') this.braces++;
    else if (type === 'rcurly') this.braces--;
    else if (type === 'lsquare') this.brackets++;
    else if (type === 'rsquare') this.brackets--;
  }

  /**
   * Reports a limit error and skips the rest of the value that broke it.
   * `midToken`: the lexer is still inside the offending token, so skipping
   * lasts at least until that token ends, even at the top level.
   */
  private refuse(error: string, midToken: boolean): void {
    const { braces, brackets } = this;
    const inside = braces > 0 || brackets > 0;
    this.resetValue();
    if (inside || midToken) {
      // Keep counting this value's brackets to find where it ends.
      this.braces = braces;
      this.brackets = brackets;
      this.skipping = true;
      this.lexer.discarding = true;
      this.lexer.maxTokenBytes = Number.POSITIVE_INFINITY;
    }
    this.report({ error });
  }

  private resetValue(): void {
    this.tokens = [];
    this.valueBytes = 0;
    this.braces = 0;
    this.brackets = 0;
    this.skipping = false;
    this.lexer.discarding = false;
    this.lexer.maxTokenBytes = this.limits.maxValueBytes;
  }

  private report(event: JsonStreamEvent): void {
    this.onEvent(event);
  }
}
