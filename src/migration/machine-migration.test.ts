import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import type { CpuSavedState } from '../accel/kvm/cpu-state.js';
import { CPU_MSRS } from '../accel/kvm/cpu-state.js';
import { GuestMemory } from '../accel/kvm/memory/guest-memory.js';
import type { KvmIrqchip, KvmPitState2 } from '../accel/kvm/structs/vm.js';
import { createSerialState, Serial16550, UART_SCR } from '../hw/char/serial.js';
import type { IrqchipVm } from '../hw/i386/irqchip-vmstate.js';
import {
  doKvmclockCtrl,
  KVMCLOCK_CTRL_OP,
  type KvmClockBackend,
  KvmClockDevice,
} from '../hw/i386/kvm/clock.js';
import {
  GET_CPU_STATE_OP,
  SET_CPU_STATE_OP,
  x86MigrationDevices,
} from '../hw/i386/migration-devices.js';
import type { JsonObject } from '../monitor/json-value.js';
import { VmLifecycle } from '../system/cpus.js';
import { BottomHalf } from '../system/main-loop.js';
import { RecordingCpus } from '../system/recording-cpus.js';
import { type RunState, RunStateMachine } from '../system/runstate.js';
import { captureTrace } from '../trace/capture.js';
import { MIGRATION_CAPABILITIES } from './capabilities.js';
import { MigrationCapabilityError, MigrationParameterError } from './errors.js';
import { guestMemoryRam } from './guest-memory-ram.js';
import {
  type DirtyLog,
  MachineMigration,
  type MigrationHost,
  PROCESS_INCOMING_MIGRATION_BH,
  type ProgressStream,
} from './machine-migration.js';
import { createBufferRam, PAGE_SIZE } from './ram.js';
import type { MigrationEvent } from './state.js';

// Sequencing tests of MachineMigration with a recording double of the vCPU
// layer (RecordingCpus: it runs named ops on the calling thread) and of
// kvmclock's KVM calls, but the real lifecycle, run states, notifiers,
// kvmclock device, stream, channels and files. They do not stand in for
// KVM: the KVM-gated tests in hw/i386/machine-migration.test.ts do that.

function cpuState(cpu: number): CpuSavedState {
  const seg = {
    base: 0n,
    limit: 0xffff,
    selector: 0,
    type: 3,
    present: 1,
    dpl: 0,
    db: 0,
    s: 1,
    l: 0,
    g: 0,
    avl: 0,
    unusable: 0,
  };
  return {
    regs: {
      rax: 1n,
      rbx: 2n,
      rcx: 3n,
      rdx: 4n,
      rsi: 5n,
      rdi: 6n,
      rsp: 0x8000n,
      rbp: 8n,
      r8: 9n,
      r9: 10n,
      r10: 11n,
      r11: 12n,
      r12: 13n,
      r13: 14n,
      r14: 15n,
      r15: BigInt(cpu),
      rip: 0x100000n + BigInt(cpu),
      rflags: 2n,
    },
    sregs: {
      cs: seg,
      ds: seg,
      es: seg,
      fs: seg,
      gs: seg,
      ss: seg,
      tr: seg,
      ldt: seg,
      gdt: { base: 0x1000n, limit: 0x27 },
      idt: { base: 0n, limit: 0 },
      cr0: 0x80000011n,
      cr2: 0n,
      cr3: 0x2000n,
      cr4: 0x20n,
      cr8: 0n,
      efer: 0x500n,
      apicBase: 0xfee00900n,
      interruptBitmap: [0n, 0n, 0n, 0n],
    },
    xsave: { region: new Uint8Array(4096).fill(cpu + 1) },
    xcrs: { flags: 0, xcrs: [{ xcr: 0, value: 3n }] },
    msrs: CPU_MSRS.map((m) => ({ index: m.index, data: BigInt(m.index) * 3n + BigInt(cpu) })),
    lapic: { regs: new Uint8Array(1024).fill(0x40 + cpu) },
    events: {
      exception: { injected: 0, nr: 0, hasErrorCode: 0, pending: 0, errorCode: 0 },
      interrupt: { injected: 0, nr: 0, soft: 0, shadow: 0 },
      nmi: { injected: 0, pending: 0, masked: 0 },
      sipiVector: 0,
      flags: 5,
      smi: { smm: 0, pending: 0, smmInsideNmi: 0, latchedInit: 0 },
      tripleFault: { pending: 0 },
      exceptionHasPayload: 0,
      exceptionPayload: 0n,
    },
    mpState: { mpState: 3 },
    debugregs: { db: [0n, 0n, 0n, 0n], dr6: 0xffff0ff0n, dr7: 0x400n, flags: 0n },
  };
}

interface HarnessOptions {
  cpus?: number;
  initial?: RunState;
  autostart?: boolean;
  pages?: number;
  seed?: boolean;
  /** A dirty log: precopy passes while the VM runs. */
  dirtyLog?: DirtyLog;
  /** Where the progress line goes (none by default). */
  progress?: ProgressStream;
  /** Guest RAM in a GuestMemory mapping (its content: `ram`'s at start): the migration thread is a worker. */
  mapped?: GuestMemory;
  /** The `events` capability (on by default here, so the tests can follow the statuses). */
  events?: boolean;
  /** With `mapped`: a mapped-ram restore maps the file over it (the machine's hook). */
  mapRam?: boolean;
}

