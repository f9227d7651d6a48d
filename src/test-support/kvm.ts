import type { TestContext } from 'node:test';
import { kvmIsPvm, probeKvmHost } from '../util/kvm-gate.js';

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

/**
 * Gate for tests that boot Linux to user space: they need KVM on VMX or
 * SVM, not PVM-backed KVM (where Linux dies in early boot). The test runner
 * sends files that call this to the VM runner on a PVM host, so finding PVM
 * here fails the test rather than skipping it.
 */
export function requireFullKvm(t: TestContext): boolean {
  if (!requireKvm(t)) return false;
  if (!kvmIsPvm()) return true;
  throw new Error(
    `${t.name}: this test boots Linux fully and this host's KVM is PVM-backed (kvm_pvm), where Linux stops in early boot. Run it with \`npm test\`, which runs such files in ../shared/tools/kvm-vm on PVM hosts`,
  );
}
