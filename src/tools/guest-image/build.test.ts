import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { buildGuestImage, type GuestManifest, MANIFEST_FORMAT, sha256 } from './build.js';
import {
  kernelDependency,
  packageInfo,
  parseAptCacheShow,
  resolveKernelPackage,
} from './debian.js';
import { GuestImageError } from './errors.js';
import { BUSYBOX_APPLETS, INIT_SCRIPT } from './initramfs.js';
import { makeBzImage, makeElfKernel } from './test-fixtures.js';

/** `apt-cache show --no-all-versions linux-image-cloud-amd64` on Debian 12, as recorded. */
const APT_CACHE_META = `Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Installed-Size: 13
Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>
Architecture: amd64
Provides: linux-latest-modules-6.1.0-56-cloud-amd64, virtualbox-guest-modules, wireguard-modules (= 1.0.0)
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
Description-md5: 11b016f38b41530eec9d7e80035fed66
Filename: pool/updates/main/l/linux-signed-amd64/linux-image-cloud-amd64_6.1.192-2_amd64.deb
Size: 1504
SHA256: 00be21c0c17f08ddf26e82d3b53fe7a41efa4a288938da6bb69e89c4b25c281d

`;

function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-guest-test-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Lists the names in a newc archive (enough of a reader for these checks). */
function cpioNames(archive: Buffer): string[] {
  const names: string[] = [];
  let at = 0;
  for (;;) {
    const field = (i: number) =>
      Number.parseInt(archive.toString('ascii', at + 6 + i * 8, at + 14 + i * 8), 16);
    const nameSize = field(11);
    const size = field(6);
    const name = archive.toString('utf8', at + 110, at + 109 + nameSize);
    if (name === 'TRAILER!!!') return names;
    names.push(name);
    const dataAt = at + 110 + nameSize + ((4 - ((110 + nameSize) % 4)) % 4);
    at = dataAt + size + ((4 - (size % 4)) % 4);
  }
}

/** Fills dir with a complete cache of stand-in files and a manifest naming them. */
/** The packages a fake cache claims to hold: the kernel package's name and version, busybox's version. */
interface CachedVersions {
  kernelName: string;
  kernel: string;
  busybox: string;
}

function fakeCache(
  dir: string,
  versions: CachedVersions = {
    kernelName: 'linux-image-6.1.0-56-cloud-amd64',
    kernel: '6.1.192-2',
    busybox: '1:1.35.0-4+deb12u1+b1',
  },
) {
  const vmlinuz = Buffer.from('stand-in kernel');
  const busybox = Buffer.from('stand-in busybox');
  writeFileSync(join(dir, 'vmlinuz'), vmlinuz);
  writeFileSync(join(dir, 'busybox'), busybox);
  const manifest: GuestManifest = {
    format: MANIFEST_FORMAT,
    kernel: {
      name: versions.kernelName,
      version: versions.kernel,
      debSha256: 'e7d02b94',
      release: versions.kernelName.replace(/^linux-image-/, ''),
      vmlinuzSha256: sha256(vmlinuz),
    },
    busybox: {
      name: 'busybox-static',
      version: versions.busybox,
      debSha256: '3d3fdbe9',
      binarySha256: sha256(busybox),
    },
    initramfsSha256: '',
    vmlinuxSha256: null,
    scriptSha256: null,
  };
  writeFileSync(join(dir, 'manifest.json'), JSON.stringify(manifest));
  return manifest;
}

/** Runs fn with PATH pointing at an empty folder, so apt-cache and friends are missing. */
async function withoutApt<T>(t: TestContext, fn: () => Promise<T>): Promise<T> {
  const saved = process.env.PATH;
  process.env.PATH = tempDir(t);
  try {
    return await fn();
  } finally {
    process.env.PATH = saved;
  }
}

test('apt-cache output is parsed and the metapackage resolves to the versioned kernel', () => {
  const meta = parseAptCacheShow(APT_CACHE_META);
  assert.ok(meta);
  assert.equal(meta.name, 'linux-image-cloud-amd64');
  assert.equal(meta.version, '6.1.192-2');
  assert.equal(meta.size, 1504);
  assert.equal(kernelDependency(meta), 'linux-image-6.1.0-56-cloud-amd64');
  assert.equal(
    kernelDependency({
      ...meta,
      depends: 'kmod, linux-base (>= 4.3~) | foo, linux-image-6.12.9-amd64 (= 6.12.9-1)',
    }),
    'linux-image-6.12.9-amd64',
  );
  assert.equal(kernelDependency({ ...meta, depends: 'kmod' }), undefined);
  assert.equal(parseAptCacheShow('N: Unable to locate package nope\n'), undefined);
});

