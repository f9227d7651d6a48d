/**
 * The probe OS (guests/probe-os) on real KVM, booted by tsvmm's Linux
 * loader: SMP bring-up, kvmclock on every CPU, the soft-lockup watchdog and
 * its GUEST_STOPPED pardon, and the serial console. Under QEMU's TCG the
 * same guest is tested without kvmclock (probe-os.test.ts).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { requireKvm } from '../../test-support/kvm.js';
import { type MachineUnderTest, waitFor, withMachine } from '../../test-support/machine.js';
import { scaled } from '../../test-support/time-scale.js';

const MiB = 2 ** 20;
/**
 * The probe OS's tick, which prints a line on every CPU: 20 ms on a KVM
 * host, stretched under emulation. There the console takes each byte as
 * a slow nested exit, and 8 vCPUs printing 50 lines a second each left the
 * one-CPU runner VM without progress for minutes, twice, at this test.
 */
const TICK_MS = scaled(20);
const probeOs = fileURLToPath(new URL('../../../guests/probe-os/probe-os.elf', import.meta.url));

/** `probe cpu=<n> <event> ...` lines of the probe OS, as [cpu, event, fields]. */
function events(output: string, event: string): { cpu: number; fields: Record<string, string> }[] {
  const found: { cpu: number; fields: Record<string, string> }[] = [];
  const lines = output.split('\n');
  // The last piece may be a line still being written (one exit per byte
  // where KVM emulates rep outsb): only whole lines count.
  lines.pop();
  for (const raw of lines) {
    const m = /^probe cpu=(\d+) (\w+)(.*)$/.exec(raw.trimEnd());
    if (!m || m[2] !== event) continue;
    const fields: Record<string, string> = {};
    for (const kv of m[3]!.trim().split(/\s+/).filter(Boolean)) {
      const at = kv.indexOf('=');
      fields[kv.slice(0, at)] = kv.slice(at + 1);
    }
    found.push({ cpu: Number(m[1]), fields });
  }
  return found;
}

async function bootProbeOs(
  cpus: number,
  cmdline: string,
  body: (m: MachineUnderTest) => Promise<void>,
): Promise<void> {
  await withMachine(
    {
      cpus,
      memoryBytes: 512 * MiB,
      boot: { kind: 'linux', kernel: readFileSync(probeOs), cmdline: `console=ttyS0 ${cmdline}` },
    },
    async (m) => {
      await m.machine.lifecycle.vmStart();
      await waitFor(
        `${cpus} CPUs ready`,
        () => events(m.output(), 'ready').length === cpus,
        60_000,
      );
      await body(m);
      await m.machine.lifecycle.vmShutdown();
    },
  );
}

for (const cpus of [1, 2, 4, 8]) {
  test(`probe OS with ${cpus} vCPU(s) and 512 MiB: every CPU uses kvmclock and ticks`, async (t) => {
    if (!requireKvm(t)) return;
    await bootProbeOs(cpus, `probe.tick_ms=${TICK_MS}`, async ({ output }) => {
      for (const r of events(output(), 'ready')) assert.equal(r.fields.clock, 'kvmclock');
      await waitFor('3 ticks on every CPU', () =>
        Array.from(
          { length: cpus },
          (_, c) => events(output(), 'tick').filter((e) => e.cpu === c).length,
        ).every((n) => n >= 3),
      );
      assert.deepEqual(events(output(), 'backwards'), []);
      assert.deepEqual(events(output(), 'exception'), []);
    });
  });
}

/**
 * The probe OS's watchdog threshold and the stall that must trip it. Under
 * emulation a vCPU thread can go without a CPU for far longer than on a
 * KVM host, so both stretch with the time scale: a threshold the guest
 * crosses only when stalled on purpose.
 */
const WATCHDOG_MS = scaled(300);
const STALL_MS = scaled(1000);

test('the watchdog fires when the host stalls the vCPUs without telling the guest', async (t) => {
  if (!requireKvm(t)) return;
  await bootProbeOs(
    2,
    `probe.tick_ms=${TICK_MS} probe.watchdog_ms=${WATCHDOG_MS}`,
    async ({ machine, output }) => {
      // Paused behind the lifecycle's back: kvmclock keeps running and no KVMCLOCK_CTRL.
      await machine.vcpus.pauseAll();
      await new Promise((r) => setTimeout(r, STALL_MS));
      await machine.vcpus.resumeAll();
      await waitFor('a softlockup report', () => events(output(), 'softlockup').length > 0, 10_000);
      assert.ok(Number(events(output(), 'softlockup')[0]!.fields.gap_ms) >= WATCHDOG_MS);
      assert.deepEqual(events(output(), 'forgiven'), []);
    },
  );
});

test('the watchdog forgives the stall when the guest was told (KVMCLOCK_CTRL)', async (t) => {
  if (!requireKvm(t)) return;
  await bootProbeOs(
    2,
    `probe.tick_ms=${TICK_MS} probe.watchdog_ms=${WATCHDOG_MS}`,
    async ({ machine, output }) => {
      await machine.vcpus.pauseAll();
      // Only what the guest says about this stall counts: under emulation a
      // vCPU can wait longer than the watchdog for a host CPU while it boots
      // (seen: a soft lockup of 5 s on each CPU before any stall). A line
      // cut by the pause is finished after the resume, so start at its line.
      const mark = output().lastIndexOf('\n') + 1;
      const since = () => output().slice(mark);
      await new Promise((r) => setTimeout(r, STALL_MS));
      // 0: KVM queued GUEST_STOPPED for the vCPU's next clock update (see doKvmclockCtrl).
      for (let cpu = 0; cpu < 2; cpu++) {
        assert.equal(
          await machine.vcpus.runOnCpu(cpu, 'kvmclock_ctrl'),
          0,
          `KVMCLOCK_CTRL on ${cpu}`,
        );
      }
      await machine.vcpus.resumeAll();
      const after = () => `output from the stall on:\n${since()}`;
      await waitFor(
        'both CPUs forgiven',
        () =>
          new Set(events(since(), 'forgiven').map((e) => e.cpu)).size === 2 ||
          events(since(), 'softlockup').length > 0,
        10_000,
      ).catch((err: Error) => assert.fail(`${err.message}\n${after()}`));
      assert.deepEqual(events(since(), 'softlockup'), [], after());
    },
  );
});

test('serial input reaches the probe OS: `sum` and `clock` are answered', async (t) => {
  if (!requireKvm(t)) return;
  await bootProbeOs(2, 'probe.dirty_mb=8', async ({ machine, output }) => {
    machine.serial.receive(Buffer.from('sum\r'));
    await waitFor(
      'the memory sum',
      () => /^probe mem sum=[0-9a-f]{16}\r?$/m.test(output()),
      10_000,
    );
    machine.serial.receive(Buffer.from('clock\r'));
    await waitFor(
      'clock on both CPUs',
      () => new Set(events(output(), 'clock').map((e) => e.cpu)).size === 2,
      10_000,
    );
  });
});
