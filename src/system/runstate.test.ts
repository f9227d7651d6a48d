import assert from 'node:assert/strict';
import { test } from 'node:test';
import { captureTrace, traceBody } from '../trace/capture.js';
import {
  InvalidRunStateTransitionError,
  isRunState,
  isValidRunStateTransition,
  RUN_STATES,
  type RunState,
  RunStateMachine,
} from './runstate.js';

// The transition table of lifecycle.md, copied out again by hand so that a
// mistake in runstate.ts's table cannot hide behind itself.
const SPEC_TABLE = `
prelaunch → inmigrate, suspended, running, finish-migrate
debug → running, finish-migrate, prelaunch, suspended
inmigrate → internal-error, io-error, paused, running, shutdown, suspended, watchdog, guest-panicked, finish-migrate, prelaunch, postmigrate, colo
internal-error → paused, finish-migrate, prelaunch
io-error → running, finish-migrate, prelaunch
paused → running, finish-migrate, postmigrate, prelaunch, colo, suspended
postmigrate → running, finish-migrate, prelaunch
finish-migrate → running, paused, postmigrate, prelaunch, colo, internal-error, io-error, shutdown, suspended, watchdog, guest-panicked
restore-vm → running, prelaunch, suspended
colo → running, prelaunch, shutdown
running → debug, internal-error, io-error, paused, finish-migrate, restore-vm, save-vm, shutdown, watchdog, guest-panicked, colo, suspended
save-vm → running, suspended
shutdown → paused, finish-migrate, prelaunch, colo
suspended → running, finish-migrate, prelaunch, colo, paused, save-vm, restore-vm, shutdown
watchdog → running, finish-migrate, prelaunch, colo
guest-panicked → running, finish-migrate, prelaunch
`;

function specTable(): Map<string, Set<string>> {
  const table = new Map<string, Set<string>>();
  for (const line of SPEC_TABLE.trim().split('\n')) {
    const [from, tos] = line.split(' → ');
    table.set(from!, new Set(tos!.split(', ')));
  }
  return table;
}

function asRunState(name: string): RunState {
  assert.ok(isRunState(name), `${name} is a run state`);
  return name;
}

test('the run states are exactly the sixteen of the spec', () => {
  assert.deepEqual([...RUN_STATES].sort(), [...specTable().keys()].sort());
  assert.equal(RUN_STATES.length, 16);
});

test('every valid transition of the spec table moves the state', () => {
  let checked = 0;
  for (const [from, tos] of specTable()) {
    for (const to of tos) {
      const m = new RunStateMachine(asRunState(from));
      m.set(asRunState(to));
      assert.equal(m.current, to, `${from} -> ${to}`);
      assert.ok(isValidRunStateTransition(asRunState(from), asRunState(to)));
      checked++;
    }
  }
  assert.equal(checked, 85);
});

test('every transition missing from the spec table throws, naming both states, and leaves the state', () => {
  const table = specTable();
  let checked = 0;
  for (const from of RUN_STATES) {
    for (const to of RUN_STATES) {
      if (from === to || table.get(from)!.has(to)) continue;
      const m = new RunStateMachine(from);
      assert.equal(isValidRunStateTransition(from, to), false, `${from} -> ${to}`);
      assert.throws(
        () => m.set(to),
        (err: unknown) => {
          assert.ok(err instanceof InvalidRunStateTransitionError);
          assert.equal(err.code, 'INVALID_RUNSTATE_TRANSITION');
          assert.equal(err.from, from);
          assert.equal(err.to, to);
          assert.ok(err.message.includes(`'${from}'`) && err.message.includes(`'${to}'`));
          return true;
        },
      );
      assert.equal(m.current, from);
      checked++;
    }
  }
  assert.equal(checked, 16 * 16 - 16 - 85);
});

test('setting the current state again is a no-op for every state, even where the table lacks it', () => {
  for (const s of RUN_STATES) {
    const m = new RunStateMachine(s);
    m.set(s);
    assert.equal(m.current, s);
  }
});

test('a new machine starts in prelaunch and is not running', () => {
  const m = new RunStateMachine();
  assert.equal(m.current, 'prelaunch');
  assert.equal(m.isRunning(), false);
  m.set('running');
  assert.equal(m.isRunning(), true);
  assert.equal(m.check('running'), true);
});

test('needsReset is true for internal-error, shutdown and guest-panicked only', () => {
  const need = RUN_STATES.filter((s) => new RunStateMachine(s).needsReset());
  assert.deepEqual(need.sort(), ['guest-panicked', 'internal-error', 'shutdown']);
});

test('runstate_set is traced with both states', async () => {
  const lines = await captureTrace(['runstate_set'], () => {
    const m = new RunStateMachine();
    m.set('running');
    m.set('paused');
  });
  assert.deepEqual(lines.map(traceBody), [
    'runstate_set from=prelaunch to=running',
    'runstate_set from=running to=paused',
  ]);
  assert.match(lines[0]!, /^\d+@\d+\.\d{6}:runstate_set from=prelaunch to=running thread=main$/);
});
