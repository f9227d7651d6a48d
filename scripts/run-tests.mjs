#!/usr/bin/env node
// The test runner behind `npm test`. Every compiled test file under dist/
// runs with Node's test runner, and every test that needs KVM runs on a real
// KVM: on this host's /dev/kvm where it is usable, otherwise inside
// ../shared/tools/kvm-vm (QEMU's emulator with nested SVM), while the tests
// that need no KVM run here at the same time. Nothing is skipped for want
// of KVM: a KVM test that cannot run is a failure.
//
// Which tests need KVM is told by the file name: `*.kvm.test.ts`. The
// runner checks the convention: a test file that asks for KVM
// (requireKvm) under any other name stops the run. A KVM test file that
// boots Linux to user space asks for full hardware KVM (requireFullKvm):
// where the host's KVM is PVM-backed, which gets Linux only through early
// boot, those files run in the VM while the rest run on the host.
//
//   node scripts/run-tests.mjs [FILTER...]     run the files whose path contains a FILTER
//   TSVMM_TEST_KVM=host|vm|auto                where the KVM tests run (default auto)
//   TSVMM_TEST_VM_TIMEOUT=SECONDS              bound on the whole VM run (default 4200)
//
// After each part the runner fails the run if a process that the tests
// started is still alive (it kills those, by pid) or if a test left a file
// in the part's private temp dir.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createConnection } from 'node:net';
import { setPriority, tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const VM_RUNNER = resolve(ROOT, '../shared/tools/kvm-vm/run');
const KVM_TEST = /\.kvm\.test\.js$/;
/**
 * Bounds on one test and on one test file: on the host, and under emulation
 * (10-50x slower). A hang fails its test, or at worst its file. Node's test
 * runner holds a whole file to the test bound too (it reports the file as
 * one test), so that bound must exceed the longest file: in a busy VM the
 * live-migration file took 605 s, and on a PVM-backed host, beside the two
 * VMs, 137-170 s (a run at 180 s failed on the bound alone).
 */
const HOST_BOUNDS = { testMs: 360_000, fileMs: 600_000 };
const VM_BOUNDS = { testMs: 1_200_000, fileMs: 1_500_000 };
/** How much longer KVM tests may wait for a guest inside the VM (TSVMM_TEST_TIME_SCALE overrides). */
const VM_TIME_SCALE = 8;
/**
 * The same for the KVM files run on a PVM-backed host's /dev/kvm: PVM runs
 * our probe guests in KVM's instruction emulator (about a microsecond an
 * instruction), beside the two VMs' emulators. At scale 1, tick-based
 * bounds failed there: a vCPU 200 ms late to its tick after a resume, the
 * probe's 1 s watchdog firing on a migration source.
 */
const PVM_TIME_SCALE = 4;
/** How many VMs share the KVM tests (each emulates on one host core; TSVMM_TEST_VM_SHARDS overrides). */
const VM_SHARDS = Number(process.env.TSVMM_TEST_VM_SHARDS ?? 2);
/** The inner part's exit status when the VM's own clock is wrong (EX_TEMPFAIL): the VM run is retried. */
const VM_CLOCK_WRONG = 75;
/** Environment variable that marks every process a part's tests start. */
const RUN_MARKER = 'TSVMM_TEST_RUN';

/**
 * Every child this run started and that still runs, with whether it leads
 * a process group of its own. If the run itself is stopped (SIGTERM,
 * SIGINT, SIGHUP: a CI timeout, Ctrl-C), each gets SIGTERM by its pid (or
 * its group's), so no VM runner with its QEMU, and no test file with its
 * tsvmm processes, outlives the run; the VM runner stops its QEMU on it.
 */
const children = new Map();
/** Set once the run is stopped: a child started after that (a VM run's retry) is stopped at once. */
let stopping = false;

function stopChild(child, group) {
  try {
    process.kill(group ? -child.pid : child.pid, 'SIGTERM');
  } catch {
    // already gone
  }
}

function track(child, group = false) {
  children.set(child, group);
  child.on('close', () => children.delete(child));
  if (stopping) stopChild(child, group);
  return child;
}

/** How long a stopped run waits for its children before it exits anyway. */
const STOP_GRACE_MS = 5_000;

for (const [signal, number] of [
  ['SIGTERM', 15],
  ['SIGINT', 2],
  ['SIGHUP', 1],
]) {
  process.once(signal, () => {
    stopping = true;
    console.error(`run-tests: ${signal}: stopping ${children.size} child process(es)`);
    for (const [child, group] of children) stopChild(child, group);
    const exit = () => process.exit(128 + number);
    if (children.size === 0) exit();
    const check = setInterval(() => {
      if (children.size === 0) exit();
    }, 50);
    setTimeout(() => {
      clearInterval(check);
      exit();
    }, STOP_GRACE_MS).unref();
  });
}

function collect(dir) {
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) found.push(...collect(path));
    else if (entry.name.endsWith('.test.js')) found.push(path);
  }
  return found;
}

