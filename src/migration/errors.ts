import { TsvmmError } from '../util/errors.js';

/**
 * Codes of {@link MigrationStreamError}. Callers match on these; the message
 * names the section, field or offset for people.
 */
export type MigrationStreamErrorCode =
  /** The stream ended before its end marker: a cut file or a dropped link. */
  | 'MIGRATION_TRUNCATED'
  /** A checksum did not match: the bytes changed after they were written. */
  | 'MIGRATION_CHECKSUM'
  /** The stream does not start with QEMU's 'QEVM' magic. */
  | 'MIGRATION_BAD_MAGIC'
  /** The file version, or a section's version, is one this build cannot read. */
  | 'MIGRATION_VERSION'
  /** The stream is for another machine: RAM, vCPUs, machine type or devices differ. */
  | 'MIGRATION_SHAPE_MISMATCH'
  /** A QEVM stream without tsvmm's integrity sections (QEMU's own, for example). */
  | 'MIGRATION_FOREIGN'
  /** The bytes do not follow the format: an unknown marker, flag or value. */
  | 'MIGRATION_MALFORMED'
  /** A device's own hook refused the state while saving or loading. */
  | 'MIGRATION_DEVICE_FAILED'
  /**
   * A capability that changes the stream's format (mapped-ram) is on at
   * one end and off at the other (QEMU's "Capability ... is off, but
   * received capability is on").
   */
  | 'MIGRATION_CAPABILITY_MISMATCH';

/**
 * A migration stream could not be written or was refused on load. On load,
 * no device state has been applied unless `code` is
 * `MIGRATION_DEVICE_FAILED`; guest RAM may have been written (`ramTouched`),
 * so the caller must keep that VM from running either way.
 */
export class MigrationStreamError extends TsvmmError {
  declare readonly code: MigrationStreamErrorCode;
  /** Whether guest RAM was written before the failure (load only). */
  ramTouched = false;

  constructor(code: MigrationStreamErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Codes of {@link MigrationChannelError}. */
export type MigrationChannelErrorCode =
  /** The URI is not one of file:, exec:, unix:, tcp:. */
  | 'MIGRATION_BAD_URI'
  /** The disk is full (ENOSPC, EDQUOT, EFBIG). */
  | 'MIGRATION_NO_SPACE'
  /** The reader went away (EPIPE, ECONNRESET). */
  | 'MIGRATION_BROKEN_PIPE'
  /** Another write error. */
  | 'MIGRATION_WRITE_FAILED'
  /** A read error other than end of stream. */
  | 'MIGRATION_READ_FAILED'
  /** The file, socket or command could not be opened, connected or started. */
  | 'MIGRATION_OPEN_FAILED'
  /** The exec: command exited with a non-zero status or a signal. */
  | 'MIGRATION_EXEC_FAILED'
  /** The channel was cancelled. */
  | 'MIGRATION_CANCELLED';

/** A migration channel (file, command, socket) failed. */
export class MigrationChannelError extends TsvmmError {
  declare readonly code: MigrationChannelErrorCode;

  constructor(code: MigrationChannelErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** A migrate-set-parameters value was refused, or a state change was invalid. */
export class MigrationParameterError extends TsvmmError {
  constructor(message: string) {
    super('MIGRATION_INVALID_PARAMETER', message);
  }
}

/** A migration status change that QEMU's state machine does not allow. */
export class MigrationStateError extends TsvmmError {
  constructor(message: string) {
    super('MIGRATION_INVALID_STATE', message);
  }
}

/** Codes of {@link MigrationCapabilityError}. */
export type MigrationCapabilityErrorCode =
  /** migrate-set-capabilities asked for a capability tsvmm cannot honour. */
  | 'MIGRATION_UNSUPPORTED_CAPABILITY'
  /** mapped-ram is on and the URI is not file: (QEMU's "requires seekable transport"). */
  | 'MIGRATION_CAPABILITY_NEEDS_FILE';

/** A capability cannot be turned on, or cannot be used with this URI. */
export class MigrationCapabilityError extends TsvmmError {
  declare readonly code: MigrationCapabilityErrorCode;

  constructor(
    message: string,
    code: MigrationCapabilityErrorCode = 'MIGRATION_UNSUPPORTED_CAPABILITY',
  ) {
    super(code, message);
  }
}
