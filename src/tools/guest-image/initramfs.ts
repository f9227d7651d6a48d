/**
 * The test guest's initramfs: a static busybox, its applet links, and an
 * /init that mounts the kernel file systems, prints the ready marker on the
 * console, then runs /script (if one was built in) or an interactive shell.
 */
import { type CpioEntry, encodeCpioNewc } from './cpio.js';

/** The line /init prints once user space is up; tests wait for it. */
export const GUEST_READY_MARKER = 'TSVMM-GUEST-READY';
/** The line /init prints after /script returns, with its exit status. */
export const GUEST_SCRIPT_DONE_MARKER = 'TSVMM-GUEST-SCRIPT-DONE';

/**
 * Busybox applets linked in /bin. /init and the tests use the first
 * group; the rest make the shell usable by a person.
 */
export const BUSYBOX_APPLETS: readonly string[] = [
  // used by /init
  'sh',
  'mount',
  'nproc',
  'cat',
  'echo',
  'setsid',
  'cttyhack',
  'poweroff',
  'reboot',
  'mkdir',
  // for people and test scripts
  'ls',
  'ps',
  'dmesg',
  'uname',
  'grep',
  'sleep',
  'date',
  'free',
  'uptime',
  'umount',
  'halt',
  'head',
  'tail',
  'wc',
  'dd',
  'sync',
  'true',
  'false',
  'test',
  '[',
  'env',
  'kill',
  'rm',
  'cp',
  'mv',
  'ln',
  'chmod',
  'sed',
  'awk',
  'md5sum',
  'sha256sum',
  'hexdump',
  'vi',
  'less',
  'top',
];

/**
 * /init, run by the kernel as PID 1 with the console on stdin, stdout and
 * stderr. After /script it powers off, or reboots when the command line
 * holds `tsvmm.exit=reboot`: without ACPI a power-off only halts the
 * vCPUs, while a reboot reaches the VMM (with -no-reboot it ends the VM).
 */
export const INIT_SCRIPT = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "${GUEST_READY_MARKER} nproc=$(nproc)"
if [ -e /script ]; then
  sh /script
  echo "${GUEST_SCRIPT_DONE_MARKER} status=$?"
  case " $(cat /proc/cmdline) " in
    *" tsvmm.exit=reboot "*) reboot -f ;;
  esac
  poweroff -f
fi
exec setsid cttyhack sh
`;

/** What goes into the initramfs. */
export interface InitramfsInput {
  /** The static busybox binary (bin/busybox of Debian's busybox-static). */
  busybox: Uint8Array;
  /** A shell script run by /init instead of the interactive shell. */
  script?: Uint8Array;
  /**
   * guests/clock-reporter, installed as /bin/clock-reporter: it prints the
   * guest's clocks every 100 ms and any backwards step or watchdog splat.
   */
  clockReporter?: Uint8Array;
}

/** The archive entries of the initramfs, in archive order. */
export function initramfsEntries(input: InitramfsInput): CpioEntry[] {
  const entries: CpioEntry[] = [
    { kind: 'dir', path: 'bin', mode: 0o755 },
    { kind: 'dir', path: 'dev', mode: 0o755 },
    // The kernel opens /dev/console for init before init runs; devtmpfs
    // is mounted over /dev only afterwards.
    { kind: 'chardev', path: 'dev/console', mode: 0o600, major: 5, minor: 1 },
    { kind: 'dir', path: 'proc', mode: 0o555 },
    { kind: 'dir', path: 'sys', mode: 0o555 },
    { kind: 'dir', path: 'tmp', mode: 0o1777 },
    { kind: 'dir', path: 'root', mode: 0o700 },
    { kind: 'file', path: 'bin/busybox', mode: 0o755, data: input.busybox },
    ...BUSYBOX_APPLETS.map(
      (applet): CpioEntry => ({ kind: 'symlink', path: `bin/${applet}`, target: 'busybox' }),
    ),
    { kind: 'file', path: 'init', mode: 0o755, data: Buffer.from(INIT_SCRIPT, 'utf8') },
  ];
  if (input.clockReporter) {
    entries.push({
      kind: 'file',
      path: 'bin/clock-reporter',
      mode: 0o755,
      data: input.clockReporter,
    });
  }
  if (input.script) entries.push({ kind: 'file', path: 'script', mode: 0o755, data: input.script });
  return entries;
}

/** The initramfs as a newc cpio archive; the same input gives the same bytes. */
export function buildInitramfs(input: InitramfsInput): Buffer {
  return encodeCpioNewc(initramfsEntries(input));
}