/** The compiled test files that still have a source (a renamed test leaves its old .js behind). */
function testFiles() {
  const dist = join(ROOT, 'dist');
  if (!existsSync(dist)) return [];
  return collect(dist)
    .filter((f) => existsSync(join(ROOT, 'src', relative(dist, f)).replace(/\.js$/, '.ts')))
    .map((f) => relative(ROOT, f))
    .sort();
}

/** Files that ask for KVM but are not named *.kvm.test: the convention is checked, not trusted. */
function misnamedKvmTests(files) {
  return files.filter(
    (f) => !KVM_TEST.test(f) && /\brequireKvm\(/.test(readFileSync(join(ROOT, f), 'utf8')),
  );
}

/** KVM test files that boot Linux fully and so need hardware KVM, not PVM (requireFullKvm). */
function fullKvmTests(files) {
  return files.filter((f) => /\brequireFullKvm\(/.test(readFileSync(join(ROOT, f), 'utf8')));
}

/** Whether this host's /dev/kvm can run the KVM tests (the same check tsvmm makes). */
async function kvmHostUsable() {
  const { probeKvmHost } = await import(join(ROOT, 'dist/util/kvm-gate.js'));
  return probeKvmHost().usable;
}

/** Whether this host's KVM is PVM-backed (the same check requireFullKvm makes). */
async function kvmHostIsPvm() {
  const { kvmIsPvm } = await import(join(ROOT, 'dist/util/kvm-gate.js'));
  return kvmIsPvm();
}

/** Counts from a TAP stream written by Node's test runner (its closing `# pass N` lines). */
function tapCounts(text) {
  const count = (name) => {
    const m = text.match(new RegExp(`^# ${name} (\\d+)$`, 'm'));
    return m ? Number(m[1]) : 0;
  };
  return {
    tests: count('tests'),
    passed: count('pass'),
    failed: count('fail') + count('cancelled'),
    skipped: count('skipped') + count('todo'),
    complete: /^# duration_ms /m.test(text),
  };
}

/** Live pids whose environment carries `marker` (processes a part's tests started). */
function markedProcesses(marker) {
  const needle = `${RUN_MARKER}=${marker}\0`;
  const found = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const env = readFileSync(`/proc/${name}/environ`, 'latin1');
      if (!env.includes(needle)) continue;
      const cmd = readFileSync(`/proc/${name}/cmdline`, 'latin1').replaceAll('\0', ' ').trim();
      const state = readFileSync(`/proc/${name}/stat`, 'latin1').split(') ')[1]?.[0];
      if (state !== 'Z') found.push({ pid: Number(name), cmd });
    } catch {
      // gone, or not ours to read
    }
  }
  return found;
}

/** Names of the tests a TAP stream reports as failed (`not ok N - name`), innermost first. */
function tapFailures(text) {
  const lines = text.split('\n');
  const failures = [];
  for (const [i, line] of lines.entries()) {
    const m = /^(\s*)not ok \d+ - (.*)$/.exec(line);
    if (m) failures.push(`${m[2]}${tapFailureDetail(lines, i + 1, m[1].length)}`);
  }
  return failures;
}

/**
 * The error of a failed test from its TAP YAML block: CI keeps only the tail
 * of the output, so the summary must say why a test failed, not only which.
 * Suites that failed because a subtest did say nothing more.
 */
