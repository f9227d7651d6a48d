// kvmclock's policies and sanitizer on KVM, end to end: tsvmm processes
// running the probe guest, stopped for 5 s and saved → 5 s → restored,
// measured from the guest's own ticks and from query-kvmclock; then the
// sanitizer against injected faults.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { DEFAULT_TICK_NS } from '../hw/i386/probe-boot.js';
import { isJsonObject, type JsonObject } from '../monitor/json-value.js';
import type { QmpClient } from '../monitor/qmp-client.js';
import { requireKvm } from '../test-support/kvm.js';
import { type ProbeLine, readProbeLines, waitFor } from '../test-support/machine.js';
import { scaled, TIME_SCALE } from '../test-support/time-scale.js';
import {
  type QmpVm,
  queryStatus,
  ProcessScope as Scope,
  SHUTDOWN_MS,
  startWithQmp,
  waitRunning,
  within,
} from '../test-support/tsvmm-process.js';

const CPUS = 2;
const PAUSE_MS = 5_000;
const MS = 1_000_000n;

async function waitTicks(serial: string, ticks: number, from: number, resumed = false) {
  await waitFor(`${ticks} ticks from each vCPU`, () => {
    const lines = readProbeLines(serial, { resumed }).slice(from);
    return Array.from({ length: CPUS }, (_, c) => c).every(
      (c) => lines.filter((l) => l.cpu === c && l.event === 'tick').length >= ticks,
    );
  });
}

function ticks(lines: readonly ProbeLine[], cpu: number): bigint[] {
  return lines.filter((l) => l.cpu === cpu && l.event === 'tick').map((l) => l.fields.ns!);
}

async function queryKvmclock(qmp: QmpClient): Promise<JsonObject> {
  const r = await within(qmp.execute('query-kvmclock'), 'query-kvmclock');
  assert.ok(isJsonObject(r));
  return r;
}

function ns(v: unknown): bigint {
  assert.ok(typeof v === 'number' || typeof v === 'string', `an integer, got ${String(v)}`);
  return BigInt(v);
}

type Vm = QmpVm;

/** startWithQmp with the vCPU count of these tests. */
function startVm(scope: Scope, dir: string, name: string, extra: readonly string[]): Promise<Vm> {
  return startWithQmp(scope, dir, name, ['-smp', String(CPUS), ...extra]);
}

async function quit({ vm, qmp }: Vm): Promise<void> {
  await within(qmp.execute('quit'), 'quit');
  const exit = await vm.waitExit(SHUTDOWN_MS);
  assert.deepEqual(exit, { code: 0, signal: null }, vm.stderr);
}

/** No KVMCLOCK_VIOLATION event, none in query-kvmclock, no violation line. */
async function assertSilent(v: Vm, what: string): Promise<void> {
  const events = v.qmp.pendingEvents().filter((e) => e.event === 'KVMCLOCK_VIOLATION');
  assert.deepEqual(events, [], `${what}: no KVMCLOCK_VIOLATION`);
  const q = await queryKvmclock(v.qmp);
  assert.deepEqual(q.violations, [], `${what}: no violation in query-kvmclock`);
  assert.doesNotMatch(v.vm.stderr, /kvmclock violation/, what);
}

/**
 * The guest's advance across a pause: first tick after minus last tick
 * before, per vCPU. A vCPU may be stopped in the middle of a line (KVM on
 * SVM emulates rep outsb a byte per exit), which it finishes only after the
 * resume: so where the guest's clock at the stop is known (`stopNs`, the
 * sanitizer's reading at the stop's TSC), ticks are split by their clock,
 * not by where they appear in the output.
 */
function guestAdvance(
  before: readonly ProbeLine[],
  after: readonly ProbeLine[],
  stopNs?: readonly bigint[],
): { cpu: number; advance: bigint }[] {
  return Array.from({ length: CPUS }, (_, cpu) => {
    const all = [...ticks(before, cpu), ...ticks(after, cpu)];
    const split = stopNs?.[cpu];
    const last =
      split === undefined ? ticks(before, cpu).at(-1) : all.filter((n) => n <= split).at(-1);
    const first = split === undefined ? ticks(after, cpu)[0] : all.find((n) => n > split);
    assert.ok(last !== undefined && first !== undefined, `vCPU ${cpu} ticked before and after`);
    assert.ok(first > last, `vCPU ${cpu}: never backwards (${last} then ${first})`);
    return { cpu, advance: first - last };
  });
}