function harness(o: HarnessOptions = {}) {
  const n = o.cpus ?? 2;
  const log: string[] = [];
  const events: MigrationEvent[] = [];
  const cpus = new RecordingCpus(n, log);
  const restored: (CpuSavedState | undefined)[] = [];
  cpus.ops.set(KVMCLOCK_CTRL_OP, (cpu) => {
    log.push(`ctrl ${cpu}`);
    return doKvmclockCtrl({ kvmclockCtrl() {} }, cpu);
  });
  cpus.ops.set(GET_CPU_STATE_OP, (cpu) => cpuState(cpu));
  cpus.ops.set(SET_CPU_STATE_OP, (cpu, arg) => {
    restored[cpu] = arg as CpuSavedState;
  });
  const lifecycle = new VmLifecycle({
    cpus,
    runstate: new RunStateMachine(o.initial ?? 'prelaunch'),
  });
  lifecycle.events.on('STOP', () => log.push('STOP'));
  lifecycle.events.on('RESUME', () => log.push('RESUME'));
  let kvmClock = o.seed ? 7_000_000_000n : 1000n;
  const clockSets: bigint[] = [];
  const backend: KvmClockBackend = {
    getClock: () => {
      kvmClock += 1000n;
      return { clock: kvmClock, flags: 0 };
    },
    setClock: (clock) => {
      clockSets.push(clock);
      kvmClock = clock;
    },
    hasKvmclockCtrl: true,
    clockIsReliableFromHost: true,
  };
  const kvmclock = new KvmClockDevice(backend, cpus);
  kvmclock.realize(lifecycle.notifiers);
  const chips = new Map<number, Uint8Array>(
    [0, 1, 2].map((id) => [id, new Uint8Array(512).fill(o.seed ? id + 10 : 0)]),
  );
  let pit: KvmPitState2 = {
    channels: [0, 1, 2].map((i) => ({
      count: o.seed ? 100 + i : 0,
      latchedCount: 0,
      countLatched: 0,
      statusLatched: 0,
      status: 0,
      readState: 0,
      writeState: 0,
      writeLatch: 0,
      rwMode: 0,
      mode: 0,
      bcd: 0,
      gate: 0,
      countLoadTime: 0n,
    })),
    flags: 0,
  };
  const vm: IrqchipVm = {
    getIrqchip: (chipId): KvmIrqchip => ({ chipId, chip: chips.get(chipId)!.slice() }),
    setIrqchip: (c) => {
      log.push(`setIrqchip ${c.chipId}`);
      chips.set(c.chipId, c.chip.slice());
    },
    getPit2: () => structuredClone(pit),
    setPit2: (p) => {
      log.push('setPit2');
      pit = structuredClone(p);
    },
  };
  const serialState = createSerialState();
  const serial = new Serial16550(serialState, { transmit: () => {}, setIrq: () => {} });
  if (o.seed) serial.write(UART_SCR, 0x77);
  const ram = createBufferRam([{ id: 'pc.ram', size: (o.pages ?? 64) * PAGE_SIZE }]);
  if (o.seed) {
    const mem = ram.memory.get('pc.ram')!;
    for (let i = 0; i < mem.length; i += 997) mem[i] = (i / 997) & 0xff;
  }
  if (o.mapped) o.mapped.write(0, ram.memory.get('pc.ram')!);
  const bhs: string[] = [];
  const host: MigrationHost = {
    machineType: 'pc',
    vcpus: n,
    ram: o.mapped ? guestMemoryRam(o.mapped) : ram,
    devices: x86MigrationDevices({ vm, cpus, kvmclock, serialState }),
    lifecycle,
    scheduleBottomHalf: (name, fn) => {
      log.push(`bh ${name}`);
      bhs.push(name);
      new BottomHalf(name, fn).schedule();
    },
    emitEvent: (e) => events.push(e),
    autostart: () => o.autostart ?? true,
    ramIsZeroed: !o.seed,
    ...(o.dirtyLog ? { dirtyLog: o.dirtyLog } : {}),
    ...(o.mapRam && o.mapped
      ? {
          mapRamFromFile: (_id: string, fd: number, off: number, len: number) => {
            log.push(`mapRam ${off} ${len}`);
            o.mapped!.mapFilePrivate(fd, off, 0, len);
          },
        }
      : {}),
  };
  const failures: Error[] = [];
  const migration = new MachineMigration(host, {
    progress: o.progress ?? null,
    log: () => {},
    onIncomingFailed: (e) => failures.push(e),
  });
  if (o.events !== false) migration.setCapabilities([{ capability: 'events', state: true }]);
  return {
    log,
    events,
    cpus,
    lifecycle,
    kvmclock,
    clockSets,
    chips,
    pit: () => pit,
    serial,
    serialState,
    ram,
    restored,
    bhs,
    migration,
    failures,
  };
}