function tapFailureDetail(lines, from, indent) {
  if (lines[from]?.trim() !== '---') return '';
  const fields = new Map();
  for (let i = from + 1; i < lines.length && lines[i].trim() !== '...'; i++) {
    const f = /^\s*(error|location|failureType): (.*)$/.exec(lines[i]);
    if (!f || lines[i].search(/\S/) !== indent + 2) continue;
    let value = f[2];
    if (value === '|-' || value === '|') {
      const more = [];
      for (let j = i + 1; j < lines.length && lines[j].search(/\S/) > indent + 2; j++) {
        more.push(lines[j].trim());
      }
      value = more.slice(0, 8).join(' / ');
    }
    fields.set(f[1], value.replace(/^'(.*)'$/, '$1'));
  }
  if (fields.get('failureType') === 'subtestsFailed') return '';
  const where = fields.get('location')?.replace(/^.*\/(dist|src)\//, '');
  return `\n      error: ${fields.get('error') ?? '(none given)'}${where ? ` at ${where}` : ''}`;
}

/**
 * Runs one test file under `node --test` in a process group of its own, and
 * kills that group if the file has not ended within `fileTimeoutMs`: a test
 * that hangs where Node's per-test timeout cannot reach it (a file whose
 * process never exits, a blocked main thread) costs its file's bound, not
 * the whole run. Resolves with its exit status and whether it timed out.
 */
function runTestFile(file, tapPath, testTimeoutMs, fileTimeoutMs, env) {
  return new Promise((resolveRun) => {
    const child = spawn(
      process.execPath,
      [
        '--test',
        '--test-concurrency=1',
        `--test-timeout=${testTimeoutMs}`,
        '--test-reporter=spec',
        '--test-reporter-destination=stdout',
        '--test-reporter=tap',
        `--test-reporter-destination=${tapPath}`,
        file,
      ],
      { cwd: ROOT, stdio: 'inherit', env, detached: true },
    );
    track(child, true);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }, fileTimeoutMs);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolveRun({ status, timedOut });
    });
  });
}

/**
 * Runs one part: each of the given files under `node --test` in turn, with
 * a private temp dir and a marker in the environment, then checks that
 * nothing was left behind. Writes `NAME.json` (and a TAP file per test
 * file) into `resultsDir`.
 */
