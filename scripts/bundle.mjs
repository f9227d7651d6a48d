#!/usr/bin/env node
// The last step of `npm run build`, after tsc: bundles what a tsvmm run
// loads into one CommonJS file per thread, beside tsc's output:
//   dist/cli/main.cjs                 the entry point (package.json's bin): starts
//                                     the vCPU threads, then loads tsvmm.cjs
//   dist/cli/tsvmm.cjs                the main thread's code
//   dist/accel/kvm/vcpu-prestart.cjs  the vCPU threads started ahead, shared
//                                     by the two above (one pool, one state)
//   dist/accel/kvm/vcpu-thread.cjs    each vCPU thread
//   dist/migration/migration-worker.cjs the migration thread
// Why bundles: Node's ESM loader costs a resolve, a file read on its thread
// pool and a compile per module; a run loaded about 140 of them, and that
// was most of tsvmm's start-up. Why CommonJS: even one ES module costs the
// ESM loader's own start (in every thread: a vCPU worker came up 3 ms
// later for it alone) and an asynchronous read and compile; a CommonJS
// file is read and compiled at once. Measured on a PVM-backed host,
// process start to the probe OS's ready line: about 20 ms less.
// tsc's ES modules stay in dist/ for the tests and the other entry points;
// dist/cli/main.js becomes a one-line module that runs main.cjs, so every
// way in shares one set of modules.
// koffi stays an external package (native code). A module that reads
// import.meta.url gets the URL its own file has in dist/, so it finds what
// it looks for (util/dist-path.ts) from inside any bundle.
import { readFile, writeFile } from 'node:fs/promises';
import { dirname, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = fileURLToPath(new URL('..', import.meta.url));
const dist = `${root}dist/`;
const prestart = 'accel/kvm/vcpu-prestart';
const bundles = [
  { entry: 'cli/main', shared: [prestart] },
  { entry: 'cli/tsvmm', shared: [prestart] },
  { entry: prestart, shared: [] },
  { entry: 'accel/kvm/vcpu-thread', shared: [] },
  { entry: 'migration/migration-worker', shared: [] },
];

/**
 * Imports of a `shared` module stay imports (of its own bundle), so every
 * bundle that loads it gets the same instance and the same state.
 */
function sharedModules(outfile, shared) {
  const targets = new Map(shared.map((m) => [`${dist}${m}.js`, `${dist}${m}.cjs`]));
  return {
    name: 'shared-modules',
    setup(b) {
      b.onResolve({ filter: /^\./ }, (args) => {
        const target = targets.get(resolve(args.resolveDir, args.path));
        if (!target) return undefined;
        let path = relative(dirname(outfile), target);
        if (!path.startsWith('.')) path = `./${path}`;
        return { path, external: true };
      });
    },
  };
}

/** import.meta.url, which CommonJS lacks, as the module's own URL in dist/. */
function importMetaUrl(outfile) {
  return {
    name: 'import-meta-url',
    setup(b) {
      b.onLoad({ filter: /\.js$/ }, async (args) => {
        let contents = await readFile(args.path, 'utf8');
        if (contents.includes('import.meta.url')) {
          const own = relative(dirname(outfile), args.path);
          contents = contents.replaceAll(
            'import.meta.url',
            `require("node:url").pathToFileURL(require("node:path").join(__dirname, ${JSON.stringify(own)})).href`,
          );
        }
        return { contents, loader: 'js' };
      });
    },
  };
}

for (const { entry, shared } of bundles) {
  const outfile = `${dist}${entry}.cjs`;
  const result = await build({
    entryPoints: [`${dist}${entry}.js`],
    outfile,
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    external: ['koffi'],
    plugins: [sharedModules(outfile, shared), importMetaUrl(outfile)],
    // Less source text for V8 to scan and to keep in every isolate's heap;
    // names stay (errors and traces name classes and functions).
    minifyWhitespace: true,
    minifySyntax: true,
    keepNames: true,
    // Maps back to src/*.ts through tsc's own maps.
    sourcemap: true,
    logLevel: 'silent',
  }).catch((err) => err);
  // Any warning (an import.meta left, say) would be a bug at run time.
  const problems = [...(result.errors ?? []), ...(result.warnings ?? [])];
  if (problems.length > 0) {
    for (const p of problems) {
      const at = p.location ? `${p.location.file}:${p.location.line}: ` : '';
      console.error(`bundle: ${entry}: ${at}${p.text}`);
    }
    process.exit(1);
  }
}

await writeFile(
  `${dist}cli/main.js`,
  "// tsvmm's entry point is main.cjs (scripts/bundle.mjs says why); this runs it.\nimport './main.cjs';\n",
);
