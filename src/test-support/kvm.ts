import type { TestContext } from 'node:test';
import { probeKvmHost } from '../util/kvm-gate.js';

/**
 * Gate for tests that need a real /dev/kvm. Returns true when the test may go
 * on. Where the host is misconfigured (a KVM device exists but cannot be
 * opened) the test fails with what to do. Where the host kernel has no KVM
 * device at all, the test is marked skipped with the reason, and the reason
 * is also written to stderr so no run can mistake it for a pass.
 */
export function requireKvm(t: TestContext): boolean {
  const state = probeKvmHost();
  if (state.usable) return true;
  if (!state.hostHasNoKvm) throw new Error(`KVM test cannot run: ${state.reason}`);
  const message = `NOT RUN (needs KVM): ${state.reason}`;
  process.stderr.write(`tsvmm: ${t.name}: ${message}\n`);
  t.skip(message);
  return false;
}