function assertNoSoftLockup(lines: readonly ProbeLine[], what: string): void {
  for (const bad of ['backwards', 'softlockup', 'exception']) {
    assert.deepEqual(
      lines.filter((l) => l.event === bad),
      [],
      `${what}: no '${bad}' line`,
    );
  }
}

/**
 * Stops `v` for PAUSE_MS and resumes it. Returns the guest's advance per
 * vCPU, the host's advance as kvmclock applied it (0 under freeze) and the
 * wall time the test itself saw between the stop and the resume.
 */
async function pauseAndResume(t: TestContext, v: Vm, policy: string) {
  await waitTicks(v.serial, 3, 0);
  const stopSent = process.hrtime.bigint();
  await within(v.qmp.execute('stop'), 'stop');
  await within(v.qmp.nextEvent('STOP'), 'STOP');
  const stopSeen = process.hrtime.bigint();
  const at = readProbeLines(v.serial).length;
  const beforeCont = await queryKvmclock(v.qmp);
  await sleep(PAUSE_MS);
  const contSent = process.hrtime.bigint();
  await within(v.qmp.execute('cont'), 'cont');
  const contDone = process.hrtime.bigint();
  await waitTicks(v.serial, 2, at);
  const lines = readProbeLines(v.serial);
  const q = await queryKvmclock(v.qmp);
  const start = q['last-start'] as JsonObject;
  const hostAdvance = ns(start['advance-ns']);
  const advances = guestAdvance(lines.slice(0, at), lines.slice(at), stopReadingsOf(beforeCont));
  for (let cpu = 0; cpu < CPUS; cpu++) {
    assert.ok(
      lines.slice(at).some((l) => l.cpu === cpu && l.event === 'stopped'),
      `vCPU ${cpu} saw GUEST_STOPPED (KVMCLOCK_CTRL still sent)`,
    );
  }
  assertNoSoftLockup(lines, `${policy} stop`);
  // The sanitizer's own readings: the stop's and the start's, on each vCPU.
  const readings = (q.vcpus as JsonObject[]).map((r) => ({
    cpu: r['cpu-index'] as number,
    transition: r.transition,
    ns: ns(r.ns),
    flags: r.flags as number,
  }));
  const stopReadings = (beforeCont.vcpus as JsonObject[]).map((r) => ns(r.ns));
  const hostNs = (v: unknown) => {
    const o = v as JsonObject;
    return BigInt(o.seconds as number) * 1_000_000_000n + BigInt(o.nanoseconds as number);
  };
  const setAt = hostNs(start['host-time']);
  // What the pause added to each vCPU's clock, from the guest's own pvclock:
  // its reading after the resume minus its reading at the stop's TSC, less
  // the host time from the SET to that reading (the guest ran then). The
  // SET came after `setAt` and the reading's TSC before its host time, so
  // this never overstates what the pause added.
  const pauseShare = (q.vcpus as JsonObject[]).map((r, i) => {
    // Only a page KVM rewrote after the start carries the clock it set.
    assert.equal(r.transition, 'cont', JSON.stringify(r));
    assert.equal(r.updated, true, `vCPU ${i}'s page rewritten after cont: ${JSON.stringify(r)}`);
    return ns(r.ns) - stopReadings[i]! - (hostNs(r['host-time']) - setAt);
  });
  t.diagnostic(
    `${policy} stop ${PAUSE_MS} ms: test saw ${(contSent - stopSeen) / 1000n} us..${(contDone - stopSent) / 1000n} us stopped; kvmclock added ${hostAdvance} ns (${start['realtime-mode']}); guest tick advance ${advances.map((a) => `cpu${a.cpu}=${a.advance}`).join(' ')} ns; pvclock stop->cont ${readings.map((r, i) => `cpu${r.cpu}=${r.ns - stopReadings[i]!}`).join(' ')} ns; pause share ${pauseShare.map((p, i) => `cpu${i}=${p}`).join(' ')} ns`,
  );
  return {
    advances,
    hostAdvance,
    mode: start['realtime-mode'],
    wallLow: contSent - stopSeen,
    wallHigh: contDone - stopSent,
    pvclock: readings.map((r, i) => r.ns - stopReadings[i]!),
    pauseShare,
  };
}

/** Each vCPU's pvclock at the stop's TSC, from query-kvmclock while stopped. */
function stopReadingsOf(q: JsonObject): bigint[] {
  return (q.vcpus as JsonObject[]).map((r) => ns(r.ns));
}

