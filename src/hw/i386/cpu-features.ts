/**
 * Named CPUID feature flags, as QEMU's `-cpu host,+NAME,-NAME,NAME=on|off`
 * spells them (mostly Linux's /proc/cpuinfo names), and how a list of them
 * is applied to the CPUID table of every vCPU.
 *
 * Names are matched as QEMU matches them: case-insensitively, with '_' and
 * '.' taken as '-' (sse4.1, sse4_1 and sse4-1 are one flag).
 */
import type { KvmCpuidEntry2 } from '../../accel/kvm/structs/cpuid.js';
import { TsvmmError } from '../../util/errors.js';

/** A register of one CPUID leaf (and subleaf). */
type Reg = 'eax' | 'ebx' | 'ecx' | 'edx';

/** Where a named feature lives: one or more bits of one leaf's register. */
export interface CpuFeatureBits {
  leaf: number;
  subleaf: number;
  reg: Reg;
  /** The bits the name stands for (kvmclock is two). */
  mask: number;
}

/** Feature words: leaf, subleaf, register, and the name of each bit. */
const WORDS: readonly { leaf: number; subleaf: number; reg: Reg; bits: Record<number, string> }[] =
  [
    {
      leaf: 1,
      subleaf: 0,
      reg: 'edx',
      bits: {
        0: 'fpu',
        1: 'vme',
        2: 'de',
        3: 'pse',
        4: 'tsc',
        5: 'msr',
        6: 'pae',
        7: 'mce',
        8: 'cx8',
        9: 'apic',
        11: 'sep',
        12: 'mtrr',
        13: 'pge',
        14: 'mca',
        15: 'cmov',
        16: 'pat',
        17: 'pse36',
        18: 'pn',
        19: 'clflush',
        21: 'ds',
        22: 'acpi',
        23: 'mmx',
        24: 'fxsr',
        25: 'sse',
        26: 'sse2',
        27: 'ss',
        28: 'ht',
        29: 'tm',
        30: 'ia64',
        31: 'pbe',
      },
    },
    {
      leaf: 1,
      subleaf: 0,
      reg: 'ecx',
      bits: {
        0: 'pni',
        1: 'pclmulqdq',
        2: 'dtes64',
        3: 'monitor',
        4: 'ds-cpl',
        5: 'vmx',
        6: 'smx',
        7: 'est',
        8: 'tm2',
        9: 'ssse3',
        10: 'cid',
        12: 'fma',
        13: 'cx16',
        14: 'xtpr',
        15: 'pdcm',
        17: 'pcid',
        18: 'dca',
        19: 'sse4-1',
        20: 'sse4-2',
        21: 'x2apic',
        22: 'movbe',
        23: 'popcnt',
        24: 'tsc-deadline',
        25: 'aes',
        26: 'xsave',
        27: 'osxsave',
        28: 'avx',
        29: 'f16c',
        30: 'rdrand',
        31: 'hypervisor',
      },
    },
    { leaf: 6, subleaf: 0, reg: 'eax', bits: { 2: 'arat' } },
    {
      leaf: 7,
      subleaf: 0,
      reg: 'ebx',
      bits: {
        0: 'fsgsbase',
        1: 'tsc-adjust',
        2: 'sgx',
        3: 'bmi1',
        4: 'hle',
        5: 'avx2',
        7: 'smep',
        8: 'bmi2',
        9: 'erms',
        10: 'invpcid',
        11: 'rtm',
        14: 'mpx',
        16: 'avx512f',
        17: 'avx512dq',
        18: 'rdseed',
        19: 'adx',
        20: 'smap',
        21: 'avx512ifma',
        23: 'clflushopt',
        24: 'clwb',
        25: 'intel-pt',
        26: 'avx512pf',
        27: 'avx512er',
        28: 'avx512cd',
        29: 'sha-ni',
        30: 'avx512bw',
        31: 'avx512vl',
      },
    },
    {
      leaf: 7,
      subleaf: 0,
      reg: 'ecx',
      bits: {
        1: 'avx512vbmi',
        2: 'umip',
        3: 'pku',
        5: 'waitpkg',
        6: 'avx512vbmi2',
        8: 'gfni',
        9: 'vaes',
        10: 'vpclmulqdq',
        11: 'avx512vnni',
        12: 'avx512bitalg',
        14: 'avx512-vpopcntdq',
        16: 'la57',
        22: 'rdpid',
        24: 'bus-lock-detect',
        25: 'cldemote',
        27: 'movdiri',
        28: 'movdir64b',
      },
    },
    {
      leaf: 7,
      subleaf: 0,
      reg: 'edx',
      bits: {
        2: 'avx512-4vnniw',
        3: 'avx512-4fmaps',
        4: 'fsrm',
        8: 'avx512-vp2intersect',
        10: 'md-clear',
        14: 'serialize',
        16: 'tsx-ldtrk',
        22: 'amx-bf16',
        23: 'avx512-fp16',
        24: 'amx-tile',
        25: 'amx-int8',
        26: 'spec-ctrl',
        27: 'stibp',
        28: 'flush-l1d',
        29: 'arch-capabilities',
        30: 'core-capability',
        31: 'ssbd',
      },
    },
    {
      leaf: 0xd,
      subleaf: 1,
      reg: 'eax',
      bits: { 0: 'xsaveopt', 1: 'xsavec', 2: 'xgetbv1', 3: 'xsaves' },
    },
    {
      leaf: 0x40000001,
      subleaf: 0,
      reg: 'eax',
      bits: {
        1: 'kvm-nopiodelay',
        4: 'kvm-asyncpf',
        5: 'kvm-steal-time',
        6: 'kvm-pv-eoi',
        7: 'kvm-pv-unhalt',
        9: 'kvm-pv-tlb-flush',
        10: 'kvm-asyncpf-vmexit',
        11: 'kvm-pv-ipi',
        12: 'kvm-poll-control',
        13: 'kvm-pv-sched-yield',
        14: 'kvm-asyncpf-int',
        24: 'kvmclock-stable-bit',
      },
    },
    {
      leaf: 0x80000001,
      subleaf: 0,
      reg: 'edx',
      bits: {
        11: 'syscall',
        20: 'nx',
        22: 'mmxext',
        25: 'fxsr-opt',
        26: 'pdpe1gb',
        27: 'rdtscp',
        29: 'lm',
        30: '3dnowext',
        31: '3dnow',
      },
    },
    {
      leaf: 0x80000001,
      subleaf: 0,
      reg: 'ecx',
      bits: {
        0: 'lahf-lm',
        1: 'cmp-legacy',
        2: 'svm',
        3: 'extapic',
        4: 'cr8legacy',
        5: 'abm',
        6: 'sse4a',
        7: 'misalignsse',
        8: '3dnowprefetch',
        9: 'osvw',
        10: 'ibs',
        11: 'xop',
        12: 'skinit',
        13: 'wdt',
        15: 'lwp',
        16: 'fma4',
        17: 'tce',
        19: 'nodeid-msr',
        21: 'tbm',
        22: 'topoext',
        23: 'perfctr-core',
        24: 'perfctr-nb',
      },
    },
    { leaf: 0x80000007, subleaf: 0, reg: 'edx', bits: { 8: 'invtsc' } },
    {
      leaf: 0x80000008,
      subleaf: 0,
      reg: 'ebx',
      bits: {
        0: 'clzero',
        9: 'wbnoinvd',
        12: 'ibpb',
        14: 'ibrs',
        15: 'amd-stibp',
        24: 'amd-ssbd',
        25: 'virt-ssbd',
        26: 'amd-no-ssb',
      },
    },
  ];