test('a complete cache is used, and the initramfs rebuilt, when apt is missing', async (t) => {
  const dir = tempDir(t);
  const cached = fakeCache(dir);
  const lines: string[] = [];
  const script = Buffer.from('echo from script\n');
  const result = await withoutApt(t, () =>
    buildGuestImage({ outDir: dir, script, log: (l) => lines.push(l) }),
  );
  assert.equal(result.downloaded, false);
  assert.match(lines.join('\n'), /cannot ask apt.*using the cached ones/);
  const initramfs = readFileSync(join(dir, 'initramfs.cpio'));
  assert.equal(result.initramfsBytes, initramfs.length);
  const names = cpioNames(initramfs);
  for (const name of ['bin/busybox', 'init', 'script', 'dev/console', 'bin/sh'])
    assert.ok(names.includes(name), name);
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as GuestManifest;
  assert.deepEqual(manifest.kernel, cached.kernel);
  assert.equal(manifest.initramfsSha256, sha256(initramfs));
  assert.equal(manifest.scriptSha256, sha256(script));
});

/**
 * Puts vmlinuz in the cache and records its sha256 in the manifest there,
 * without vmlinuxSha256, as a manifest written before vmlinux existed.
 */
function replaceCachedKernel(dir: string, vmlinuz: Buffer): void {
  const manifestPath = join(dir, 'manifest.json');
  const { vmlinuxSha256: _, ...manifest } = JSON.parse(
    readFileSync(manifestPath, 'utf8'),
  ) as GuestManifest;
  writeFileSync(join(dir, 'vmlinuz'), vmlinuz);
  manifest.kernel.vmlinuzSha256 = sha256(vmlinuz);
  writeFileSync(manifestPath, JSON.stringify(manifest));
}

test('vmlinux is extracted from vmlinuz once, again when either changes, and left out when it cannot be', async (t) => {
  const dir = tempDir(t);
  fakeCache(dir);
  const elf = makeElfKernel();
  replaceCachedKernel(dir, makeBzImage(gzipSync(elf)));
  const vmlinuxPath = join(dir, 'vmlinux');
  const build = async () => {
    const lines: string[] = [];
    const result = await withoutApt(t, () =>
      buildGuestImage({ outDir: dir, log: (l) => lines.push(l) }),
    );
    return { result, log: lines.join('\n') };
  };

  const first = await build();
  assert.match(first.log, /extracted vmlinux \(\d+ bytes\)/);
  assert.equal(first.result.vmlinux, vmlinuxPath);
  assert.equal(first.result.vmlinuxBytes, elf.length);
  assert.ok(readFileSync(vmlinuxPath).equals(elf));
  assert.equal(first.result.manifest.vmlinuxSha256, sha256(elf));
  const onDisk = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as GuestManifest;
  assert.equal(onDisk.vmlinuxSha256, sha256(elf));

  const second = await build();
  assert.doesNotMatch(second.log, /extracted vmlinux/, 'an intact vmlinux is kept');
  assert.equal(second.result.manifest.vmlinuxSha256, sha256(elf));

  writeFileSync(vmlinuxPath, 'damaged');
  const third = await build();
  assert.match(third.log, /extracted vmlinux/, 'a damaged vmlinux is written again');
  assert.ok(readFileSync(vmlinuxPath).equals(elf));

  const otherElf = makeElfKernel(Buffer.from('another kernel'));
  replaceCachedKernel(dir, makeBzImage(gzipSync(otherElf)));
  const fourth = await build();
  assert.match(
    fourth.log,
    /extracted vmlinux/,
    'an old manifest and a new vmlinuz give a new vmlinux',
  );
  assert.ok(readFileSync(vmlinuxPath).equals(otherElf));

  const xz = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1, 2, 3]);
  replaceCachedKernel(dir, makeBzImage(xz));
  const fifth = await build();
  assert.match(fifth.log, /no vmlinux, only the bzImage: .*payload is xz-compressed/);
  assert.equal(fifth.result.vmlinux, null);
  assert.equal(fifth.result.manifest.vmlinuxSha256, null);
  assert.equal(existsSync(vmlinuxPath), false, 'the stale vmlinux is removed');
});

test('without apt and without a valid cache the build fails saying what is missing', async (t) => {
  const dir = tempDir(t);
  fakeCache(dir);
  writeFileSync(join(dir, 'vmlinuz'), 'changed since the manifest');
  await assert.rejects(
    withoutApt(t, () => buildGuestImage({ outDir: dir })),
    (e: unknown) =>
      e instanceof GuestImageError &&
      e.code === 'GUEST_IMAGE_TOOL_MISSING' &&
      /apt-cache is not installed/.test(e.message),
  );
});

