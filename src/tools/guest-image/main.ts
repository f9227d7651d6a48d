/**
 * The `node scripts/build-guest.mjs [--out DIR] [--script FILE]` command:
 * builds the Linux test guest into a cache folder and says how to boot it.
 */
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { buildGuestImage } from './build.js';
import { GuestImageError } from './errors.js';

export const BUILD_GUEST_USAGE = `usage: node scripts/build-guest.mjs [--out DIR] [--script FILE]

Builds a Linux test guest from Debian's packages: the cloud kernel
(linux-image-cloud-amd64) and an initramfs around busybox-static.
  --out DIR      where to put vmlinuz, vmlinux, initramfs.cpio and manifest.json
                 (default $TSVMM_GUEST_CACHE, else ~/.cache/tsvmm/guest)
  --script FILE  a shell script the guest runs at boot instead of a shell;
                 then it powers off, or reboots if the kernel command line
                 holds tsvmm.exit=reboot (without ACPI a power-off only
                 halts the vCPUs; a reboot ends tsvmm -no-reboot)
Needs apt-get and dpkg, and apt's package lists (apt-get update).
Downloads are skipped when the cache holds the current package versions.`;

/** Parsed command line of build-guest. */
export interface BuildGuestArgs {
  help: boolean;
  out?: string;
  script?: string;
}

/** Parses build-guest's arguments; throws GUEST_IMAGE_USAGE on anything unknown. */
export function parseBuildGuestArgs(argv: readonly string[]): BuildGuestArgs {
  const args: BuildGuestArgs = { help: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--help' || arg === '-h') {
      args.help = true;
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    if (name !== '--out' && name !== '--script') {
      throw new GuestImageError('GUEST_IMAGE_USAGE', `unknown option ${arg}\n${BUILD_GUEST_USAGE}`);
    }
    const value = eq > 0 ? arg.slice(eq + 1) : argv[++i];
    if (!value) {
      throw new GuestImageError('GUEST_IMAGE_USAGE', `${name} needs a value\n${BUILD_GUEST_USAGE}`);
    }
    if (name === '--out') args.out = value;
    else args.script = value;
  }
  return args;
}

/** $TSVMM_GUEST_CACHE, else ~/.cache/tsvmm/guest. */
export function defaultGuestCacheDir(
  env: NodeJS.ProcessEnv = process.env,
  home: string = homedir(),
): string {
  return env.TSVMM_GUEST_CACHE || join(home, '.cache', 'tsvmm', 'guest');
}

/** Runs the command; resolves to the exit status (0 or 1). */
export async function main(
  argv: readonly string[],
  out: (line: string) => void = (l) => process.stdout.write(`${l}\n`),
  err: (line: string) => void = (l) => process.stderr.write(`${l}\n`),
): Promise<number> {
  try {
    const args = parseBuildGuestArgs(argv);
    if (args.help) {
      out(BUILD_GUEST_USAGE);
      return 0;
    }
    const outDir = args.out ?? defaultGuestCacheDir();
    const script = args.script ? await readScript(args.script) : undefined;
    const started = performance.now();
    const result = await buildGuestImage({
      outDir,
      ...(script ? { script } : {}),
      log: (line) => err(`build-guest: ${line}`),
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const k = result.manifest.kernel;
    out(`kernel     ${k.name} ${k.version} (release ${k.release})`);
    out(`busybox    ${result.manifest.busybox.name} ${result.manifest.busybox.version}`);
    out(`vmlinuz    ${result.vmlinuz} (${result.vmlinuzBytes} bytes)`);
    out(`initramfs  ${result.initramfs} (${result.initramfsBytes} bytes)`);
    out(
      `vmlinux    ${result.vmlinux ? `${result.vmlinux} (${result.vmlinuxBytes} bytes, ELF)` : 'none'}`,
    );
    out(`${result.downloaded ? 'downloaded' : 'from cache'} in ${seconds} s`);
    out(
      `boot it:   npx tsvmm -smp 2 -m 512M -nographic -kernel ${result.vmlinuz} -initrd ${result.initramfs} -append 'console=ttyS0'`,
    );
    return 0;
  } catch (e) {
    err(`build-guest: ${e instanceof Error ? e.message : String(e)}`);
    return 1;
  }
}

async function readScript(path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (e) {
    throw new GuestImageError(
      'GUEST_IMAGE_USAGE',
      `cannot read the --script file ${path} (${(e as NodeJS.ErrnoException).code ?? e}): give a readable shell script`,
      { cause: e },
    );
  }
}
