#!/usr/bin/env node
// Runs every compiled test file under dist/ with Node's test runner.
// Node 20's `node --test` takes files, not globs, so we collect them here.
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

function collect(dir) {
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) found.push(...collect(path));
    else if (entry.name.endsWith('.test.js')) found.push(path);
  }
  return found;
}

const files = collect('dist').sort();
if (files.length === 0) {
  console.error('run-tests: no test files under dist/; run `npm run build` first');
  process.exit(1);
}
const filter = process.argv.slice(2);
const chosen = filter.length ? files.filter((f) => filter.some((p) => f.includes(p))) : files;
const result = spawnSync(process.execPath, ['--test', '--test-concurrency=1', '--test-timeout=180000', ...chosen], {
  stdio: 'inherit',
});
process.exit(result.status ?? 1);
