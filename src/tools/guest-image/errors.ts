import { TsvmmError } from '../../util/errors.js';

/**
 * An archive entry the cpio writer cannot write: a bad path, a missing
 * parent directory, a duplicate, or a field that does not fit newc's 32 bits.
 * Codes: CPIO_BAD_PATH, CPIO_MISSING_PARENT, CPIO_DUPLICATE, CPIO_TOO_LARGE,
 * CPIO_BAD_MODE.
 */
export class CpioError extends TsvmmError {}

/**
 * Building the guest image failed: a Debian tool is missing or failed, a
 * package has no candidate, or a downloaded package lacks what we need.
 * Codes: GUEST_IMAGE_TOOL_MISSING, GUEST_IMAGE_TOOL_FAILED,
 * GUEST_IMAGE_NO_PACKAGE, GUEST_IMAGE_BAD_PACKAGE, GUEST_IMAGE_USAGE,
 * GUEST_IMAGE_NOT_BUILT (cachedOnly found no complete cache).
 */
export class GuestImageError extends TsvmmError {}

/**
 * LZ4 data that cannot be decoded: a wrong magic number, input that ends
 * early, or a block whose sequences point outside what it has written.
 * Codes: LZ4_BAD_MAGIC, LZ4_TRUNCATED, LZ4_CORRUPT.
 */
export class Lz4Error extends TsvmmError {}

/**
 * The uncompressed vmlinux cannot be taken out of a bzImage: the file is no
 * bzImage, its payload uses a compression we do not decode, or the payload
 * does not decompress to an ELF64 x86-64 kernel.
 * Codes: VMLINUX_NOT_BZIMAGE, VMLINUX_UNSUPPORTED_COMPRESSION,
 * VMLINUX_CORRUPT_PAYLOAD, VMLINUX_NOT_ELF.
 */
export class VmlinuxError extends TsvmmError {}