async function runPart(name, files, resultsDir, bounds, extraEnv = {}, heartbeat = false) {
  const marker = randomBytes(8).toString('hex');
  const partTmp = mkdtempSync(join(tmpdir(), `tsvmm-${name}-`));
  const env = { ...process.env, ...extraEnv, [RUN_MARKER]: marker, TMPDIR: partTmp };
  const started = Date.now();
  const totals = { tests: 0, passed: 0, failed: 0, skipped: 0 };
  const failures = [];
  const done = [];
  let exitCode = 0;
  const jsonPath = join(resultsDir, `${name}.json`);
  const writeSummary = (extra) =>
    writeFileSync(
      jsonPath,
      JSON.stringify({
        name,
        seconds: (Date.now() - started) / 1000,
        exitCode,
        ...totals,
        failures,
        done,
        ...extra,
      }),
    );
  // Inside a VM, a heartbeat tells the outer runner that the VM still makes progress.
  let beats = 0;
  let current;
  const beat = () =>
    writeFileSync(
      join(resultsDir, `${name}.alive`),
      JSON.stringify({ beat: ++beats, file: current }),
    );
  const heart = heartbeat ? setInterval(beat, HEARTBEAT_MS) : undefined;
  for (const [i, file] of files.entries()) {
    const tapPath = join(resultsDir, `${name}.${i}.tap`);
    const fileStarted = Date.now();
    current = file;
    if (heartbeat) beat();
    const run = await runTestFile(file, tapPath, bounds.testMs, bounds.fileMs, env);
    const tap = existsSync(tapPath) ? readFileSync(tapPath, 'utf8') : '';
    const counts = tapCounts(tap);
    const seconds = ((Date.now() - fileStarted) / 1000).toFixed(0);
    for (const key of Object.keys(totals)) totals[key] += counts[key];
    for (const test of tapFailures(tap)) failures.push(`${file}: ${test}`);
    if (run.timedOut) {
      const passedNames = [...tap.matchAll(/^\s*ok \d+ - (.*)$/gm)].map((m) => m[1]);
      failures.push(
        `${file}: still running after its bound of ${bounds.fileMs / 1000} s, killed; the last test it finished: ${passedNames.at(-1) ?? 'none'}`,
      );
      totals.failed += 1;
    }
    if (run.status !== 0) exitCode = run.status ?? 1;
    console.log(
      `run-tests: ${name}: ${file}: ${seconds} s${run.timedOut ? ' (killed at its bound)' : ''}`,
    );
    done.push(file);
    writeSummary({ leaks: [], complete: false });
  }
  current = undefined;
  clearInterval(heart);
  const seconds = (Date.now() - started) / 1000;
  const leaks = [];
  // A test's children may take a moment to go after their parent test ended.
  let alive = markedProcesses(marker);
  for (let i = 0; i < 20 && alive.length > 0; i++) {
    await new Promise((r) => setTimeout(r, 100));
    alive = markedProcesses(marker);
  }
  for (const p of alive) {
    leaks.push(`process ${p.pid} outlived the tests: ${p.cmd}`);
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  for (const entry of readdirSync(partTmp))
    leaks.push(`temp file left behind: ${join(partTmp, entry)}`);
  rmSync(partTmp, { recursive: true, force: true });
  writeSummary({ leaks, complete: true });
  return { name, seconds, exitCode, ...totals, failures, done, leaks, complete: true };
}

function describe(summary, where) {
  return `${summary.name}: ${summary.passed} passed, ${summary.failed} failed, ${summary.skipped} skipped in ${summary.seconds.toFixed(0)} s (${where})`;
}

/**
 * Seconds each KVM test file took in a runner VM, measured in a CI-style run
 * (two VMs and the host part at once). They balance the VMs; a file not
 * listed is guessed from its compiled size. Refresh them from the
 * `run-tests: kvm-vm-N: FILE: N s` lines when a file's cost changes much.
 */
const VM_FILE_SECONDS = {
  'accel/kvm/kvm-fd.kvm.test.js': 17,
  'accel/kvm/kvm.kvm.test.js': 12,
  'accel/kvm/vcpu-threads.kvm.test.js': 8,
  'cli/kvmclock.kvm.test.js': 245,
  // With its live-migration leg: 399 s in a VM of its own before the UART's writes were coalesced.
  'cli/linux-clock.kvm.test.js': 480,
  'cli/main.kvm.test.js': 239,
  'cli/monitor-stdio.kvm.test.js': 31,
  'cli/shutdown.kvm.test.js': 180,
  'hw/i386/linux-boot.kvm.test.js': 14,
  'hw/i386/linux-smp.kvm.test.js': 200,
  'hw/i386/machine-migration-host.kvm.test.js': 76,
  'hw/i386/machine.kvm.test.js': 75,
  'hw/i386/probe-os.kvm.test.js': 200,
  'migration/kvm-dirty-log.kvm.test.js': 16,
  'migration/live-migration.kvm.test.js': 470,
  'migration/migration-capabilities.kvm.test.js': 39,
  'migration/mapped-ram.kvm.test.js': 42,
};

/** A guess for a KVM file that VM_FILE_SECONDS does not list: Linux boots cost minutes. */
function guessSeconds(file, fullKvm) {
  const kib = readFileSync(join(ROOT, file)).length / 1024;
  return fullKvm ? 300 + 10 * kib : 5 * kib;
}

/** Splits `files` into `n` shards of about equal run time, the longest files placed first. */
function shardFiles(files, n) {
  const shards = Array.from({ length: Math.max(1, Math.min(n, files.length)) }, () => ({
    files: [],
    seconds: 0,
  }));
  const full = new Set(fullKvmTests(files));
  const timed = files.map((f) => ({
    f,
    seconds: VM_FILE_SECONDS[relative('dist', f)] ?? guessSeconds(f, full.has(f)),
  }));
  for (const { f, seconds } of timed.sort((a, b) => b.seconds - a.seconds)) {
    const lightest = shards.reduce((a, b) => (b.seconds < a.seconds ? b : a));
    lightest.files.push(f);
    lightest.seconds += seconds;
  }
  return shards.map((s) => s.files.sort());
}

/** The niceness of the plain (no KVM) part while VMs run: the VM runner's QEMU's. */
const PLAIN_PART_NICE = 10;

/** How many of a VM's last output lines the summary repeats when the VM run fails. */
const TAIL_LINES = 25;

/**
 * Runs a child, copying its output line by line to ours with `prefix` before
 * each line. Returns the child, and a promise of its exit status and its
 * last lines.
 */
function runPrefixed(command, args, prefix, env = process.env) {
  const tail = [];
  const child = track(spawn(command, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] }));
  for (const stream of [child.stdout, child.stderr]) {
    let pending = '';
    stream.setEncoding('utf8');
    stream.on('data', (text) => {
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop();
      for (const line of lines) {
        process.stdout.write(`${prefix}${line}\n`);
        tail.push(line);
        if (tail.length > TAIL_LINES) tail.shift();
      }
    });
    stream.on('end', () => {
      if (pending) process.stdout.write(`${prefix}${pending}\n`);
    });
  }
  const done = new Promise((resolveRun) =>
    child.on('close', (status) => resolveRun({ status, tail })),
  );
  return { child, done };
}

/** How often the part inside a VM writes its heartbeat file. */
const HEARTBEAT_MS = 15_000;
/** How often the outer runner looks at it. */
const WATCH_MS = 10_000;
/**
 * A VM whose heartbeat stops this long is taken as wedged (TSVMM_TEST_VM_WEDGE_SECONDS
 * overrides). Seen under QEMU's emulator: while an SMP Linux guest booted
 * in nested KVM, the whole one-CPU VM stopped making progress, its own
 * timers included, so no test timeout could fire inside it.
 */
