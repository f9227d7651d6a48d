/**
 * The "cpu" migration section: one per vCPU (instance = cpu index), holding
 * everything captureCpuState (accel/kvm/cpu-state.ts) reads. General
 * registers are scalar fields named as in QEMU's vmstate_x86_cpu where
 * they map (`regs` in QEMU's R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP,
 * R_ESI, R_EDI, R8..R15 order, then `rip`, `rflags`), each MSR is a named
 * u64; the KVM structs without a field-by-field QEMU counterpart (sregs,
 * the LAPIC page, vCPU events, debug registers, FPU/XSAVE, XCRs) travel as
 * the bytes of the kernel's struct (little-endian), so the vmdesc JSON
 * shows them as buffers of the kernel's size.
 *
 * The section only carries plain data. Filling it before a save
 * (get_cpu_state on the vCPU's thread) and applying it after a verified
 * load (set_cpu_state) are the migration code's job, not vmstate hooks,
 * because both are asynchronous trips to another thread.
 */
import { CPU_MSRS, type CpuSavedState } from '../../accel/kvm/cpu-state.js';
import {
  decodeKvmXcrs,
  encodeKvmXcrs,
  KVM_FPU,
  KVM_XCRS_SIZE,
  KVM_XSAVE_SIZE,
} from '../../accel/kvm/structs/fpu.js';
import type { StructCodec } from '../../accel/kvm/structs/layout.js';
import { KVM_DEBUGREGS, KVM_REGS, KVM_SREGS, type KvmRegs } from '../../accel/kvm/structs/regs.js';
import { KVM_LAPIC_STATE_SIZE, KVM_VCPU_EVENTS } from '../../accel/kvm/structs/vcpu-state.js';
import { type DeviceSection, encodeDeviceSection } from '../../migration/stream.js';
import { type VMStateDescription, type VMStateField, vmsField } from '../../migration/vmstate.js';
import { TsvmmError } from '../../util/errors.js';

/** The section's idstr, as QEMU names it. */
export const CPU_SECTION = 'cpu';

/** The state object of one vCPU's section. */
export interface CpuMigrationState {
  /** The vCPU's index, which is also the section's instance id. */
  readonly index: number;
  /**
   * The vCPU's state: set before a save (from get_cpu_state), and by a
   * load (to hand to set_cpu_state). Undefined until one of them ran.
   */
  saved: CpuSavedState | undefined;
  /** Which {@link CPU_MSRS} a load found present; staged between fields. */
  loadMsrMask: bigint;
}

/** A fresh section state for vCPU `index`. */
export function cpuMigrationState(index: number): CpuMigrationState {
  return { index, saved: undefined, loadMsrMask: 0n };
}

/** The state was asked for before it was captured: a bug in the caller's sequence. */
export class CpuMigrationStateError extends TsvmmError {}

function need(s: CpuMigrationState): CpuSavedState {
  if (!s.saved) {
    throw new CpuMigrationStateError(
      'CPU_STATE_NOT_CAPTURED',
      `vCPU ${s.index}: its state was not read (get_cpu_state) before the save`,
    );
  }
  return s.saved;
}

/** QEMU's order of the general registers in env->regs[]. */
const REG_ORDER: readonly (keyof KvmRegs)[] = [
  'rax',
  'rcx',
  'rdx',
  'rbx',
  'rsp',
  'rbp',
  'rsi',
  'rdi',
  'r8',
  'r9',
  'r10',
  'r11',
  'r12',
  'r13',
  'r14',
  'r15',
];

function zeroed<T>(codec: StructCodec<T>): T {
  return codec.decode(Buffer.alloc(codec.size));
}

/** An all-zero state for a load to fill in field by field. */
function emptyState(): CpuSavedState {
  return {
    regs: zeroed(KVM_REGS),
    sregs: zeroed(KVM_SREGS),
    msrs: [],
    lapic: { regs: new Uint8Array(KVM_LAPIC_STATE_SIZE) },
    events: zeroed(KVM_VCPU_EVENTS),
    mpState: { mpState: 0 },
    debugregs: zeroed(KVM_DEBUGREGS),
  };
}

/** A buffer field holding a KVM struct encoded with its codec. */
function structField<T>(
  name: string,
  codec: StructCodec<T>,
  get: (s: CpuSavedState) => T,
  set: (s: CpuSavedState, v: T) => void,
): VMStateField<CpuMigrationState> {
  return vmsField.buffer(
    name,
    codec.size,
    (s: CpuMigrationState) => new Uint8Array(codec.encode(get(need(s)))),
    (s, v) => set(s.saved!, codec.decode(v)),
  );
}

function msrField(i: number): VMStateField<CpuMigrationState> {
  const { index, name } = CPU_MSRS[i]!;
  return vmsField.uint64(
    `msr_${name}`,
    (s: CpuMigrationState) => need(s).msrs.find((m) => m.index === index)?.data ?? 0n,
    (s, v) => {
      if (s.loadMsrMask & (1n << BigInt(i))) s.saved!.msrs.push({ index, data: v });
    },
  );
}

if (CPU_MSRS.length > 64) throw new RangeError('CPU_MSRS must fit the 64-bit presence mask');

/**
 * vmstate "cpu", version 1. Subsections: `cpu/xsave` (the 4096-byte XSAVE
 * area) or `cpu/fpu` (struct kvm_fpu) — exactly one is sent — and
 * `cpu/xcrs` where the source host has KVM_CAP_XCRS.
 */