test('cachedOnly uses a complete cache without asking apt, and without one says how to build it', async (t) => {
  const dir = tempDir(t);
  const cached = fakeCache(dir);
  const lines: string[] = [];
  // The fake cache's versions are not what apt offers: only a build that
  // never asks apt keeps them (and never downloads).
  const result = await buildGuestImage({
    outDir: dir,
    cachedOnly: true,
    log: (l) => lines.push(l),
  });
  assert.equal(result.downloaded, false);
  assert.deepEqual(result.manifest.kernel, cached.kernel);
  assert.doesNotMatch(lines.join('\n'), /cannot ask apt/);
  writeFileSync(join(dir, 'busybox'), 'changed since the manifest');
  await assert.rejects(
    buildGuestImage({ outDir: dir, cachedOnly: true }),
    (e: unknown) =>
      e instanceof GuestImageError &&
      e.code === 'GUEST_IMAGE_NOT_BUILT' &&
      e.message.includes(dir) &&
      /node scripts\/build-guest\.mjs/.test(e.message),
  );
});

/** The candidate versions apt offers here, or a skip reason when apt cannot say. */
async function aptVersions(t: TestContext): Promise<CachedVersions | undefined> {
  const offered = await aptOffers();
  if (offered instanceof Error) {
    t.skip(`apt cannot resolve the packages here: ${offered.message}`);
    return undefined;
  }
  return offered;
}

/** What apt offers for the guest's packages, or the error when its lists cannot say (never updated). */
async function aptOffers(): Promise<CachedVersions | Error> {
  try {
    const kernel = await resolveKernelPackage('linux-image-cloud-amd64');
    return {
      kernelName: kernel.name,
      kernel: kernel.version,
      busybox: (await packageInfo('busybox-static')).version,
    };
  } catch (e) {
    if (e instanceof GuestImageError) return e;
    throw e;
  }
}

// Holds with or without apt's lists: where apt offers versions, the cache
// claims exactly those (the kernel's versioned package name included, which
// changes with each Debian kernel ABI); where apt cannot resolve the
// packages (a fresh machine before `apt-get update`), a complete cache is
// used as it is. Either way nothing is downloaded.
test('no download when the cache holds the versions apt offers (apt-cache only, no network)', async (t) => {
  const offered = await aptOffers();
  const dir = tempDir(t);
  const cached = offered instanceof Error ? fakeCache(dir) : fakeCache(dir, offered);
  const log: string[] = [];
  const result = await buildGuestImage({ outDir: dir, log: (l) => log.push(l) });
  assert.equal(result.downloaded, false, log.join('\n'));
  assert.deepEqual(result.manifest.kernel, cached.kernel);
  assert.deepEqual(result.manifest.busybox, cached.busybox);
  assert.equal(readFileSync(join(dir, 'vmlinuz'), 'utf8'), 'stand-in kernel');
  const expected =
    offered instanceof Error ? /using the cached ones/ : /cache is current: linux-image-/;
  assert.match(log.join('\n'), expected);
});

test('an unknown package is refused with what to do', async (t) => {
  if (!(await aptVersions(t))) return;
  await assert.rejects(resolveKernelPackage('tsvmm-no-such-package'), {
    code: 'GUEST_IMAGE_NO_PACKAGE',
  });
});

test('the whole build from Debian packages (TSVMM_TEST_GUEST_BUILD=1)', async (t) => {
  if (process.env.TSVMM_TEST_GUEST_BUILD !== '1') {
    t.skip('downloads about 28 MB from Debian: set TSVMM_TEST_GUEST_BUILD=1 to run it');
    return;
  }
  const dir = tempDir(t);
  const first = await buildGuestImage({ outDir: dir });
  assert.equal(first.downloaded, true);
  const vmlinuz = readFileSync(first.vmlinuz);
  assert.equal(
    vmlinuz.toString('latin1', 0x202, 0x206),
    'HdrS',
    'a bzImage with a boot protocol header',
  );
  assert.match(first.manifest.kernel.release, /^\d+\.\d+\.\d+-\d+-cloud-amd64$/);
  assert.ok(first.vmlinux, 'vmlinux is extracted from the kernel');
  const vmlinux = readFileSync(first.vmlinux);
  assert.equal(vmlinux.toString('latin1', 0, 4), '\x7fELF');
  assert.equal(first.manifest.vmlinuxSha256, sha256(vmlinux));
  // Every applet we link must exist in this busybox (it runs on the amd64 host).
  const list = spawnSync(join(dir, 'busybox'), ['--list'], { encoding: 'utf8' });
  assert.equal(list.status, 0, list.stderr);
  const applets = new Set(list.stdout.split('\n'));
  for (const applet of BUSYBOX_APPLETS) assert.ok(applets.has(applet), `busybox has ${applet}`);
  const initramfs = readFileSync(first.initramfs);
  assert.ok(cpioNames(initramfs).includes('init'));
  assert.ok(initramfs.includes(Buffer.from(INIT_SCRIPT)));
  const second = await buildGuestImage({ outDir: dir });
  assert.equal(second.downloaded, false, 'the second run uses the cache');
  assert.equal(
    second.manifest.initramfsSha256,
    first.manifest.initramfsSha256,
    'reproducible initramfs',
  );
  assert.equal(second.manifest.vmlinuxSha256, first.manifest.vmlinuxSha256);
});