const statuses = (events: MigrationEvent[]) =>
  events.map((e) => (e.event === 'MIGRATION' ? e.data.status : `pass ${e.data.pass}`));

/**
 * The statuses of a `migrate exec:false`. The header goes out in setup,
 * before the thread is ready: it fails there if `false` has already
 * exited, else a later write of pass 1 does.
 */
function assertExecFalseStatuses(seen: readonly string[]): void {
  assert.ok(
    [
      ['setup', 'failed'],
      ['setup', 'active', 'pass 1', 'failed'],
    ].some((expected) => JSON.stringify(expected) === JSON.stringify(seen)),
    seen.join(', '),
  );
}

async function until(what: string, check: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('MachineMigration (recording vCPU double)', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'tsvmm-migrate-'));
  });
  afterEach(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  async function saveRunning(o: HarnessOptions = {}) {
    const src = harness({ seed: true, ...o });
    await src.lifecycle.vmStart();
    const path = join(dir, 'vm.state');
    const trace = await captureTrace(
      ['kvmclock_vm_state_change', 'migrate_set_state'],
      async () => {
        await src.migration.migrate(`file:${path}`);
        await src.migration.whenIdle();
      },
    );
    return { src, path, trace };
  }

  test('outgoing to file: setup, active, finish-migrate stop on the migration thread, completed, postmigrate', async () => {
    const { src, path, trace } = await saveRunning();
    assert.deepEqual(statuses(src.events), ['setup', 'active', 'pass 1', 'completed']);
    assert.equal(src.lifecycle.runstate.current, 'postmigrate');
    const stops = trace.filter((l) => l.includes('kvmclock_vm_state_change'));
    assert.equal(stops.length, 1);
    assert.match(
      stops[0]!,
      /kvmclock_vm_state_change running=0 state=finish-migrate thread=migration$/,
    );
    // The stop comes before any vCPU state is read, and each vCPU is read on its own thread's queue.
    const pause = src.log.lastIndexOf('pauseAll');
    assert.ok(pause >= 0 && pause < src.log.indexOf('runOnCpu 0 get_cpu_state'));
    assert.ok(src.log.includes('runOnCpu 1 get_cpu_state'));
    assert.ok(src.log.includes('STOP'));
    assert.deepEqual(readdirSync(dir), ['vm.state'], 'no temporary file left');
    assert.equal(readFileSync(path).subarray(0, 4).toString('latin1'), 'QEVM');
    const info = src.migration.queryMigrate();
    assert.equal(info.status, 'completed');
    assert.equal((info.ram as { total: number }).total, 64 * PAGE_SIZE);
  });

  test('incoming from file: verified load, state into every device, then process_incoming_migration_bh starts the VM', async () => {
    const { src, path } = await saveRunning();
    const dst = harness();
    const trace = await captureTrace(
      ['kvmclock_vm_state_change', 'kvmclock_ctrl', 'bh_run'],
      async () => {
        await dst.migration.startIncoming(`file:${path}`);
        assert.equal(dst.lifecycle.runstate.current, 'inmigrate');
        await dst.migration.whenIdle();
        await until(
          'the incoming migration to complete',
          () => dst.migration.status === 'completed',
        );
      },
    );
    assert.equal(dst.lifecycle.runstate.current, 'running');
    assert.deepEqual(dst.bhs, [PROCESS_INCOMING_MIGRATION_BH]);
    assert.deepEqual(statuses(dst.events), ['setup', 'active', 'completed']);
    // Every vCPU got its state on its own queue before the VM resumed; then KVMCLOCK_CTRL on each.
    const resume = dst.log.indexOf('resumeAll');
    for (const cpu of [0, 1]) {
      assert.ok(dst.log.indexOf(`runOnCpu ${cpu} set_cpu_state`) < resume);
      assert.ok(
        dst.log.indexOf(`ctrl ${cpu}`) > dst.log.indexOf(`bh ${PROCESS_INCOMING_MIGRATION_BH}`),
      );
      assert.deepEqual(dst.restored[cpu], cpuState(cpu));
    }
    assert.ok(dst.log.indexOf('setIrqchip 0') < resume);
    for (const id of [0, 1, 2]) assert.deepEqual(dst.chips.get(id), src.chips.get(id));
    assert.deepEqual(dst.pit(), src.pit());
    assert.equal(dst.serial.read(UART_SCR), 0x77);
    assert.deepEqual(dst.ram.memory.get('pc.ram'), src.ram.memory.get('pc.ram'));
    // kvmclock starts from the clock saved at finish-migrate: no time passed for the guest.
    assert.deepEqual(dst.clockSets, [src.kvmclock.clock]);
    const bhRun = trace.findIndex((l) =>
      l.includes(`bh_run name=${PROCESS_INCOMING_MIGRATION_BH}`),
    );
    const start = trace.findIndex((l) =>
      l.includes('kvmclock_vm_state_change running=1 state=running'),
    );
    assert.ok(bhRun >= 0 && start > bhRun, 'the start runs in the bottom half');
    assert.match(trace[start]!, /thread=main$/);
    assert.equal(trace.filter((l) => l.includes('kvmclock_ctrl')).length, 2);
  });

  test('incoming without autostart (-S) leaves the VM paused', async () => {
    const { path } = await saveRunning();
    const dst = harness({ autostart: false });
    await dst.migration.startIncoming(`file:${path}`);
    await dst.migration.whenIdle();
    await until('the incoming migration to complete', () => dst.migration.status === 'completed');
    assert.equal(dst.lifecycle.runstate.current, 'paused');
    assert.ok(!dst.log.includes('resumeAll'));
  });

  test('incoming from a corrupted file: refused, no device state applied, the VM never starts', async () => {
    const { path } = await saveRunning();
    const bytes = readFileSync(path);
    bytes[Math.floor(bytes.length / 2)]! ^= 0x10;
    writeFileSync(path, bytes);
    const dst = harness();
    const clockBefore = dst.kvmclock.clock;
    await dst.migration.startIncoming(`file:${path}`);
    await dst.migration.whenIdle();
    await new Promise((r) => setImmediate(r));
    assert.equal(dst.migration.status, 'failed');
    assert.equal(dst.failures.length, 1);
    assert.match(String(dst.migration.queryMigrate()['error-desc']), /checksum|damaged/);
    assert.equal(dst.lifecycle.runstate.current, 'inmigrate');
    assert.deepEqual(dst.bhs, []);
    assert.ok(!dst.log.includes('resumeAll'));
    assert.ok(
      !dst.log.some(
        (l) => l.includes('set_cpu_state') || l.startsWith('setIrqchip') || l === 'setPit2',
      ),
    );
    assert.equal(dst.kvmclock.clock, clockBefore);
    assert.equal(dst.serial.read(UART_SCR), 0);
    assert.deepEqual(dst.restored, []);
  });

  test('a channel that cannot open (file: in a missing directory) fails the migration; the VM keeps running', async () => {
    const src = harness({ seed: true });
    await src.lifecycle.vmStart();
    await src.migration.migrate(`file:${join(dir, 'missing', 'vm.state')}`);
    await src.migration.whenIdle();
    assert.deepEqual(statuses(src.events), ['setup', 'failed']);
    assert.match(String(src.migration.queryMigrate()['error-desc']), /cannot open/);
    assert.equal(src.lifecycle.runstate.current, 'running');
  });

  test('exec:false fails after the completion stopped the VM; the VM is resumed', async () => {
    const src = harness({ seed: true });
    await src.lifecycle.vmStart();
    await src.migration.migrate('exec:false');
    await src.migration.whenIdle();
    assertExecFalseStatuses(statuses(src.events));
    assert.equal(src.lifecycle.runstate.current, 'running');
    const stop = src.log.indexOf('STOP');
    assert.ok(stop >= 0 && src.log.indexOf('RESUME', stop) > stop, 'stopped, then resumed');
  });

  test('migrate_cancel during the save: cancelled, the command is gone, the VM is resumed', async () => {
    const src = harness({ seed: true, pages: 4096 });
    await src.lifecycle.vmStart();
    // `sleep` never reads its stdin: the pipe fills and the save blocks.
    await src.migration.migrate('exec:sleep 30');
    await until('the completion stop', () => src.lifecycle.runstate.current === 'finish-migrate');
    await new Promise((r) => setTimeout(r, 50));
    await src.migration.cancel();
    await src.migration.whenIdle();
    assert.deepEqual(statuses(src.events), [
      'setup',
      'active',
      'pass 1',
      'cancelling',
      'cancelled',
    ]);
    assert.equal(src.lifecycle.runstate.current, 'running');
  });

  test('migrate refuses a second migration and a bad URI; query and set parameters', async () => {
    const src = harness();
    await assert.rejects(src.migration.migrate('ftp:x'), /bad migration URI/);
    assert.deepEqual(src.migration.queryMigrate(), {});
    src.migration.setParameters({ 'downtime-limit': 50, 'max-bandwidth': 0 });
    const params = src.migration.queryParameters();
    assert.equal(params['downtime-limit'], 50);
    assert.equal(params['max-bandwidth'], 0);
    await assert.rejects(src.migration.migrateIncoming(`file:${join(dir, 'x')}`), /-incoming/);
    assert.ok(!existsSync(join(dir, 'x')));
  });

  test('without the events capability no MIGRATION or MIGRATION_PASS event is sent', async () => {
    const src = harness({ seed: true, events: false });
    await src.lifecycle.vmStart();
    await src.migration.migrate(`file:${join(dir, 'quiet.state')}`);
    await src.migration.whenIdle();
    assert.equal(src.migration.status, 'completed');
    assert.deepEqual(src.events, []);
  });

  test("query-migrate-capabilities lists QEMU 7.2's capabilities; unsupported ones are refused as a whole", () => {
    const src = harness({ events: false });
    const all = src.migration.queryCapabilities();
    assert.deepEqual(
      all.map((c) => c.capability),
      [...MIGRATION_CAPABILITIES],
    );
    assert.equal(all.length, 22);
    assert.ok(all.every((c) => c.state === false));
    src.migration.setCapabilities([
      { capability: 'events', state: true },
      { capability: 'pause-before-switchover', state: true },
      { capability: 'xbzrle', state: false },
    ]);
    const on = () =>
      src.migration
        .queryCapabilities()
        .filter((c) => c.state)
        .map((c) => c.capability);
    assert.deepEqual(on(), ['events', 'pause-before-switchover']);
    assert.throws(
      () =>
        src.migration.setCapabilities([
          { capability: 'events', state: false },
          { capability: 'postcopy-ram', state: true },
        ]),
      (e: unknown) =>
        e instanceof MigrationCapabilityError &&
        e.code === 'MIGRATION_UNSUPPORTED_CAPABILITY' &&
        /'postcopy-ram'.*precopy only/.test(e.message),
    );
    assert.deepEqual(on(), ['events', 'pause-before-switchover'], 'nothing half-applied');
    // A later entry for the same capability wins, as in QEMU.
    src.migration.setCapabilities([
      { capability: 'events', state: false },
      { capability: 'events', state: true },
      { capability: 'pause-before-switchover', state: false },
    ]);
    assert.deepEqual(on(), ['events']);
  });

  test("migrate-set-parameters: QEMU's other parameters keep their defaults; a change to one is refused", () => {
    const src = harness();
    const before = src.migration.queryParameters();
    assert.equal(before['downtime-limit'], 300);
    assert.equal(before['max-bandwidth'], 128 << 20);
    assert.equal(before['compress-level'], 1);
    assert.equal(before['tls-creds'], '');
    assert.equal(before['multifd-compression'], 'none');
    // What libvirt sends when it does not use TLS: the values in effect.
    src.migration.setParameters({ 'tls-creds': '', 'tls-hostname': null, 'downtime-limit': 100 });
    assert.equal(src.migration.queryParameters()['downtime-limit'], 100);
    const refused: JsonObject[] = [
      { 'compress-level': 9 },
      { 'tls-creds': 'tls0' },
      { 'xbzrle-cache-size': 1 << 20 },
      { 'block-bitmap-mapping': [] },
      { 'downtime-limit': 50, 'multifd-channels': 4 },
    ];
    for (const bad of refused) {
      assert.throws(
        () => src.migration.setParameters(bad),
        (e: unknown) =>
          e instanceof MigrationParameterError &&
          /parameters with an effect: downtime-limit, max-bandwidth/.test(e.message),
        JSON.stringify(bad),
      );
    }
    assert.deepEqual(src.migration.queryParameters(), { ...before, 'downtime-limit': 100 });
  });

  test('pause-before-switchover: the stopped source waits in pre-switchover until migrate-continue', async () => {
    const src = harness({ seed: true });
    src.migration.setCapabilities([{ capability: 'pause-before-switchover', state: true }]);
    await src.lifecycle.vmStart();
    const path = join(dir, 'paused.state');
    await src.migration.migrate(`file:${path}`);
    await until('pre-switchover', () => src.migration.status === 'pre-switchover');
    assert.equal(src.lifecycle.runstate.current, 'finish-migrate', 'stopped while paused');
    assert.equal(existsSync(path), false, 'nothing is complete while paused');
    assert.throws(
      () => src.migration.setCapabilities([{ capability: 'events', state: false }]),
      /There's a migration process in progress/,
    );
    assert.throws(() => src.migration.migrateContinue('active'), {
      message: 'Migration not in expected state: pre-switchover',
    });
    // Still paused after the refused continue.
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(src.migration.status, 'pre-switchover');
    src.migration.migrateContinue('pre-switchover');
    await src.migration.whenIdle();
    assert.deepEqual(statuses(src.events), [
      'setup',
      'active',
      'pass 1',
      'pre-switchover',
      'device',
      'completed',
    ]);
    assert.equal(src.lifecycle.runstate.current, 'postmigrate');
    const dst = harness({ initial: 'inmigrate' });
    await dst.migration.startIncoming(`file:${path}`);
    await dst.migration.whenIdle();
    await until('the incoming migration', () => dst.migration.status === 'completed');
    assert.ok(
      Buffer.from(dst.ram.memory.get('pc.ram')!).equals(Buffer.from(src.ram.memory.get('pc.ram')!)),
      'RAM equal',
    );
  });

  test('pause-before-switchover: migrate_cancel in pre-switchover cancels and resumes the VM', async () => {
    const src = harness({ seed: true });
    src.migration.setCapabilities([{ capability: 'pause-before-switchover', state: true }]);
    await src.lifecycle.vmStart();
    await src.migration.migrate(`file:${join(dir, 'cancelled.state')}`);
    await until('pre-switchover', () => src.migration.status === 'pre-switchover');
    await src.migration.cancel();
    await src.migration.whenIdle();
    assert.deepEqual(statuses(src.events), [
      'setup',
      'active',
      'pass 1',
      'pre-switchover',
      'cancelling',
      'cancelled',
    ]);
    assert.equal(src.lifecycle.runstate.current, 'running');
    assert.throws(() => src.migration.migrateContinue('pre-switchover'), {
      message: 'Migration not in expected state: cancelled',
    });
    assert.equal(existsSync(join(dir, 'cancelled.state')), false);
  });
});

