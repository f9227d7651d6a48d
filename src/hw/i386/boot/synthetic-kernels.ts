/**
 * Kernel images built byte by byte, for the loader's tests: a bzImage with
 * a real setup header and an ELF64 executable. Every field the loader
 * reads can be set, so each refusal can be provoked on its own.
 */

/** Fields of a synthetic bzImage; each defaults to what Debian's 6.1 kernel has. */
export interface BzImageSpec {
  version?: number;
  /** The raw setup_sects byte (0 means 4). */
  setupSects?: number;
  loadflags?: number;
  xloadflags?: number;
  relocatable?: boolean;
  kernelAlignment?: number;
  prefAddress?: number;
  initSize?: number;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  /** Size of the protected-mode kernel. */
  protectedModeSize?: number;
  payloadOffset?: number;
  payloadLength?: number;
  kernelVersion?: string;
  /** Cut the file to this many bytes. */
  truncateTo?: number;
  bootFlag?: number;
}

/** A bzImage whose protected-mode bytes are a recognisable pattern (byte i = i & 0xff). */
export function syntheticBzImage(spec: BzImageSpec = {}): Uint8Array {
  const rawSects = spec.setupSects ?? 4;
  const setupSize = ((rawSects === 0 ? 4 : rawSects) + 1) * 512;
  const pmSize = spec.protectedModeSize ?? 0x4000;
  const file = new Uint8Array(setupSize + pmSize);
  const view = new DataView(file.buffer);
  view.setUint8(0x1f1, rawSects);
  view.setUint32(0x1f4, Math.ceil(pmSize / 16), true);
  view.setUint16(0x1fa, 0xfffe, true); // anything but 0xffff, to see the loader set it
  view.setUint16(0x1fe, spec.bootFlag ?? 0xaa55, true);
  view.setUint8(0x200, 0xeb);
  view.setUint8(0x201, 0x6a); // header ends at 0x26c, as in 2.15 kernels
  file.set(Buffer.from('HdrS', 'latin1'), 0x202);
  view.setUint16(0x206, spec.version ?? 0x020f, true);
  if (spec.kernelVersion !== undefined) {
    view.setUint16(0x20e, 0x300 - 0x200, true);
    file.set(Buffer.from(`${spec.kernelVersion}\0`, 'latin1'), 0x300);
  }
  view.setUint8(0x211, spec.loadflags ?? 0x01);
  view.setUint32(0x214, 0x100000, true);
  view.setUint32(0x22c, spec.initrdAddrMax ?? 0x7fffffff, true);
  view.setUint32(0x230, spec.kernelAlignment ?? 0x200000, true);
  view.setUint8(0x234, (spec.relocatable ?? true) ? 1 : 0);
  view.setUint8(0x235, 21);
  view.setUint16(0x236, spec.xloadflags ?? 0x7f, true);
  view.setUint32(0x238, spec.cmdlineSize ?? 2047, true);
  const payloadOffset = spec.payloadOffset ?? 0x300;
  const payloadLength = spec.payloadLength ?? pmSize - payloadOffset - 0x100;
  view.setUint32(0x248, payloadOffset, true);
  view.setUint32(0x24c, payloadLength, true);
  view.setBigUint64(0x258, BigInt(spec.prefAddress ?? 0x1000000), true);
  view.setUint32(0x260, spec.initSize ?? 0x3378000, true);
  for (let i = 0; i < pmSize; i++) file[setupSize + i] = i & 0xff;
  if (payloadLength > 0 && payloadOffset + 1 < pmSize) {
    file[setupSize + payloadOffset] = 0x28; // zstd magic
    file[setupSize + payloadOffset + 1] = 0xb5;
  }
  return spec.truncateTo === undefined ? file : file.slice(0, spec.truncateTo);
}

/** One program header of a synthetic ELF. */
export interface ElfSegmentSpec {
  /** PT_LOAD (1) unless given. */
  type?: number;
  paddr: number;
  /** Defaults to paddr. */
  vaddr?: bigint;
  data: Uint8Array;
  /** Defaults to data's length. */
  memsz?: number;
}

/** Header fields of a synthetic ELF64. */
export interface ElfSpec {
  segments: ElfSegmentSpec[];
  entry: bigint;
  elfClass?: number;
  machine?: number;
  type?: number;
  truncateTo?: number;
}

/** An ELF64 little-endian executable with the given segments, data after the headers. */
export function syntheticElf(spec: ElfSpec): Uint8Array {
  const phoff = 64;
  let dataAt = phoff + spec.segments.length * 56;
  const offsets = spec.segments.map((s) => {
    const at = dataAt;
    dataAt += (s.data.byteLength + 15) & ~15;
    return at;
  });
  const file = new Uint8Array(dataAt);
  const view = new DataView(file.buffer);
  file.set([0x7f, 0x45, 0x4c, 0x46, spec.elfClass ?? 2, 1, 1, 0], 0);
  view.setUint16(16, spec.type ?? 2, true);
  view.setUint16(18, spec.machine ?? 62, true);
  view.setUint32(20, 1, true);
  view.setBigUint64(24, spec.entry, true);
  view.setBigUint64(32, BigInt(phoff), true);
  view.setUint16(52, 64, true);
  view.setUint16(54, 56, true);
  view.setUint16(56, spec.segments.length, true);
  spec.segments.forEach((s, i) => {
    const at = phoff + i * 56;
    view.setUint32(at, s.type ?? 1, true);
    view.setUint32(at + 4, 7, true);
    view.setBigUint64(at + 8, BigInt(offsets[i]!), true);
    view.setBigUint64(at + 16, s.vaddr ?? BigInt(s.paddr), true);
    view.setBigUint64(at + 24, BigInt(s.paddr), true);
    view.setBigUint64(at + 32, BigInt(s.data.byteLength), true);
    view.setBigUint64(at + 40, BigInt(s.memsz ?? s.data.byteLength), true);
    view.setBigUint64(at + 48, 0x1000n, true);
    file.set(s.data, offsets[i]!);
  });
  return spec.truncateTo === undefined ? file : file.slice(0, spec.truncateTo);
}

/** An ELF note area holding one Xen PHYS32_ENTRY note with a 64-bit descriptor. */
export function pvhNote(entry: number): Uint8Array {
  const note = new Uint8Array(12 + 4 + 8);
  const view = new DataView(note.buffer);
  view.setUint32(0, 4, true);
  view.setUint32(4, 8, true);
  view.setUint32(8, 18, true);
  note.set(Buffer.from('Xen\0', 'latin1'), 12);
  view.setBigUint64(16, BigInt(entry), true);
  return note;
}
