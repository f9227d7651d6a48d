import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { MigrationStreamError } from './errors.js';
import { createBufferRam, PAGE_SIZE, type RamAccessor } from './ram.js';
import type { DeviceSection } from './stream.js';
import { type VMStateDescription, vmsField } from './vmstate.js';

/**
 * Synthetic devices and RAM for migration tests: every field type, arrays,
 * subsections sent and not sent, and hooks that record when they ran.
 */
export interface AllTypes {
  flag: boolean;
  u8: number;
  u16: number;
  u32: number;
  i32: number;
  u64: bigint;
  i64: bigint;
  blob: Uint8Array;
  regs: number[];
  deltas: bigint[];
  bits: boolean[];
  extra: number;
  extraWide: bigint[];
  absent: number;
  /** Hook log, not migrated. */
  log: string[];
}

/** A description with every field type, two subsections (one never needed). */
export const vmstateAllTypes: VMStateDescription<AllTypes> = {
  name: 'test-all-types',
  version: 2,
  minimumVersion: 1,
  fields: [
    vmsField.bool(
      'flag',
      (s: AllTypes) => s.flag,
      (s, v) => {
        s.flag = v;
      },
    ),
    vmsField.uint8(
      'u8',
      (s: AllTypes) => s.u8,
      (s, v) => {
        s.u8 = v;
      },
    ),
    vmsField.uint16(
      'u16',
      (s: AllTypes) => s.u16,
      (s, v) => {
        s.u16 = v;
      },
    ),
    vmsField.uint32(
      'u32',
      (s: AllTypes) => s.u32,
      (s, v) => {
        s.u32 = v;
      },
    ),
    vmsField.int32(
      'i32',
      (s: AllTypes) => s.i32,
      (s, v) => {
        s.i32 = v;
      },
    ),
    vmsField.uint64(
      'u64',
      (s: AllTypes) => s.u64,
      (s, v) => {
        s.u64 = v;
      },
    ),
    vmsField.int64(
      'i64',
      (s: AllTypes) => s.i64,
      (s, v) => {
        s.i64 = v;
      },
    ),
    vmsField.buffer(
      'blob',
      16,
      (s: AllTypes) => s.blob,
      (s, v) => {
        s.blob = v;
      },
    ),
    vmsField.array(
      'uint32',
      'regs',
      4,
      (s: AllTypes) => s.regs,
      (s, v) => {
        s.regs = v;
      },
    ),
    vmsField.array(
      'int64',
      'deltas',
      3,
      (s: AllTypes) => s.deltas,
      (s, v) => {
        s.deltas = v;
      },
      { sinceVersion: 2 },
    ),
    vmsField.array(
      'bool',
      'bits',
      2,
      (s: AllTypes) => s.bits,
      (s, v) => {
        s.bits = v;
      },
    ),
  ],
  subsections: [
    {
      name: 'test-all-types/extra',
      version: 1,
      needed: () => true,
      fields: [
        vmsField.uint32(
          'extra',
          (s: AllTypes) => s.extra,
          (s, v) => {
            s.extra = v;
          },
        ),
        vmsField.array(
          'uint64',
          'extra_wide',
          2,
          (s: AllTypes) => s.extraWide,
          (s, v) => {
            s.extraWide = v;
          },
        ),
      ],
      preLoad: (s) => s.log.push('extra.preLoad'),
      postLoad: (s) => s.log.push('extra.postLoad'),
    },
    {
      name: 'test-all-types/absent',
      version: 1,
      needed: () => false,
      fields: [
        vmsField.uint8(
          'absent',
          (s: AllTypes) => s.absent,
          (s, v) => {
            s.absent = v;
          },
        ),
      ],
    },
  ],
  preSave: (s) => s.log.push('preSave'),
  preLoad: (s) => s.log.push('preLoad'),
  postLoad: (s, v) => s.log.push(`postLoad v${v}`),
};

/** A filled AllTypes with extreme values, or a blank one to load into. */
export function allTypes(filled: boolean): AllTypes {
  if (!filled) {
    return {
      flag: false,
      u8: 0,
      u16: 0,
      u32: 0,
      i32: 0,
      u64: 0n,
      i64: 0n,
      blob: new Uint8Array(16),
      regs: [0, 0, 0, 0],
      deltas: [0n, 0n, 0n],
      bits: [false, false],
      extra: 0,
      extraWide: [0n, 0n],
      absent: 7,
      log: [],
    };
  }
  return {
    flag: true,
    u8: 0xfe,
    u16: 0xbeef,
    u32: 0xdeadbeef,
    i32: -123456789,
    u64: 0xffff_ffff_ffff_fffen,
    i64: -(1n << 62n),
    blob: Uint8Array.from({ length: 16 }, (_, i) => i * 17),
    regs: [1, 0x7fffffff, 0x80000000, 0xffffffff],
    deltas: [-1n, 0n, (1n << 63n) - 1n],
    bits: [true, false],
    extra: 42,
    extraWide: [1n << 40n, 99n],
    absent: 1,
    log: [],
  };
}

