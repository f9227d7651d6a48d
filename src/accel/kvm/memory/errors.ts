import { TsvmmError } from '../../../util/errors.js';

/**
 * A guest-physical access outside guest RAM, or one that runs past the end
 * of the RAM slot it starts in. Nothing was read or written.
 */
export class GuestMemoryError extends TsvmmError {
  readonly gpa: number;
  readonly length: number;

  constructor(gpa: number, length: number, detail: string) {
    super(
      'GUEST_MEMORY_OUT_OF_RANGE',
      `guest-physical access of ${length} bytes at 0x${gpa.toString(16)} ${detail}`,
    );
    this.gpa = gpa;
    this.length = length;
  }
}

/** Guest memory was used after close(); its mapping is gone. */
export class GuestMemoryClosedError extends TsvmmError {
  constructor() {
    super('GUEST_MEMORY_CLOSED', 'guest memory was used after close(): map new guest memory');
  }
}

/** The host refused to map guest RAM. */
export class GuestMemoryAllocError extends TsvmmError {
  readonly errno: number;

  constructor(size: number, errno: number, errnoName: string, what: 'map' | 'preallocate' = 'map') {
    super(
      'GUEST_MEMORY_ALLOC_FAILED',
      what === 'map'
        ? `cannot map ${size} bytes of guest RAM (${errnoName}): the host lacks address space or refuses overcommit; give the guest less memory (-m)`
        : `cannot preallocate ${size} bytes of guest RAM (${errnoName}): the host has not that much memory free; give the guest less memory (-m) or drop -mem-prealloc`,
    );
    this.errno = errno;
  }
}

/** A memory size that cannot be used: unparsable, zero, too large or not page-aligned. */
export class InvalidMemorySizeError extends TsvmmError {
  constructor(message: string) {
    super('INVALID_MEMORY_SIZE', message);
  }
}

/** A file could not be mapped over guest RAM (a mapped-ram restore). */
export class GuestMemoryMapFileError extends TsvmmError {
  readonly errno: number;

  constructor(message: string, errno: number) {
    super('GUEST_MEMORY_MAP_FILE_FAILED', message);
    this.errno = errno;
  }
}