/**
 * The pause's share of the guest clock (see pauseAndResume) vs the advance
 * kvmclock applied: at most 1 ms more on a KVM host. The share also holds
 * the guest time that passed between the stop's TSC reads and its
 * GET_CLOCK (a few vCPU round trips), and under realtime KVM adds the wall
 * time it reads inside KVM_SET_CLOCK while the advance recorded is read
 * just before the ioctl: microseconds on a host, tens of ms under
 * emulation, so there the bound has 10 ms stretched by the time scale
 * (80 ms in the VM runner, still far below the 5 s pause it must not
 * show). It may read low by the latency of the readings themselves, never
 * high.
 */
function assertPauseShare(policy: string, share: readonly bigint[], hostAdvance: bigint): void {
  const slack = BigInt(TIME_SCALE > 1 ? scaled(10) : 1) * MS;
  share.forEach((p, cpu) => {
    const beyond = p - hostAdvance;
    assert.ok(
      beyond < slack && beyond > -BigInt(scaled(250)) * MS,
      `${policy}: the pause added ${p} ns to vCPU ${cpu}'s clock; kvmclock applied ${hostAdvance} ns; at most ${slack} ns more expected`,
    );
  });
}

/**
 * The guest's tick advance across a pause vs what the policy promises. The
 * probe samples its clock once a tick: the advance seen between two ticks
 * is the pause's share plus up to one tick interval of running, plus
 * however long the vCPU went without a host CPU around the stop and the
 * resume. On a KVM host that is bounded here, by 50 ms: far below the 5 s
 * a running clock would show, and above the 2.5 ms a vCPU thread was seen
 * late on a PVM host while the test runner's two emulated VMs took both
 * host CPUs (1 ms failed there). Under emulation a vCPU
 * thread can starve for seconds (seen: 12 s with the machine loaded), so
 * the tick figure says nothing there: it is reported, and the pause's
 * share (read from the guest's pvclock, assertPauseShare) is what is
 * checked.
 */
function assertPolicy(
  t: TestContext,
  policy: 'freeze' | 'realtime',
  advances: readonly { cpu: number; advance: bigint }[],
  hostAdvance: bigint,
): void {
  for (const { cpu, advance } of advances) {
    const beyond = advance - hostAdvance;
    if (TIME_SCALE > 1) {
      t.diagnostic(
        `${policy}: vCPU ${cpu}'s ticks advanced ${beyond} ns beyond the applied ${hostAdvance} ns (not checked under emulation)`,
      );
      continue;
    }
    const slack = 50n * MS;
    assert.ok(
      beyond > -1n * MS && beyond < DEFAULT_TICK_NS + slack,
      `${policy}: vCPU ${cpu}'s clock advanced ${advance} ns across the pause; the host's advance applied was ${hostAdvance} ns; expected within ${slack} ns beyond one ${DEFAULT_TICK_NS} ns tick`,
    );
  }
}

