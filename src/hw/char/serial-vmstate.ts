/**
 * The UART's migration state: vmstate "serial" with QEMU's field names
 * where they map (divider, rbr, ier, iir, lcr, mcr, lsr, msr, scr, fcr),
 * then what our UART keeps besides (the pending THRE interrupt, the modem
 * status delta, the interrupt line's level), and the RX buffer in the
 * subsection "serial/rx_buffer" when it holds bytes.
 *
 * The registers live in the SharedArrayBuffer that every vCPU thread
 * drives (serial.ts); {@link readSerialRegisters} and
 * {@link writeSerialRegisters} take one consistent snapshot of it, or
 * replace it, under the UART's lock.
 */

import type { DeviceSection } from '../../migration/stream.js';
import { type VMStateDescription, vmsField } from '../../migration/vmstate.js';
import { TsvmmError } from '../../util/errors.js';
import { SharedLock } from '../../util/shared-lock.js';
import { SERIAL_CELLS as C, SERIAL_RX_CAPACITY } from './serial.js';

/** The UART's registers and queued input, as plain data. */
export interface SerialRegisters {
  /** The baud-rate divisor latch, DLM << 8 | DLL. */
  divider: number;
  ier: number;
  lcr: number;
  mcr: number;
  scr: number;
  fcr: number;
  /** A THRE interrupt is pending (QEMU's thr_ipending). */
  thrIpending: boolean;
  /** MCR changed since MSR was last read: a modem-status interrupt is pending. */
  msrDelta: boolean;
  /** The level the UART last drove its interrupt line to. */
  irqLevel: boolean;
  /** Received bytes not yet read by the guest, oldest first. */
  rx: Uint8Array;
}

/** A snapshot of the UART's shared state, taken under its lock. */
export function readSerialRegisters(shared: SharedArrayBuffer): SerialRegisters {
  const cells = new Int32Array(shared);
  return new SharedLock(shared, C.LOCK * 4).with(() => {
    const count = cells[C.RX_COUNT]!;
    const head = cells[C.RX_HEAD]!;
    const rx = new Uint8Array(count);
    for (let i = 0; i < count; i++) rx[i] = cells[C.RX_BASE + ((head + i) % SERIAL_RX_CAPACITY)]!;
    return {
      divider: ((cells[C.DLM]! & 0xff) << 8) | (cells[C.DLL]! & 0xff),
      ier: cells[C.IER]!,
      lcr: cells[C.LCR]!,
      mcr: cells[C.MCR]!,
      scr: cells[C.SCR]!,
      fcr: cells[C.FCR]!,
      thrIpending: cells[C.THR_INT_PENDING] !== 0,
      msrDelta: cells[C.MSR_DELTA] !== 0,
      irqLevel: cells[C.IRQ_LEVEL] !== 0,
      rx,
    };
  });
}

/** Replaces the UART's shared state with `regs`, under its lock. */
export function writeSerialRegisters(shared: SharedArrayBuffer, regs: SerialRegisters): void {
  if (regs.rx.length > SERIAL_RX_CAPACITY) {
    throw new RangeError(`the UART holds at most ${SERIAL_RX_CAPACITY} received bytes`);
  }
  const cells = new Int32Array(shared);
  new SharedLock(shared, C.LOCK * 4).with(() => {
    cells[C.DLL] = regs.divider & 0xff;
    cells[C.DLM] = (regs.divider >> 8) & 0xff;
    cells[C.IER] = regs.ier;
    cells[C.LCR] = regs.lcr;
    cells[C.MCR] = regs.mcr;
    cells[C.SCR] = regs.scr;
    cells[C.FCR] = regs.fcr;
    cells[C.THR_INT_PENDING] = regs.thrIpending ? 1 : 0;
    cells[C.MSR_DELTA] = regs.msrDelta ? 1 : 0;
    cells[C.RX_HEAD] = 0;
    cells[C.RX_COUNT] = regs.rx.length;
    regs.rx.forEach((b, i) => {
      cells[C.RX_BASE + i] = b;
    });
    Atomics.store(cells, C.IRQ_LEVEL, regs.irqLevel ? 1 : 0);
  });
}

/** The state object of the "serial" section: the shared state and a snapshot of it. */
export interface SerialMigrationState {
  readonly shared: SharedArrayBuffer;
  /** Taken by pre-save; filled by a load and then written to `shared` by post-load. */
  regs: SerialRegisters;
}