export const CPU_VMSTATE: VMStateDescription<CpuMigrationState> = {
  name: CPU_SECTION,
  version: 1,
  fields: [
    vmsField.array(
      'uint64',
      'regs',
      REG_ORDER.length,
      (s: CpuMigrationState) => REG_ORDER.map((r) => need(s).regs[r]),
      (s, v) => {
        REG_ORDER.forEach((r, i) => {
          s.saved!.regs[r] = v[i]!;
        });
      },
    ),
    vmsField.uint64(
      'rip',
      (s: CpuMigrationState) => need(s).regs.rip,
      (s, v) => {
        s.saved!.regs.rip = v;
      },
    ),
    vmsField.uint64(
      'rflags',
      (s: CpuMigrationState) => need(s).regs.rflags,
      (s, v) => {
        s.saved!.regs.rflags = v;
      },
    ),
    structField(
      'kvm_sregs',
      KVM_SREGS,
      (c) => c.sregs,
      (c, v) => {
        c.sregs = v;
      },
    ),
    vmsField.uint64(
      'msr_present',
      (s: CpuMigrationState) => {
        const present = new Set(need(s).msrs.map((m) => m.index));
        let mask = 0n;
        CPU_MSRS.forEach((m, i) => {
          if (present.has(m.index)) mask |= 1n << BigInt(i);
        });
        return mask;
      },
      (s, v) => {
        s.loadMsrMask = v;
      },
    ),
    ...CPU_MSRS.map((_, i) => msrField(i)),
    vmsField.buffer(
      'lapic',
      KVM_LAPIC_STATE_SIZE,
      (s: CpuMigrationState) => need(s).lapic.regs,
      (s, v) => {
        s.saved!.lapic = { regs: v };
      },
    ),
    structField(
      'kvm_vcpu_events',
      KVM_VCPU_EVENTS,
      (c) => c.events,
      (c, v) => {
        c.events = v;
      },
    ),
    vmsField.uint32(
      'mp_state',
      (s: CpuMigrationState) => need(s).mpState.mpState,
      (s, v) => {
        s.saved!.mpState = { mpState: v };
      },
    ),
    structField(
      'kvm_debugregs',
      KVM_DEBUGREGS,
      (c) => c.debugregs,
      (c, v) => {
        c.debugregs = v;
      },
    ),
  ],
  subsections: [
    {
      name: `${CPU_SECTION}/xsave`,
      version: 1,
      needed: (s) => need(s).xsave !== undefined,
      fields: [
        vmsField.buffer(
          'xsave',
          KVM_XSAVE_SIZE,
          (s: CpuMigrationState) => need(s).xsave!.region,
          (s, v) => {
            s.saved!.xsave = { region: v };
          },
        ),
      ],
    },
    {
      name: `${CPU_SECTION}/fpu`,
      version: 1,
      needed: (s) => need(s).xsave === undefined,
      fields: [
        structField(
          'kvm_fpu',
          KVM_FPU,
          (c) => {
            if (!c.fpu) throw new RangeError('vCPU state has neither XSAVE nor FPU state');
            return c.fpu;
          },
          (c, v) => {
            c.fpu = v;
          },
        ),
      ],
    },
    {
      name: `${CPU_SECTION}/xcrs`,
      version: 1,
      needed: (s) => need(s).xcrs !== undefined,
      fields: [
        vmsField.buffer(
          'kvm_xcrs',
          KVM_XCRS_SIZE,
          (s: CpuMigrationState) => new Uint8Array(encodeKvmXcrs(need(s).xcrs!)),
          (s, v) => {
            s.saved!.xcrs = decodeKvmXcrs(v);
          },
        ),
      ],
    },
  ],
  preLoad: (s) => {
    // Fields fill a fresh object: nothing of an earlier state survives a load.
    s.saved = emptyState();
    s.loadMsrMask = 0n;
  },
  postLoad: (s) => {
    const c = s.saved!;
    if (!c.xsave && !c.fpu) {
      throw new CpuMigrationStateError(
        'CPU_STATE_INCOMPLETE',
        `vCPU ${s.index}: the stream has neither the 'cpu/xsave' nor the 'cpu/fpu' subsection`,
      );
    }
  },
};

/**
 * Runs the section's encoder on an all-zero stand-in state, twice, before
 * a save stops the VM. The real encode runs with the VM stopped and was
 * the slowest step of the downtime in a fresh process: V8 compiles each
 * field's function on its first call and runs it in its interpreter,
 * about 2 ms for one vCPU's section on a PVM host, against 0.04 ms once
 * warm; the second run here was still a third of the first (measured).
 * It touches no vCPU and no device state.
 */
export async function warmUpCpuSection(): Promise<void> {
  const state = cpuMigrationState(0);
  state.saved = {
    ...emptyState(),
    xsave: { region: new Uint8Array(KVM_XSAVE_SIZE) },
    xcrs: { flags: 0, xcrs: [{ xcr: 0, value: 1n }] },
  };
  for (let i = 0; i < 2; i++) await encodeDeviceSection(cpuSection(state));
}

/** The device section of vCPU `state.index`. */
export function cpuSection(state: CpuMigrationState): DeviceSection<CpuMigrationState> {
  return { idstr: CPU_SECTION, instanceId: state.index, vmsd: CPU_VMSTATE, state };
}
