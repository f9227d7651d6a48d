#!/usr/bin/env node
// The last step of `npm run build`, after tsc: bundles what a tsvmm run
// loads into one file per thread, in place of tsc's output for that entry:
//   dist/cli/tsvmm.js             the main thread (everything cli/main.js loads after its vCPU prestart)
//   dist/accel/kvm/vcpu-thread.js each vCPU thread
//   dist/migration/migration-worker.js the migration thread (started at each
//                                 `migrate`: its start-up is on the setup's critical path)
// Node's ESM loader costs a resolve, a file read on its thread pool and a
// compile per module; a run loaded about 140 of them (106 on the main
// thread, 32 in every vCPU thread), and that was most of tsvmm's start-up.
// cli/main.js itself stays tsc's: it imports only the prestart helper, so
// the vCPU threads start before the big bundle is read.
// koffi stays an external package (native code). The other modules in
// dist/ stay as tsc wrote them, for the tests and the other entry points.
// Modules that find files at run time go through util/dist-path.ts, which
// is right from the bundle's place as from its own.
import { existsSync } from 'node:fs';
import { dirname, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = fileURLToPath(new URL('..', import.meta.url));
const entries = [
  'dist/cli/tsvmm.js',
  'dist/accel/kvm/vcpu-thread.js',
  'dist/migration/migration-worker.js',
];
// Modules that cli/main.js has already loaded and that hold state the
// bundle must see (the prestarted vCPU threads): the bundle imports them
// from dist/ rather than carrying a second copy with a second state.
const shared = ['dist/accel/kvm/vcpu-prestart.js', 'dist/util/dist-path.js'].map(
  (f) => `${root}${f}`,
);

/** Keeps `shared` modules out of the bundle, imported by their path relative to the bundle. */
function sharedModules(outfile) {
  return {
    name: 'shared-modules',
    setup(b) {
      b.onResolve({ filter: /^\./ }, (args) => {
        const target = resolve(args.resolveDir, args.path);
        if (!shared.includes(target)) return undefined;
        let path = relative(dirname(outfile), target);
        if (!path.startsWith('.')) path = `./${path}`;
        return { path, external: true };
      });
    },
  };
}

for (const entry of entries) {
  const path = `${root}${entry}`;
  if (!existsSync(path)) {
    console.error(`bundle: ${entry} is missing: run tsc first (npm run build does both)`);
    process.exit(1);
  }
  await build({
    entryPoints: [path],
    outfile: path,
    allowOverwrite: true,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['koffi'],
    plugins: [sharedModules(path)],
    // Less source text for V8 to scan and to keep in every isolate's heap;
    // names stay (errors and traces name classes and functions).
    minifyWhitespace: true,
    minifySyntax: true,
    keepNames: true,
    // Maps back to src/*.ts through tsc's own maps.
    sourcemap: true,
    logLevel: 'warning',
  });
}
