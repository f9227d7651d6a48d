// The probe OS (guests/probe-os/): the committed ELF is what its sources
// build to, it is bootable by both of its entries, and, where QEMU is
// installed, it boots under QEMU's software emulator (TCG) with 1, 2 and 4
// CPUs: every CPU comes up and ticks, the console answers `sum` and
// `clock`, and a stalled guest is reported by its watchdog.
//
// Under TCG there is no kvmclock (no KVM paravirtual CPUID leaves), so the
// probe OS runs on its TSC clock there; the kvmclock paths (GUEST_STOPPED,
// `stopped`, `forgiven`) need a KVM host and are not exercised here.
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const dir = fileURLToPath(new URL('../../../guests/probe-os/', import.meta.url));
const elfPath = join(dir, 'probe-os.elf');
const SOURCES = ['Makefile', 'probe-os.ld', 'probe.h', 'boot.S', 'lib.c', 'main.c', 'platform.c'];

const LOAD_ADDR = 0x100000n;
const PT_LOAD = 1;
const PT_NOTE = 4;
const XEN_ELFNOTE_PHYS32_ENTRY = 18;

test('the committed probe-os.elf is what guests/probe-os builds to, byte for byte', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'tsvmm-probe-os-'));
  try {
    for (const f of SOURCES) copyFileSync(join(dir, f), join(tmp, f));
    execFileSync('make', ['-s', '-C', tmp], { stdio: 'pipe' });
    const built = readFileSync(join(tmp, 'probe-os.elf'));
    assert.ok(built.length > 0);
    assert.ok(
      built.equals(readFileSync(elfPath)),
      'guests/probe-os/probe-os.elf is stale: run make -C guests/probe-os',
    );
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

interface Segment {
  type: number;
  flags: number;
  offset: number;
  vaddr: bigint;
  paddr: bigint;
  filesz: number;
  memsz: number;
  align: number;
}

function segments(elf: Buffer): Segment[] {
  const phoff = Number(elf.readBigUInt64LE(32));
  const phentsize = elf.readUInt16LE(54);
  const phnum = elf.readUInt16LE(56);
  const out: Segment[] = [];
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * phentsize;
    out.push({
      type: elf.readUInt32LE(p),
      flags: elf.readUInt32LE(p + 4),
      offset: Number(elf.readBigUInt64LE(p + 8)),
      vaddr: elf.readBigUInt64LE(p + 16),
      paddr: elf.readBigUInt64LE(p + 24),
      filesz: Number(elf.readBigUInt64LE(p + 32)),
      memsz: Number(elf.readBigUInt64LE(p + 40)),
      align: Number(elf.readBigUInt64LE(p + 48)),
    });
  }
  return out;
}

