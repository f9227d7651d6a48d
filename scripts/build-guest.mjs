#!/usr/bin/env node
// Builds the Linux test guest (Debian's cloud kernel and a busybox
// initramfs) into a cache folder: node scripts/build-guest.mjs --help.
// The code is src/tools/guest-image/, compiled to dist/ by `npm run build`.
import { existsSync } from 'node:fs';

const entry = new URL('../dist/tools/guest-image/main.js', import.meta.url);
if (!existsSync(entry)) {
  console.error(
    'build-guest: dist/tools/guest-image/main.js is missing; run `npm run build` first',
  );
  process.exit(1);
}
const { main } = await import(entry.href);
process.exitCode = await main(process.argv.slice(2));
