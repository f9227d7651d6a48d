// bench/lib/migrate-disk.mjs: what the disk under the benchmark's files
// reaches with dd: `dd if=/dev/zero of=FILE bs=1M count=N oflag=direct
// conv=fsync`, or without oflag=direct where the file system refuses it.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { BenchError, collectTail, spawnTracked, stopChild, withTimeout } from './common.mjs';

async function runDd(path, mb, direct, timeoutMs) {
  const args = ['if=/dev/zero', `of=${path}`, 'bs=1M', `count=${mb}`, 'conv=fsync'];
  if (direct) args.push('oflag=direct');
  const t0 = process.hrtime.bigint();
  const child = spawnTracked('dd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const err = collectTail(child.stderr);
  const ended = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (e) => resolve({ code: null, signal: null, error: e }));
  });
  let r;
  try {
    r = await withTimeout(ended, timeoutMs, `dd of ${mb} MiB`);
  } catch (e) {
    await stopChild(child, { signal: 'SIGKILL' });
    throw e;
  }
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  return { ...r, ms, stderr: err.text.trim(), args };
}

/**
 * dd's write rate in bytes per second on the file system of `dir`, the
 * better of `runs` runs of `mb` MiB. The file is removed after each run.
 * Resolves with { bytesPerSec, ms, direct, command }.
 */
export async function ddRate({ dir, mb, runs = 2, timeoutMs = 300_000 }) {
  const path = join(dir, 'dd.out');
  let direct = true;
  let best;
  try {
    for (let i = 0; i < runs; i++) {
      let r = await runDd(path, mb, direct, timeoutMs);
      if (r.code !== 0 && direct) {
        // O_DIRECT is refused by some file systems (tmpfs, some overlays).
        direct = false;
        rmSync(path, { force: true });
        r = await runDd(path, mb, direct, timeoutMs);
      }
      rmSync(path, { force: true });
      if (r.error) throw new BenchError(`dd: cannot start: ${r.error.message}`);
      if (r.code !== 0)
        throw new BenchError(`dd ${r.args.join(' ')} failed (${r.code ?? r.signal}): ${r.stderr}`);
      // Our own clock, process start to exit: dd's figure leaves out its open and exit.
      const bytesPerSec = (mb * 2 ** 20) / (r.ms / 1000);
      if (!best || bytesPerSec > best.bytesPerSec) {
        best = {
          bytesPerSec,
          ms: r.ms,
          direct,
          command: `dd ${r.args.join(' ')}`,
          ddSays: lastLine(r.stderr),
        };
      }
    }
  } finally {
    rmSync(path, { force: true });
  }
  return best;
}

function lastLine(text) {
  const lines = text.split('\n').filter(Boolean);
  return lines[lines.length - 1] ?? '';
}