const WEDGE_MS = Number(process.env.TSVMM_TEST_VM_WEDGE_SECONDS ?? 180) * 1000;
/**
 * How many VMs one shard may use in all (TSVMM_TEST_VM_RUNS overrides), and
 * after how long it starts no more. Measured: up to four wedges in one shard
 * of one run, in different files, each gone in a new VM.
 */
const VM_RUNS = Number(process.env.TSVMM_TEST_VM_RUNS ?? 8);
const VM_RUNS_UNTIL_MS = 60 * 60_000;
/** The first heartbeat comes after the VM runner's first-use set-up and the VM's boot. */
const FIRST_HEARTBEAT_MS = 900_000;

/** The test file a heartbeat names, if it can be read (a beat may be caught half written). */
function beatFile(beat) {
  try {
    return JSON.parse(beat).file;
  } catch {
    return undefined;
  }
}

/**
 * Boots one VM that runs `files` (`--part name`), and stops it if its
 * heartbeat stops. Resolves with the VM runner's status, its last lines, the
 * part's summary (possibly partial: `done` lists the files that finished),
 * whether it was found wedged and in which file.
 */
async function runOneVm(name, files, resultsDir) {
  const timeout = process.env.TSVMM_TEST_VM_TIMEOUT ?? '4200';
  const args = [
    // One emulated CPU. QEMU runs the VM's CPUs one at a time anyway
    // (single-threaded TCG), so a second one adds no throughput; and with
    // two, SMP Linux guests under nested KVM hung at random in early boot,
    // under QEMU 7.2 as under tsvmm, with every vCPU waiting on a spinlock
    // whose release it never saw (`info registers`: native_halt from the
    // PV spinlock wait, or native_queued_spin_lock_slowpath). With one, the
    // same boots reached the shell nearly every time. See the README.
    '--smp',
    process.env.TSVMM_TEST_VM_SMP ?? '1',
    '--timeout',
    timeout,
    '--out',
    resultsDir,
    '--keep-log',
    join(resultsDir, `${name}.log`),
    ...(process.env.TSVMM_TEST_TIME_SCALE ? ['--env', 'TSVMM_TEST_TIME_SCALE'] : []),
    '--',
    process.execPath,
    fileURLToPath(import.meta.url),
    '--part',
    name,
    '--results',
    resultsDir,
    ...files,
  ];
  const beatPath = join(resultsDir, `${name}.alive`);
  const jsonPath = join(resultsDir, `${name}.json`);
  const started = Date.now();
  // An HMP monitor on the VM runner's QEMU: when the VM wedges, its CPU
  // state says where (see dumpWedgedCpu).
  // A unix socket's path has at most 107 bytes; QEMU would not start with a longer one.
  const monitorPath = join(resultsDir, `${name}.mon`);
  const monitor = Buffer.byteLength(monitorPath) < 100;
  rmSync(monitorPath, { force: true });
  const qemuArgs = [
    process.env.KVM_VM_QEMU_ARGS,
    monitor ? `-monitor unix:${monitorPath},server,nowait` : undefined,
  ];
  const { child, done } = runPrefixed(VM_RUNNER, args, `[${name}] `, {
    ...process.env,
    KVM_VM_QEMU_ARGS: qemuArgs.filter(Boolean).join(' '),
  });
  // The heartbeat's content changes with every beat; compare content, not
  // the file's time, which the VM's 9p client may set from its own clock.
  let lastBeat = '';
  let lastChange = started;
  let wedgedIn;
  const watch = setInterval(() => {
    const beat = existsSync(beatPath) ? readFileSync(beatPath, 'utf8') : '';
    if (beat !== lastBeat) {
      lastBeat = beat;
      lastChange = Date.now();
      return;
    }
    if (Date.now() - lastChange < (beat ? WEDGE_MS : FIRST_HEARTBEAT_MS)) return;
    wedgedIn = beat ? (beatFile(beat) ?? 'between files') : 'before its first test';
    console.error(
      `run-tests: ${name}: no heartbeat from the VM for ${((Date.now() - lastChange) / 1000).toFixed(0)} s (wedged in ${wedgedIn}); stopping it`,
    );
    clearInterval(watch);
    (monitor ? dumpWedgedCpu(name, monitorPath) : Promise.resolve()).finally(() =>
      child.kill('SIGTERM'),
    );
  }, WATCH_MS);
  const { status, tail } = await done;
  clearInterval(watch);
  rmSync(monitorPath, { force: true });
  const summary = existsSync(jsonPath) ? JSON.parse(readFileSync(jsonPath, 'utf8')) : undefined;
  return { status, tail, summary, wedgedIn, seconds: (Date.now() - started) / 1000, timeout };
}

