/**
 * Migration capabilities (QAPI's MigrationCapability), as QEMU 7.2 lists
 * them in query-migrate-capabilities, plus QEMU 9's `mapped-ram`, and
 * which of them tsvmm honours.
 *
 * tsvmm honours `events` (MIGRATION and MIGRATION_PASS events),
 * `pause-before-switchover` (the source waits in `pre-switchover` for
 * migrate-continue) and `mapped-ram` (QEMU 9's file layout where each RAM
 * page has a fixed offset; only with a `file:` URI, see
 * {@link checkCapabilityTransport}). Every other capability names a mechanism tsvmm does
 * not have (compression, postcopy, multifd, block migration, ...): it can
 * be set to false, which it already is, and setting it to true is refused
 * with the reason, so no client believes it is in effect.
 */
import { MigrationCapabilityError } from './errors.js';

/**
 * QEMU 7.2's capabilities in its enum order, the order query-migrate-capabilities
 * lists them, then QEMU 9's `mapped-ram`.
 */
export const MIGRATION_CAPABILITIES = [
  'xbzrle',
  'rdma-pin-all',
  'auto-converge',
  'zero-blocks',
  'compress',
  'events',
  'postcopy-ram',
  'x-colo',
  'release-ram',
  'block',
  'return-path',
  'pause-before-switchover',
  'multifd',
  'dirty-bitmaps',
  'postcopy-blocktime',
  'late-block-activate',
  'x-ignore-shared',
  'validate-uuid',
  'background-snapshot',
  'zero-copy-send',
  'postcopy-preempt',
  // QEMU 9.0's, after the 7.2 list (QEMU 9 has others between, not offered here).
  'mapped-ram',
] as const;

/** A capability name QEMU 7.2 knows, or `mapped-ram`. */
export type MigrationCapability = (typeof MIGRATION_CAPABILITIES)[number];

/** The capabilities tsvmm implements. */
export const SUPPORTED_MIGRATION_CAPABILITIES: readonly MigrationCapability[] = [
  'events',
  'pause-before-switchover',
  'mapped-ram',
];

/**
 * QEMU's check before a migration starts on either side: `mapped-ram`
 * writes pages at fixed offsets, so it needs a seekable channel, which
 * among tsvmm's transports only `file:` is. Throws
 * {@link MigrationCapabilityError} (code MIGRATION_CAPABILITY_NEEDS_FILE)
 * for any other transport; `transport` is the URI's scheme.
 */
export function checkCapabilityTransport(
  capabilities: Pick<MigrationCapabilities, 'has'>,
  transport: string,
  uri: string,
): void {
  if (capabilities.has('mapped-ram') && transport !== 'file') {
    throw new MigrationCapabilityError(
      `Migration requires seekable transport (e.g. file): capability 'mapped-ram' writes ` +
        `each RAM page at a fixed offset, so '${uri}' cannot carry it; use file:PATH or turn ` +
        `'mapped-ram' off`,
      'MIGRATION_CAPABILITY_NEEDS_FILE',
    );
  }
}

/** Why each other capability cannot be turned on here: what tsvmm lacks. */
const UNSUPPORTED_REASON: Readonly<Record<string, string>> = {
  xbzrle: 'it sends each dirty page whole, with no XBZRLE delta encoding',
  'rdma-pin-all': 'it has no RDMA transport',
  'auto-converge': 'it does not throttle vCPUs to make precopy converge',
  'zero-blocks': 'it has no block devices to migrate',
  compress: 'it does not compress pages',
  'postcopy-ram': 'it does precopy only',
  'x-colo': 'it has no COLO fault tolerance',
  'release-ram': 'it does precopy only, and release-ram is a postcopy feature',
  block: 'it has no block devices to migrate',
  'return-path': 'it opens no return path from the destination',
  multifd: 'it sends RAM over one channel',
  'dirty-bitmaps': 'it has no block dirty bitmaps',
  'postcopy-blocktime': 'it does precopy only',
  'late-block-activate': 'it has no block devices to activate',
  'x-ignore-shared': 'it always sends all of guest RAM',
  'validate-uuid': 'it writes no VM UUID in the stream',
  'background-snapshot': 'it has no background snapshots',
  'zero-copy-send': 'it has no multifd channels to send from',
  'postcopy-preempt': 'it does precopy only',
};

/** One entry of migrate-set-capabilities' list and of query-migrate-capabilities' answer. */
export interface MigrationCapabilityStatus {
  capability: MigrationCapability;
  state: boolean;
}

/** The state of every capability, all off at start as in QEMU. */
export class MigrationCapabilities {
  private readonly on = new Set<MigrationCapability>();

  /** Whether `capability` is on. */
  has(capability: MigrationCapability): boolean {
    return this.on.has(capability);
  }

  /**
   * migrate-set-capabilities: applies the list in order (a later entry for
   * the same capability wins, as in QEMU) to a copy, checks the result,
   * and only then takes it. Throws {@link MigrationCapabilityError} for a
   * capability turned on that tsvmm cannot honour; nothing changes then.
   */
  set(list: readonly MigrationCapabilityStatus[]): void {
    const next = new Set(this.on);
    for (const { capability, state } of list) {
      if (state) next.add(capability);
      else next.delete(capability);
    }
    for (const capability of next) {
      if (SUPPORTED_MIGRATION_CAPABILITIES.includes(capability)) continue;
      const reason = UNSUPPORTED_REASON[capability] ?? 'it does not implement it';
      throw new MigrationCapabilityError(
        `tsvmm cannot turn on migration capability '${capability}': ${reason}; ` +
          `supported: ${SUPPORTED_MIGRATION_CAPABILITIES.join(', ')}`,
      );
    }
    this.on.clear();
    for (const capability of next) this.on.add(capability);
  }

  /** query-migrate-capabilities: every capability listed above, in its order, with its state. */
  query(): MigrationCapabilityStatus[] {
    return MIGRATION_CAPABILITIES.map((capability) => ({
      capability,
      state: this.on.has(capability),
    }));
  }
}