test('probe-os.elf: an x86-64 ELF loaded at 1 MiB, entered at 1 MiB, with a PVH entry note', () => {
  const elf = readFileSync(elfPath);
  assert.deepEqual([...elf.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], 'ELF magic');
  assert.equal(elf[4], 2, 'ELFCLASS64');
  assert.equal(elf[5], 1, 'little-endian');
  assert.equal(elf.readUInt16LE(16), 2, 'ET_EXEC');
  assert.equal(elf.readUInt16LE(18), 62, 'EM_X86_64');
  const entry = elf.readBigUInt64LE(24);
  assert.equal(entry, LOAD_ADDR, 'the 64-bit (boot_params) entry is at 1 MiB');

  const segs = segments(elf);
  const loads = segs.filter((s) => s.type === PT_LOAD);
  const first = loads[0];
  assert.ok(first, 'a PT_LOAD');
  assert.equal(first.paddr, LOAD_ADDR, 'the first PT_LOAD is at physical 1 MiB');
  assert.equal(first.vaddr, first.paddr, 'identity-linked: virtual = physical');
  for (const s of loads) {
    assert.equal(s.vaddr, s.paddr);
    assert.ok(s.paddr >= LOAD_ADDR && s.filesz <= s.memsz);
    assert.ok(s.paddr + BigInt(s.memsz) <= 0x400000n, 'the image ends below 4 MiB');
  }
  const inExec = (addr: bigint) =>
    loads.some((s) => s.flags & 1 && addr >= s.paddr && addr < s.paddr + BigInt(s.filesz));
  assert.ok(inExec(entry), 'the entry point is in an executable PT_LOAD');
  // entry64 begins with cli (0xfa), cld (0xfc)
  const fileOf = (addr: bigint) => {
    const s = loads.find((l) => addr >= l.paddr && addr < l.paddr + BigInt(l.filesz))!;
    return s.offset + Number(addr - s.paddr);
  };
  assert.deepEqual([...elf.subarray(fileOf(entry), fileOf(entry) + 2)], [0xfa, 0xfc]);

  const note = segs.find((s) => s.type === PT_NOTE);
  assert.ok(note, 'a PT_NOTE segment');
  // QEMU pads the note name to the segment's alignment: keep it 4
  assert.equal(note.align, 4, 'PT_NOTE aligned to 4 bytes, as QEMU expects');
  let pvh: bigint | undefined;
  for (let p = note.offset; p + 12 <= note.offset + note.filesz; ) {
    const namesz = elf.readUInt32LE(p);
    const descsz = elf.readUInt32LE(p + 4);
    const type = elf.readUInt32LE(p + 8);
    const name = elf.subarray(p + 12, p + 12 + namesz).toString('latin1');
    const desc = p + 12 + ((namesz + 3) & ~3);
    if (name === 'Xen\0' && type === XEN_ELFNOTE_PHYS32_ENTRY) {
      assert.equal(descsz, 8, 'an 8-byte entry address, as QEMU reads from a 64-bit ELF');
      pvh = elf.readBigUInt64LE(desc);
    }
    p = desc + ((descsz + 3) & ~3);
  }
  assert.ok(pvh !== undefined, 'a Xen note of type XEN_ELFNOTE_PHYS32_ENTRY (18)');
  assert.ok(pvh < 0x100000000n && inExec(pvh), 'the PVH entry is 32-bit addressable code');
  assert.deepEqual([...elf.subarray(fileOf(pvh), fileOf(pvh) + 2)], [0xfa, 0xfc], 'cli; cld');
});

// ---- under QEMU's TCG -------------------------------------------------------

const QEMU = 'qemu-system-x86_64';