/**
 * Prints where a wedged VM's CPU is, from the VM runner's QEMU monitor:
 * its registers twice, 2 s apart (a livelock moves, a hang does not), and
 * the code at RIP. The wedge's cause is not known yet; this is the record
 * that will tell. Gives up after 20 s: the summary matters more.
 */
function dumpWedgedCpu(name, monitorPath) {
  const commands = ['info registers', 'x/6i $pc', 'info registers'];
  return new Promise((resolveDump) => {
    let out = '';
    let finished = false;
    const sock = createConnection(monitorPath);
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(bound);
      sock.destroy();
      const keep = out
        .split(/\r?\n/)
        .filter((l) => /^(RIP|RAX|CR0|CS |0x[0-9a-f]+:|\(qemu\) monitor:)/.test(l.trim()));
      for (const line of keep) console.error(`run-tests: ${name}: wedged CPU: ${line.trim()}`);
      resolveDump();
    };
    const bound = setTimeout(finish, 20_000);
    sock.on('error', (err) => {
      out += `\n(qemu) monitor: ${err.message}`;
      finish();
    });
    sock.setEncoding('utf8');
    sock.on('data', (text) => {
      out += text;
    });
    sock.on('connect', async () => {
      for (const command of commands) {
        sock.write(`${command}\n`);
        await new Promise((r) => setTimeout(r, 2_000));
      }
      sock.end('quit\n');
    });
    sock.on('close', finish);
  });
}

/**
 * Runs one shard of the KVM tests inside the VM runner. When the VM dies,
 * wedges or turns out unfit before every file has run, the files that did
 * not finish run in a new VM, up to VM_RUNS VMs in all. A test that failed
 * is never run again: only a VM that stopped is.
 */
async function runPartInVm(name, files, resultsDir) {
  if (!existsSync(VM_RUNNER)) {
    return { error: `no /dev/kvm here and no VM runner at ${VM_RUNNER}` };
  }
  const merged = { name, seconds: 0, exitCode: 0, tests: 0, passed: 0, failed: 0, skipped: 0 };
  merged.failures = [];
  merged.leaks = [];
  merged.notes = [];
  let remaining = files;
  let vmSeconds = 0;
  const shardStarted = Date.now();
  for (let attempt = 1; ; attempt++) {
    const runName = attempt === 1 ? name : `${name}-again${attempt - 1}`;
    const vm = await runOneVm(runName, remaining, resultsDir);
    vmSeconds += vm.seconds;
    const s = vm.summary;
    if (s) {
      for (const key of ['seconds', 'tests', 'passed', 'failed', 'skipped']) merged[key] += s[key];
      merged.failures.push(...s.failures);
      merged.leaks.push(...s.leaks);
      if (s.complete && s.exitCode !== 0) merged.exitCode = s.exitCode;
    }
    const finished = new Set(s?.done ?? []);
    const undone = remaining.filter((f) => !finished.has(f));
    if (undone.length === 0 && s?.complete) return { summary: merged, vmSeconds };
    const why = vm.wedgedIn
      ? `the VM stopped making progress (no heartbeat for ${WEDGE_MS / 1000} s) while running ${vm.wedgedIn}`
      : vm.status === 124
        ? `the VM run timed out after ${vm.timeout} s`
        : vm.status === 125
          ? 'the VM could not run the tests'
          : vm.status === VM_CLOCK_WRONG
            ? "the VM's clock was miscalibrated at its boot"
            : `the VM run ended with status ${vm.status} before its part ended`;
    const outOfRuns = attempt >= VM_RUNS || Date.now() - shardStarted > VM_RUNS_UNTIL_MS;
    if (outOfRuns || (vm.status === 124 && !vm.wedgedIn)) {
      return { error: why, tail: vm.tail, partial: merged, undone };
    }
    console.error(
      `run-tests: ${name}: ${why}; running its ${undone.length} unfinished file(s) in a new VM`,
    );
    merged.notes.push(`${why}; its ${undone.length} unfinished file(s) ran again in a new VM`);
    remaining = undone;
  }
}

/**
 * Creates one KVM VM and keeps it for the whole part. Linux turns a static
 * key on when the first KVM VM of the system is created and off when the
 * last one goes (the scheduler's preempt notifiers), and each turn patches
 * the kernel's code. The VM runner's README names QEMU 7.2's TCG running
 * stale code after such patching as a cause of livelocks; the tests create
 * and destroy a VM hundreds of times, and the runner VM wedged about once
 * per 20 minutes. With one VM held, the count never falls to zero and the
 * key never turns again. (It did not end the wedges: the first CPU state
 * dumped from one shows the VM's CPU halted with interrupts on, waiting
 * for a wake-up that never came. Kept: it costs nothing and takes one
 * suspect away.)
 */
