import { SharedLock } from '../../util/shared-lock.js';

/**
 * A 16550A UART: the PC's COM1 at 0x3f8, IRQ 4.
 *
 * Its registers live in a SharedArrayBuffer so that the same UART can be
 * driven from every vCPU thread and from the main thread (console input):
 * each thread builds its own `Serial16550` over the shared state, with its
 * own way to emit bytes and to drive the interrupt line, and every register
 * access runs under one shared lock. Transmission is instantaneous: THR is
 * always empty, so LSR always reports THRE and TEMT.
 */

/** Register offsets from the base port. */
export const UART_RBR_THR_DLL = 0;
export const UART_IER_DLM = 1;
export const UART_IIR_FCR = 2;
export const UART_LCR = 3;
export const UART_MCR = 4;
export const UART_LSR = 5;
export const UART_MSR = 6;
export const UART_SCR = 7;

export const COM1_BASE = 0x3f8;
export const COM1_IRQ = 4;

const LCR_DLAB = 0x80;
const IER_RDI = 0x01; // received data available
const IER_THRI = 0x02; // transmitter holding register empty
const IER_MSI = 0x08; // modem status
const IIR_NO_INT = 0x01;
const IIR_THRI = 0x02;
const IIR_RDI = 0x04;
const IIR_MSI = 0x00;
const IIR_FIFO_ENABLED = 0xc0;
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const LSR_DR = 0x01;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const MCR_LOOP = 0x10;
const MSR_CONNECTED = 0xb0; // DCD | DSR | CTS: a peer is always there

// Layout of the shared state, in Int32 cells.
const LOCK = 0;
const IER = 1;
const LCR = 2;
const MCR = 3;
const SCR = 4;
const DLL = 5;
const DLM = 6;
const FCR = 7;
const THR_INT_PENDING = 8;
const MSR_DELTA = 9;
const IRQ_LEVEL = 10;
const RX_HEAD = 11; // next slot to read
const RX_COUNT = 12;
const RX_BASE = 16;
/** Bytes of console input the UART holds before it drops more (like a full FIFO plus a line buffer). */
export const SERIAL_RX_CAPACITY = 4096;
const CELLS = RX_BASE + SERIAL_RX_CAPACITY;

/** The shared state's Int32 cell indices, for the UART's migration state (serial-vmstate.ts). */
export const SERIAL_CELLS = {
  LOCK,
  IER,
  LCR,
  MCR,
  SCR,
  DLL,
  DLM,
  FCR,
  THR_INT_PENDING,
  MSR_DELTA,
  IRQ_LEVEL,
  RX_HEAD,
  RX_COUNT,
  RX_BASE,
} as const;

/** Allocates the shared state of one UART, to hand to every thread that drives it. */
export function createSerialState(): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(CELLS * 4);
  const cells = new Int32Array(sab);
  cells[DLL] = 0x0c; // 9600 baud, as firmware leaves it
  return sab;
}

export interface SerialBackend {
  /** Bytes the guest transmitted. Called with the lock held: do not re-enter the UART. */
  transmit(bytes: Uint8Array): void;
  /** Drives the UART's interrupt line; called only when the level changes. */
  setIrq(level: boolean): void;
}

export class Serial16550 {
  private readonly cells: Int32Array;
  private readonly lock: SharedLock;

  constructor(
    /** The shared state this handle drives (for migration: serial-vmstate.ts). */
    readonly state: SharedArrayBuffer,
    private readonly backend: SerialBackend,
  ) {
    this.cells = new Int32Array(state);
    this.lock = new SharedLock(state, LOCK * 4);
  }

  /** A guest read of register `offset` (0..7). */
  read(offset: number): number {
    return this.lock.with(() => {
      const value = this.readLocked(offset & 7);
      this.updateIrq();
      return value;
    });
  }

  /** A guest write of `value` to register `offset` (0..7). */
  write(offset: number, value: number): void {
    this.lock.with(() => {
      this.writeLocked(offset & 7, value & 0xff);
      this.updateIrq();
    });
  }

  /**
   * A string write (`rep outsb`): the whole run goes to the backend at once
   * when it is plain transmission, which keeps a guest's line in one piece.
   */
  writeMany(offset: number, bytes: Uint8Array): void {
    this.lock.with(() => {
      const c = this.cells;
      if ((offset & 7) === UART_RBR_THR_DLL && !(c[LCR]! & LCR_DLAB) && !(c[MCR]! & MCR_LOOP)) {
        this.backend.transmit(bytes);
        if (c[IER]! & IER_THRI) c[THR_INT_PENDING] = 1;
      } else {
        for (const b of bytes) this.writeLocked(offset & 7, b);
      }
      this.updateIrq();
    });
  }

