import { accessSync, constants, existsSync, readFileSync } from 'node:fs';

/**
 * Whether this host can run KVM guests, and if not, why. Tests that need
 * /dev/kvm ask this first.
 *
 * Two cases are told apart on purpose:
 * - the kernel registered a KVM device (it is in /proc/misc) but /dev/kvm is
 *   missing or not accessible: the host is misconfigured, and a KVM test must
 *   fail, loudly, with what to do;
 * - the kernel registered no KVM device at all (no vendor module bound, for
 *   example kvm_pvm refusing to bind inside a PVM guest): no VMM can run a
 *   guest here, and a KVM test is reported as not run, with that reason.
 */
export type KvmHostState =
  | { usable: true }
  | { usable: false; hostHasNoKvm: true; reason: string }
  | { usable: false; hostHasNoKvm: false; reason: string };

export function probeKvmHost(devicePath = '/dev/kvm'): KvmHostState {
  if (existsSync(devicePath)) {
    try {
      accessSync(devicePath, constants.R_OK | constants.W_OK);
      return { usable: true };
    } catch {
      return {
        usable: false,
        hostHasNoKvm: false,
        reason: `${devicePath} exists but is not readable and writable by this user: add the user to the kvm group or run as root`,
      };
    }
  }
  if (kernelRegisteredKvm()) {
    return {
      usable: false,
      hostHasNoKvm: false,
      reason: `the kernel has a KVM device but ${devicePath} is missing: create it with 'mknod ${devicePath} c 10 232' (or let udev do it)`,
    };
  }
  return {
    usable: false,
    hostHasNoKvm: true,
    reason: `this host kernel provides no KVM device (no 'kvm' in /proc/misc${vendorHint()}): no guest can run here`,
  };
}

function kernelRegisteredKvm(): boolean {
  try {
    return /^\s*\d+\s+kvm$/m.test(readFileSync('/proc/misc', 'utf8'));
  } catch {
    return false;
  }
}

function vendorHint(): string {
  const vendors = ['kvm_intel', 'kvm_amd', 'kvm_pvm'].filter((m) => existsSync(`/sys/module/${m}`));
  return vendors.length
    ? `; vendor modules present but not bound: ${vendors.join(', ')}`
    : '; no kvm vendor module';
}

/**
 * Whether this host's KVM is PVM-backed (kvm_pvm, no VMX or SVM module):
 * there Linux guests get only through early boot (see kvm-from-node.md),
 * so tests that boot Linux fully ask for hardware KVM instead.
 */
export function kvmIsPvm(): boolean {
  const has = (m: string) => existsSync(`/sys/module/${m}`);
  return has('kvm_pvm') && !has('kvm_intel') && !has('kvm_amd');
}