async function holdKvmVm(name) {
  try {
    const { Kvm } = await import(join(ROOT, 'dist/accel/kvm/system.js'));
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    return {
      close() {
        vm.close();
        kvm.close();
      },
    };
  } catch (err) {
    console.error(`run-tests: ${name}: could not hold a KVM VM open: ${err.message}`);
    return undefined;
  }
}

async function inner(argv) {
  // --part NAME --results DIR FILES...: one part, run where this process is.
  const name = argv[1];
  const resultsDir = argv[3];
  const files = argv.slice(4);
  // Under emulation every wait of a KVM test is stretched (test-support/time-scale.ts).
  const scale = process.env.TSVMM_TEST_TIME_SCALE || String(VM_TIME_SCALE);
  // The VM's kernel trusts its TSC (kvm-vm boots it with tsc=reliable).
  // When the host was busy while it booted, its PIT calibration can come
  // out wrong (measured: 116 MHz for a 2,096 MHz TSC), and then every clock
  // in the VM runs many times too fast and every timeout fires early. Such
  // a VM is no place for tests: say so and let the outer runner retry.
  const dmesg = spawnSync('dmesg', { encoding: 'utf8' }).stdout ?? '';
  if (
    /tsc: PIT calibration deviates from HPET/.test(dmesg) &&
    /tsc: Using PIT calibration value/.test(dmesg)
  ) {
    console.error(
      `run-tests: ${name}: this VM's clock is miscalibrated (${dmesg.match(/tsc: Detected .*/)?.[0] ?? 'tsc'}); no tests run in it`,
    );
    process.exit(VM_CLOCK_WRONG);
  }
  const held = await holdKvmVm(name);
  const s = await runPart(
    name,
    files,
    resultsDir,
    VM_BOUNDS,
    { TSVMM_TEST_TIME_SCALE: scale },
    true,
  );
  held?.close();
  for (const leak of s.leaks) console.error(`run-tests: ${name}: ${leak}`);
  process.exit(s.failed === 0 && s.leaks.length === 0 && s.exitCode === 0 ? 0 : 1);
}

