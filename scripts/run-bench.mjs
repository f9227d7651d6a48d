#!/usr/bin/env node
// `npm run bench -- <name> [args]`: runs bench/<name>.mjs after a build.
// `npm run bench -- all`: runs every bench/*.mjs in turn (the order below
// first, then any other bench file found, by name), each with its default
// arguments, prints a summary of their status, time and RESULT lines, and
// exits 1 if any failed. Whatever a bench prints goes through as it is.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';

/** Benches run first by `all`, cheapest first; others follow by name. */
const ORDER = ['exit-rate', 'qmp', 'boot', 'rss', 'migrate'];

const name = process.argv[2];
const available = readdirSync('bench')
  .filter((f) => f.endsWith('.mjs'))
  .map((f) => f.slice(0, -4))
  .sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
if (!name || !(name === 'all' || available.includes(name))) {
  console.error(`usage: npm run bench -- <name>   (one of: all, ${available.join(', ')})`);
  process.exit(2);
}
if (!existsSync('dist')) {
  const build = spawnSync('npm', ['run', 'build'], { stdio: 'inherit' });
  if (build.status !== 0) process.exit(build.status ?? 1);
}

if (name !== 'all') {
  const run = spawnSync(process.execPath, [`bench/${name}.mjs`, ...process.argv.slice(3)], {
    stdio: 'inherit',
  });
  process.exit(run.status ?? 1);
}

// A signal to this runner ends the bench under way too (by its pid), whose
// own handler then stops its VMMs.
let current;
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(signal, () => {
    if (current?.exitCode === null && current.pid !== undefined) {
      try {
        process.kill(current.pid, signal);
      } catch {
        // already gone
      }
    }
    process.exit(1);
  });
}

const summary = [];
const t0 = Date.now();
for (const bench of available) {
  console.log(`\n=== bench ${bench} ===`);
  const started = Date.now();
  const { status, results } = await runOne(bench);
  summary.push({ bench, status, seconds: (Date.now() - started) / 1000, results });
}
console.log(`\n=== all benches: ${((Date.now() - t0) / 1000).toFixed(0)} s ===`);
for (const s of summary) {
  const state = s.status === 0 ? 'ok' : `FAILED (status ${s.status})`;
  console.log(`  ${s.bench.padEnd(10)} ${state.padEnd(20)} ${s.seconds.toFixed(1).padStart(7)} s`);
}
for (const s of summary) {
  for (const line of s.results)
    console.log(`RESULT bench=${s.bench} ${line.slice('RESULT '.length)}`);
}
process.exit(summary.every((s) => s.status === 0) ? 0 : 1);

function rank(bench) {
  const i = ORDER.indexOf(bench);
  return i < 0 ? ORDER.length : i;
}

/** Runs one bench, its output passed through, and keeps its RESULT lines. */
function runOne(bench) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [`bench/${bench}.mjs`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    current = child;
    const results = [];
    let partial = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      process.stdout.write(chunk);
      partial += chunk;
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) if (line.startsWith('RESULT ')) results.push(line);
    });
    child.on('error', () => resolve({ status: 127, results }));
    child.on('close', (code, signal) => {
      if (partial.startsWith('RESULT ')) results.push(partial);
      resolve({ status: code ?? (signal ? 128 : 1), results });
    });
  });
}