/** A kvmclock-shaped device, as the lifecycle spec describes it. */
export interface ClockState {
  clock: bigint;
  reliable: boolean;
  sendReliable: boolean;
}

export const vmstateClock: VMStateDescription<ClockState> = {
  name: 'kvmclock',
  version: 1,
  fields: [
    vmsField.uint64(
      'clock',
      (s: ClockState) => s.clock,
      (s, v) => {
        s.clock = v;
      },
    ),
  ],
  subsections: [
    {
      name: 'kvmclock/clock_is_reliable',
      version: 1,
      needed: (s) => s.sendReliable,
      fields: [
        vmsField.bool(
          'clock_is_reliable',
          (s: ClockState) => s.reliable,
          (s, v) => {
            s.reliable = v;
          },
        ),
      ],
    },
  ],
  preLoad: (s) => {
    s.reliable = false;
  },
};

/** A small per-vCPU state, saved as section 'cpu' with instance = index. */
export interface CpuState {
  rip: bigint;
  regs: bigint[];
  halted: boolean;
}

export const vmstateCpu: VMStateDescription<CpuState> = {
  name: 'cpu',
  version: 1,
  fields: [
    vmsField.uint64(
      'rip',
      (s: CpuState) => s.rip,
      (s, v) => {
        s.rip = v;
      },
    ),
    vmsField.array(
      'uint64',
      'regs',
      16,
      (s: CpuState) => s.regs,
      (s, v) => {
        s.regs = v;
      },
    ),
    vmsField.bool(
      'halted',
      (s: CpuState) => s.halted,
      (s, v) => {
        s.halted = v;
      },
    ),
  ],
};

/** The state objects of a synthetic machine, to compare after a load. */
export interface FixtureMachine {
  all: AllTypes;
  clock: ClockState;
  cpus: CpuState[];
  ram: RamAccessor & { readonly memory: ReadonlyMap<string, Uint8Array> };
  devices: DeviceSection[];
}

/**
 * A machine with `vcpus` CPUs and two RAM blocks. When `filled`, RAM has
 * zero pages, random pages and pages with a single non-zero byte at the
 * end; otherwise everything is blank, ready to load into.
 */
export function fixtureMachine(
  filled: boolean,
  opts: { vcpus?: number; ramPages?: number } = {},
): FixtureMachine {
  const vcpus = opts.vcpus ?? 2;
  const pages = opts.ramPages ?? 512;
  const ram = createBufferRam([
    { id: 'pc.ram', size: pages * PAGE_SIZE },
    { id: 'vga.vram', size: 16 * PAGE_SIZE },
  ]);
  const all = allTypes(filled);
  const clock: ClockState = filled
    ? { clock: 123_456_789_012n, reliable: true, sendReliable: true }
    : { clock: 0n, reliable: true, sendReliable: true };
  const cpus: CpuState[] = Array.from({ length: vcpus }, (_, i) => ({
    rip: filled ? 0xfff0n + BigInt(i) : 0n,
    regs: Array.from({ length: 16 }, (_, r) => (filled ? BigInt(i * 100 + r) : 0n)),
    halted: filled && i % 2 === 1,
  }));
  if (filled) {
    const mem = ram.memory.get('pc.ram')!;
    for (let p = 0; p < pages; p++) {
      const page = mem.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      if (p % 4 === 1) randomFillSync(page);
      else if (p % 4 === 2) page[PAGE_SIZE - 1] = p & 0xff || 1;
    }
    ram.memory.get('vga.vram')!.fill(0x5a, 0, 3 * PAGE_SIZE);
  }
  const devices: DeviceSection[] = [
    { idstr: 'test-all-types', instanceId: 0, vmsd: vmstateAllTypes, state: all },
    ...cpus.map((state, i) => ({ idstr: 'cpu', instanceId: i, vmsd: vmstateCpu, state })),
    { idstr: 'kvmclock', instanceId: 0, vmsd: vmstateClock, state: clock },
  ];
  return { all, clock, cpus, ram, devices };
}

/**
 * The MigrationStreamError that loading `p` rejects with; fails the test if
 * it loads, or rejects with anything else. `what` names what was loaded.
 */
export async function refusal(
  p: Promise<unknown>,
  what = 'the stream',
): Promise<MigrationStreamError> {
  try {
    await p;
  } catch (err) {
    assert.ok(
      err instanceof MigrationStreamError,
      `expected MigrationStreamError, got ${String(err)}`,
    );
    return err;
  }
  assert.fail(`${what} was accepted`);
}