async function main(filters) {
  const all = testFiles();
  if (all.length === 0) {
    console.error('run-tests: no test files under dist/; run `npm run build` first');
    process.exit(1);
  }
  const misnamed = misnamedKvmTests(all);
  if (misnamed.length > 0) {
    console.error(
      `run-tests: these test files call requireKvm but are not named *.kvm.test.ts, so the runner would not give them KVM:\n  ${misnamed.join('\n  ')}`,
    );
    process.exit(1);
  }
  const chosen = filters.length ? all.filter((f) => filters.some((p) => f.includes(p))) : all;
  const allKvmFiles = chosen.filter((f) => KVM_TEST.test(f));
  const mode = process.env.TSVMM_TEST_KVM ?? 'auto';
  if (!['auto', 'host', 'vm'].includes(mode)) {
    console.error(`run-tests: TSVMM_TEST_KVM must be host, vm or auto, not '${mode}'`);
    process.exit(1);
  }
  let kvmWhere = mode === 'auto' ? ((await kvmHostUsable()) ? 'host' : 'vm') : mode;
  // The files the VMs take: every KVM file, or on a PVM host only those that need full KVM.
  let kvmFiles = allKvmFiles;
  let pvmNote = '';
  // KVM tests on a PVM host's /dev/kvm wait as under emulation (PVM_TIME_SCALE).
  let hostEnv = {};
  if (kvmWhere === 'host' && (await kvmHostIsPvm())) {
    hostEnv = { TSVMM_TEST_TIME_SCALE: process.env.TSVMM_TEST_TIME_SCALE || String(PVM_TIME_SCALE) };
    kvmFiles = fullKvmTests(allKvmFiles);
    if (kvmFiles.length) {
      kvmWhere = 'vm';
      pvmNote = `this host's KVM is PVM-backed: the ${allKvmFiles.length - kvmFiles.length} other KVM files run on it, and `;
    }
  }
  const plainFiles = chosen.filter((f) => !kvmFiles.includes(f));
  const resultsDir = join(ROOT, '.test-results');
  rmSync(resultsDir, { recursive: true, force: true });
  mkdirSync(resultsDir, { recursive: true });

  const started = Date.now();
  const lines = [];
  let failed = 0;
  let passed = 0;
  let skipped = 0;
  const account = (s, where) => {
    lines.push(describe(s, where));
    for (const failure of s.failures ?? []) lines.push(`  FAILED: ${failure}`);
    for (const note of s.notes ?? []) lines.push(`  NOTE: ${note}`);
    for (const leak of s.leaks) lines.push(`  LEAK: ${leak}`);
    passed += s.passed;
    failed += s.failed + s.leaks.length + (s.exitCode !== 0 && s.failed === 0 ? 1 : 0);
    skipped += s.skipped;
  };

  if (kvmWhere === 'host') {
    console.log(`run-tests: KVM tests run on this host's /dev/kvm (${kvmFiles.length} files)`);
    if (chosen.length)
      account(
        await runPart('host', chosen, resultsDir, HOST_BOUNDS, hostEnv),
        'on this host, /dev/kvm',
      );
  } else {
    const shards = shardFiles(kvmFiles, VM_SHARDS);
    console.log(
      `run-tests: ${pvmNote}KVM tests (${kvmFiles.length} files) run in ${shards.length} VM(s) of ../shared/tools/kvm-vm (nested SVM under QEMU's emulator), their lines marked [kvm-vm-N]; the other ${plainFiles.length} files run here at the same time and print when done`,
    );
    // The plain part runs in a child of its own so that every part runs at once.
    const plain = plainFiles.length
      ? new Promise((resolvePlain) => {
          const child = spawn(
            process.execPath,
            [fileURLToPath(import.meta.url), '--host-part', resultsDir, ...plainFiles],
            {
              cwd: ROOT,
              stdio: ['ignore', 'pipe', 'pipe'],
              env: { ...process.env, ...hostEnv },
            },
          );
          track(child);
          // The VM runner's QEMUs run at nice 10. At our nice 0 the plain
          // files took a whole core for their first minutes, the two VMs
          // shared the other, and the KVM tests that watch a guest's clock
          // ran first in both VMs, at half speed. At the same nice all three
          // share the two cores alike; the plain part takes longer, and
          // still ends long before the VMs.
          try {
            setPriority(child.pid, PLAIN_PART_NICE);
          } catch {
            // Not allowed here: the run goes on as before.
          }
          // Its output goes to a file and is printed after the VMs', so the parts do not interleave.
          const chunks = [];
          child.stdout.on('data', (c) => chunks.push(c));
          child.stderr.on('data', (c) => chunks.push(c));
          child.on('close', () => {
            writeFileSync(join(resultsDir, 'host.out'), Buffer.concat(chunks));
            resolvePlain();
          });
        })
      : Promise.resolve();
    const vms = await Promise.all(
      shards.map((files, i) =>
        files.length ? runPartInVm(`kvm-vm-${i + 1}`, files, resultsDir) : undefined,
      ),
    );
    await plain;
    if (plainFiles.length) {
      process.stdout.write(readFileSync(join(resultsDir, 'host.out')));
      const hostJson = join(resultsDir, 'host.json');
      const hostWhere = pvmNote
        ? 'on this host, its PVM-backed /dev/kvm'
        : 'on this host, no KVM needed';
      if (existsSync(hostJson)) account(JSON.parse(readFileSync(hostJson, 'utf8')), hostWhere);
      else {
        lines.push('host: FAILED: the part ended without a result');
        failed += 1;
      }
    }
    vms.forEach((vm, i) => {
      if (vm?.error) {
        if (vm.partial?.tests) account(vm.partial, 'in a KVM VM, nested SVM, before it stopped');
        lines.push(
          `kvm-vm-${i + 1}: FAILED: ${vm.error}; these did not finish: ${(vm.undone ?? shards[i]).join(' ')}`,
        );
        failed += 1;
        // The VM's output scrolled by long before this summary: repeat where it stopped.
        lines.push(`  its last ${vm.tail?.length ?? 0} lines:`);
        for (const line of vm.tail ?? []) lines.push(`  | ${line}`);
      } else if (vm) {
        account(vm.summary, `in a KVM VM, nested SVM; ${vm.vmSeconds.toFixed(0)} s with its boot`);
      }
    });
    finish();
    return;
  }
  finish();

  function finish() {
    console.log(`\nrun-tests: ${((Date.now() - started) / 1000).toFixed(0)} s in all`);
    for (const line of lines) console.log(`run-tests: ${line}`);
    console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
    process.exit(failed === 0 ? 0 : 1);
  }
}

const argv = process.argv.slice(2);
if (argv[0] === '--part') await inner(argv);
else if (argv[0] === '--host-part') {
  const s = await runPart('host', argv.slice(2), argv[1], HOST_BOUNDS);
  process.exit(s.failed === 0 ? 0 : 1);
} else await main(argv);
