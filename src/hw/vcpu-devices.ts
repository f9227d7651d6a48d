/**
 * The devices a vCPU thread serves itself when the guest touches I/O ports
 * or unassigned memory, and the plain-data plan each vCPU thread builds
 * them from.
 *
 * Device handlers run on the vCPU thread that took the exit, as KVM
 * delivers it, rather than on the main thread: a round trip to the main
 * thread would cost more than the exit itself (about 7 µs here). Device
 * state that several threads share lives in SharedArrayBuffers under a
 * shared lock (see hw/char/serial.ts), which plays the part of QEMU's big
 * lock.
 */
import type { CoalescedRing } from '../accel/kvm/coalesced-ring.js';
import { writeOrDrop } from '../util/fd-writer.js';
import { Serial16550 } from './char/serial.js';
import { CoalescedIo } from './coalesced-io.js';

/** Everything a vCPU thread needs to build its view of the devices: plain, transferable data. */
export interface VcpuDevicePlan {
  /** The UART, or absent for `-serial none`. */
  serial?: {
    state: SharedArrayBuffer;
    base: number;
    irq: number;
    /** Where transmitted bytes go; null discards them. */
    outFd: number | null;
  };
  /** A port whose writes are only counted (the exit-rate benchmark's target). */
  countingPort?: number;
  /**
   * Present when the VM queues some port writes in KVM's coalesced ring
   * (the UART's THR): where the ring is in the vCPU mapping, and the lock
   * every thread takes to drain it (hw/coalesced-io.ts).
   */
  coalesced?: { ringPage: number; state: SharedArrayBuffer };
}

/** How the devices reach the interrupt controller and the exit counter. */
export interface VcpuDeviceHost {
  setIrqLine(irq: number, level: boolean): void;
  countWrite(): void;
  unassigned(kind: 'pio' | 'mmio', addr: number | bigint, size: number, write: boolean): void;
  /** The coalesced ring page `ringPage` of this thread's vCPU mapping. */
  coalescedRing?(ringPage: number): CoalescedRing;
}

/** Port and MMIO dispatch for one vCPU thread. */
export class VcpuDevices {
  private readonly serial: Serial16550 | undefined;
  private readonly serialBase: number;
  private readonly countingPort: number;
  private readonly coalesced: CoalescedIo | undefined;

  constructor(
    plan: VcpuDevicePlan,
    private readonly host: VcpuDeviceHost,
  ) {
    const serial = plan.serial;
    this.serialBase = serial?.base ?? -1;
    this.countingPort = plan.countingPort ?? -1;
    this.serial = serial
      ? new Serial16550(serial.state, {
          transmit: (bytes) => {
            // A closed or stuck reader drops the output; the guest runs on.
            if (serial.outFd !== null) writeOrDrop(serial.outFd, bytes);
          },
          setIrq: (level) => host.setIrqLine(serial.irq, level),
        })
      : undefined;
    const coalesced = plan.coalesced;
    this.coalesced =
      coalesced && host.coalescedRing
        ? new CoalescedIo(host.coalescedRing(coalesced.ringPage), coalesced.state, (port, bytes) =>
            this.portIo(port, 1, bytes.length, true, bytes),
          )
        : undefined;
  }

  /**
   * Serves the port writes KVM queued instead of exiting, from any vCPU.
   * Called after every KVM_RUN, before its exit is served.
   */
  flushCoalesced(): void {
    this.coalesced?.flush();
  }

  /**
   * One KVM_EXIT_IO: `data` holds size x count bytes, to read for an OUT
   * and to fill for an IN.
   */
  portIo(port: number, size: number, count: number, isWrite: boolean, data: Uint8Array): void {
    if (port === this.countingPort && isWrite) {
      this.host.countWrite();
      return;
    }
    if (this.serial && port >= this.serialBase && port < this.serialBase + 8 && size === 1) {
      const offset = port - this.serialBase;
      if (isWrite) {
        if (count === 1) this.serial.write(offset, data[0]!);
        else this.serial.writeMany(offset, data);
      } else {
        for (let i = 0; i < count; i++) data[i] = this.serial.read(offset);
      }
      return;
    }
    // Nothing here: reads float high, as on a PC bus, and writes are dropped.
    if (!isWrite) data.fill(0xff);
    this.host.unassigned('pio', port, size, isWrite);
  }

  /** One KVM_EXIT_MMIO to an address no device claims: reads are all-ones. */
  mmio(addr: bigint, len: number, isWrite: boolean, data: Uint8Array): void {
    if (!isWrite) data.fill(0xff, 0, len);
    this.host.unassigned('mmio', addr, len, isWrite);
  }
}
