/**
 * The kinds of token the QMP lexer produces. `error` is a lexical error: the
 * bytes that could not start or continue a token.
 */
export type JsonTokenType =
  | 'lcurly'
  | 'rcurly'
  | 'lsquare'
  | 'rsquare'
  | 'colon'
  | 'comma'
  | 'string'
  | 'integer'
  | 'float'
  | 'keyword'
  | 'error';

/** One token. `raw` holds its bytes (quotes included for strings). */
export interface JsonToken {
  type: JsonTokenType;
  raw: Buffer;
}

/** What the lexer calls back into; the message stream implements it. */
export interface JsonLexerSink {
  /**
   * A complete token. `length` is its size in bytes; `raw` is empty while the
   * sink has asked the lexer to discard (see `JsonLexer.discarding`).
   */
  token(type: JsonTokenType, raw: Buffer, length: number): void;
  /** The token being read grew past `JsonLexer.maxTokenBytes`. */
  tokenTooLarge(): void;
}

// Lexer states. Numbers rather than strings: the hot loop compares them.
const START = 0;
const RECOVERY = 1;
const DQ_STRING = 2;
const DQ_ESCAPE = 3;
const SQ_STRING = 4;
const SQ_ESCAPE = 5;
const ZERO = 6;
const SIGN = 7;
const DIGITS = 8;
const MANTISSA = 9;
const MANTISSA_DIGITS = 10;
const EXP_E = 11;
const EXP_SIGN = 12;
const EXP_DIGITS = 13;
const KEYWORD = 14;

const EMPTY = Buffer.alloc(0);

/** How many bytes of a bad token an error message quotes, at most. */
const STRAY_QUOTE_MAX = 64;

function isWhitespace(c: number): boolean {
  return c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;
}

function structural(c: number): JsonTokenType | undefined {
  switch (c) {
    case 0x7b:
      return 'lcurly';
    case 0x7d:
      return 'rcurly';
    case 0x5b:
      return 'lsquare';
    case 0x5d:
      return 'rsquare';
    case 0x3a:
      return 'colon';
    case 0x2c:
      return 'comma';
    default:
      return undefined;
  }
}

function isDigit(c: number): boolean {
  return c >= 0x30 && c <= 0x39;
}

/**
 * A byte-level JSON lexer with QEMU's extensions (single-quoted strings and
 * the `\'` escape) and QEMU's error recovery, fed one chunk at a time: a
 * token may span any number of chunks.
 *
 * Recovery follows QMP's rule: after a lexical error the lexer skips input up
 * to the next structural character (`{}[]:,`), ASCII control character other
 * than tab, or the bytes 0xFE/0xFF, so a client can always resynchronise by
 * sending one of those.
 */
export class JsonLexer {
  /** The sink may lower this between tokens to bound the value it is building. */
  maxTokenBytes = Number.POSITIVE_INFINITY;
  /** While true, token bytes are not kept: only types and lengths are reported. */
  discarding = false;

  private state = START;
  /** Pieces of the current token from earlier chunks. */
  private pending: Buffer[] = [];
  private pendingLength = 0;
  private readonly sink: JsonLexerSink;

  constructor(sink: JsonLexerSink) {
    this.sink = sink;
  }

  /** Forgets any partly read token. */
  reset(): void {
    this.state = START;
    this.pending = [];
    this.pendingLength = 0;
  }

