/**
 * Debian's package tools, as the guest-image builder uses them: apt-cache
 * to learn the candidate version of a package (no network), apt-get
 * download to fetch its .deb into a folder (no root needed, nothing is
 * installed) and dpkg -x to unpack it.
 */
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { GuestImageError } from './errors.js';

/** The fields of one apt-cache stanza that the builder uses. */
export interface DebPackage {
  name: string;
  version: string;
  /** The Depends field as written, or "" when there is none. */
  depends: string;
  /** SHA256 of the .deb as the archive's index gives it. */
  sha256: string;
  size: number;
}

/** Runs a program (never through a shell) and resolves to its stdout. */
export function runTool(
  program: string,
  args: readonly string[],
  options: { cwd?: string } = {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      program,
      args,
      {
        cwd: options.cwd,
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
        env: { ...process.env, LC_ALL: 'C' },
      },
      (error, stdout, stderr) => {
        if (!error) {
          resolve(stdout);
          return;
        }
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
          reject(
            new GuestImageError(
              'GUEST_IMAGE_TOOL_MISSING',
              `${program} is not installed: the guest-image builder needs Debian's apt and dpkg (run it on Debian or Ubuntu)`,
              { cause: error },
            ),
          );
          return;
        }
        const detail = stderr.trim().split('\n').slice(-5).join('\n') || error.message;
        reject(
          new GuestImageError(
            'GUEST_IMAGE_TOOL_FAILED',
            `${program} ${args.join(' ')} failed: ${detail}`,
            { cause: error },
          ),
        );
      },
    );
  });
}

/** Parses the first stanza of `apt-cache show` output. */
export function parseAptCacheShow(text: string): DebPackage | undefined {
  const stanza = text.split(/\n\s*\n/)[0] ?? '';
  const fields = new Map<string, string>();
  let last = '';
  for (const line of stanza.split('\n')) {
    if (/^\s/.test(line) && last) {
      fields.set(last, `${fields.get(last)}\n${line.trim()}`);
      continue;
    }
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    last = line.slice(0, colon);
    fields.set(last, line.slice(colon + 1).trim());
  }
  const name = fields.get('Package');
  const version = fields.get('Version');
  if (!name || !version) return undefined;
  return {
    name,
    version,
    depends: fields.get('Depends') ?? '',
    sha256: fields.get('SHA256') ?? '',
    size: Number(fields.get('Size') ?? 0),
  };
}

/** The candidate version of a package, from the local apt lists. */
export async function packageInfo(name: string): Promise<DebPackage> {
  let text: string;
  try {
    text = await runTool('apt-cache', ['show', '--no-all-versions', name]);
  } catch (e) {
    if (e instanceof GuestImageError && e.code === 'GUEST_IMAGE_TOOL_FAILED') {
      throw noPackage(name, e);
    }
    throw e;
  }
  const info = parseAptCacheShow(text);
  if (!info) throw noPackage(name);
  return info;
}

function noPackage(name: string, cause?: unknown): GuestImageError {
  return new GuestImageError(
    'GUEST_IMAGE_NO_PACKAGE',
    `apt knows no package ${name}: run \`apt-get update\` (as root) so the package lists are there, then try again`,
    { cause },
  );
}

/**
 * The versioned kernel package a metapackage such as linux-image-cloud-amd64
 * depends on: the first dependency named linux-image-<digit>...
 */
export function kernelDependency(meta: DebPackage): string | undefined {
  for (const alternative of meta.depends.split(/[,|]/)) {
    const name = alternative.trim().split(/\s/)[0] ?? '';
    if (/^linux-image-\d/.test(name)) return name;
  }
  return undefined;
}

/** Resolves a kernel metapackage to the package holding the kernel image. */
export async function resolveKernelPackage(metaName: string): Promise<DebPackage> {
  const meta = await packageInfo(metaName);
  if (/^linux-image-\d/.test(meta.name)) return meta;
  const target = kernelDependency(meta);
  if (!target) {
    throw new GuestImageError(
      'GUEST_IMAGE_BAD_PACKAGE',
      `${metaName} ${meta.version} depends on no linux-image-<version> package (Depends: ${meta.depends || 'none'}): name a kernel package`,
    );
  }
  return packageInfo(target);
}

/** Downloads `pkg` at its version into `dir`; resolves to the .deb's path. */
export async function downloadPackage(pkg: DebPackage, dir: string): Promise<string> {
  await runTool('apt-get', ['download', '-q', `${pkg.name}=${pkg.version}`], { cwd: dir });
  const deb = (await readdir(dir)).find((f) => f.startsWith(`${pkg.name}_`) && f.endsWith('.deb'));
  if (!deb) {
    throw new GuestImageError(
      'GUEST_IMAGE_BAD_PACKAGE',
      `apt-get download ${pkg.name}=${pkg.version} left no .deb in ${dir}`,
    );
  }
  return join(dir, deb);
}

/** Unpacks a .deb's files into `dir` (dpkg -x: nothing is installed). */
export async function extractDeb(deb: string, dir: string): Promise<void> {
  await runTool('dpkg', ['-x', deb, dir]);
}