/** Other spellings QEMU accepts for the same flag. */
const ALIASES: Record<string, string> = {
  sse3: 'pni',
  pclmuldq: 'pclmulqdq',
  xd: 'nx',
  ffxsr: 'fxsr-opt',
  i64: 'lm',
  sha: 'sha-ni',
};

/** Every flag: name -> bits. kvmclock stands for both kvm-clock MSR sets (bits 0 and 3). */
export const CPU_FEATURES: ReadonlyMap<string, CpuFeatureBits> = (() => {
  const map = new Map<string, CpuFeatureBits>();
  for (const w of WORDS) {
    for (const [bit, name] of Object.entries(w.bits)) {
      map.set(name, {
        leaf: w.leaf,
        subleaf: w.subleaf,
        reg: w.reg,
        mask: (1 << Number(bit)) >>> 0,
      });
    }
  }
  map.set('kvmclock', { leaf: 0x40000001, subleaf: 0, reg: 'eax', mask: (1 << 0) | (1 << 3) });
  return map;
})();

/** A flag's canonical name, as QEMU normalizes it: lower case, '_' and '.' as '-'. */
export function canonicalFeatureName(name: string): string {
  const n = name.toLowerCase().replace(/[_.]/g, '-');
  return ALIASES[n] ?? n;
}

/** One flag switched on or off. */
export interface CpuFeatureSetting {
  /** The canonical name (a key of CPU_FEATURES). */
  name: string;
  on: boolean;
}

/** A flag name tsvmm does not know. */
export class CpuFeatureError extends TsvmmError {}

/** The known flag closest to `name` (by edit distance), if any is close enough to be a typo. */
export function closestFeatureName(name: string): string | undefined {
  const wanted = canonicalFeatureName(name);
  let best: string | undefined;
  let bestDistance = Number.POSITIVE_INFINITY;
  for (const known of CPU_FEATURES.keys()) {
    const d = editDistance(wanted, known);
    if (d < bestDistance) {
      best = known;
      bestDistance = d;
    }
  }
  return bestDistance <= Math.max(2, Math.floor(wanted.length / 3)) ? best : undefined;
}

/**
 * The canonical name of flag `name`; throws CpuFeatureError (code
 * CPU_FEATURE_UNKNOWN) naming it, with the closest known name.
 */