describe('kvmclock policies on the probe guest (needs KVM)', () => {
  for (const policy of ['freeze', 'realtime'] as const) {
    test(`policy=${policy}: a 5 s stop and save -> 5 s -> restore, measured; the sanitizer stays silent`, {
      timeout: scaled(400_000),
    }, async (t) => {
      if (!requireKvm(t)) return;
      const scope = new Scope(t);
      const dir = scope.tempDir();
      const html = join(dir, 'timeline.html');
      const args = [
        '-global',
        `kvmclock.policy=${policy}`,
        '-global',
        'kvmclock.check=on',
        '-kvmclock',
        `timeline=${html}`,
      ];
      const src = await startVm(scope, dir, 'src', args);
      await waitRunning(src.qmp);
      const q0 = await queryKvmclock(src.qmp);
      assert.equal(q0.policy, policy);
      assert.equal(q0.check, true);

      const stop = await pauseAndResume(t, src, policy);
      assertPauseShare(policy, stop.pauseShare, stop.hostAdvance);
      if (policy === 'freeze') {
        assert.equal(stop.hostAdvance, 0n);
        assertPolicy(t, 'freeze', stop.advances, 0n);
      } else {
        // kvmclock's advance is the wall time from the save to the set, which the test brackets.
        assert.ok(
          stop.hostAdvance >= stop.wallLow && stop.hostAdvance <= stop.wallHigh,
          `realtime advance ${stop.hostAdvance} ns within what the test saw (${stop.wallLow}..${stop.wallHigh} ns)`,
        );
        assertPolicy(t, 'realtime', stop.advances, stop.hostAdvance);
      }
      await assertSilent(src, `${policy} stop/cont`);

      // save -> 5 s -> restore.
      const saved = join(dir, 'vm.state');
      await within(src.qmp.execute('migrate', { uri: `file:${saved}` }), 'migrate');
      await waitFor('the migration to complete', () => existsSync(saved), 60_000);
      for (;;) {
        const s = await queryStatus(src.qmp);
        if (s.status === 'postmigrate') break;
        await sleep(50);
      }
      const srcLines = readProbeLines(src.serial);
      await assertSilent(src, `${policy} finish-migrate`);
      await quit(src);
      await sleep(PAUSE_MS);
      const dst = await startVm(scope, dir, 'dst', [
        ...args.slice(0, 4),
        '-incoming',
        `file:${saved}`,
      ]);
      await waitRunning(dst.qmp);
      await waitTicks(dst.serial, 2, 0, true);
      const dstLines = readProbeLines(dst.serial, { resumed: true });
      const q = await queryKvmclock(dst.qmp);
      const start = q['last-start'] as JsonObject;
      assert.equal(start.restored, true);
      const hostAdvance = ns(start['advance-ns']);
      const advances = guestAdvance(srcLines, dstLines);
      t.diagnostic(
        `${policy} save -> ${PAUSE_MS} ms -> restore: kvmclock added ${hostAdvance} ns (${start['realtime-mode']}); guest tick advance ${advances.map((a) => `cpu${a.cpu}=${a.advance}`).join(' ')} ns`,
      );
      if (policy === 'freeze') {
        assert.equal(hostAdvance, 0n);
      } else {
        assert.ok(
          hostAdvance >= BigInt(PAUSE_MS) * MS,
          `realtime restore advanced ${hostAdvance} ns`,
        );
      }
      assertPolicy(t, policy, advances, hostAdvance);
      assertNoSoftLockup(dstLines, `${policy} restore`);
      for (let cpu = 0; cpu < CPUS; cpu++) {
        assert.ok(dstLines.some((l) => l.cpu === cpu && l.event === 'stopped'));
      }
      await assertSilent(dst, `${policy} incoming`);
      await quit(dst);

      // The source's timeline: every event of its life, in order.
      const page = readFileSync(html, 'utf8');
      assert.match(page, /^<!DOCTYPE html>/);
      assert.doesNotMatch(page, /https?:\/\/(?!www\.w3\.org\/2000\/svg)/, 'nothing to fetch');
      const kinds = [...page.matchAll(/class="mark" data-kind="(\w+)"/g)].map((m) => m[1]);
      assert.deepEqual(kinds, ['start', 'CTRL', 'stop', 'cont', 'CTRL', 'migrate', 'quit']);
      assert.equal([...page.matchAll(/class="vcpu"/g)].length, CPUS);
    });
  }
});

