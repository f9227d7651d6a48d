/**
 * The MADT ("APIC"): the interrupt controllers. One local APIC entry per
 * vCPU (APIC id = ACPI processor UID = vCPU index, all enabled), the I/O
 * APIC, the interrupt source overrides and the local APICs' NMI line.
 *
 * Interrupt wiring is that of KVM's in-kernel irqchip with its default GSI
 * routing, which tsvmm keeps (no KVM_SET_GSI_ROUTING): ISA IRQ n is GSI n
 * on I/O APIC pin n, so the PIT's IRQ 0 arrives on pin 0, not pin 2 as
 * under QEMU's own routing. The MP table (mptable.ts) says the same. ACPI
 * assumes identity for ISA IRQs without an override; we still state IRQ 0
 * explicitly, so a reader of the table (and a guest that would otherwise
 * guess pin 2) sees the choice.
 */
import { newTable, SDT_HEADER_SIZE, sealTable } from './sdt.js';

/** MADT revision of ACPI 6.0. */
export const MADT_REVISION = 4;
export const MADT_LOCAL_APIC_ADDR = 0xfee00000;
export const MADT_IOAPIC_ADDR = 0xfec00000;
/** MADT Flags bit 0: the machine also has dual 8259s (KVM's in-kernel PIC). */
export const MADT_PCAT_COMPAT = 1;

/** Interrupt controller structure types. */
export const MADT_ENTRY = {
  LOCAL_APIC: 0,
  IOAPIC: 1,
  INTERRUPT_OVERRIDE: 2,
  LOCAL_APIC_NMI: 4,
} as const;

export const MADT_LOCAL_APIC_SIZE = 8;
export const MADT_IOAPIC_SIZE = 12;
export const MADT_OVERRIDE_SIZE = 10;
export const MADT_LOCAL_NMI_SIZE = 6;
/** Local APIC flags: enabled. */
export const MADT_LAPIC_ENABLED = 1;
/** MPS INTI flags 0: polarity and trigger conform to the bus (ISA: active high, edge). */
export const MADT_INTI_CONFORMS = 0;

/** One ISA IRQ's route to a GSI. */
export interface MadtOverride {
  irq: number;
  gsi: number;
  flags: number;
}

/** The MADT's inputs. */
export interface MadtOptions {
  cpuCount: number;
  ioapicId: number;
  /** Default: IRQ 0 on GSI 0, KVM's default routing. */
  overrides?: readonly MadtOverride[];
}

/** Bytes of the MADT for cpuCount vCPUs and `overrides` overrides. */
export function madtSize(cpuCount: number, overrides = 1): number {
  return (
    SDT_HEADER_SIZE +
    8 +
    cpuCount * MADT_LOCAL_APIC_SIZE +
    MADT_IOAPIC_SIZE +
    overrides * MADT_OVERRIDE_SIZE +
    MADT_LOCAL_NMI_SIZE
  );
}

/** The MADT for cpuCount vCPUs (vCPU 0 first: the guest takes the first entry as its boot CPU). */
export function buildMadt(options: MadtOptions): Uint8Array {
  const overrides = options.overrides ?? [{ irq: 0, gsi: 0, flags: MADT_INTI_CONFORMS }];
  const table = newTable('APIC', MADT_REVISION, madtSize(options.cpuCount, overrides.length));
  const view = new DataView(table.buffer);
  view.setUint32(SDT_HEADER_SIZE, MADT_LOCAL_APIC_ADDR, true);
  view.setUint32(SDT_HEADER_SIZE + 4, MADT_PCAT_COMPAT, true);
  let at = SDT_HEADER_SIZE + 8;
  for (let cpu = 0; cpu < options.cpuCount; cpu++) {
    table[at] = MADT_ENTRY.LOCAL_APIC;
    table[at + 1] = MADT_LOCAL_APIC_SIZE;
    table[at + 2] = cpu; // ACPI processor UID
    table[at + 3] = cpu; // APIC id
    view.setUint32(at + 4, MADT_LAPIC_ENABLED, true);
    at += MADT_LOCAL_APIC_SIZE;
  }
  table[at] = MADT_ENTRY.IOAPIC;
  table[at + 1] = MADT_IOAPIC_SIZE;
  table[at + 2] = options.ioapicId;
  view.setUint32(at + 4, MADT_IOAPIC_ADDR, true);
  view.setUint32(at + 8, 0, true); // GSI base: pin n is GSI n
  at += MADT_IOAPIC_SIZE;
  for (const o of overrides) {
    table[at] = MADT_ENTRY.INTERRUPT_OVERRIDE;
    table[at + 1] = MADT_OVERRIDE_SIZE;
    table[at + 2] = 0; // bus: ISA
    table[at + 3] = o.irq;
    view.setUint32(at + 4, o.gsi, true);
    view.setUint16(at + 8, o.flags, true);
    at += MADT_OVERRIDE_SIZE;
  }
  // NMI arrives on LINT1 of every local APIC (UID 0xff: all processors).
  table[at] = MADT_ENTRY.LOCAL_APIC_NMI;
  table[at + 1] = MADT_LOCAL_NMI_SIZE;
  table[at + 2] = 0xff;
  view.setUint16(at + 3, MADT_INTI_CONFORMS, true);
  table[at + 5] = 1; // LINT1
  return sealTable(table);
}
