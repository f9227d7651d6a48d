import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { captureTrace, traceBody } from '../trace/capture.js';
import { VmChangeStateNotifiers } from './notifiers.js';

function recordingHandlers(n: VmChangeStateNotifiers, log: string[], priorities: number[]) {
  return priorities.map((p, i) =>
    n.add({
      priority: p,
      prepare: (running) => {
        log.push(`prepare ${i}@${p} ${running ? 1 : 0}`);
      },
      callback: (running, state) => {
        log.push(`main ${i}@${p} ${running ? 1 : 0} ${state}`);
      },
    }),
  );
}

test('start runs every prepare then every main callback in ascending priority', async () => {
  const n = new VmChangeStateNotifiers();
  const log: string[] = [];
  recordingHandlers(n, log, [10, -5, 0, 0]);
  await n.notify(true, 'running');
  assert.deepEqual(log, [
    'prepare 1@-5 1',
    'prepare 2@0 1',
    'prepare 3@0 1',
    'prepare 0@10 1',
    'main 1@-5 1 running',
    'main 2@0 1 running',
    'main 3@0 1 running',
    'main 0@10 1 running',
  ]);
});

test('stop runs both phases in descending priority', async () => {
  const n = new VmChangeStateNotifiers();
  const log: string[] = [];
  recordingHandlers(n, log, [10, -5, 0, 0]);
  await n.notify(false, 'paused');
  assert.deepEqual(log, [
    'prepare 0@10 0',
    'prepare 3@0 0',
    'prepare 2@0 0',
    'prepare 1@-5 0',
    'main 0@10 0 paused',
    'main 3@0 0 paused',
    'main 2@0 0 paused',
    'main 1@-5 0 paused',
  ]);
});

test('async handlers are awaited in order: a slow handler finishes before the next starts', async () => {
  const n = new VmChangeStateNotifiers();
  const log: string[] = [];
  n.add({
    priority: 0,
    callback: async () => {
      log.push('slow begins');
      await sleep(20);
      log.push('slow ends');
    },
  });
  n.add({ priority: 1, callback: () => void log.push('next') });
  await n.notify(true, 'running');
  assert.deepEqual(log, ['slow begins', 'slow ends', 'next']);
});

test('a removed handler is no longer called; removing twice reports false', async () => {
  const n = new VmChangeStateNotifiers();
  const log: string[] = [];
  const [a] = recordingHandlers(n, log, [0, 1]);
  assert.equal(n.remove(a!), true);
  assert.equal(n.remove(a!), false);
  await n.notify(true, 'running');
  assert.deepEqual(log, ['prepare 1@1 1', 'main 1@1 1 running']);
  assert.equal(n.list().length, 1);
});

test('a failing handler stops the walk and its error reaches the caller', async () => {
  const n = new VmChangeStateNotifiers();
  const log: string[] = [];
  n.add({
    priority: 0,
    callback: () => {
      throw new Error('boom');
    },
  });
  n.add({ priority: 1, callback: () => void log.push('after') });
  await assert.rejects(n.notify(true, 'running'), /boom/);
  assert.deepEqual(log, []);
});

test('vm_state_notify is traced with running as 0 or 1', async () => {
  const n = new VmChangeStateNotifiers();
  const lines = await captureTrace(['vm_state_notify'], async () => {
    await n.notify(true, 'running');
    await n.notify(false, 'finish-migrate');
  });
  assert.deepEqual(lines.map(traceBody), [
    'vm_state_notify running=1 state=running',
    'vm_state_notify running=0 state=finish-migrate',
  ]);
});