/**
 * A guest double for precopy: while the VM runs it rewrites a few pages of
 * buffer RAM every millisecond (some to all zero, so a page sent non-zero
 * must later be sent as a zero page), and logs them as KVM's dirty log
 * would: sync() returns the pages written since start() or the last sync.
 */
class WritingGuest implements DirtyLog {
  private readonly dirty = new Set<number>();
  private logging = false;
  private timer: NodeJS.Timeout | undefined;
  private counter = 0;
  syncs = 0;
  written = 0;

  start(): void {
    this.logging = true;
    this.dirty.clear();
  }

  sync(): { block: string; pages: number[] }[] {
    this.syncs++;
    const pages = [...this.dirty].sort((a, b) => a - b);
    this.dirty.clear();
    return pages.length > 0 ? [{ block: 'pc.ram', pages }] : [];
  }

  stop(): void {
    this.logging = false;
  }

  run(mem: Uint8Array, running: () => boolean): void {
    const pages = mem.length / PAGE_SIZE;
    this.timer = setInterval(() => {
      if (!running()) return;
      for (let k = 0; k < 3; k++) {
        const n = ++this.counter;
        const page = (n * 7919) % pages;
        const value = n % 3 === 0 ? 0 : (n & 0xff) | 1;
        mem.fill(value, page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
        this.written++;
        if (this.logging) this.dirty.add(page);
      }
    }, 1);
  }

  end(): void {
    clearInterval(this.timer);
  }
}

describe('MachineMigration precopy with a dirty log (recording vCPU double)', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'tsvmm-precopy-'));
  });
  afterEach(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  async function migrateLive(params: { 'downtime-limit': number; 'max-bandwidth': number }) {
    const guest = new WritingGuest();
    const src = harness({ seed: true, pages: 512, dirtyLog: guest });
    const dst = harness({ pages: 512 });
    const mem = src.ram.memory.get('pc.ram')!;
    await src.lifecycle.vmStart();
    guest.run(mem, () => src.lifecycle.runstate.current === 'running');
    try {
      const sock = join(dir, 'mig.sock');
      await dst.migration.startIncoming(`unix:${sock}`);
      src.migration.setParameters(params);
      await src.migration.migrate(`unix:${sock}`);
      await src.migration.whenIdle();
      await until('the destination to complete', () => dst.migration.status === 'completed');
    } finally {
      guest.end();
    }
    return { guest, src, dst, mem };
  }

  test('RAM goes out while the guest writes; what it dirtied goes after the stop; the copy is exact', async () => {
    // 2 MiB at 4 MiB/s: the first pass takes about half a second of guest writes.
    const { guest, src, dst, mem } = await migrateLive({
      'downtime-limit': 300,
      'max-bandwidth': 4 << 20,
    });
    assert.equal(src.migration.status, 'completed', JSON.stringify(src.migration.queryMigrate()));
    assert.equal(src.lifecycle.runstate.current, 'postmigrate');
    const st = statuses(src.events);
    assert.deepEqual(st.slice(0, 3), ['setup', 'active', 'pass 1']);
    assert.equal(st.at(-1), 'completed');
    assert.ok(guest.written > 50, `the guest wrote while RAM went out (${guest.written} pages)`);
    // One sync after each pass, and one after the stop.
    assert.equal(guest.syncs, st.filter((s) => s.startsWith('pass')).length + 1);
    assert.ok(Buffer.from(dst.ram.memory.get('pc.ram')!).equals(Buffer.from(mem)), 'RAM equal');
    assert.equal(dst.lifecycle.runstate.current, 'running');
  });

  test('a downtime limit of 0 never fits while the guest writes: 30 passes, then completion; still exact', async () => {
    const { src, dst, mem } = await migrateLive({ 'downtime-limit': 0, 'max-bandwidth': 0 });
    assert.equal(src.migration.status, 'completed');
    const passes = statuses(src.events).filter((s) => s.startsWith('pass'));
    assert.ok(passes.length >= 2 && passes.length <= 30, `passes: ${passes.join(', ')}`);
    assert.ok(Buffer.from(dst.ram.memory.get('pc.ram')!).equals(Buffer.from(mem)), 'RAM equal');
  });

  test('a long save shows one self-overwriting progress line on a terminal, then a newline', async () => {
    const guest = new WritingGuest();
    const out: string[] = [];
    const tty: ProgressStream = { isTTY: true, write: (s: string) => out.push(s) };
    const src = harness({ seed: true, pages: 512, dirtyLog: guest, progress: tty });
    await src.lifecycle.vmStart();
    // 2 MiB of RAM at 1 MiB/s: about two seconds, more than the one before the line shows.
    src.migration.setParameters({ 'max-bandwidth': 1 << 20 });
    await src.migration.migrate(`file:${join(dir, 'vm.state')}`);
    await src.migration.whenIdle();
    assert.equal(src.migration.status, 'completed');
    const lines = out.filter((s) => s.startsWith('\rmigration: '));
    assert.ok(lines.length >= 2, `progress lines: ${JSON.stringify(out)}`);
    for (const l of lines) {
      assert.ok(l.endsWith('\u001b[K'), 'each line clears the rest of the terminal line');
      assert.match(
        l.slice(0, -3),
        /^\rmigration: \d+ of \d+ MiB of RAM \(\d+%\), \d+ MiB written, \d+ MiB\/s$/,
      );
    }
    assert.equal(out.at(-1), '\n', 'the line is ended once the save is over');
    assert.equal(out.filter((s) => s === '\n').length, 1);

    // Not a terminal: nothing is written.
    const quiet: string[] = [];
    const pipe = harness({
      seed: true,
      pages: 512,
      dirtyLog: new WritingGuest(),
      progress: { isTTY: false, write: (s: string) => quiet.push(s) },
    });
    await pipe.lifecycle.vmStart();
    pipe.migration.setParameters({ 'max-bandwidth': 1 << 20 });
    await pipe.migration.migrate(`file:${join(dir, 'vm2.state')}`);
    await pipe.migration.whenIdle();
    assert.equal(pipe.migration.status, 'completed');
    assert.deepEqual(quiet, []);
  });
});

