import { QEMU_COMPAT_VERSION, tsvmmVersion } from '../monitor/version.js';
import { OPTION_SPECS } from './options.js';

/**
 * The `--help` text: usage, then every option with its argument and what it
 * does, generated from the same table the parser uses so the two cannot
 * drift apart.
 */
export function helpText(program = 'tsvmm'): string {
  const rows = OPTION_SPECS.map((o) => {
    const names = o.names.join(', ');
    return { left: o.arg !== undefined ? `${names} ${o.arg}` : names, help: o.help };
  });
  const lines = [
    `usage: ${program} [options]`,
    '',
    "A KVM virtual machine monitor with QEMU's command line, QMP and lifecycle.",
    'With no -kernel, tsvmm boots its own small probe guest.',
    'Every option may also be spelled with two dashes (--m 1G).',
    '',
    'Options:',
  ];
  for (const row of rows) {
    lines.push(`  ${row.left}`);
    lines.push(`        ${row.help}`);
  }
  lines.push(
    '',
    'Example:',
    `  ${program} -accel kvm -m 512M -smp 2 -nographic \\`,
    '      -qmp unix:/tmp/qmp.sock,server=on,wait=off -S',
    '',
  );
  return lines.join('\n');
}

/** The `--version` text. */
export function versionText(): string {
  const { major, minor, micro } = QEMU_COMPAT_VERSION;
  return `tsvmm version ${tsvmmVersion()} (QMP and command line of QEMU ${major}.${minor}.${micro})\n`;
}
