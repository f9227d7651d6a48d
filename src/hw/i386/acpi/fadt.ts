/**
 * The FADT ("FACP"): fixed hardware and boot flags. Ours is hardware-reduced
 * ACPI (as Firecracker's and Cloud Hypervisor's): no PM1 event or control
 * blocks, no PM timer, no GPEs, no SCI, no FACS. What that means for a
 * Linux guest: it treats the machine as ACPI-only, installs no legacy PIC
 * and skips the PIT timer setup (x86 acpi_reduced_hw_init), so it keeps
 * time with kvm-clock and the local APIC timer, and every interrupt goes
 * through the I/O APIC, which is what KVM's in-kernel irqchip gives. The
 * PIT and the 8259s still exist for guests without ACPI.
 */
import { newTable, sealTable, writeAscii } from './sdt.js';

/** ACPI 6.0 FADT: major revision 6, 276 bytes. */
export const FADT_REVISION = 6;
export const FADT_MINOR_REVISION = 0;
export const FADT_SIZE = 276;

/** FADT Flags bits used here. */
export const FADT_FLAG = {
  /** WBINVD works: caches can be flushed. */
  WBINVD: 1 << 0,
  /** C1 (HLT) works on every processor. */
  PROC_C1: 1 << 2,
  /** No real-time clock wake-up from S4. */
  RTC_S4: 1 << 7,
  /** Hardware-reduced ACPI: none of the fixed hardware exists. */
  HW_REDUCED_ACPI: 1 << 20,
} as const;

/** IA-PC boot architecture flags (FADT offset 109). */
export const FADT_IAPC_BOOT = {
  LEGACY_DEVICES: 1 << 0,
  I8042: 1 << 1,
  VGA_NOT_PRESENT: 1 << 2,
  MSI_NOT_SUPPORTED: 1 << 3,
  PCIE_ASPM_CONTROLS: 1 << 4,
  CMOS_RTC_NOT_PRESENT: 1 << 5,
} as const;

/** Offsets of the FADT fields we set. */
export const FADT_OFFSET = {
  FIRMWARE_CTRL: 36,
  DSDT: 40,
  PREFERRED_PM_PROFILE: 45,
  SCI_INT: 46,
  IAPC_BOOT_ARCH: 109,
  FLAGS: 112,
  MINOR_REVISION: 131,
  X_DSDT: 140,
  HYPERVISOR_VENDOR_ID: 268,
} as const;

/**
 * The FADT pointing at the DSDT at `dsdtAddr`. Boot flags: no VGA, no
 * CMOS RTC and no i8042 (tsvmm has none of them, so the guest does not
 * probe them), no MSI (there is no PCI bus).
 */
export function buildFadt(dsdtAddr: number): Uint8Array {
  const table = newTable('FACP', FADT_REVISION, FADT_SIZE);
  const view = new DataView(table.buffer);
  // The 32-bit DSDT pointer and the 64-bit one agree, as ACPICA wants.
  view.setUint32(FADT_OFFSET.DSDT, dsdtAddr, true);
  view.setBigUint64(FADT_OFFSET.X_DSDT, BigInt(dsdtAddr), true);
  view.setUint16(
    FADT_OFFSET.IAPC_BOOT_ARCH,
    FADT_IAPC_BOOT.VGA_NOT_PRESENT |
      FADT_IAPC_BOOT.MSI_NOT_SUPPORTED |
      FADT_IAPC_BOOT.CMOS_RTC_NOT_PRESENT,
    true,
  );
  view.setUint32(
    FADT_OFFSET.FLAGS,
    FADT_FLAG.WBINVD | FADT_FLAG.PROC_C1 | FADT_FLAG.HW_REDUCED_ACPI,
    true,
  );
  table[FADT_OFFSET.MINOR_REVISION] = FADT_MINOR_REVISION;
  writeAscii(table, FADT_OFFSET.HYPERVISOR_VENDOR_ID, 'TSVMM', 8);
  return sealTable(table);
}