/** Boots a VM with `args`, lets it tick, stops and resumes it; returns the violations it reported. */
async function violationsAcrossStop(
  t: TestContext,
  args: readonly string[],
): Promise<JsonObject[]> {
  const scope = new Scope(t);
  const dir = scope.tempDir();
  const v = await startVm(scope, dir, 'vm', ['-global', 'kvmclock.check=on', ...args]);
  await waitRunning(v.qmp);
  await waitTicks(v.serial, 2, 0);
  await within(v.qmp.execute('stop'), 'stop');
  await within(v.qmp.nextEvent('STOP'), 'STOP');
  await sleep(500);
  await within(v.qmp.execute('cont'), 'cont');
  const event = await within(v.qmp.nextEvent('KVMCLOCK_VIOLATION'), 'KVMCLOCK_VIOLATION');
  assert.ok(isJsonObject(event.data as JsonObject));
  const q = await queryKvmclock(v.qmp);
  await quit(v);
  assert.match(v.vm.stderr, /^tsvmm: kvmclock violation \(/m);
  return q.violations as JsonObject[];
}

function kinds(violations: readonly JsonObject[]): string[] {
  return [...new Set(violations.map((v) => v.kind as string))].sort();
}

describe('the kvmclock sanitizer catches injected faults (needs KVM)', () => {
  test('a clock set 1 s backwards at cont: backwards on every vCPU, and the freeze policy broken', {
    timeout: scaled(200_000),
  }, async (t) => {
    if (!requireKvm(t)) return;
    const v = await violationsAcrossStop(t, ['-x-clock-set-backwards', '1000000000']);
    assert.deepEqual(kinds(v), ['backwards', 'policy']);
    assert.deepEqual(
      v.filter((x) => x.kind === 'backwards').map((x) => x['cpu-index']),
      [0, 1],
    );
  });

  test('no KVMCLOCK_CTRL (-x-no-kvmclock-ctrl): GUEST_STOPPED missing on every vCPU', {
    timeout: scaled(200_000),
  }, async (t) => {
    if (!requireKvm(t)) return;
    const v = await violationsAcrossStop(t, ['-x-no-kvmclock-ctrl']);
    assert.deepEqual(kinds(v), ['guest-stopped-missing']);
  });

  test('an unreliable GET_CLOCK (-x-unreliable-get-clock): the clock is taken from the guest at the stop, so it stays frozen', {
    timeout: scaled(200_000),
  }, async (t) => {
    if (!requireKvm(t)) return;
    // The start reads the guest's pvclock at the TSC saved at the stop (as
    // QEMU does), not at the TSC now, which counted through the pause.
    const scope = new Scope(t);
    const dir = scope.tempDir();
    const v = await startVm(scope, dir, 'vm', [
      '-global',
      'kvmclock.check=on',
      '-x-unreliable-get-clock',
    ]);
    await waitRunning(v.qmp);
    await waitTicks(v.serial, 2, 0);
    await within(v.qmp.execute('stop'), 'stop');
    await within(v.qmp.nextEvent('STOP'), 'STOP');
    const saved = ns((await queryKvmclock(v.qmp)).clock);
    await sleep(scaled(500));
    await within(v.qmp.execute('cont'), 'cont');
    await waitRunning(v.qmp);
    const q = await queryKvmclock(v.qmp);
    assert.equal(q['clock-is-reliable'], false);
    const set = ns((q['last-start'] as JsonObject).clock);
    // Under freeze the clock set is the guest's at the stop's TSC. GET_CLOCK
    // ran a little after those TSC reads (a round trip to each vCPU thread,
    // milliseconds under emulation), so it may be ahead by that much; the
    // pause (scaled(500) ms) must not be in it.
    const pauseNs = BigInt(scaled(500)) * MS;
    assert.ok(set <= saved + 1n * MS, `set ${set} ns, after the ${saved} ns saved`);
    assert.ok(
      saved - set < pauseNs / 2n,
      `set ${set} ns, ${saved - set} ns before the ${saved} ns saved`,
    );
    const bad = (q.violations as JsonObject[]).filter((x) => x.kind !== 'policy');
    assert.deepEqual(bad, [], 'no backwards, cross-vcpu, mismatch or missing GUEST_STOPPED');
    await quit(v);
  });

  test('a restore that skips KVM_SET_CLOCK: the guest clock is not the saved one', {
    timeout: scaled(300_000),
  }, async (t) => {
    if (!requireKvm(t)) return;
    const scope = new Scope(t);
    const dir = scope.tempDir();
    const src = await startVm(scope, dir, 'src', []);
    await waitRunning(src.qmp);
    await waitTicks(src.serial, 10, 0);
    const saved = join(dir, 'vm.state');
    await within(src.qmp.execute('migrate', { uri: `file:${saved}` }), 'migrate');
    for (;;) {
      if ((await queryStatus(src.qmp)).status === 'postmigrate') break;
      await sleep(50);
    }
    await quit(src);
    const dst = await startVm(scope, dir, 'dst', [
      '-global',
      'kvmclock.check=on',
      '-x-skip-set-clock-on-restore',
      '-incoming',
      `file:${saved}`,
    ]);
    // The start may come before this client is connected: read the record, not the event.
    await waitRunning(dst.qmp);
    let q: JsonObject = {};
    const deadline = Date.now() + scaled(60_000);
    while (Date.now() < deadline) {
      q = await queryKvmclock(dst.qmp);
      // backwards may be reported first, from the round that reads every
      // vCPU; clock-mismatch comes once KVM has rewritten the pages.
      if (kinds(q.violations as JsonObject[]).includes('clock-mismatch')) break;
      await sleep(100);
    }
    const v = q.violations as JsonObject[];
    // The fault's own symptom is clock-mismatch: the new VM's clock is not
    // the one saved. It is also backwards whenever that clock (the new VM's
    // age) is behind the source's; which one is larger depends on timing.
    // And it is cross-vcpu when the round catches one vCPU's page already
    // rewritten by KVM (the new VM's age) and another's still as the
    // stream brought it (the source's clock): seen in the VM runner with
    // one emulated CPU, where vCPUs enter KVM further apart.
    assert.ok(kinds(v).includes('clock-mismatch'), JSON.stringify(q));
    assert.deepEqual(
      kinds(v).filter((k) => !['clock-mismatch', 'backwards', 'cross-vcpu'].includes(k)),
      [],
      JSON.stringify(q),
    );
    assert.ok(v.every((x) => x.transition === 'incoming'));
    await quit(dst);
    assert.match(dst.vm.stderr, /^tsvmm: kvmclock violation \(clock-mismatch\) at incoming/m);
  });
});
