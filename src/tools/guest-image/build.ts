/**
 * Builds the Linux test guest: Debian's cloud kernel and an initramfs of our
 * own around Debian's static busybox, into a cache folder outside the repo.
 *
 * The folder holds:
 *   vmlinuz         the kernel (bzImage) from boot/vmlinuz-<release>
 *   vmlinux         the uncompressed ELF kernel taken out of vmlinuz's
 *                   payload (extract-vmlinux.ts); booting it skips the
 *                   in-guest decompressor, which is slow under PVM. Left
 *                   out, with a log line, when the payload's compression
 *                   is one we do not decode
 *   initramfs.cpio  newc archive from initramfs.ts
 *   busybox         the static busybox, kept so the initramfs can be
 *                   rebuilt (for another --script) without a download
 *   manifest.json   package names, versions and sha256s
 *
 * The downloads are skipped when the manifest already names the candidate
 * versions apt offers and the cached files still have their recorded
 * sha256s. The initramfs is written every time; it is reproducible. vmlinux
 * is extracted again only when it or vmlinuz differ from the manifest.
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { distUrl } from '../../util/dist-path.js';
import {
  type DebPackage,
  downloadPackage,
  extractDeb,
  packageInfo,
  resolveKernelPackage,
} from './debian.js';
import { GuestImageError, VmlinuxError } from './errors.js';
import { extractVmlinux } from './extract-vmlinux.js';
import { buildInitramfs } from './initramfs.js';

/** The committed clock reporter (guests/clock-reporter), built into every image. */
export const CLOCK_REPORTER_PATH = fileURLToPath(
  distUrl('../guests/clock-reporter/clock-reporter'),
);

/** The kernel metapackage used unless another is named. */
export const DEFAULT_KERNEL_PACKAGE = 'linux-image-cloud-amd64';
export const BUSYBOX_PACKAGE = 'busybox-static';

export const MANIFEST_FORMAT = 1;

/** One package as the manifest records it. */
export interface ManifestPackage {
  name: string;
  version: string;
  /** sha256 of the downloaded .deb. */
  debSha256: string;
}

/** Contents of manifest.json. */
export interface GuestManifest {
  format: number;
  kernel: ManifestPackage & { release: string; vmlinuzSha256: string };
  busybox: ManifestPackage & { binarySha256: string };
  initramfsSha256: string;
  /**
   * sha256 of vmlinux, the ELF extracted from vmlinuz; null when it could
   * not be extracted. Manifests written before vmlinux existed lack it.
   */
  vmlinuxSha256: string | null;
  /** sha256 of the /script built in, or null for the interactive shell. */
  scriptSha256: string | null;
}

/** Options of buildGuestImage. */
export interface GuestBuildOptions {
  /** The cache folder; created if missing. */
  outDir: string;
  /** A shell script that /init runs instead of the interactive shell. */
  script?: Uint8Array;
  /** Kernel package or metapackage. Default linux-image-cloud-amd64. */
  kernelPackage?: string;
  /** Progress lines, for people. */
  log?: (line: string) => void;
  /**
   * Use only what the cache holds: no apt query, no download. For places
   * without network or apt lists (tests inside the VM runner); a missing or
   * damaged cache throws GUEST_IMAGE_NOT_BUILT, saying how to build it.
   */
  cachedOnly?: boolean;
}

/** What buildGuestImage made. */
export interface GuestBuildResult {
  vmlinuz: string;
  initramfs: string;
  /** The extracted ELF kernel, or null when vmlinuz's payload could not be decoded. */
  vmlinux: string | null;
  manifest: GuestManifest;
  /** False when the cache already held the same package versions. */
  downloaded: boolean;
  vmlinuzBytes: number;
  initramfsBytes: number;
  vmlinuxBytes: number;
}

/** sha256 of bytes, as lowercase hex. */
export function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/**
 * Builds (or refreshes) the test guest in options.outDir.
 *
 * @example
 * const guest = await buildGuestImage({ outDir: defaultGuestCacheDir() });
 * // tsvmm -kernel guest.vmlinuz -initrd guest.initramfs -append 'console=ttyS0'
 */
