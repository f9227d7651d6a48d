/**
 * Structs passed to VM-fd ioctls: memory slots, the VM clock, the in-kernel
 * interrupt controllers and PIT, IRQ lines, the dirty log and ENABLE_CAP.
 */
import { defineStruct } from './layout.js';

/** struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION). */
export interface KvmUserspaceMemoryRegion {
  slot: number;
  /** KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY. */
  flags: number;
  guestPhysAddr: bigint;
  /** 0 deletes the slot. */
  memorySize: bigint;
  userspaceAddr: bigint;
}

export const KVM_USERSPACE_MEMORY_REGION_SIZE = 32;

/** Codec for struct kvm_userspace_memory_region. */
export const KVM_USERSPACE_MEMORY_REGION = defineStruct<KvmUserspaceMemoryRegion>(
  'struct kvm_userspace_memory_region',
  KVM_USERSPACE_MEMORY_REGION_SIZE,
  {
    slot: { offset: 0, type: 'u32' },
    flags: { offset: 4, type: 'u32' },
    guestPhysAddr: { offset: 8, type: 'u64' },
    memorySize: { offset: 16, type: 'u64' },
    userspaceAddr: { offset: 24, type: 'u64' },
  },
);

/** Memory slot flags. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1;
export const KVM_MEM_READONLY = 2;

/** struct kvm_clock_data (KVM_GET_CLOCK / KVM_SET_CLOCK). */
export interface KvmClockData {
  /** kvmclock in nanoseconds. */
  clock: bigint;
  /** KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC. */
  flags: number;
  /** Host CLOCK_REALTIME in ns when `clock` was read (valid with KVM_CLOCK_REALTIME). */
  realtime: bigint;
  /** Host TSC when `clock` was read (valid with KVM_CLOCK_HOST_TSC). */
  hostTsc: bigint;
}

export const KVM_CLOCK_DATA_SIZE = 48;

/** Codec for struct kvm_clock_data. */
export const KVM_CLOCK_DATA = defineStruct<KvmClockData>(
  'struct kvm_clock_data',
  KVM_CLOCK_DATA_SIZE,
  {
    clock: { offset: 0, type: 'u64' },
    flags: { offset: 8, type: 'u32' },
    realtime: { offset: 16, type: 'u64' },
    hostTsc: { offset: 24, type: 'u64' },
  },
);

/**
 * struct kvm_irqchip (KVM_GET_IRQCHIP / KVM_SET_IRQCHIP). The chip state
 * (kvm_pic_state or kvm_ioapic_state in a 512-byte union) stays raw bytes:
 * a monitor saves and restores it without looking inside.
 */
export interface KvmIrqchip {
  /** KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC. */
  chipId: number;
  chip: Uint8Array;
}

export const KVM_IRQCHIP_SIZE = 520;
export const KVM_IRQCHIP_STATE_BYTES = 512;

/** Codec for struct kvm_irqchip. */
export const KVM_IRQCHIP = defineStruct<KvmIrqchip>('struct kvm_irqchip', KVM_IRQCHIP_SIZE, {
  chipId: { offset: 0, type: 'u32' },
  chip: { offset: 8, type: 'bytes', length: KVM_IRQCHIP_STATE_BYTES },
});

/** chip_id values of struct kvm_irqchip. */
export const KVM_IRQCHIP_PIC_MASTER = 0;
export const KVM_IRQCHIP_PIC_SLAVE = 1;
export const KVM_IRQCHIP_IOAPIC = 2;

/** struct kvm_pit_channel_state: one i8254 channel. */
export interface KvmPitChannelState {
  count: number;
  latchedCount: number;
  countLatched: number;
  statusLatched: number;
  status: number;
  readState: number;
  writeState: number;
  writeLatch: number;
  rwMode: number;
  mode: number;
  bcd: number;
  gate: number;
  countLoadTime: bigint;
}

export const KVM_PIT_CHANNEL_STATE_SIZE = 24;

