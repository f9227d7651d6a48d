import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  prestartedWorkersSettled,
  prestartVcpuWorkers,
  takeVcpuWorker,
  vcpuCountHint,
} from './vcpu-prestart.js';

test('vcpuCountHint reads -smp in the spellings the option parser takes', () => {
  assert.equal(vcpuCountHint([]), 1);
  assert.equal(vcpuCountHint(['-m', '512M']), 1);
  assert.equal(vcpuCountHint(['-smp', '4']), 4);
  assert.equal(vcpuCountHint(['--smp', '2']), 2);
  assert.equal(vcpuCountHint(['-smp=3']), 3);
  assert.equal(vcpuCountHint(['--smp=6,sockets=1']), 6);
  assert.equal(vcpuCountHint(['-smp', 'cpus=8,cores=8']), 8);
  assert.equal(vcpuCountHint(['-smp', 'sockets=1,cpus=5']), 5);
  // The last -smp wins, as in the parser.
  assert.equal(vcpuCountHint(['-smp', '2', '-smp', '3']), 3);
});

test('vcpuCountHint asks for no thread where the run builds no VM', () => {
  assert.equal(vcpuCountHint(['--help']), 0);
  assert.equal(vcpuCountHint(['-h']), 0);
  assert.equal(vcpuCountHint(['-version']), 0);
  assert.equal(vcpuCountHint(['-cpu', 'help']), 0);
  assert.equal(vcpuCountHint(['-machine', '?']), 0);
});

test('vcpuCountHint stays within 1..64 whatever it is given', () => {
  assert.equal(vcpuCountHint(['-smp', '0']), 1);
  assert.equal(vcpuCountHint(['-smp', '254']), 64);
  assert.equal(vcpuCountHint(['-smp', 'many']), 1);
  assert.equal(vcpuCountHint(['-smp']), 1);
});

test('prestarted vCPU threads say when their code is loaded, so an early exit can wait for it', async () => {
  assert.equal(await prestartedWorkersSettled(1_000), true, 'nothing prestarted: settled at once');
  prestartVcpuWorkers(2);
  // The bound is only there to end the test if a thread never says so.
  assert.equal(await prestartedWorkersSettled(120_000), true);
  const workers = [takeVcpuWorker(0), takeVcpuWorker(1)];
  for (const w of workers) await w.terminate();
});