  /** Lexes one chunk of input. */
  feed(chunk: Buffer): void {
    const n = chunk.length;
    // Where the current token starts in this chunk (0 when it began earlier).
    let start = 0;
    let i = 0;
    while (i < n) {
      const c = chunk[i]!;
      switch (this.state) {
        case START: {
          if (isWhitespace(c)) {
            i++;
            break;
          }
          start = i;
          const s = structural(c);
          if (s !== undefined) {
            i++;
            this.emit(s, chunk, start, i);
          } else if (c === 0x22) {
            this.state = DQ_STRING;
            i++;
          } else if (c === 0x27) {
            this.state = SQ_STRING;
            i++;
          } else if (c === 0x30) {
            this.state = ZERO;
            i++;
          } else if (c >= 0x31 && c <= 0x39) {
            this.state = DIGITS;
            i++;
          } else if (c === 0x2d) {
            this.state = SIGN;
            i++;
          } else if (c >= 0x61 && c <= 0x7a) {
            this.state = KEYWORD;
            i++;
          } else {
            i++;
            this.fail(chunk, start, i);
          }
          break;
        }
        case RECOVERY: {
          if ((c < 0x20 && c !== 0x09) || c >= 0xfe || structural(c) !== undefined) {
            this.state = START; // look at this byte again from the start state
          } else {
            i++;
          }
          break;
        }
        case DQ_STRING:
        case SQ_STRING: {
          // Tight loop over the body of a string: most of a big command is here.
          const quote = this.state === DQ_STRING ? 0x22 : 0x27;
          let j = i;
          let d = 0;
          while (j < n) {
            d = chunk[j]!;
            if (d === quote || d === 0x5c || d < 0x20 || d >= 0xfe) break;
            j++;
          }
          if (j === n) {
            i = j;
            break;
          }
          i = j + 1;
          if (d === quote) {
            this.emit('string', chunk, start, i);
          } else if (d === 0x5c) {
            this.state = this.state === DQ_STRING ? DQ_ESCAPE : SQ_ESCAPE;
          } else {
            this.fail(chunk, start, i);
          }
          break;
        }
        case DQ_ESCAPE:
        case SQ_ESCAPE: {
          // Which escapes are valid is the parser's business; the lexer only
          // keeps the escaped byte inside the string.
          i++;
          if (c < 0x20 || c >= 0xfe) {
            this.fail(chunk, start, i);
          } else {
            this.state = this.state === DQ_ESCAPE ? DQ_STRING : SQ_STRING;
          }
          break;
        }
        case ZERO:
          if (c === 0x2e) {
            this.state = MANTISSA;
            i++;
          } else if (isDigit(c)) {
            i++;
            this.fail(chunk, start, i);
          } else {
            this.emit('integer', chunk, start, i);
          }
          break;
        case SIGN:
          if (c === 0x30) {
            this.state = ZERO;
            i++;
          } else if (c >= 0x31 && c <= 0x39) {
            this.state = DIGITS;
            i++;
          } else {
            i++;
            this.fail(chunk, start, i);
          }
          break;
        case DIGITS:
          if (isDigit(c)) {
            i++;
          } else if (c === 0x2e) {
            this.state = MANTISSA;
            i++;
          } else if (c === 0x65 || c === 0x45) {
            this.state = EXP_E;
            i++;
          } else {
            this.emit('integer', chunk, start, i);
          }
          break;
        case MANTISSA:
          i++;
          if (isDigit(c)) this.state = MANTISSA_DIGITS;
          else this.fail(chunk, start, i);
          break;
        case MANTISSA_DIGITS:
          if (isDigit(c)) {
            i++;
          } else if (c === 0x65 || c === 0x45) {
            this.state = EXP_E;
            i++;
          } else {
            this.emit('float', chunk, start, i);
          }
          break;
        case EXP_E:
          i++;
          if (c === 0x2b || c === 0x2d) this.state = EXP_SIGN;
          else if (isDigit(c)) this.state = EXP_DIGITS;
          else this.fail(chunk, start, i);
          break;
        case EXP_SIGN:
          i++;
          if (isDigit(c)) this.state = EXP_DIGITS;
          else this.fail(chunk, start, i);
          break;
        case EXP_DIGITS:
          if (isDigit(c)) i++;
          else this.emit('float', chunk, start, i);
          break;
        case KEYWORD:
          if (c >= 0x61 && c <= 0x7a) i++;
          else this.emit('keyword', chunk, start, i);
          break;
      }
      if (this.state !== START && this.state !== RECOVERY) {
        const length = this.pendingLength + (i - start);
        if (length > this.maxTokenBytes) this.overflow();
      }
    }
    // Keep the unfinished token's bytes for the next chunk.
    if (this.state !== START && this.state !== RECOVERY && start < n) {
      const piece = this.discarding ? EMPTY : chunk.subarray(start, n);
      this.pending.push(piece);
      this.pendingLength += n - start;
    }
  }

  private take(chunk: Buffer, start: number, end: number): { raw: Buffer; length: number } {
    const length = this.pendingLength + (end - start);
    let raw: Buffer;
    if (this.discarding) raw = EMPTY;
    else if (this.pending.length === 0) raw = chunk.subarray(start, end);
    else raw = Buffer.concat([...this.pending, chunk.subarray(start, end)]);
    this.pending = [];
    this.pendingLength = 0;
    return { raw, length };
  }

  private emit(type: JsonTokenType, chunk: Buffer, start: number, end: number): void {
    const { raw, length } = this.take(chunk, start, end);
    this.state = START;
    this.sink.token(type, raw, length);
  }

  private fail(chunk: Buffer, start: number, end: number): void {
    const taken = this.take(chunk, start, end);
    const { length } = taken;
    // While discarding, at least the byte that broke the token is named.
    const raw = this.discarding ? chunk.subarray(end - 1, end) : taken.raw;
    this.state = RECOVERY;
    // The error names the bad bytes; a bad token that is huge is quoted in part.
    const quoted =
      raw.length > STRAY_QUOTE_MAX
        ? Buffer.concat([raw.subarray(0, STRAY_QUOTE_MAX), Buffer.from('...')])
        : raw;
    this.sink.token('error', quoted, length);
  }

  private overflow(): void {
    // Drop what we hold of the token; the sink switches us to discarding, so
    // the rest of the token is lexed (to find where it ends) but not kept.
    this.pending = [];
    this.sink.tokenTooLarge();
  }
}
