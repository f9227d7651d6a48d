/**
 * Debian's cloud kernel boots under the tsvmm command to the guest image's
 * ready line on every vCPU, and its shell answers a command typed on the
 * serial console. The kernel has no MP-table parser (CONFIG_X86_MPPARSE is
 * off), so it counts the vCPUs from our ACPI MADT and brings each AP up
 * with INIT/SIPI through KVM's in-kernel local APIC.
 *
 * The guest image comes from the cache only (`node scripts/build-guest.mjs`
 * fills it; CI runs that before the tests): the VM runner has no network,
 * and a test must not depend on what apt offers today. A missing image
 * fails the test and says how to build it.
 *
 * Each test starts tsvmm with the serial port on its stdio (stdin a pipe),
 * kills it by its pid on every path, and prints the time from spawn to the
 * ready line. On a PVM-backed host the runner sends this file to the VM
 * runner (requireFullKvm): Linux gets only through early boot on PVM.
 * In the VM runner (KVM nested in QEMU's TCG) a boot takes a minute or
 * more, most of it the kernel log written to the UART a byte per exit.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { requireFullKvm } from '../../test-support/kvm.js';
import { waitFor } from '../../test-support/machine.js';
import { scaled } from '../../test-support/time-scale.js';
import { ProcessScope } from '../../test-support/tsvmm-process.js';
import { buildGuestImage, type GuestBuildResult } from '../../tools/guest-image/build.js';
import { GUEST_READY_MARKER } from '../../tools/guest-image/initramfs.js';
import { defaultGuestCacheDir } from '../../tools/guest-image/main.js';

/**
 * Spawn to the ready line. On a host with KVM this boot takes a few
 * seconds; waitFor stretches it by the time scale (8 in the VM runner).
 */
const BOOT_MS = 60_000;
/** The typed command's output, after the ready line. */
const COMMAND_MS = 15_000;
/** Checking the cached image (sha256 of 70 MB, an initramfs written). */
const IMAGE_MS = 30_000;

/** The cached guest image, checked once for all tests of this file. */
let image: Promise<GuestBuildResult> | undefined;
function guestImage(): Promise<GuestBuildResult> {
  image ??= buildGuestImage({ outDir: defaultGuestCacheDir(), cachedOnly: true });
  return image;
}

for (const cpus of [1, 2, 4]) {
  test(`Linux boots with -smp ${cpus} to the ready line with nproc=${cpus} and runs a typed command`, {
    timeout: scaled(IMAGE_MS + BOOT_MS + COMMAND_MS + 10_000),
  }, async (t) => {
    if (!requireFullKvm(t)) return;
    const built = await guestImage();
    // The ELF vmlinux skips the decompressor.
    const kernel = built.vmlinux ?? built.vmlinuz;
    const scope = new ProcessScope(t);
    const started = performance.now();
    const vm = scope.start(
      [
        '-smp',
        String(cpus),
        '-m',
        '512M',
        '-nographic',
        '-kernel',
        kernel,
        '-initrd',
        built.initramfs,
        // No `quiet`: the whole log is what tells where a boot stopped.
        '-append',
        'console=ttyS0',
      ],
      { stdin: 'pipe' },
    );
    const tail = () => `${vm.stdout}${vm.stderr ? `\nstderr:\n${vm.stderr}` : ''}`.slice(-3000);
    const ready = new RegExp(`^${GUEST_READY_MARKER} nproc=(\\d+)$`);
    const readyLine = () => vm.lines().find((l) => ready.test(l));
    await waitFor('the ready line', () => readyLine() !== undefined || vm.exited, BOOT_MS).catch(
      (err: Error) => {
        throw new Error(`${err.message}; the console so far ends with:\n${tail()}`);
      },
    );
    const line = readyLine();
    assert.ok(line, `tsvmm exited before the ready line:\n${tail()}`);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    process.stderr.write(`tsvmm: -smp ${cpus}: ready line ${seconds} s after spawn\n`);
    assert.equal(Number(ready.exec(line)![1]), cpus, `nproc in the guest:\n${tail()}`);
    // The shell starts after the ready line; a line typed before its
    // prompt waits in the UART and the tty, so typing now is safe.
    vm.type('echo typed-$((6*7))');
    await waitFor(
      'the typed command to run',
      () => vm.lines().some((l) => l.includes('typed-42')),
      COMMAND_MS,
    ).catch((err: Error) => {
      throw new Error(`${err.message}; the console ends with:\n${tail()}`);
    });
  });
}