/** Threads of this process (the migration thread is one while it runs). */
const threads = () => readdirSync('/proc/self/task').length;

describe('MachineMigration with RAM in a GuestMemory mapping: the RAM passes run on a worker', () => {
  let dir: string;
  let mem: GuestMemory;
  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'tsvmm-mapped-'));
    mem = GuestMemory.create(4096 * PAGE_SIZE, { layout: 'flat' });
    // Start libuv's thread pool before counting threads.
    await readFile('/proc/self/stat');
  });
  afterEach(() => {
    mem.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Runs `fn` and returns the most threads seen while it ran. */
  async function sampleThreads(fn: () => Promise<void>): Promise<number> {
    let most = threads();
    const timer = setInterval(() => {
      most = Math.max(most, threads());
    }, 2);
    try {
      await fn();
    } finally {
      clearInterval(timer);
    }
    return most;
  }

  test('the file is byte for byte the one saved from the main thread; kvmclock stops on thread migration; the worker ends', async () => {
    const before = threads();
    const old = harness({ seed: true, pages: 4096 });
    await old.lifecycle.vmStart();
    const oldPath = join(dir, 'old.state');
    await old.migration.migrate(`file:${oldPath}`);
    await old.migration.whenIdle();
    assert.equal(old.migration.status, 'completed');
    assert.equal(threads(), before, 'no worker for RAM in buffers');

    const src = harness({ seed: true, pages: 4096, mapped: mem });
    await src.lifecycle.vmStart();
    const path = join(dir, 'vm.state');
    let most = 0;
    const trace = await captureTrace(['kvmclock_vm_state_change'], async () => {
      most = await sampleThreads(async () => {
        await src.migration.migrate(`file:${path}`);
        await src.migration.whenIdle();
      });
    });
    assert.equal(src.migration.status, 'completed', JSON.stringify(src.migration.queryMigrate()));
    assert.equal(src.lifecycle.runstate.current, 'postmigrate');
    assert.deepEqual(statuses(src.events), ['setup', 'active', 'pass 1', 'completed']);
    assert.ok(most > before, `a migration thread ran (${most} threads, ${before} before)`);
    assert.equal(threads(), before, 'the migration thread has ended');
    assert.equal(trace.length, 1);
    assert.match(trace[0]!, /running=0 state=finish-migrate thread=migration$/);
    const a = readFileSync(oldPath);
    const b = readFileSync(path);
    assert.ok(a.length > 4096 * 9, `a real stream (${a.length} bytes)`);
    assert.ok(a.equals(b), 'the same stream from the worker as from the main thread');

    // And it loads into a machine with the same RAM.
    const dst = harness({ pages: 4096 });
    await dst.migration.startIncoming(`file:${path}`);
    await until('the load', () => dst.migration.status === 'completed');
    assert.ok(
      Buffer.from(dst.ram.memory.get('pc.ram')!).equals(Buffer.from(old.ram.memory.get('pc.ram')!)),
    );
  });

  test('a dead pipe fails the migration and resumes the VM; a cancel cancels it; the worker ends each time', async () => {
    const before = threads();
    const src = harness({ seed: true, pages: 4096, mapped: mem });
    await src.lifecycle.vmStart();
    await src.migration.migrate('exec:false');
    await src.migration.whenIdle();
    assertExecFalseStatuses(statuses(src.events));
    assert.match(String(src.migration.queryMigrate()['error-desc']), /.+/);
    assert.equal(src.lifecycle.runstate.current, 'running');
    assert.equal(threads(), before, 'the migration thread has ended after the failure');

    const other = harness({ seed: true, pages: 4096, mapped: mem });
    await other.lifecycle.vmStart();
    await other.migration.migrate('exec:sleep 30');
    await until('the completion stop', () => other.lifecycle.runstate.current === 'finish-migrate');
    await new Promise((r) => setTimeout(r, 50));
    await other.migration.cancel();
    await other.migration.whenIdle();
    assert.deepEqual(statuses(other.events), [
      'setup',
      'active',
      'pass 1',
      'cancelling',
      'cancelled',
    ]);
    assert.equal(other.lifecycle.runstate.current, 'running');
    assert.equal(threads(), before, 'the migration thread has ended after the cancel');
  });

  test('mapped-ram: saved in one pass after the stop with no worker, restored by mapping the file; the guest dirty log is not used', async () => {
    const before = threads();
    const guest = new WritingGuest();
    const src = harness({ seed: true, pages: 4096, mapped: mem, dirtyLog: guest });
    src.migration.setCapabilities([{ capability: 'mapped-ram', state: true }]);
    await assert.rejects(
      src.migration.migrate('exec:cat > /dev/null'),
      (e: unknown) =>
        e instanceof MigrationCapabilityError && e.code === 'MIGRATION_CAPABILITY_NEEDS_FILE',
    );
    await src.lifecycle.vmStart();
    const path = join(dir, 'vm.state');
    let most = 0;
    most = await sampleThreads(async () => {
      await src.migration.migrate(`file:${path}`);
      await src.migration.whenIdle();
    });
    assert.equal(src.migration.status, 'completed', JSON.stringify(src.migration.queryMigrate()));
    assert.deepEqual(statuses(src.events), ['setup', 'active', 'pass 1', 'completed']);
    assert.equal(guest.syncs, 0, 'no precopy passes: the dirty log was not used');
    assert.equal(most, before, `no migration worker (${most} threads, ${before} before)`);
    const saved = readFileSync(path);

    // Without the capability on the destination: refused, as QEMU does.
    const refused = harness({ pages: 4096 });
    await refused.migration.startIncoming(`file:${path}`);
    await refused.migration.whenIdle();
    assert.equal(refused.migration.status, 'failed');
    assert.match(
      String(refused.migration.queryMigrate()['error-desc']),
      /Capability mapped-ram is off/,
    );
    assert.equal(refused.lifecycle.runstate.current, 'inmigrate');

    // -incoming defer, the capability, then migrate-incoming: RAM is mapped, not read.
    const dstMem = GuestMemory.create(4096 * PAGE_SIZE, { layout: 'flat' });
    try {
      const dst = harness({ pages: 4096, mapped: dstMem, mapRam: true });
      await dst.migration.startIncoming('defer');
      dst.migration.setCapabilities([{ capability: 'mapped-ram', state: true }]);
      await assert.rejects(
        dst.migration.migrateIncoming('tcp:127.0.0.1:0'),
        (e: unknown) =>
          e instanceof MigrationCapabilityError && e.code === 'MIGRATION_CAPABILITY_NEEDS_FILE',
      );
      await dst.migration.migrateIncoming(`file:${path}`);
      await until('the load', () => dst.migration.status === 'completed');
      assert.equal(dst.lifecycle.runstate.current, 'running');
      assert.equal(dst.log.filter((l) => l.startsWith('mapRam ')).length, 1);
      assert.ok(dst.log.indexOf('mapRam') < dst.log.indexOf('resumeAll'));
      assert.ok(dstMem.fileBacked);
      assert.ok(
        Buffer.from(dstMem.read(0, 4096 * PAGE_SIZE)).equals(
          Buffer.from(mem.read(0, 4096 * PAGE_SIZE)),
        ),
        'RAM as saved',
      );
      for (const cpu of [0, 1]) assert.deepEqual(dst.restored[cpu], cpuState(cpu));
      dstMem.fill(0, 4096 * PAGE_SIZE, 0x33);
      assert.ok(readFileSync(path).equals(saved), 'the file is unchanged after RAM was written');
    } finally {
      dstMem.close();
    }
  });

  test('precopy from the worker while the guest writes: the copy is exact, the main loop keeps ticking', async () => {
    const before = threads();
    const guest = new WritingGuest();
    const src = harness({ seed: true, pages: 4096, dirtyLog: guest, mapped: mem });
    const dst = harness({ pages: 4096 });
    const view = mem.view(0, 4096 * PAGE_SIZE);
    await src.lifecycle.vmStart();
    guest.run(view, () => src.lifecycle.runstate.current === 'running');
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 1);
    try {
      const sock = join(dir, 'mig.sock');
      await dst.migration.startIncoming(`unix:${sock}`);
      src.migration.setParameters({ 'downtime-limit': 300, 'max-bandwidth': 32 << 20 });
      await src.migration.migrate(`unix:${sock}`);
      await src.migration.whenIdle();
      await until('the destination to complete', () => dst.migration.status === 'completed');
    } finally {
      guest.end();
      clearInterval(ticker);
    }
    assert.equal(src.migration.status, 'completed', JSON.stringify(src.migration.queryMigrate()));
    assert.ok(guest.written > 50, `the guest wrote while RAM went out (${guest.written} pages)`);
    assert.ok(ticks > 50, `the main loop ran timers during the passes (${ticks})`);
    assert.ok(Buffer.from(dst.ram.memory.get('pc.ram')!).equals(Buffer.from(view)), 'RAM equal');
    assert.equal(threads(), before);
  });
});
