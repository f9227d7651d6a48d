import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ExitGuard } from './exit-guard.js';

function guard(deadlineMs: number) {
  const forced: string[] = [];
  return { forced, guard: new ExitGuard({ deadlineMs, force: (why) => void forced.push(why) }) };
}

test('no deadline runs before a shutdown is asked for', async () => {
  const { guard: g, forced } = guard(1);
  assert.equal(g.armed, false);
  await sleep(20);
  assert.deepEqual(forced, []);
});

test('a shutdown that does not finish by the deadline is forced, once', async () => {
  const { guard: g, forced } = guard(5);
  g.shutdownRequested();
  g.shutdownRequested();
  assert.equal(g.armed, true);
  await sleep(50);
  assert.deepEqual(forced, ['the shutdown did not finish within 5 ms']);
  assert.equal(g.armed, false);
});

test('a disarmed deadline forces nothing', async () => {
  const { guard: g, forced } = guard(5);
  g.shutdownRequested();
  g.disarm();
  await sleep(50);
  assert.deepEqual(forced, []);
});

test('the first signal asks for a clean shutdown and arms the deadline; the second forces the exit', async () => {
  const { guard: g, forced } = guard(60_000);
  assert.equal(g.signal('SIGTERM'), true);
  assert.equal(g.armed, true);
  assert.deepEqual(forced, []);
  assert.equal(g.signal('SIGINT'), false);
  assert.deepEqual(forced, ['SIGINT again while shutting down']);
  assert.equal(g.armed, false, 'the deadline is off once forced');
  assert.equal(g.signal('SIGHUP'), false);
  assert.equal(forced.length, 1, 'forced once');
});