/** A section state over the UART's shared state. */
export function serialMigrationState(shared: SharedArrayBuffer): SerialMigrationState {
  return { shared, regs: readSerialRegisters(shared) };
}

/** A loaded UART state that no 16550 can be in. */
export class SerialMigrationError extends TsvmmError {}

// The registers the guest would read that follow from the others (as
// serial.ts computes them on a read). Sent so the vmdesc reads like QEMU's;
// a load ignores them.
function iir(r: SerialRegisters): number {
  let v = 0x01;
  if (r.ier & 0x01 && r.rx.length > 0) v = 0x04;
  else if (r.ier & 0x02 && r.thrIpending) v = 0x02;
  else if (r.ier & 0x08 && r.msrDelta) v = 0x00;
  return v | (r.fcr & 0x01 ? 0xc0 : 0);
}

function lsr(r: SerialRegisters): number {
  return 0x60 | (r.rx.length > 0 ? 0x01 : 0);
}

function msr(r: SerialRegisters): number {
  if (!(r.mcr & 0x10)) return 0xb0;
  const m = r.mcr;
  return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4);
}

function u8(name: string, key: 'ier' | 'lcr' | 'mcr' | 'scr' | 'fcr') {
  return vmsField.uint8(
    name,
    (s: SerialMigrationState) => s.regs[key],
    (s, v) => {
      s.regs[key] = v;
    },
  );
}

function ignored(name: string, get: (r: SerialRegisters) => number) {
  return vmsField.uint8(
    name,
    (s: SerialMigrationState) => get(s.regs),
    () => {},
  );
}

function flag(name: string, key: 'thrIpending' | 'msrDelta' | 'irqLevel') {
  return vmsField.bool(
    name,
    (s: SerialMigrationState) => s.regs[key],
    (s, v) => {
      s.regs[key] = v;
    },
  );
}

/** vmstate "serial", version 1 (tsvmm's own layout under QEMU's names). */
export const SERIAL_VMSTATE: VMStateDescription<SerialMigrationState> = {
  name: 'serial',
  version: 1,
  fields: [
    vmsField.uint16(
      'divider',
      (s: SerialMigrationState) => s.regs.divider,
      (s, v) => {
        s.regs.divider = v;
      },
    ),
    ignored('rbr', (r) => r.rx[0] ?? 0),
    u8('ier', 'ier'),
    ignored('iir', iir),
    u8('lcr', 'lcr'),
    u8('mcr', 'mcr'),
    ignored('lsr', lsr),
    ignored('msr', msr),
    u8('scr', 'scr'),
    u8('fcr', 'fcr'),
    flag('thr_ipending', 'thrIpending'),
    flag('msr_delta', 'msrDelta'),
    flag('irq_level', 'irqLevel'),
  ],
  subsections: [
    {
      name: 'serial/rx_buffer',
      version: 1,
      needed: (s) => s.regs.rx.length > 0,
      fields: [
        vmsField.uint16(
          'rx_count',
          (s: SerialMigrationState) => s.regs.rx.length,
          (s, v) => {
            if (v > SERIAL_RX_CAPACITY) {
              throw new SerialMigrationError(
                'SERIAL_RX_OVERFLOW',
                `the stream's UART holds ${v} received bytes; this UART holds at most ${SERIAL_RX_CAPACITY}`,
              );
            }
            s.regs.rx = new Uint8Array(v);
          },
        ),
        vmsField.buffer(
          'rx_data',
          SERIAL_RX_CAPACITY,
          (s: SerialMigrationState) => {
            const out = new Uint8Array(SERIAL_RX_CAPACITY);
            out.set(s.regs.rx);
            return out;
          },
          (s, v) => {
            s.regs.rx = v.slice(0, s.regs.rx.length);
          },
        ),
      ],
    },
  ],
  preSave: (s) => {
    s.regs = readSerialRegisters(s.shared);
  },
  preLoad: (s) => {
    // An empty RX buffer unless the subsection brings one.
    s.regs = { ...s.regs, rx: new Uint8Array(0) };
  },
  postLoad: (s) => writeSerialRegisters(s.shared, s.regs),
};

/** The "serial" device section (instance 0: COM1). */
export function serialSection(state: SerialMigrationState): DeviceSection<SerialMigrationState> {
  return { idstr: 'serial', instanceId: 0, vmsd: SERIAL_VMSTATE, state };
}