/** Codec for struct kvm_pit_channel_state. */
export const KVM_PIT_CHANNEL_STATE = defineStruct<KvmPitChannelState>(
  'struct kvm_pit_channel_state',
  KVM_PIT_CHANNEL_STATE_SIZE,
  {
    count: { offset: 0, type: 'u32' },
    latchedCount: { offset: 4, type: 'u16' },
    countLatched: { offset: 6, type: 'u8' },
    statusLatched: { offset: 7, type: 'u8' },
    status: { offset: 8, type: 'u8' },
    readState: { offset: 9, type: 'u8' },
    writeState: { offset: 10, type: 'u8' },
    writeLatch: { offset: 11, type: 'u8' },
    rwMode: { offset: 12, type: 'u8' },
    mode: { offset: 13, type: 'u8' },
    bcd: { offset: 14, type: 'u8' },
    gate: { offset: 15, type: 'u8' },
    countLoadTime: { offset: 16, type: 's64' },
  },
);

/** struct kvm_pit_state2 (KVM_GET_PIT2 / KVM_SET_PIT2). */
export interface KvmPitState2 {
  /** Exactly three channels. */
  channels: KvmPitChannelState[];
  /** KVM_PIT_FLAGS_HPET_LEGACY | KVM_PIT_FLAGS_SPEAKER_DATA_ON. */
  flags: number;
}

export const KVM_PIT_STATE2_SIZE = 112;

/** Codec for struct kvm_pit_state2. */
export const KVM_PIT_STATE2 = defineStruct<KvmPitState2>(
  'struct kvm_pit_state2',
  KVM_PIT_STATE2_SIZE,
  {
    channels: { offset: 0, type: 'struct[]', codec: KVM_PIT_CHANNEL_STATE, count: 3 },
    flags: { offset: 72, type: 'u32' },
  },
);

/** kvm_pit_state2.flags bits. */
export const KVM_PIT_FLAGS_HPET_LEGACY = 1;
export const KVM_PIT_FLAGS_SPEAKER_DATA_ON = 2;

/** struct kvm_pit_config (KVM_CREATE_PIT2). */
export interface KvmPitConfig {
  /** KVM_PIT_SPEAKER_DUMMY or 0. */
  flags: number;
}

export const KVM_PIT_CONFIG_SIZE = 64;

/** Codec for struct kvm_pit_config. */
export const KVM_PIT_CONFIG = defineStruct<KvmPitConfig>(
  'struct kvm_pit_config',
  KVM_PIT_CONFIG_SIZE,
  {
    flags: { offset: 0, type: 'u32' },
  },
);

/** kvm_pit_config.flags: emulate the PC speaker port as a dummy. */
export const KVM_PIT_SPEAKER_DUMMY = 1;

/** struct kvm_irq_level (KVM_IRQ_LINE, KVM_IRQ_LINE_STATUS). */
export interface KvmIrqLevel {
  /** GSI in; for KVM_IRQ_LINE_STATUS the kernel writes the status over it. */
  irq: number;
  level: number;
}

export const KVM_IRQ_LEVEL_SIZE = 8;

/** Codec for struct kvm_irq_level. */
export const KVM_IRQ_LEVEL = defineStruct<KvmIrqLevel>('struct kvm_irq_level', KVM_IRQ_LEVEL_SIZE, {
  irq: { offset: 0, type: 'u32' },
  level: { offset: 4, type: 'u32' },
});

/** struct kvm_dirty_log (KVM_GET_DIRTY_LOG). */
export interface KvmDirtyLog {
  slot: number;
  /** Native address of a bitmap with one bit per page of the slot. */
  dirtyBitmap: bigint;
}

export const KVM_DIRTY_LOG_SIZE = 16;

/** Codec for struct kvm_dirty_log. */
export const KVM_DIRTY_LOG = defineStruct<KvmDirtyLog>('struct kvm_dirty_log', KVM_DIRTY_LOG_SIZE, {
  slot: { offset: 0, type: 'u32' },
  dirtyBitmap: { offset: 8, type: 'u64' },
});

/** struct kvm_enable_cap (KVM_ENABLE_CAP on a VM or vCPU fd). */
export interface KvmEnableCap {
  cap: number;
  flags: number;
  /** Exactly four arguments. */
  args: bigint[];
}

export const KVM_ENABLE_CAP_SIZE = 104;

/** Codec for struct kvm_enable_cap. */
export const KVM_ENABLE_CAP_STRUCT = defineStruct<KvmEnableCap>(
  'struct kvm_enable_cap',
  KVM_ENABLE_CAP_SIZE,
  {
    cap: { offset: 0, type: 'u32' },
    flags: { offset: 4, type: 'u32' },
    args: { offset: 8, type: 'u64[]', count: 4 },
  },
);
