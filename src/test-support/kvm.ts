import type { TestContext } from 'node:test';
import { probeKvmHost } from '../util/kvm-gate.js';

/**
 * Gate for tests that need a real /dev/kvm; they live in `*.kvm.test.ts`
 * files, which the test runner (scripts/run-tests.mjs) runs where KVM is:
 * on the host, or inside ../shared/tools/kvm-vm. A KVM test that finds no
 * usable KVM therefore fails, with the reason: it is never skipped.
 * Returns true so call sites read `if (!requireKvm(t)) return;`.
 */
export function requireKvm(t: TestContext): boolean {
  const state = probeKvmHost();
  if (state.usable) return true;
  throw new Error(
    `${t.name}: this test needs KVM and found none (${state.reason}). Run it with \`npm test\`, which runs KVM tests in ../shared/tools/kvm-vm where the host has no /dev/kvm`,
  );
}