  /**
   * Console input for the guest. Returns how many bytes were taken; the rest
   * did not fit (the caller may retry later).
   */
  receive(bytes: Uint8Array): number {
    return this.lock.with(() => {
      const taken = this.pushRx(bytes);
      this.updateIrq();
      return taken;
    });
  }

  /** The interrupt line's current level. */
  get irqLevel(): boolean {
    return Atomics.load(this.cells, IRQ_LEVEL) === 1;
  }

  private readLocked(offset: number): number {
    const c = this.cells;
    const dlab = (c[LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case UART_RBR_THR_DLL:
        return dlab ? c[DLL]! : this.popRx();
      case UART_IER_DLM:
        return dlab ? c[DLM]! : c[IER]!;
      case UART_IIR_FCR: {
        const iir = this.pendingIir();
        // Reading IIR while it reports THRE acknowledges that interrupt.
        if (iir === IIR_THRI) c[THR_INT_PENDING] = 0;
        return iir | (c[FCR]! & FCR_ENABLE ? IIR_FIFO_ENABLED : 0);
      }
      case UART_LCR:
        return c[LCR]!;
      case UART_MCR:
        return c[MCR]!;
      case UART_LSR:
        return LSR_THRE | LSR_TEMT | (c[RX_COUNT]! > 0 ? LSR_DR : 0);
      case UART_MSR: {
        c[MSR_DELTA] = 0;
        if (c[MCR]! & MCR_LOOP) {
          // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
          const m = c[MCR]!;
          return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4);
        }
        return MSR_CONNECTED;
      }
      default:
        return c[SCR]!;
    }
  }

  private writeLocked(offset: number, value: number): void {
    const c = this.cells;
    const dlab = (c[LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case UART_RBR_THR_DLL:
        if (dlab) c[DLL] = value;
        else {
          if (c[MCR]! & MCR_LOOP) this.pushRx(Uint8Array.of(value));
          else this.backend.transmit(Uint8Array.of(value));
          if (c[IER]! & IER_THRI) c[THR_INT_PENDING] = 1;
        }
        return;
      case UART_IER_DLM:
        if (dlab) {
          c[DLM] = value;
          return;
        }
        // Enabling the THRE interrupt while THR is empty raises it at once.
        if (value & IER_THRI && !(c[IER]! & IER_THRI)) c[THR_INT_PENDING] = 1;
        if (!(value & IER_THRI)) c[THR_INT_PENDING] = 0;
        c[IER] = value & 0x0f;
        return;
      case UART_IIR_FCR:
        c[FCR] = value & 0xc9;
        if (value & FCR_CLEAR_RX) {
          c[RX_HEAD] = 0;
          c[RX_COUNT] = 0;
        }
        return;
      case UART_LCR:
        c[LCR] = value;
        return;
      case UART_MCR:
        if ((c[MCR]! ^ value) & 0x0f) c[MSR_DELTA] = 1;
        c[MCR] = value & 0x1f;
        return;
      case UART_LSR:
      case UART_MSR:
        return; // read-only on a 16550
      default:
        c[SCR] = value;
    }
  }

  private pendingIir(): number {
    const c = this.cells;
    const ier = c[IER]!;
    if (ier & IER_RDI && c[RX_COUNT]! > 0) return IIR_RDI;
    if (ier & IER_THRI && c[THR_INT_PENDING]) return IIR_THRI;
    if (ier & IER_MSI && c[MSR_DELTA]) return IIR_MSI;
    return IIR_NO_INT;
  }

  private updateIrq(): void {
    const level = this.pendingIir() !== IIR_NO_INT ? 1 : 0;
    if (Atomics.exchange(this.cells, IRQ_LEVEL, level) !== level) this.backend.setIrq(level === 1);
  }

  private pushRx(bytes: Uint8Array): number {
    const c = this.cells;
    let taken = 0;
    for (const b of bytes) {
      if (c[RX_COUNT]! >= SERIAL_RX_CAPACITY) break;
      c[RX_BASE + ((c[RX_HEAD]! + c[RX_COUNT]!) % SERIAL_RX_CAPACITY)] = b;
      c[RX_COUNT]!++;
      taken++;
    }
    return taken;
  }

  private popRx(): number {
    const c = this.cells;
    if (c[RX_COUNT] === 0) return 0;
    const b = c[RX_BASE + c[RX_HEAD]!]!;
    c[RX_HEAD] = (c[RX_HEAD]! + 1) % SERIAL_RX_CAPACITY;
    c[RX_COUNT]!--;
    return b;
  }
}
