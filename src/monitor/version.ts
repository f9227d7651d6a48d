import { readFileSync } from 'node:fs';
import { distUrl } from '../util/dist-path.js';
import type { JsonObject } from './json-value.js';

/** query-version's answer, also the greeting's `version` member. */
export interface QmpVersionInfo extends JsonObject {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

/**
 * The QEMU release whose QMP and command line tsvmm reproduces. Management
 * tools gate features on `qemu.major/minor`, so we report the release we
 * match rather than our own version; our own is in `package`.
 */
export const QEMU_COMPAT_VERSION = { major: 9, minor: 2, micro: 0 } as const;

let cachedVersion: string | undefined;

/** tsvmm's own version, from package.json ("0.0.0" if it cannot be read); read once. */
export function tsvmmVersion(): string {
  cachedVersion ??= readVersion();
  return cachedVersion;
}

function readVersion(): string {
  try {
    const parsed: unknown = JSON.parse(readFileSync(distUrl('../package.json'), 'utf8'));
    if (typeof parsed === 'object' && parsed !== null && 'version' in parsed) {
      const { version } = parsed;
      if (typeof version === 'string') return version;
    }
  } catch {
    // Running from an unusual layout; the version is cosmetic.
  }
  return '0.0.0';
}

/** The version tsvmm reports over QMP: `{"qemu": {...}, "package": "tsvmm 0.1.0"}`. */
export function qmpVersionInfo(): QmpVersionInfo {
  return { qemu: { ...QEMU_COMPAT_VERSION }, package: `tsvmm ${tsvmmVersion()}` };
}