export async function buildGuestImage(options: GuestBuildOptions): Promise<GuestBuildResult> {
  const log = options.log ?? (() => {});
  const outDir = options.outDir;
  await mkdir(outDir, { recursive: true });
  const vmlinuzPath = join(outDir, 'vmlinuz');
  const busyboxPath = join(outDir, 'busybox');
  const initramfsPath = join(outDir, 'initramfs.cpio');
  const vmlinuxPath = join(outDir, 'vmlinux');
  const manifestPath = join(outDir, 'manifest.json');

  const cached = await readValidCache(manifestPath, vmlinuzPath, busyboxPath);
  if (options.cachedOnly && !cached) {
    throw new GuestImageError(
      'GUEST_IMAGE_NOT_BUILT',
      `no complete guest image in ${outDir}: build it first with \`node scripts/build-guest.mjs\` (needs apt and the network; --out or $TSVMM_GUEST_CACHE for another folder)`,
    );
  }
  const wanted = options.cachedOnly
    ? undefined
    : await candidatePackages(options.kernelPackage ?? DEFAULT_KERNEL_PACKAGE, cached, log);

  let kernelPart: GuestManifest['kernel'];
  let busyboxPart: GuestManifest['busybox'];
  let busybox: Uint8Array;
  let downloaded = false;
  if (cached && (!wanted || sameVersions(cached.manifest, wanted))) {
    log(
      `cache is current: ${cached.manifest.kernel.name} ${cached.manifest.kernel.version}, ${BUSYBOX_PACKAGE} ${cached.manifest.busybox.version}`,
    );
    kernelPart = cached.manifest.kernel;
    busyboxPart = cached.manifest.busybox;
    busybox = cached.busybox;
  } else {
    // Without a cache, a failure to resolve was thrown above: wanted is set.
    const fetched = await fetchPackages(wanted!.kernel, wanted!.busybox, log);
    await writeAtomic(vmlinuzPath, fetched.vmlinuz);
    await writeAtomic(busyboxPath, fetched.busybox, 0o755);
    kernelPart = fetched.kernel;
    busyboxPart = fetched.busyboxPart;
    busybox = fetched.busybox;
    downloaded = true;
  }

  const clockReporter = await readFile(CLOCK_REPORTER_PATH);
  const initramfs = buildInitramfs(
    options.script
      ? { busybox, clockReporter, script: options.script }
      : { busybox, clockReporter },
  );
  await writeAtomic(initramfsPath, initramfs);
  const vmlinuz = await readFile(vmlinuzPath);
  const vmlinux = await refreshVmlinux(vmlinuxPath, vmlinuz, cached?.manifest, log);
  const manifest: GuestManifest = {
    format: MANIFEST_FORMAT,
    kernel: kernelPart,
    busybox: busyboxPart,
    initramfsSha256: sha256(initramfs),
    vmlinuxSha256: vmlinux?.sha256 ?? null,
    scriptSha256: options.script ? sha256(options.script) : null,
  };
  await writeAtomic(manifestPath, Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`));
  return {
    vmlinuz: vmlinuzPath,
    initramfs: initramfsPath,
    vmlinux: vmlinux ? vmlinuxPath : null,
    manifest,
    downloaded,
    vmlinuzBytes: vmlinuz.byteLength,
    initramfsBytes: initramfs.byteLength,
    vmlinuxBytes: vmlinux?.bytes ?? 0,
  };
}

/**
 * Writes the ELF kernel extracted from vmlinuz to path, unless the previous
 * manifest shows the file already holds it. Returns null, logs why and
 * removes any stale file when the payload cannot be extracted.
 */
async function refreshVmlinux(
  path: string,
  vmlinuz: Uint8Array,
  previous: GuestManifest | undefined,
  log: (line: string) => void,
): Promise<{ sha256: string; bytes: number } | null> {
  const recorded = previous?.vmlinuxSha256;
  if (recorded && previous.kernel.vmlinuzSha256 === sha256(vmlinuz)) {
    const existing = await readFile(path).catch(() => undefined);
    if (existing && sha256(existing) === recorded) {
      return { sha256: recorded, bytes: existing.byteLength };
    }
  }
  let vmlinux: Uint8Array;
  const started = performance.now();
  try {
    vmlinux = extractVmlinux(vmlinuz);
  } catch (e) {
    if (!(e instanceof VmlinuxError)) throw e;
    log(`no vmlinux, only the bzImage: ${e.message}`);
    await rm(path, { force: true });
    return null;
  }
  log(
    `extracted vmlinux (${vmlinux.byteLength} bytes) in ${((performance.now() - started) / 1000).toFixed(1)} s`,
  );
  await writeAtomic(path, vmlinux);
  return { sha256: sha256(vmlinux), bytes: vmlinux.byteLength };
}

/**
 * The package versions apt offers now, or undefined when apt cannot tell
 * and the cache is complete (without apt or its lists the cache is still
 * usable).
 */
async function candidatePackages(
  kernelPackage: string,
  cached: unknown,
  log: (line: string) => void,
): Promise<{ kernel: DebPackage; busybox: DebPackage } | undefined> {
  try {
    // Each apt-cache call takes about a second: ask both at once.
    const [kernel, busybox] = await Promise.all([
      resolveKernelPackage(kernelPackage),
      packageInfo(BUSYBOX_PACKAGE),
    ]);
    return { kernel, busybox };
  } catch (e) {
    if (!cached || !(e instanceof GuestImageError)) throw e;
    log(`cannot ask apt for newer packages (${e.message}); using the cached ones`);
    return undefined;
  }
}

function sameVersions(
  manifest: GuestManifest,
  wanted: { kernel: DebPackage; busybox: DebPackage },
): boolean {
  return (
    manifest.kernel.name === wanted.kernel.name &&
    manifest.kernel.version === wanted.kernel.version &&
    manifest.busybox.name === wanted.busybox.name &&
    manifest.busybox.version === wanted.busybox.version
  );
}

/** The manifest and busybox when the cache is complete and its files match their sha256s. */
async function readValidCache(
  manifestPath: string,
  vmlinuzPath: string,
  busyboxPath: string,
): Promise<{ manifest: GuestManifest; busybox: Uint8Array } | undefined> {
  try {
    const manifest = JSON.parse(await readFile(manifestPath, 'utf8')) as GuestManifest;
    if (manifest.format !== MANIFEST_FORMAT) return undefined;
    const busybox = await readFile(busyboxPath);
    if (sha256(busybox) !== manifest.busybox.binarySha256) return undefined;
    if (sha256(await readFile(vmlinuzPath)) !== manifest.kernel.vmlinuzSha256) return undefined;
    return { manifest, busybox };
  } catch {
    // Missing or unreadable: build afresh.
    return undefined;
  }
}

/** Downloads and unpacks both packages in a temporary folder, removed afterwards. */
async function fetchPackages(
  kernelPkg: DebPackage,
  busyboxPkg: DebPackage,
  log: (line: string) => void,
): Promise<{
  vmlinuz: Buffer;
  busybox: Buffer;
  kernel: GuestManifest['kernel'];
  busyboxPart: GuestManifest['busybox'];
}> {
  const work = await mkdtemp(join(tmpdir(), 'tsvmm-guest-'));
  try {
    const debs = join(work, 'debs');
    const root = join(work, 'root');
    await mkdir(debs);
    await mkdir(root);
    log(`downloading ${kernelPkg.name} ${kernelPkg.version} (${kernelPkg.size} bytes)`);
    const kernelDeb = await downloadPackage(kernelPkg, debs);
    log(`downloading ${busyboxPkg.name} ${busyboxPkg.version} (${busyboxPkg.size} bytes)`);
    const busyboxDeb = await downloadPackage(busyboxPkg, debs);
    log('unpacking');
    await extractDeb(kernelDeb, root);
    await extractDeb(busyboxDeb, root);

    const images = (await readdir(join(root, 'boot')).catch(() => [] as string[])).filter((f) =>
      f.startsWith('vmlinuz-'),
    );
    const image = images[0];
    if (images.length !== 1 || !image) {
      throw new GuestImageError(
        'GUEST_IMAGE_BAD_PACKAGE',
        `${kernelPkg.name} ${kernelPkg.version} holds ${images.length} boot/vmlinuz-* files, not one: name a package with exactly one kernel`,
      );
    }
    const vmlinuz = await readFile(join(root, 'boot', image));
    const busybox = await readFile(join(root, 'bin', 'busybox')).catch((e: unknown) => {
      throw new GuestImageError(
        'GUEST_IMAGE_BAD_PACKAGE',
        `${busyboxPkg.name} ${busyboxPkg.version} has no bin/busybox`,
        { cause: e },
      );
    });
    return {
      vmlinuz,
      busybox,
      kernel: {
        name: kernelPkg.name,
        version: kernelPkg.version,
        debSha256: sha256(await readFile(kernelDeb)),
        release: image.slice('vmlinuz-'.length),
        vmlinuzSha256: sha256(vmlinuz),
      },
      busyboxPart: {
        name: busyboxPkg.name,
        version: busyboxPkg.version,
        debSha256: sha256(await readFile(busyboxDeb)),
        binarySha256: sha256(busybox),
      },
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Writes a file through a temporary name, so a reader never sees half of it. */
async function writeAtomic(path: string, bytes: Uint8Array, mode = 0o644): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, bytes, { mode });
  await rename(tmp, path);
}
