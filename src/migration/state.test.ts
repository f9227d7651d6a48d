import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationParameterError, MigrationStateError } from './errors.js';
import {
  DEFAULT_MIGRATION_PARAMETERS,
  type MigrationEvent,
  MigrationStateMachine,
  validateMigrationParameters,
} from './state.js';

function machine() {
  let now = 1_000;
  const events: MigrationEvent[] = [];
  const m = new MigrationStateMachine({ now: () => now, onEvent: (e) => events.push(e) });
  return { m, events, advance: (ms: number) => (now += ms) };
}

describe('migration state', () => {
  test("QEMU's defaults: downtime-limit 300 ms, max-bandwidth 128 MiB/s", () => {
    assert.deepEqual(DEFAULT_MIGRATION_PARAMETERS, {
      'downtime-limit': 300,
      'max-bandwidth': 134217728,
    });
    assert.deepEqual(new MigrationStateMachine().parameters, DEFAULT_MIGRATION_PARAMETERS);
  });

  test('migrate-set-parameters validates every value before applying any', () => {
    const { m } = machine();
    m.setParameters({ 'downtime-limit': 50, 'max-bandwidth': 0 });
    assert.deepEqual(m.parameters, { 'downtime-limit': 50, 'max-bandwidth': 0 });
    for (const bad of [
      { 'downtime-limit': 2_000_001 },
      { 'downtime-limit': -1 },
      { 'downtime-limit': 1.5 },
      { 'max-bandwidth': '1G' },
      { 'max-bandwidth': -5 },
      { 'downtime-limit': 10, 'xbzrle-cache-size': 1 },
    ]) {
      assert.throws(() => m.setParameters(bad), MigrationParameterError, JSON.stringify(bad));
    }
    assert.deepEqual(m.parameters, { 'downtime-limit': 50, 'max-bandwidth': 0 });
    assert.deepEqual(validateMigrationParameters({ 'downtime-limit': 2_000_000 }), {
      'downtime-limit': 2_000_000,
    });
  });

  test('query-migrate is {} before any migration, then shows what QEMU shows per status', () => {
    const { m, events, advance } = machine();
    assert.deepEqual(m.query(), {});
    m.start(1 << 30);
    assert.deepEqual(m.query(), { status: 'setup' });
    advance(20);
    m.activate();
    advance(1000);
    m.progress({
      transferred: 100 << 20,
      normalPages: 20_000,
      zeroPages: 5000,
      remaining: 200 << 20,
    });
    assert.equal(m.pass(), 1);
    const active = m.query();
    assert.equal(active.status, 'active');
    assert.equal(active['setup-time'], 20);
    assert.equal(active['total-time'], 1020);
    assert.equal(active.ram?.transferred, 100 << 20);
    assert.equal(active.ram?.duplicate, 5000);
    assert.equal(active.ram?.normal, 20_000);
    assert.equal(active.ram?.['normal-bytes'], 20_000 * 4096);
    assert.equal(active.ram?.total, 1 << 30);
    assert.equal(active.ram?.['dirty-sync-count'], 1);
    assert.ok(Math.abs(active.ram!.mbps - 838.8608) < 1e-6, String(active.ram?.mbps));
    // 200 MiB left at 100 MiB/s: two seconds.
    assert.equal(active['expected-downtime'], 2000);
    assert.equal(active.downtime, undefined);
    m.stopForCompletion();
    advance(40);
    m.progress({ transferred: 110 << 20, downtimeBytes: 10 << 20 });
    m.complete();
    const done = m.query();
    assert.equal(done.status, 'completed');
    assert.equal(done.downtime, 40);
    assert.equal(done['total-time'], 1060);
    assert.equal(done['expected-downtime'], undefined);
    assert.equal(done.ram?.remaining, 0);
    assert.equal(done.ram?.['downtime-bytes'], 10 << 20);
    assert.deepEqual(
      events.map((e) => (e.event === 'MIGRATION' ? e.data.status : `pass ${e.data.pass}`)),
      ['setup', 'active', 'pass 1', 'completed'],
    );
  });

  test('failure records error-desc; a new migration may start after it', () => {
    const { m } = machine();
    m.start(4096);
    m.activate();
    assert.equal(m.fail('No space left on device'), true);
    assert.deepEqual(m.query(), { status: 'failed', 'error-desc': 'No space left on device' });
    assert.equal(m.fail('again'), false, 'a finished migration does not fail twice');
    m.start(4096);
    assert.deepEqual(m.query(), { status: 'setup' });
  });

  test('cancel: running → cancelling → cancelled; a late completion loses the race', () => {
    const { m, events } = machine();
    assert.equal(m.cancel(), false, 'nothing to cancel');
    m.start(4096);
    m.activate();
    assert.equal(m.cancel(), true);
    assert.equal(m.status, 'cancelling');
    assert.equal(
      m.setStatus('active', 'completed'),
      false,
      'compare-and-set: active is no longer current',
    );
    assert.equal(m.cancelled(), true);
    assert.deepEqual(m.query(), { status: 'cancelled' });
    assert.deepEqual(
      events.map((e) => (e.event === 'MIGRATION' ? e.data.status : '')),
      ['setup', 'active', 'cancelling', 'cancelled'],
    );
  });

  test('changes QEMU never makes, and starting twice, are refused', () => {
    const { m } = machine();
    assert.throws(() => m.setStatus('none', 'completed'), MigrationStateError);
    assert.throws(() => m.setStatus('completed', 'active'), /from 'completed' to 'active'/);
    m.start(4096);
    assert.throws(() => m.start(4096), /already in progress/);
  });
});
