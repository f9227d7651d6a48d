/**
 * Puts a guest into a created machine and sets where each vCPU starts:
 * either one of our probe guests (every vCPU starts in long mode) or a
 * Linux kernel through the 64-bit boot protocol (the BSP starts at the
 * kernel's 64-bit entry with RSI = boot_params; the APs wait, as on real
 * hardware, for the kernel's INIT/SIPI). A Linux guest learns the vCPUs
 * from the ACPI tables (acpi/), or from the MP table when it runs without
 * ACPI (acpi=off) and was built with MP-table support.
 */
import type { LongModeEntry } from '../../accel/kvm/vcpu-ops.js';
import { ACPI_TABLES_BASE, ACPI_TABLES_END, buildAcpiTables } from './acpi/build.js';
import { type LoaderMemory, loadLinux } from './boot/linux-loader.js';
import { writeLongModeTables } from './long-mode.js';
import { buildMpTable, MPTABLE_BIOS_BASE, MPTABLE_EBDA_BASE, mpTableBase } from './mptable.js';
import {
  DEFAULT_TICK_NS,
  PROBE_LOAD_ADDR,
  type ProbeGuestName,
  probeEntry,
  probeImage,
} from './probe-boot.js';

/** What to boot. */
export type GuestBoot =
  | { kind: 'probe'; image: ProbeGuestName; tickNs?: bigint }
  | { kind: 'linux'; kernel: Uint8Array; initrd?: Uint8Array; cmdline: string };

/** Where the BSP's stack points at the 64-bit entry (below the zero page at 0x7000). */
export const LINUX_BOOT_STACK = 0x8ff0n;

/** The machine as seen by the boot code. */
export interface BootTarget {
  memory: LoaderMemory;
  cpus: number;
  /** CPUID leaf 1 EAX and EDX of the vCPUs, copied into the MP table. */
  cpuSignature?: number;
  cpuFeatures?: number;
  startLongMode(cpu: number, entry: LongModeEntry): Promise<void>;
}

/** Writes the guest into memory and sets the starting registers of the vCPUs that start at once. */
export async function bootGuest(target: BootTarget, boot: GuestBoot): Promise<void> {
  writeLongModeTables(target.memory);
  if (boot.kind === 'probe') {
    target.memory.write(PROBE_LOAD_ADDR, probeImage(boot.image));
    for (let cpu = 0; cpu < target.cpus; cpu++) {
      await target.startLongMode(cpu, probeEntry(cpu, boot.tickNs ?? DEFAULT_TICK_NS));
    }
    return;
  }
  const mpBase = mpTableBase(target.cpus);
  target.memory.write(
    mpBase,
    buildMpTable(target.cpus, mpBase, {
      ...(target.cpuSignature !== undefined ? { cpuSignature: target.cpuSignature } : {}),
      ...(target.cpuFeatures !== undefined ? { cpuFeatures: target.cpuFeatures } : {}),
    }),
  );
  const acpi = buildAcpiTables({ cpuCount: target.cpus });
  target.memory.write(acpi.base, acpi.bytes);
  const linux = loadLinux(target.memory, {
    kernel: boot.kernel,
    ...(boot.initrd ? { initrd: boot.initrd } : {}),
    cmdline: boot.cmdline,
    // Both places Linux searches for the MP table, and the ACPI tables,
    // stay out of its RAM.
    reserved: [
      { start: MPTABLE_EBDA_BASE, size: 0xa0000 - MPTABLE_EBDA_BASE },
      { start: ACPI_TABLES_BASE, size: ACPI_TABLES_END - ACPI_TABLES_BASE },
      { start: MPTABLE_BIOS_BASE, size: 0x100000 - MPTABLE_BIOS_BASE },
    ],
    acpiRsdpAddr: acpi.rsdpAddr,
  });
  await target.startLongMode(0, {
    rip: linux.entry,
    rsp: LINUX_BOOT_STACK,
    rsi: BigInt(linux.bootParamsAddr),
  });
}
