/**
 * Where tsvmm's own files are, for modules that load one at run time (a
 * worker script, a guest image, package.json): relative to dist/, from
 * this module's own place there. `npm run build` bundles what a run loads
 * into a few CommonJS files (scripts/bundle.mjs), and gives a bundled
 * module the URL of its file in dist/ as import.meta.url, so this holds
 * from inside a bundle too.
 */

/** The URL of `path`, relative to dist/ (`accel/kvm/vcpu-thread.cjs`, `../guests/probe.bin`). */
export function distUrl(path: string): URL {
  return new URL(`../${path}`, import.meta.url);
}
