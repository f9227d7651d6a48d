/**
 * Where tsvmm's own files are, for modules that load one at run time (a
 * worker script, a guest image, package.json).
 *
 * `npm run build` bundles the entry point into dist/cli/main.js and the
 * vCPU thread into dist/accel/kvm/vcpu-thread.js (scripts/bundle.mjs), so
 * code that says `new URL('./x.js', import.meta.url)` would resolve from
 * the bundle's directory, not from its own. This module sits two levels
 * below the package root, as the main bundle does: `../` is dist/ from
 * either, bundled or not.
 */

/** The URL of `path`, relative to dist/ (`accel/kvm/vcpu-thread.js`, `../guests/probe.bin`). */
export function distUrl(path: string): URL {
  return new URL(`../${path}`, import.meta.url);
}
