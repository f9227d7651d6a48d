import { TsvmmError } from '../util/errors.js';

/**
 * QMP's error classes (QAPI's QapiErrorClass). Almost every error is
 * GenericError; the others exist for compatibility with old clients.
 */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

/**
 * An error a command handler throws to answer with a QMP error: `errorClass`
 * becomes `class` and the message becomes `desc`. Any other error a handler
 * throws is answered as a GenericError with its message.
 */
export class QmpError extends TsvmmError {
  readonly errorClass: QmpErrorClass;

  constructor(errorClass: QmpErrorClass, desc: string) {
    super('QMP_ERROR', desc);
    this.errorClass = errorClass;
  }
}

/** Registering a command whose name is taken, or with an invalid name. */
export class QmpRegistryError extends TsvmmError {
  constructor(message: string) {
    super('QMP_REGISTRY', message);
  }
}

/** A QMP listener could not be set up (socket in use, bad path, ...). */
export class QmpListenError extends TsvmmError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('QMP_LISTEN', message, options);
  }
}