export function lookupFeature(name: string): string {
  const canonical = canonicalFeatureName(name);
  if (CPU_FEATURES.has(canonical)) return canonical;
  const near = closestFeatureName(name);
  throw new CpuFeatureError(
    'CPU_FEATURE_UNKNOWN',
    `CPU feature '${name}' is unknown${near ? `; did you mean '${near}'?` : ''} (-cpu help lists them)`,
  );
}

/**
 * Applies `settings` in order (a later one wins) to one vCPU's CPUID
 * entries, in place. A flag switched off is cleared; one switched on must
 * be in `supported` (what KVM offers), else CpuFeatureError
 * CPU_FEATURE_UNSUPPORTED, before anything is changed.
 */
export function applyCpuFeatures(
  entries: KvmCpuidEntry2[],
  settings: readonly CpuFeatureSetting[],
  supported: (bits: CpuFeatureBits) => boolean,
): void {
  const final = finalSettings(settings);
  for (const [name, on] of final) {
    const bits = CPU_FEATURES.get(name)!;
    if (on && !supported(bits)) {
      throw new CpuFeatureError(
        'CPU_FEATURE_UNSUPPORTED',
        `CPU feature '${name}' was asked for (-cpu host,+${name}) but this host's KVM cannot offer it; remove it`,
      );
    }
  }
  for (const [name, on] of final) {
    const bits = CPU_FEATURES.get(name)!;
    const entry = entries.find((e) => e.function === bits.leaf && e.index === bits.subleaf);
    if (!entry) continue; // the leaf is absent: the flag is already off
    entry[bits.reg] = (on ? entry[bits.reg] | bits.mask : entry[bits.reg] & ~bits.mask) >>> 0;
  }
}

/** Each flag's canonical name and its last setting (a later one wins); throws on an unknown name. */
function finalSettings(settings: readonly CpuFeatureSetting[]): Map<string, boolean> {
  const final = new Map<string, boolean>();
  for (const s of settings) final.set(lookupFeature(s.name), s.on);
  return final;
}

/** Whether `entries` have every bit of `bits` set (false where the leaf is absent). */
export function hasFeatureBits(entries: readonly KvmCpuidEntry2[], bits: CpuFeatureBits): boolean {
  const e = entries.find((x) => x.function === bits.leaf && x.index === bits.subleaf);
  return e !== undefined && (e[bits.reg] & bits.mask) >>> 0 === bits.mask;
}

/**
 * The flags `settings` switch off (the last setting of each wins) that
 * `supported` (KVM_GET_SUPPORTED_CPUID) does not list. On ordinary KVM
 * hiding one of them changes nothing, as KVM never offered it. On
 * PVM-backed KVM it matters: measured on our PVM hosts, the guest reads
 * the host CPU's own value of every bit KVM does not list (xsave, popcnt,
 * avx2, pcid...), and only the few it lists (cx16, x2apic, tsc-deadline,
 * hypervisor) follow the CPUID tsvmm sets, so hiding the others silently
 * does nothing there.
 */
export function hiddenFlagsKvmDoesNotList(
  settings: readonly CpuFeatureSetting[],
  supported: readonly KvmCpuidEntry2[],
): string[] {
  const out: string[] = [];
  for (const [name, on] of finalSettings(settings)) {
    if (!on && !hasFeatureBits(supported, CPU_FEATURES.get(name)!)) out.push(name);
  }
  return out;
}

/** The `-cpu help` text: the one model and every flag. */
export function cpuHelpText(): string {
  const names = [...CPU_FEATURES.keys()].sort();
  const lines: string[] = [];
  let line = ' ';
  for (const n of names) {
    if (line.length + n.length + 1 > 78) {
      lines.push(line);
      line = ' ';
    }
    line += ` ${n}`;
  }
  lines.push(line);
  return [
    'Available CPUs:',
    'x86 host    the host CPU as KVM offers it, with the hypervisor and KVM paravirtual leaves',
    '',
    'Feature flags change CPUID for every vCPU: -cpu host,-NAME or NAME=off hides a',
    'flag, +NAME or NAME=on asks for one KVM offers (later settings win), e.g.',
    '  -cpu host,-cx16,-xsave',
    '',
    "On PVM-backed KVM (kvm_pvm) the guest reads the host CPU's own value of every",
    'flag KVM does not report; only those it reports (there: cx16, x2apic,',
    'tsc-deadline, hypervisor) can be hidden, and tsvmm warns about the others.',
    'tsvmm applies no flags of its own there: no set of them lets a stock Linux',
    'kernel boot on PVM (see the README).',
    '',
    'Recognized CPUID flags:',
    ...lines,
    '',
  ].join('\n');
}

/** Edit distance counting a swap of two neighbours as one edit (typos like cx61 for cx16). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)),
  );
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let best = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        best = Math.min(best, d[i - 2]![j - 2]! + 1);
      }
      d[i]![j] = best;
    }
  }
  return d[a.length]![b.length]!;
}
