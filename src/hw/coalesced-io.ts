/**
 * Writes KVM queued in the coalesced ring instead of exiting (the UART's
 * transmit register: a guest writing its console no longer leaves KVM_RUN
 * for every byte), handed to the devices in the order the guest made them.
 *
 * Every thread that serves device accesses takes the queue before it
 * serves anything else (each vCPU thread after every KVM_RUN, the main
 * thread before it reads device state and on a short timer), so a read of
 * a device never overtakes a write queued before it. Taking the queue is
 * serialised across threads by one shared lock, which is always taken
 * before a device's own lock, never while one is held.
 */
import type { CoalescedRing } from '../accel/kvm/coalesced-ring.js';
import { SharedLock } from '../util/shared-lock.js';

/** How the queued writes reach the devices: a run of byte writes to one port. */
export type CoalescedPortWrites = (port: number, bytes: Uint8Array) => void;

/** The state every thread's {@link CoalescedIo} shares: its lock. */
export function createCoalescedIoState(): SharedArrayBuffer {
  return new SharedArrayBuffer(4);
}

/** One thread's consumer of the VM's coalesced ring. */
export class CoalescedIo {
  private readonly lock: SharedLock;
  private port = -1;
  private run: number[] = [];

  constructor(
    private readonly ring: CoalescedRing,
    state: SharedArrayBuffer,
    private readonly deliver: CoalescedPortWrites,
  ) {
    this.lock = new SharedLock(state);
  }

  /** Delivers every write queued so far and says how many there were. Cheap when there is none. */
  flush(): number {
    if (!this.ring.pending) return 0;
    return this.lock.with(() => {
      try {
        const taken = this.ring.drain((addr, pio, data) => this.take(addr, pio, data));
        this.emit();
        return taken;
      } finally {
        this.port = -1;
        this.run = [];
      }
    });
  }

  // Consecutive byte writes to one port go out as one run (a console line
  // stays in one piece, as with `rep outsb`). Only byte-wide port writes
  // are served, as on the exit path; anything else is dropped there too.
  private take(addr: number, pio: boolean, data: Uint8Array): void {
    if (!pio || data.length !== 1) return;
    if (addr !== this.port) {
      this.emit();
      this.port = addr;
    }
    this.run.push(data[0]!);
  }

  private emit(): void {
    if (this.run.length === 0) return;
    this.deliver(this.port, Uint8Array.from(this.run));
    this.run = [];
  }
}

/**
 * The main thread's look at the ring, for writes no exit followed: a
 * guest that writes its last bytes and then idles in the kernel. Drivers
 * read a UART register after writing (Linux's interrupt handler reads IIR,
 * its console LSR; the probe OS waits for TEMT), so a vCPU thread takes
 * almost everything and this mostly finds nothing: it looks again soon
 * after it found writes, and backs off to {@link POLL_MAX_MS} while it
 * finds none, so an idle VM wakes the main thread a few times a second,
 * not a hundred (which under emulation costs a good part of a CPU).
 */
export class CoalescedIoPoller {
  static readonly POLL_MIN_MS = 10;
  static readonly POLL_MAX_MS = 250;
  private delay = CoalescedIoPoller.POLL_MIN_MS;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly io: CoalescedIo) {
    this.schedule();
  }

  /** Stops looking, then takes what is still queued. */
  stop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.io.flush();
  }

  private schedule(): void {
    this.timer = setTimeout(() => this.poll(), this.delay).unref();
  }

  private poll(): void {
    const found = this.io.flush() > 0;
    this.delay = found
      ? CoalescedIoPoller.POLL_MIN_MS
      : Math.min(this.delay * 2, CoalescedIoPoller.POLL_MAX_MS);
    this.schedule();
  }
}