function qemuVersion(): string | undefined {
  const r = spawnSync(QEMU, ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return undefined;
  return r.stdout.split('\n')[0];
}

/** A running QEMU whose serial console is its stdin/stdout. */
class Guest {
  readonly lines: string[] = [];
  private partial = '';
  private stderr = '';
  private waiters: (() => void)[] = [];
  readonly exited: Promise<void>;

  constructor(readonly proc: ChildProcess) {
    proc.stdout!.setEncoding('latin1');
    proc.stdout!.on('data', (chunk: string) => {
      const parts = (this.partial + chunk).split('\n');
      this.partial = parts.pop()!;
      for (const p of parts) this.lines.push(p.replace(/\r$/, ''));
      for (const w of this.waiters.splice(0)) w();
    });
    proc.stderr!.setEncoding('latin1');
    proc.stderr!.on('data', (chunk: string) => {
      this.stderr += chunk;
    });
    this.exited = new Promise((resolve) => {
      proc.on('exit', () => {
        for (const w of this.waiters.splice(0)) w();
        resolve();
      });
    });
  }

  probeLines(): string[] {
    return this.lines.filter((l) => l.startsWith('probe '));
  }

  /** Waits until `done(lines)` holds, at most `ms`; fails with the console so far. */
  async until(what: string, ms: number, done: (lines: string[]) => boolean): Promise<void> {
    const deadline = Date.now() + ms;
    while (!done(this.probeLines())) {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null)
        assert.fail(`QEMU ended while waiting for ${what}\n${this.transcript()}`);
      const left = deadline - Date.now();
      if (left <= 0)
        assert.fail(`timed out after ${ms} ms waiting for ${what}\n${this.transcript()}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  type(text: string): void {
    this.proc.stdin!.write(text);
  }

  transcript(): string {
    return `--- console (last 40 lines) ---\n${this.lines.slice(-40).join('\n')}\n--- stderr ---\n${this.stderr}`;
  }

  /** Ends QEMU by its pid (SIGKILL) and waits for it, at most 5 s. */
  async kill(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null && this.proc.pid)
      process.kill(this.proc.pid, 'SIGKILL');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.exited, new Promise((r) => (timer = setTimeout(r, 5000)))]);
    clearTimeout(timer);
  }
}

const LINE = /^probe cpu=(\d+) (\S+)((?: \S+=\S+)*)$/;

function parse(line: string): { cpu: number; event: string; kv: Map<string, string> } | undefined {
  const m = LINE.exec(line);
  if (!m) return undefined;
  const kv = new Map<string, string>();
  for (const pair of m[3]!.trim().split(' ').filter(Boolean)) {
    const eq = pair.indexOf('=');
    kv.set(pair.slice(0, eq), pair.slice(eq + 1));
  }
  return { cpu: Number(m[1]), event: m[2]!, kv };
}

function events(lines: string[], event: string) {
  return lines.map(parse).filter((p) => p?.event === event) as NonNullable<
    ReturnType<typeof parse>
  >[];
}

/** What `sum` must answer after the first pass: FNV-1a 64 over words (address ^ 1). */
function expectedSum(base: bigint, bytes: number): string {
  const prime = 0x100000001b3n;
  let h = 0xcbf29ce484222325n;
  for (let off = 0n; off < BigInt(bytes); off += 8n) {
    h ^= (base + off) ^ 1n;
    h = BigInt.asUintN(64, h * prime);
  }
  return h.toString(16).padStart(16, '0');
}

interface Boot {
  cpus: number;
  machine: string;
  smp: string;
  append: string;
  entry: 'pvh' | 'linux64';
  tables: 'acpi' | 'mptable';
  timer: 'lapic' | 'poll';
  /** How the TSC's rate is found: PIT channel 2, or the LAPIC timer where there is no PIT. */
  tscCal: 'pit' | 'lapic';
  /** SIGSTOP QEMU this long and expect the watchdog to report it. */
  stallMs?: number;
  /** Expect no softlockup line at all (the boot is not stalled). */
  noLockups?: boolean;
}

const BOOTS: Boot[] = [
  {
    cpus: 1,
    machine: 'pc',
    smp: '1',
    append: 'probe.watchdog_ms=500',
    entry: 'pvh',
    tables: 'acpi',
    timer: 'lapic',
    tscCal: 'pit',
    stallMs: 1500,
  },
  {
    // the MP table (no ACPI; SeaBIOS lists one CPU per socket), the
    // boot_params entry tsvmm uses (reached from PVH by probe.entry=linux64)
    // and the interrupt-free polling loop
    cpus: 2,
    machine: 'pc,acpi=off',
    smp: '2,sockets=2,cores=1,threads=1',
    append: 'probe.entry=linux64 probe.timer=poll',
    entry: 'linux64',
    tables: 'mptable',
    timer: 'poll',
    tscCal: 'pit',
  },
  {
    cpus: 4,
    machine: 'q35',
    smp: '4',
    append: '',
    entry: 'pvh',
    tables: 'acpi',
    timer: 'lapic',
    tscCal: 'pit',
  },
  // no PIT there: the TSC is calibrated against the LAPIC timer. A failed
  // calibration (once tsc_khz=11 on a loaded host) made every tick a soft
  // lockup of hours; the watchdog is set to 5 s so that only such nonsense,
  // not a host that holds QEMU up for a second, fails the boot.
  {
    cpus: 4,
    machine: 'microvm',
    smp: '4',
    append: 'probe.watchdog_ms=5000',
    entry: 'pvh',
    tables: 'acpi',
    timer: 'lapic',
    tscCal: 'lapic',
    noLockups: true,
  },
];

const DIRTY_MB = 2;

/** The TSC rates the probe OS accepts from a calibration (100 MHz .. 10 GHz). */
const TSC_KHZ_MIN = 100_000;
const TSC_KHZ_MAX = 10_000_000;

/**
 * The TSC rate of the first boot calibrated on the PIT. Under TCG every
 * machine's TSC is the host's, so a rate calibrated otherwise must agree.
 */
let pitTscKhz: number | undefined;

async function bootUnderTcg(t: TestContext, b: Boot): Promise<void> {
  const started = Date.now();
  const args = [
    ['-accel', 'tcg'],
    ['-M', b.machine],
    ['-smp', b.smp],
    ['-m', '512M'],
    ['-kernel', elfPath],
    ['-append', `probe.tick_ms=100 probe.dirty_mb=${DIRTY_MB} ${b.append}`.trim()],
    ['-display', 'none'],
    ['-serial', 'stdio'],
    ['-monitor', 'none'],
    ['-nodefaults'],
    ['-no-reboot'],
  ].flat();
  const guest = new Guest(spawn(QEMU, args, { stdio: ['pipe', 'pipe', 'pipe'] }));
  try {
    const n = b.cpus;
    const cpuIds = [...Array(n).keys()];
    await guest.until(`${n} ready lines`, 20000, (ls) => events(ls, 'ready').length >= n);
    const readyMs = Date.now() - started;
    await guest.until('3 ticks on every CPU and the first dirty pass', 15000, (ls) => {
      const ticks = events(ls, 'tick');
      return (
        cpuIds.every((c) => ticks.filter((p) => p.cpu === c).length >= 3) &&
        events(ls, 'dirty').some((p) => p.kv.get('pass') === '1')
      );
    });

    const lines = guest.probeLines();
    const [boot] = events(lines, 'boot');
    assert.ok(boot, `a boot line\n${guest.transcript()}`);
    assert.equal(boot.cpu, 0);
    assert.equal(boot.kv.get('entry'), b.entry);
    assert.equal(boot.kv.get('clock'), 'tsc', 'TCG offers no kvmclock: the TSC clock');
    assert.equal(boot.kv.get('cpus'), String(n));
    assert.equal(boot.kv.get('tables'), b.tables);
    assert.equal(boot.kv.get('timer'), b.timer);
    // a calibrated TSC: not a guess, and a rate a CPU can have (a failed
    // calibration once gave tsc_khz=11, and a soft lockup on every tick)
    const tscKhz = Number(boot.kv.get('tsc_khz'));
    assert.ok(
      tscKhz >= TSC_KHZ_MIN && tscKhz <= TSC_KHZ_MAX,
      `tsc_khz=${boot.kv.get('tsc_khz')} is within 100 MHz .. 10 GHz\n${guest.transcript()}`,
    );
    assert.equal(boot.kv.get('tsc_cal'), b.tscCal, `the TSC calibrated by ${b.tscCal}`);
    if (b.tscCal === 'pit') pitTscKhz ??= tscKhz;
    else if (pitTscKhz !== undefined)
      assert.ok(
        Math.abs(tscKhz - pitTscKhz) <= pitTscKhz * 0.05,
        `tsc_khz=${tscKhz} (${b.tscCal}) agrees within 5% with ${pitTscKhz} (pit)`,
      );
    const watchdogMs = /probe\.watchdog_ms=(\d+)/.exec(b.append)?.[1] ?? '1000';
    assert.equal(boot.kv.get('watchdog_ms'), watchdogMs, 'the watchdog is on');
    const ready = events(lines, 'ready');
    assert.deepEqual(ready.map((p) => p.cpu).sort(), cpuIds, 'each CPU says ready once');
    for (const r of ready) {
      assert.equal(r.kv.get('clock'), 'tsc');
      assert.equal(r.kv.get('cpus'), String(n));
    }
    for (const c of cpuIds) {
      const ns = events(lines, 'tick')
        .filter((p) => p.cpu === c)
        .map((p) => BigInt(p.kv.get('ns')!));
      for (let i = 1; i < ns.length; i++) assert.ok(ns[i]! > ns[i - 1]!, `cpu ${c} ticks advance`);
    }

    const [dirty] = events(lines, 'dirty');
    assert.equal(dirty?.kv.get('mb'), String(DIRTY_MB));
    const base = BigInt(dirty!.kv.get('base')!);
    guest.type('sum\n');
    await guest.until('the answer to sum', 10000, (ls) =>
      ls.some((l) => l.startsWith('probe mem sum=')),
    );
    const sum = guest.probeLines().find((l) => l.startsWith('probe mem sum='))!;
    assert.equal(sum, `probe mem sum=${expectedSum(base, DIRTY_MB << 20)}`);

    guest.type('clock\r');
    await guest.until('a clock line from every CPU', 10000, (ls) =>
      cpuIds.every((c) => events(ls, 'clock').some((p) => p.cpu === c)),
    );
    for (const p of events(guest.probeLines(), 'clock')) {
      assert.ok(BigInt(p.kv.get('ns')!) > 0n && BigInt(p.kv.get('tsc')!) > 0n, 'ns and tsc');
    }

    guest.type('help\n');
    await guest.until('the answer to help', 10000, (ls) => events(ls, 'help').length > 0);

    let stallReport = '';
    if (b.stallMs) {
      // the host stalls the guest without telling it: the watchdog must see the gap
      const before = events(guest.probeLines(), 'softlockup').length;
      process.kill(guest.proc.pid!, 'SIGSTOP');
      await new Promise((r) => setTimeout(r, b.stallMs));
      process.kill(guest.proc.pid!, 'SIGCONT');
      await guest.until(
        'a softlockup report after the stall',
        10000,
        (ls) => events(ls, 'softlockup').length > before,
      );
      const report = events(guest.probeLines(), 'softlockup')[before]!;
      const gap = Number(report.kv.get('gap_ms'));
      assert.ok(gap >= b.stallMs * 0.8, `gap_ms=${gap} covers the ${b.stallMs} ms stall`);
      stallReport = ` stall=${b.stallMs}ms softlockup gap_ms=${gap}`;
    }

    const bad = guest
      .probeLines()
      .filter((l) => / (exception|backwards|nmi|unexpected|ap-timeout|ignored|unknown) /.test(l));
    assert.deepEqual(bad, [], `no exception, backwards clock or failed CPU\n${guest.transcript()}`);
    const lockups = events(guest.probeLines(), 'softlockup').length - (b.stallMs ? 1 : 0);
    if (b.noLockups)
      assert.deepEqual(
        events(guest.probeLines(), 'softlockup'),
        [],
        `no softlockup line on an unstalled boot\n${guest.transcript()}`,
      );
    t.diagnostic(
      `-M ${b.machine} -smp ${b.smp}: ready (all ${n}) after ${readyMs} ms, ` +
        `done after ${Date.now() - started} ms; ` +
        `${boot.kv.get('tsc_khz')} kHz TSC (${boot.kv.get('tsc_cal')}); ` +
        `other softlockup lines: ${lockups}${stallReport}`,
    );
  } finally {
    await guest.kill();
  }
}

test('probe-os boots under QEMU TCG (pc, q35, microvm) with 1, 2 and 4 CPUs and answers on its console', async (t) => {
  const version = qemuVersion();
  if (!version) {
    const reason = `${QEMU} is not installed (apt-get install qemu-system-x86)`;
    process.stderr.write(`tsvmm: ${t.name}: NOT RUN: ${reason}\n`);
    t.skip(reason);
    return;
  }
  t.diagnostic(version);
  for (const b of BOOTS) {
    await t.test(
      `-smp ${b.cpus} (${b.machine}, ${b.entry} entry, ${b.tables}, ${b.timer} timer)`,
      (st) => bootUnderTcg(st, b),
    );
  }
});
