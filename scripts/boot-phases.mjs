#!/usr/bin/env node
// Where tsvmm's start-up time goes: boots the probe OS once under
// `strace -f -tt -T --seccomp-bpf` (only execve, openat, ioctl, clone3 and
// write are stopped at, so the other syscalls run at full speed), waits for
// `probe cpu=0 ready`, ends tsvmm, and prints the time of each landmark from
// the execve: Node's own start, module load (koffi's .node among it), KVM
// set-up, the vCPU worker spawn, the vCPU set-up and guest load, the first
// KVM_RUN, and the guest's own boot up to its ready line.
//
// Usage: node scripts/boot-phases.mjs [--smp N] [--keep FILE] [-- EXTRA TSVMM ARGS]
//        node scripts/boot-phases.mjs --from FILE   (a trace kept with --keep)
// Needs strace and /dev/kvm. strace's stops make every landmark late; read
// the phases as shares, and take the totals from `npm run bench -- boot`.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const root = fileURLToPath(new URL('..', import.meta.url));
const { values, positionals } = parseArgs({
  options: {
    smp: { type: 'string', default: '1' },
    mem: { type: 'string', default: '256M' },
    keep: { type: 'string' },
    from: { type: 'string' },
    timeout: { type: 'string', default: '120' },
  },
  allowPositionals: true,
});

if (values.from) {
  report(readFileSync(values.from, 'utf8'), undefined);
  process.exit(0);
}
const dir = mkdtempSync(join(tmpdir(), 'boot-phases-'));
const traceFile = join(dir, 'strace.txt');
const tsvmmArgs = [
  join(root, 'dist/cli/main.cjs'),
  '-kernel',
  join(root, 'guests/probe-os/probe-os.elf'),
  '-append',
  'console=ttyS0',
  '-smp',
  values.smp,
  '-m',
  values.mem,
  '-serial',
  'stdio',
  ...positionals,
];
const straceArgs = [
  '-f',
  '-tt',
  '-T',
  '--seccomp-bpf',
  '-e',
  'trace=execve,openat,ioctl,clone3,write',
  '-s',
  '64',
  '-o',
  traceFile,
  process.execPath,
  ...tsvmmArgs,
];

try {
  const t0 = process.hrtime.bigint();
  const strace = spawn('strace', straceArgs, { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const readyNs = await new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no ready line within ${values.timeout} s`)),
      Number(values.timeout) * 1000,
    );
    strace.stdout.on('data', (chunk) => {
      out += chunk.toString('latin1');
      if (/^probe cpu=0 ready\b/m.test(out)) {
        clearTimeout(timer);
        resolve(process.hrtime.bigint());
      }
    });
    strace.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`strace ended (status ${code}) before the ready line:\n${out}`));
    });
  });
  // strace's only child is tsvmm: end it (strace itself would only detach).
  const children = readFileSync(`/proc/${strace.pid}/task/${strace.pid}/children`, 'utf8')
    .trim()
    .split(/\s+/)
    .map(Number);
  for (const pid of children) process.kill(pid, 'SIGTERM');
  await new Promise((resolve) => strace.once('exit', resolve));
  const text = readFileSync(traceFile, 'utf8');
  if (values.keep) writeFileSync(values.keep, text);
  report(text, Number(readyNs - t0) / 1e6);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

/** The write to fd 1 that completes `probe cpu=0 ready` (the UART writes byte by byte). */
function readyWrite(events) {
  let out = '';
  for (const e of events) {
    const m = /^write\(1, "((?:[^"\\]|\\.)*)"/.exec(e.rest);
    if (!m) continue;
    out += m[1].replace(/\\r|\\n/g, '\n');
    if (out.includes('probe cpu=0 ready')) return e;
  }
  return undefined;
}

function report(text, wallMs) {
  const lines = text.split('\n').map((line) => {
    const m = /^(\d+)\s+(\d+):(\d+):(\d+\.\d+) (.*)$/.exec(line);
    if (!m) return undefined;
    const t = (Number(m[2]) * 3600 + Number(m[3]) * 60 + Number(m[4])) * 1000;
    return { pid: Number(m[1]), t, rest: m[5] };
  });
  const events = lines.filter(Boolean);
  const mainPid = events[0].pid;
  const start = events[0].t;
  const first = (pred) => events.find(pred);
  const last = (pred) => events.findLast(pred);
  const at = (e) => (e ? `${(e.t - start).toFixed(1)} ms` : '-');
  const firstRun = first((e) => /ioctl\(\d+, KVM_RUN/.test(e.rest));
  const marks = [
    ['execve (process start)', first((e) => e.rest.startsWith('execve('))],
    [
      'Node bootstrapped: opens dist/cli/main.cjs',
      first((e) => e.rest.startsWith('openat(') && e.rest.includes('dist/cli/main.cjs"')),
    ],
    ['koffi: opens its .node', first((e) => /koffi.*\.node"/.test(e.rest))],
    ['modules loaded, options parsed: opens /dev/kvm', first((e) => e.rest.includes('"/dev/kvm"'))],
    ['KVM_CREATE_VM', first((e) => e.rest.includes('KVM_CREATE_VM'))],
    ['guest RAM registered', first((e) => e.rest.includes('KVM_SET_USER_MEMORY_REGION'))],
    ['KVM_CREATE_VCPU (vCPU 0)', first((e) => e.rest.includes('KVM_CREATE_VCPU'))],
    [
      'a vCPU worker opens vcpu-thread.cjs',
      first((e) => e.pid !== mainPid && e.rest.includes('vcpu-thread.cjs"')),
    ],
    [
      'vCPU worker ready (KVM_SET_SIGNAL_MASK)',
      first((e) => e.rest.includes('KVM_SET_SIGNAL_MASK')),
    ],
    ['KVM_SET_CPUID2 (vCPU set-up starts)', first((e) => e.rest.includes('KVM_SET_CPUID2'))],
    [
      'last set-up ioctl before the first KVM_RUN',
      firstRun
        ? last(
            (e) =>
              e.t <= firstRun.t && /ioctl\(\d+, KVM_/.test(e.rest) && !e.rest.includes('KVM_RUN'),
          )
        : undefined,
    ],
    ['first KVM_RUN', firstRun],
    ['the ready line is written (serial, fd 1)', readyWrite(events)],
  ];
  console.log('boot phases: strace -f -tt -T --seccomp-bpf, time since the execve');
  const execve = /^execve\("[^"]*", \[(.*?)\]/.exec(events[0].rest);
  if (execve) console.log(`  ${execve[1].replaceAll('"', '').replaceAll(', ', ' ')}`);
  const width = Math.max(...marks.map(([label]) => label.length));
  for (const [label, e] of marks) console.log(`  ${label.padEnd(width)}  ${at(e).padStart(10)}`);
  if (wallMs !== undefined) {
    console.log(`  (spawn to the ready line as the parent saw it: ${wallMs.toFixed(1)} ms)`);
  }
  const count = (re) => events.filter((e) => re.test(e.rest)).length;
  console.log(
    `  syscalls stopped at: ${count(/^openat\(/)} openat (${count(/^openat\(.*\.js"/)} of .js files), ${count(/^ioctl\(.*KVM_/)} KVM ioctls, ${count(/^clone3\(/)} clone3, ${count(/^write\(/)} write`,
  );
}
