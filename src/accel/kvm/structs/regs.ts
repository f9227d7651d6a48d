/**
 * General-purpose, segment, control and debug registers of an x86 vCPU:
 * kvm_regs, kvm_sregs (with kvm_segment and kvm_dtable) and kvm_debugregs.
 */
import { defineStruct } from './layout.js';

/** struct kvm_regs (KVM_GET_REGS / KVM_SET_REGS). */
export interface KvmRegs {
  rax: bigint;
  rbx: bigint;
  rcx: bigint;
  rdx: bigint;
  rsi: bigint;
  rdi: bigint;
  rsp: bigint;
  rbp: bigint;
  r8: bigint;
  r9: bigint;
  r10: bigint;
  r11: bigint;
  r12: bigint;
  r13: bigint;
  r14: bigint;
  r15: bigint;
  rip: bigint;
  rflags: bigint;
}

export const KVM_REGS_SIZE = 144;

/** Codec for struct kvm_regs: eighteen u64 in declaration order. */
export const KVM_REGS = defineStruct<KvmRegs>('struct kvm_regs', KVM_REGS_SIZE, {
  rax: { offset: 0, type: 'u64' },
  rbx: { offset: 8, type: 'u64' },
  rcx: { offset: 16, type: 'u64' },
  rdx: { offset: 24, type: 'u64' },
  rsi: { offset: 32, type: 'u64' },
  rdi: { offset: 40, type: 'u64' },
  rsp: { offset: 48, type: 'u64' },
  rbp: { offset: 56, type: 'u64' },
  r8: { offset: 64, type: 'u64' },
  r9: { offset: 72, type: 'u64' },
  r10: { offset: 80, type: 'u64' },
  r11: { offset: 88, type: 'u64' },
  r12: { offset: 96, type: 'u64' },
  r13: { offset: 104, type: 'u64' },
  r14: { offset: 112, type: 'u64' },
  r15: { offset: 120, type: 'u64' },
  rip: { offset: 128, type: 'u64' },
  rflags: { offset: 136, type: 'u64' },
});

/** struct kvm_segment: one segment register with its hidden descriptor part. */
export interface KvmSegment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

export const KVM_SEGMENT_SIZE = 24;

/** Codec for struct kvm_segment. */
export const KVM_SEGMENT = defineStruct<KvmSegment>('struct kvm_segment', KVM_SEGMENT_SIZE, {
  base: { offset: 0, type: 'u64' },
  limit: { offset: 8, type: 'u32' },
  selector: { offset: 12, type: 'u16' },
  type: { offset: 14, type: 'u8' },
  present: { offset: 15, type: 'u8' },
  dpl: { offset: 16, type: 'u8' },
  db: { offset: 17, type: 'u8' },
  s: { offset: 18, type: 'u8' },
  l: { offset: 19, type: 'u8' },
  g: { offset: 20, type: 'u8' },
  avl: { offset: 21, type: 'u8' },
  unusable: { offset: 22, type: 'u8' },
});

/** struct kvm_dtable: a descriptor table register (GDTR, IDTR). */
export interface KvmDtable {
  base: bigint;
  limit: number;
}

export const KVM_DTABLE_SIZE = 16;

/** Codec for struct kvm_dtable. */
export const KVM_DTABLE = defineStruct<KvmDtable>('struct kvm_dtable', KVM_DTABLE_SIZE, {
  base: { offset: 0, type: 'u64' },
  limit: { offset: 8, type: 'u16' },
});

/** struct kvm_sregs (KVM_GET_SREGS / KVM_SET_SREGS). */
export interface KvmSregs {
  cs: KvmSegment;
  ds: KvmSegment;
  es: KvmSegment;
  fs: KvmSegment;
  gs: KvmSegment;
  ss: KvmSegment;
  tr: KvmSegment;
  ldt: KvmSegment;
  gdt: KvmDtable;
  idt: KvmDtable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  /** 256 bits, one per interrupt vector pending injection. */
  interruptBitmap: bigint[];
}

export const KVM_SREGS_SIZE = 312;

const seg = (offset: number) => ({ offset, type: 'struct' as const, codec: KVM_SEGMENT });

/** Codec for struct kvm_sregs. */
export const KVM_SREGS = defineStruct<KvmSregs>('struct kvm_sregs', KVM_SREGS_SIZE, {
  cs: seg(0),
  ds: seg(24),
  es: seg(48),
  fs: seg(72),
  gs: seg(96),
  ss: seg(120),
  tr: seg(144),
  ldt: seg(168),
  gdt: { offset: 192, type: 'struct', codec: KVM_DTABLE },
  idt: { offset: 208, type: 'struct', codec: KVM_DTABLE },
  cr0: { offset: 224, type: 'u64' },
  cr2: { offset: 232, type: 'u64' },
  cr3: { offset: 240, type: 'u64' },
  cr4: { offset: 248, type: 'u64' },
  cr8: { offset: 256, type: 'u64' },
  efer: { offset: 264, type: 'u64' },
  apicBase: { offset: 272, type: 'u64' },
  interruptBitmap: { offset: 280, type: 'u64[]', count: 4 },
});

/** struct kvm_debugregs (KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS). */
export interface KvmDebugregs {
  /** DR0..DR3. */
  db: bigint[];
  dr6: bigint;
  dr7: bigint;
  flags: bigint;
}

export const KVM_DEBUGREGS_SIZE = 128;

/** Codec for struct kvm_debugregs. */
export const KVM_DEBUGREGS = defineStruct<KvmDebugregs>(
  'struct kvm_debugregs',
  KVM_DEBUGREGS_SIZE,
  {
    db: { offset: 0, type: 'u64[]', count: 4 },
    dr6: { offset: 32, type: 'u64' },
    dr7: { offset: 40, type: 'u64' },
    flags: { offset: 48, type: 'u64' },
  },
);
