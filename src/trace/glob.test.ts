import assert from 'node:assert/strict';
import { test } from 'node:test';
import { globMatch, isGlobPattern } from './glob.js';

test('* matches any run of characters, also none', () => {
  assert.ok(globMatch('kvmclock_*', 'kvmclock_ctrl'));
  assert.ok(globMatch('kvmclock_*', 'kvmclock_'));
  assert.ok(globMatch('*', 'anything'));
  assert.ok(globMatch('*_state_*', 'kvmclock_vm_state_change'));
  assert.ok(!globMatch('kvmclock_*', 'kvm_run_exit'));
});

test('? matches exactly one character', () => {
  assert.ok(globMatch('vm_st?p', 'vm_stop'));
  assert.ok(!globMatch('vm_st?p', 'vm_stp'));
  assert.ok(!globMatch('vm_sto?', 'vm_stopp'));
});

test('other characters match only themselves, regex metacharacters included', () => {
  assert.ok(globMatch('a.b', 'a.b'));
  assert.ok(!globMatch('a.b', 'axb'));
  assert.ok(globMatch('a+(b)', 'a+(b)'));
  assert.ok(!globMatch('runstate_set', 'runstate_settle'));
});

test('a pattern is a glob only if it has a wildcard', () => {
  assert.ok(isGlobPattern('kvm*'));
  assert.ok(isGlobPattern('vm_st?p'));
  assert.ok(!isGlobPattern('vm_stop'));
});
