import { TsvmmError } from '../util/errors.js';

/**
 * A command line tsvmm cannot run: an unknown option, a missing or bad
 * value, options that conflict. The message names the option; the CLI
 * prints it and exits with status 1.
 */
export class UsageError extends TsvmmError {
  constructor(message: string) {
    super('CLI_USAGE', message);
  }
}
