import { crc32 } from './crc32.js';
import { MigrationStreamError } from './errors.js';
import {
  applyMappedRam,
  loadMappedRamSection,
  MAPPED_RAM_CAPABILITY,
  type MappedRamBlockEntry,
  type MapRamFromFile,
  saveMappedRam,
} from './mapped-ram.js';
import { type ByteSink, type ByteSource, StreamReader, StreamWriter } from './qemu-file.js';
import {
  checkRamShape,
  isZeroPageAt,
  isZeroRun,
  loadRamSection,
  PAGE_SIZE,
  RAM_SECTION_VERSION,
  type RamAccessor,
  type RamBlock,
  type RamBlockEntry,
  RamCommitter,
  type RamCounters,
  type RamPageSelection,
  RamPageWriter,
  RamStage,
  ramTotal,
  saveRamEos,
  saveRamSetup,
  validateRam,
} from './ram.js';
import {
  applyVMState,
  describeVMState,
  loadVMState,
  QEMU_VM_SUBSECTION,
  type StagedVMState,
  saveVMState,
  type VMDescState,
  type VMStateDescription,
  validateVMState,
  vmsField,
} from './vmstate.js';

/** Framing constants from QEMU's migration/savevm.c. */
export const QEMU_VM_FILE_MAGIC = 0x5145564d;
export const QEMU_VM_FILE_VERSION = 3;
export const QEMU_VM_EOF = 0x00;
export const QEMU_VM_SECTION_START = 0x01;
export const QEMU_VM_SECTION_PART = 0x02;
export const QEMU_VM_SECTION_END = 0x03;
export const QEMU_VM_SECTION_FULL = 0x04;
export const QEMU_VM_VMDESCRIPTION = 0x06;
export const QEMU_VM_CONFIGURATION = 0x07;
export const QEMU_VM_SECTION_FOOTER = 0x7e;

/** The section ids tsvmm adds, described in the vmdesc JSON like any device. */
export const MACHINE_IDSTR = 'tsvmm-machine';
export const INTEGRITY_IDSTR = 'tsvmm-integrity';
export const STREAM_END_IDSTR = 'tsvmm-stream-end';

/**
 * A device's migration state: the section idstr and instance id it is saved
 * under (QEMU's SaveStateEntry; "cpu" with instance = vCPU index, say), its
 * description and the object the description's getters and setters use.
 */
export interface DeviceSection<S = unknown> {
  readonly idstr: string;
  readonly instanceId: number;
  readonly vmsd: VMStateDescription<S>;
  readonly state: S;
}

/** What both ends must agree on before RAM or devices are exchanged. */
export interface MachineShape {
  /** QEMU's machine type name, sent in the configuration section. */
  readonly machineType: string;
  readonly vcpus: number;
  readonly ram: RamAccessor;
  readonly devices: readonly DeviceSection[];
}

/** The vmdesc JSON written after QEMU_VM_EOF, which analyze-migration.py reads. */
export interface VMDesc {
  configuration: VMDescState;
  page_size: number;
  devices: (VMDescState & { name: string; instance_id: number })[];
}

/** Byte and page counts of a save or load, for query-migrate. */
export interface StreamStats extends RamCounters {
  /** Bytes of the stream so far. */
  bytes: number;
}

// ---------------------------------------------------- tsvmm's own sections

interface MachineRecord {
  cpus: number;
  ramSize: bigint;
  ramBlocks: number;
  pageSize: number;
}

const machineVmsd: VMStateDescription<MachineRecord> = {
  name: MACHINE_IDSTR,
  version: 1,
  fields: [
    vmsField.uint32(
      'cpus',
      (s: MachineRecord) => s.cpus,
      (s, v) => {
        s.cpus = v;
      },
    ),
    vmsField.uint64(
      'ram_size',
      (s: MachineRecord) => s.ramSize,
      (s, v) => {
        s.ramSize = v;
      },
    ),
    vmsField.uint32(
      'ram_blocks',
      (s: MachineRecord) => s.ramBlocks,
      (s, v) => {
        s.ramBlocks = v;
      },
    ),
    vmsField.uint32(
      'page_size',
      (s: MachineRecord) => s.pageSize,
      (s, v) => {
        s.pageSize = v;
      },
    ),
  ],
};

interface IntegrityRecord {
  sectionId: number;
  offset: bigint;
  crc: number;
}

/**
 * After every other section: the id of the section just ended and the
 * CRC-32 of every stream byte before this record. Verifying it proves that
 * section and all before it; the loader commits a section only then.
 */
const integrityVmsd: VMStateDescription<IntegrityRecord> = {
  name: INTEGRITY_IDSTR,
  version: 1,
  fields: [
    vmsField.uint32(
      'section_id',
      (s: IntegrityRecord) => s.sectionId,
      (s, v) => {
        s.sectionId = v;
      },
    ),
    vmsField.uint64(
      'stream_offset',
      (s: IntegrityRecord) => s.offset,
      (s, v) => {
        s.offset = v;
      },
    ),
    vmsField.uint32(
      'stream_crc32',
      (s: IntegrityRecord) => s.crc,
      (s, v) => {
        s.crc = v;
      },
    ),
  ],
};

interface StreamEndRecord {
  offset: bigint;
  crc: number;
  sections: number;
  vmdescLength: number;
  vmdescCrc: number;
}

/**
 * The last section: the whole-stream CRC-32 up to here, the number of
 * sections, and the length and CRC-32 of the vmdesc JSON that follows EOF.
 */
const streamEndVmsd: VMStateDescription<StreamEndRecord> = {
  name: STREAM_END_IDSTR,
  version: 1,
  fields: [
    vmsField.uint64(
      'stream_offset',
      (s: StreamEndRecord) => s.offset,
      (s, v) => {
        s.offset = v;
      },
    ),
    vmsField.uint32(
      'stream_crc32',
      (s: StreamEndRecord) => s.crc,
      (s, v) => {
        s.crc = v;
      },
    ),
    vmsField.uint32(
      'sections',
      (s: StreamEndRecord) => s.sections,
      (s, v) => {
        s.sections = v;
      },
    ),
    vmsField.uint32(
      'vmdesc_length',
      (s: StreamEndRecord) => s.vmdescLength,
      (s, v) => {
        s.vmdescLength = v;
      },
    ),
    vmsField.uint32(
      'vmdesc_crc32',
      (s: StreamEndRecord) => s.vmdescCrc,
      (s, v) => {
        s.vmdescCrc = v;
      },
    ),
  ],
};

const RESERVED = new Set(['ram', MACHINE_IDSTR, INTEGRITY_IDSTR, STREAM_END_IDSTR]);

function validateShape(shape: MachineShape): void {
  validateRam(shape.ram);
  if (!Number.isInteger(shape.vcpus) || shape.vcpus < 1) {
    throw new RangeError(`vcpus must be a positive integer, not ${shape.vcpus}`);
  }
  const keys = new Set<string>();
  for (const d of shape.devices) {
    if (RESERVED.has(d.idstr)) throw new RangeError(`section idstr '${d.idstr}' is reserved`);
    if (!d.idstr || Buffer.byteLength(d.idstr) > 255) {
      throw new RangeError(`section idstr '${d.idstr}' must be 1 to 255 bytes long`);
    }
    const key = `${d.idstr}#${d.instanceId}`;
    if (keys.has(key)) throw new RangeError(`device '${d.idstr}' instance ${d.instanceId} twice`);
    keys.add(key);
    validateVMState(d.vmsd);
  }
}

/** QEMU's subsection of the configuration that lists the capabilities both ends must agree on. */
export const CAPABILITIES_SUBSECTION = 'configuration/capabilities';

function configurationDesc(machineType: string, capabilities: readonly string[]): VMDescState {
  const desc: VMDescState = {
    vmsd_name: 'configuration',
    version: 1,
    fields: [
      { name: 'len', type: 'uint32', size: 4 },
      { name: 'name', type: 'buffer', size: Buffer.byteLength(machineType) },
    ],
  };
  if (capabilities.length > 0) {
    desc.subsections = [
      {
        vmsd_name: CAPABILITIES_SUBSECTION,
        version: 1,
        fields: [
          { name: 'caps_count', type: 'uint32', size: 4 },
          {
            name: 'capabilities',
            type: 'capability',
            size: 4,
            ...(capabilities.length > 1 ? { array_len: capabilities.length } : {}),
          },
        ],
      },
    ];
  }
  return desc;
}

/**
 * The vmdesc bytes: analyze-migration.py finds the JSON by looking for the
 * last NUL byte and then the first '{' after it, so the be32 length before
 * the JSON must not hold a '{' after its last zero byte. Trailing spaces
 * (valid JSON) change the length until it does not.
 */
export function encodeVmdesc(json: VMDesc): Buffer {
  let text = JSON.stringify(json);
  for (;;) {
    const len = Buffer.byteLength(text);
    const lenBytes = [len >>> 24, (len >>> 16) & 0xff, (len >>> 8) & 0xff, len & 0xff];
    const lastZero = lenBytes.lastIndexOf(0);
    if (!lenBytes.slice(lastZero + 1).includes(0x7b)) return Buffer.from(text, 'utf8');
    text += ' ';
  }
}

// ------------------------------------------------------------------ saving

/** A device's section body (its saveVMState bytes) and vmdesc entry, as {@link encodeDeviceSection} gives them. */
export interface EncodedDeviceSection {
  readonly idstr: string;
  readonly instanceId: number;
  readonly version: number;
  readonly body: Uint8Array;
  readonly desc: VMDescState;
}

/** The chunk size of {@link encodeDeviceSection}'s writer. */
const DEVICE_CHUNK_BYTES = 16 * 1024;

/**
 * Encodes `d`'s section once and drops the bytes, before a save stops the
 * VM: the encode that the stopped VM waits for then runs compiled code.
 * In a fresh process it ran cold (V8 compiles a function at its first call
 * and runs it in its interpreter): about 1 ms for the chip, UART and clock
 * sections on a PVM host. The preSave hook is skipped (it may read the
 * hardware: kvmclock's reads the clock). False when the state cannot be
 * encoded before its capture (a vCPU's: see MigratableDevice.prepareSave).
 */
export async function warmUpDeviceSection(d: DeviceSection): Promise<boolean> {
  try {
    await encodeDeviceSection(d, { preSave: false });
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs a completion (the RAM END section, device sections, the stream-end
 * record, EOF and the vmdesc JSON) once into a sink that drops the bytes,
 * with stand-ins for the devices (their own encoders are warmed by
 * {@link warmUpDeviceSection}), before a save stops the VM: cold, that
 * code took 1.5-2.5 ms of the downtime on a PVM host.
 */
export async function warmUpCompletion(shape: MachineShape): Promise<void> {
  const dry = new MigrationStreamWriter({
    sink: { write: () => undefined },
    machineType: shape.machineType,
    vcpus: shape.vcpus,
    ram: shape.ram,
    devices: shape.devices.map((d) => deviceStub(d.idstr, d.instanceId, d.vmsd.version)),
    resume: { offset: 0, crc: 0, sections: 0, normalPages: 0, zeroPages: 0 },
  });
  await dry.complete();
}

/** Encodes a device's state as {@link MigrationStreamWriter.complete} would write it. */
export async function encodeDeviceSection(
  d: DeviceSection,
  options: { preSave?: boolean } = {},
): Promise<EncodedDeviceSection> {
  const parts: Uint8Array[] = [];
  // A section is a few kilobytes (a vCPU's, with its XSAVE area, about
  // 7 KiB): small chunks, not the stream's 1 MiB ones (see StreamWriter).
  const w = new StreamWriter(
    { write: (b) => void parts.push(b.slice()) },
    { chunkBytes: DEVICE_CHUNK_BYTES },
  );
  const desc = saveVMState(w, d.vmsd, d.state, options);
  await w.flush();
  const body = new Uint8Array(Buffer.concat(parts));
  return { idstr: d.idstr, instanceId: d.instanceId, version: d.vmsd.version, body, desc };
}

/**
 * The stand-in of a device for a writer that writes no device section: the
 * migration thread's (their count sets the stream's section ids; the main
 * thread writes the completion) or a warm-up's.
 */
export function deviceStub(idstr: string, instanceId: number, version: number): DeviceSection {
  return { idstr, instanceId, vmsd: { name: idstr, version, fields: [] }, state: {} };
}

/**
 * Where a writer's stream stands once it has been flushed: what a writer
 * on another thread needs to go on with the same stream.
 */
export interface StreamResumePoint {
  readonly offset: number;
  readonly crc: number;
  /** Sections written so far (the stream-end record counts them). */
  readonly sections: number;
  /** Pages sent so far (query-migrate's counters go on from them). */
  readonly normalPages: number;
  readonly zeroPages: number;
}

/**
 * How many zero pages weigh one full page in a RAM section's size. A
 * section ends with a footer and an integrity record (encoded, checksummed)
 * and the loader stages it whole before its checksum is checked: per page,
 * a zero page is 9 bytes against 4 KiB and a few bytes to stage. Counted as
 * full pages, an idle 512 MiB guest took 128 sections, and their ends were
 * a third of the saver's pass; weighed, it takes 2.
 */
export const ZERO_PAGE_WEIGHT = 64;
/** Zero-page records written between two looks at the sink (about 147 KB). */
const ZERO_BATCH_PAGES = 16 * 1024;

/** Options of {@link MigrationStreamWriter}. */
export interface StreamWriterOptions extends MachineShape {
  readonly sink: ByteSink;
  /**
   * Pages per RAM section, each followed by an integrity record. Default
   * 1024 (4 MiB); zero pages count 1/ZERO_PAGE_WEIGHT of a page each.
   */
  readonly chunkPages?: number;
  /** Bytes per second; unlimited when absent or 0. */
  readonly maxBandwidth?: number;
  /**
   * The mapped-ram layout (see mapped-ram.ts): the sink must be seekable
   * (a file), RAM goes out in one pass with the guest stopped (sendRam
   * without a selection, once), and the configuration section names the
   * capability, as QEMU's does.
   */
  readonly mappedRam?: boolean;
  /**
   * Go on from where another writer's begin() left the stream on the same
   * sink ({@link MigrationStreamWriter.resumePoint}): no begin() here.
   * Not with mappedRam.
   */
  readonly resume?: StreamResumePoint;
}

/**
 * Writes a QEMU-format migration stream:
 *
 *   'QEVM' v3 | CONFIGURATION(machine type) | FULL tsvmm-machine |
 *   START ram (block list) | PART ram (pages)... | END ram |
 *   FULL <device>... | FULL tsvmm-stream-end | EOF | VMDESCRIPTION(JSON)
 *
 * with a section footer after every section and a FULL tsvmm-integrity
 * record after every section but the last. Use `begin()`, then `sendRam()`
 * once (a save) or once per precopy pass (live migration), then
 * `complete()` with the VM stopped.
 */
export class MigrationStreamWriter {
  private readonly w: StreamWriter;
  private readonly pages: RamPageWriter;
  private readonly counters: RamCounters;
  private readonly chunkPages: number;
  private readonly ramId = 1;
  private readonly integrityId: number;
  private readonly endId: number;
  private readonly descs: VMDesc['devices'] = [];
  private sections = 0;
  private phase: 'new' | 'ram' | 'done' = 'new';
  /** mapped-ram: whether the START section with every page has been written. */
  private mappedSent = false;
  /** The last answer of RamBlock.unpopulatedPages in this pass. */
  private unpopulated: { block: RamBlock; first: number; map: Uint8Array } | undefined;
  /** Blocks that could not answer unpopulatedPages: not asked again. */
  private readonly pagemapFailed = new Set<RamBlock>();

  constructor(private readonly opts: StreamWriterOptions) {
    validateShape(opts);
    if (opts.resume && opts.mappedRam) {
      throw new RangeError('a mapped-ram stream is written by one writer: no resume');
    }
    this.w = new StreamWriter(opts.sink, {
      maxBandwidth: opts.maxBandwidth,
      ...(opts.resume ? { from: { offset: opts.resume.offset, crc: opts.resume.crc } } : {}),
    });
    this.counters = {
      normalPages: opts.resume?.normalPages ?? 0,
      zeroPages: opts.resume?.zeroPages ?? 0,
    };
    if (opts.resume) {
      this.sections = opts.resume.sections;
      this.phase = 'ram';
    }
    this.pages = new RamPageWriter(this.w, this.counters);
    this.chunkPages = opts.chunkPages ?? 1024;
    if (!(Number.isInteger(this.chunkPages) && this.chunkPages > 0)) {
      throw new RangeError(`chunkPages must be a positive integer, not ${opts.chunkPages}`);
    }
    this.integrityId = 2 + opts.devices.length;
    this.endId = this.integrityId + 1;
  }

  /** Bytes and pages so far. */
  get stats(): StreamStats {
    return { bytes: this.w.offset, ...this.counters };
  }

  /** Bytes the sink has accepted so far. */
  get transferred(): number {
    return this.w.transferred;
  }

  /** Writes everything put so far to the sink (QEMU's qemu_fflush). */
  flush(): Promise<void> {
    return this.w.flush();
  }

  /**
   * Where the stream stands, for a writer that goes on with it ({@link
   * StreamWriterOptions.resume}); only after flush(), with nothing buffered.
   */
  resumePoint(): StreamResumePoint {
    const cp = this.w.checkpoint();
    if (cp.offset !== this.w.transferred) {
      throw new Error('resumePoint() needs everything written: flush() first');
    }
    return { offset: cp.offset, crc: cp.crc, sections: this.sections, ...this.counters };
  }

  /** Header, configuration, the machine record and the RAM block list. */
  async begin(): Promise<void> {
    if (this.phase !== 'new') throw new Error('begin() called twice');
    const { w, opts } = this;
    w.u32(QEMU_VM_FILE_MAGIC);
    w.u32(QEMU_VM_FILE_VERSION);
    w.u8(QEMU_VM_CONFIGURATION);
    const name = Buffer.from(opts.machineType, 'utf8');
    w.u32(name.length);
    w.bytes(name);
    if (opts.mappedRam) {
      if (!opts.sink.writeAt || !opts.sink.skip) {
        throw new RangeError('the mapped-ram layout needs a seekable sink (a file: URI)');
      }
      // QEMU's configuration/capabilities subsection: the capabilities
      // that change the format, which the destination checks against its own.
      w.u8(QEMU_VM_SUBSECTION);
      w.str8(CAPABILITIES_SUBSECTION);
      w.u32(1);
      w.u32(1);
      w.str8(MAPPED_RAM_CAPABILITY);
    }

    const machine: MachineRecord = {
      cpus: opts.vcpus,
      ramSize: BigInt(ramTotal(opts.ram)),
      ramBlocks: opts.ram.blocks.length,
      pageSize: PAGE_SIZE,
    };
    await this.fullSection(0, MACHINE_IDSTR, 0, machineVmsd, machine);

    this.phase = 'ram';
    // mapped-ram: the START section carries the pages, written in sendRam().
    if (opts.mappedRam) return;
    this.header(QEMU_VM_SECTION_START, this.ramId, 'ram', 0, RAM_SECTION_VERSION);
    saveRamSetup(w, opts.ram);
    await this.endSection(this.ramId);
  }

  /** mapped-ram: the START section with every block's header, bitmap and pages, once. */
  private async sendMappedRam(selection?: readonly RamPageSelection[]): Promise<void> {
    if (selection || this.mappedSent) {
      throw new Error(
        'the mapped-ram layout is written in one pass with the guest stopped: sendRam() once, without pages',
      );
    }
    this.mappedSent = true;
    this.header(QEMU_VM_SECTION_START, this.ramId, 'ram', 0, RAM_SECTION_VERSION);
    await saveMappedRam(this.w, this.opts.sink, this.opts.ram, this.counters);
    await this.endSection(this.ramId);
    await this.w.settleAll();
  }

  /**
   * Sends RAM pages in PART sections of at most `chunkPages` pages: every
   * page of every block when `selection` is absent, else the given pages
   * (a pass over the dirty pages). Zero pages take 9 bytes or less, and
   * count as 1/ZERO_PAGE_WEIGHT of a page toward a section's size. Pages
   * the block reports unpopulated (RamBlock.unpopulatedPages) are sent as
   * zero pages without being read; the stream is the same either way.
   */
  async sendRam(selection?: readonly RamPageSelection[]): Promise<void> {
    if (this.phase !== 'ram') throw new Error('sendRam() needs begin() first and no complete()');
    if (this.opts.mappedRam) return this.sendMappedRam(selection);
    await this.sendPages(selection);
    // A pass ends when the sink has taken all of it, its last partial
    // chunk too, as QEMU flushes at the end of each iteration: a live
    // migration times its passes, and the channel can make them durable
    // before the stop (OutgoingChannel.flush), so the stopped VM does not
    // wait for the end of the last pass to be written.
    await this.w.flush();
  }

  /** The pages of sendRam(), left in the writer's buffer at the end. */
  private async sendPages(selection?: readonly RamPageSelection[]): Promise<void> {
    let open = false;
    // The open section's size, in zero pages: a full page counts ZERO_PAGE_WEIGHT.
    let inSection = 0;
    const sectionSize = this.chunkPages * ZERO_PAGE_WEIGHT;
    const openSection = (): void => {
      if (open) return;
      this.header(QEMU_VM_SECTION_PART, this.ramId);
      this.pages.newSection();
      open = true;
    };
    // Counts `weight` into the open section: ends it once full, else lets
    // the sink take a full chunk. Not async: most calls have nothing to
    // wait for, and this runs for every page.
    const counted = (weight: number): Promise<void> | undefined => {
      inSection += weight;
      if (inSection < sectionSize) return this.w.flushIfNeeded();
      saveRamEos(this.w);
      open = false;
      inSection = 0;
      return this.endSection(this.ramId);
    };
    // Never reuse what pagemap said in an earlier pass.
    this.unpopulated = undefined;
    for (const [block, first, count] of runs(this.opts.ram, selection)) {
      const unpopulated = this.unpopulatedIn(block, first, count, !selection);
      let i = 0;
      while (i < count) {
        // A stretch [i, j) of pages known zero without reading (no data),
        // or of pages read in one view.
        let j = i + 1;
        let data: Uint8Array = NO_DATA;
        let allZero = true;
        if (unpopulated?.[i]) {
          while (j < count && unpopulated[j]) j++;
        } else {
          if (unpopulated) while (j < count && !unpopulated[j]) j++;
          else j = count;
          data = block.read((first + i) * PAGE_SIZE, (j - i) * PAGE_SIZE);
          // One memcmp finds an all-zero run (an idle guest) at once.
          allZero = isZeroRun(data);
        }
        // Zero pages, known without a read or found by one memcmp: their
        // records go out in batches, within the section's size.
        for (let k = i; allZero && k < j; ) {
          openSection();
          const n = Math.min(j - k, sectionSize - inSection, ZERO_BATCH_PAGES);
          this.pages.zeroRun(block, (first + k) * PAGE_SIZE, n);
          k += n;
          const p = counted(n);
          if (p) await p;
        }
        for (let k = allZero ? j : i; k < j; k++) {
          openSection();
          const off = (k - i) * PAGE_SIZE;
          const zero = isZeroPageAt(data, off);
          this.pages.pageAt(block, (first + k) * PAGE_SIZE, data, off, zero);
          const p = counted(zero ? 1 : ZERO_PAGE_WEIGHT);
          if (p) await p;
        }
        i = j;
      }
    }
    this.unpopulated = undefined;
    if (open) {
      saveRamEos(this.w);
      await this.endSection(this.ramId);
    }
  }

  /**
   * Which of the `count` pages from `first` the block says are zero
   * without a read (RamBlock.unpopulatedPages), or undefined to read them
   * all. A pass over all of RAM asks for PAGEMAP_AHEAD_PAGES at once and
   * keeps the answer for the runs that follow (a page populated after the
   * question was written after it, which the dirty log reports as it would
   * had the page been read); a pass over chosen (dirty, so most likely
   * populated) pages asks only for runs of PAGEMAP_MIN_RUN pages or more.
   */
  private unpopulatedIn(
    block: RamBlock,
    first: number,
    count: number,
    ahead: boolean,
  ): Uint8Array | undefined {
    if (!block.unpopulatedPages || this.pagemapFailed.has(block)) return undefined;
    const c = this.unpopulated;
    if (c && c.block === block && first >= c.first && first + count <= c.first + c.map.length) {
      return c.map.subarray(first - c.first, first - c.first + count);
    }
    if (!ahead && count < PAGEMAP_MIN_RUN) return undefined;
    const n = ahead
      ? Math.max(count, Math.min(PAGEMAP_AHEAD_PAGES, block.size / PAGE_SIZE - first))
      : count;
    const map = block.unpopulatedPages(first, n);
    if (!map || map.length !== n) {
      this.pagemapFailed.add(block);
      return undefined;
    }
    if (ahead) this.unpopulated = { block, first, map };
    return map.subarray(0, count);
  }

  /**
   * The completion (the VM must be stopped): the last RAM pages if given,
   * the RAM END section, every device's state, the stream-end record, EOF
   * and the vmdesc JSON; then everything is flushed to the sink.
   */
  async complete(selection?: readonly RamPageSelection[]): Promise<StreamStats> {
    if (this.phase !== 'ram') throw new Error('complete() needs begin() first, once');
    // The last pages go out with the rest, in one write where they fit.
    if (selection) {
      if (this.opts.mappedRam) await this.sendMappedRam(selection);
      else await this.sendPages(selection);
    }
    if (this.opts.mappedRam && !this.mappedSent) await this.sendMappedRam();
    const { w, opts } = this;
    this.header(QEMU_VM_SECTION_END, this.ramId);
    saveRamEos(w);
    await this.endSection(this.ramId);

    let id = 2;
    for (const d of opts.devices) {
      const desc = await this.fullSection(id++, d.idstr, d.instanceId, d.vmsd, d.state);
      this.descs.push({ name: d.idstr, instance_id: d.instanceId, ...desc });
    }

    const json: VMDesc = {
      configuration: configurationDesc(
        opts.machineType,
        opts.mappedRam ? [MAPPED_RAM_CAPABILITY] : [],
      ),
      page_size: PAGE_SIZE,
      devices: [
        { name: MACHINE_IDSTR, instance_id: 0, ...describeVMState(machineVmsd) },
        ...this.descs,
        { name: INTEGRITY_IDSTR, instance_id: 0, ...describeVMState(integrityVmsd) },
        { name: STREAM_END_IDSTR, instance_id: 0, ...describeVMState(streamEndVmsd) },
      ],
    };
    const vmdesc = encodeVmdesc(json);
    const cp = w.checkpoint();
    const end: StreamEndRecord = {
      offset: BigInt(cp.offset),
      crc: cp.crc,
      sections: this.sections,
      vmdescLength: vmdesc.length,
      vmdescCrc: crc32(vmdesc),
    };
    this.header(QEMU_VM_SECTION_FULL, this.endId, STREAM_END_IDSTR, 0, streamEndVmsd.version);
    saveVMState(w, streamEndVmsd, end);
    this.footer(this.endId);
    w.u8(QEMU_VM_EOF);
    w.u8(QEMU_VM_VMDESCRIPTION);
    w.u32(vmdesc.length);
    w.bytes(vmdesc);
    await w.flush();
    this.phase = 'done';
    return this.stats;
  }

  private header(type: number, id: number, idstr?: string, instance = 0, version = 0): void {
    this.w.u8(type);
    this.w.u32(id);
    if (idstr !== undefined) {
      this.w.str8(idstr);
      this.w.u32(instance);
      this.w.u32(version);
    }
  }

  private footer(id: number): void {
    this.w.u8(QEMU_VM_SECTION_FOOTER);
    this.w.u32(id);
    this.sections++;
  }

  private async fullSection<S>(
    id: number,
    idstr: string,
    instance: number,
    vmsd: VMStateDescription<S>,
    state: S,
  ): Promise<VMDescState> {
    this.header(QEMU_VM_SECTION_FULL, id, idstr, instance, vmsd.version);
    const desc = saveVMState(this.w, vmsd, state);
    await this.endSection(id);
    return desc;
  }

  /** Footer, then the integrity record covering everything so far. */
  private async endSection(id: number): Promise<void> {
    this.footer(id);
    const cp = this.w.checkpoint();
    const rec: IntegrityRecord = { sectionId: id, offset: BigInt(cp.offset), crc: cp.crc };
    this.header(QEMU_VM_SECTION_FULL, this.integrityId, INTEGRITY_IDSTR, 0, integrityVmsd.version);
    saveVMState(this.w, integrityVmsd, rec);
    this.w.u8(QEMU_VM_SECTION_FOOTER);
    this.w.u32(this.integrityId);
    const p = this.w.flushIfNeeded();
    if (p) await p;
  }
}

const RUN_PAGES = 256;
/** Pages a pass over all of RAM asks RamBlock.unpopulatedPages about at once (256 MiB). */
const PAGEMAP_AHEAD_PAGES = 64 * 1024;
/** The shortest run of chosen pages worth asking about. */
const PAGEMAP_MIN_RUN = 32;
/** The data of a stretch of pages that are not read. */
const NO_DATA = new Uint8Array(0);

/** Consecutive page runs [block, first page, count] to read in one call each. */
function* runs(
  ram: RamAccessor,
  selection: readonly RamPageSelection[] | undefined,
): Generator<[RamBlock, number, number]> {
  if (!selection) {
    for (const b of ram.blocks) {
      const total = b.size / PAGE_SIZE;
      for (let p = 0; p < total; p += RUN_PAGES) yield [b, p, Math.min(RUN_PAGES, total - p)];
    }
    return;
  }
  for (const sel of selection) {
    const b = ram.blocks.find((x) => x.id === sel.block);
    if (!b) throw new RangeError(`no RAM block '${sel.block}'`);
    const total = b.size / PAGE_SIZE;
    let start = -1;
    let count = 0;
    for (const page of sel.pages) {
      if (!Number.isInteger(page) || page < 0 || page >= total) {
        throw new RangeError(`page ${page} is outside RAM block '${b.id}' (${total} pages)`);
      }
      if (count > 0 && page === start + count && count < RUN_PAGES) {
        count++;
        continue;
      }
      if (count > 0) yield [b, start, count];
      start = page;
      count = 1;
    }
    if (count > 0) yield [b, start, count];
  }
}

/**
 * Saves a stopped VM in one pass: begin, every RAM page, complete.
 *
 * @example
 * const ch = await openOutgoing('file:/var/tmp/vm.state');
 * await saveVmState({ sink: ch.sink, machineType: 'pc', vcpus: 1, ram, devices });
 * await ch.close();
 */
export async function saveVmState(opts: StreamWriterOptions): Promise<StreamStats> {
  const writer = new MigrationStreamWriter(opts);
  await writer.begin();
  await writer.sendRam();
  return writer.complete();
}

// ----------------------------------------------------------------- loading

/** Options of {@link loadVmState}. */
export interface StreamLoadOptions extends MachineShape {
  readonly source: ByteSource;
  /**
   * Guest RAM is freshly allocated and all zero (a new VM waiting for
   * -incoming): zero pages this load has not written are then skipped
   * instead of checked, which spares a page fault per page.
   */
  readonly ramIsZeroed?: boolean;
  /** Called after each verified RAM chunk with the counts so far. */
  readonly onProgress?: (stats: StreamStats) => void;
  /**
   * The destination's mapped-ram capability. The stream's configuration
   * must say the same (QEMU's check: a mismatch is
   * MIGRATION_CAPABILITY_MISMATCH); with it, RAM is in the mapped-ram
   * layout and the source must be seekable (file:).
   */
  readonly mappedRam?: boolean;
  /**
   * mapped-ram: maps a block's pages from the file over its guest RAM
   * (MAP_PRIVATE), once the whole stream is verified. Without it (or
   * without the source's fd) the present pages are read and copied.
   */
  readonly mapRam?: MapRamFromFile;
  /** mapped-ram: where the stream starts in its file (file:PATH,offset=N). Default 0. */
  readonly fileOffset?: number;
}

/** What {@link loadVmState} read. */
export interface LoadResult extends StreamStats {
  /** Sections in the stream, integrity records excluded. */
  sections: number;
  /** The vmdesc JSON from the end of the stream. */
  vmdesc: VMDesc;
  /** mapped-ram: whether guest RAM was mapped from the file or its pages copied. */
  mappedRam?: 'mapped' | 'copied';
}

type Pending =
  | { kind: 'machine'; id: number; record: MachineRecord }
  | {
      kind: 'ram';
      id: number;
      blockList: RamBlockEntry[] | undefined;
      mapped?: MappedRamBlockEntry[];
    }
  | { kind: 'device'; id: number; device: DeviceSection; staged: StagedVMState<unknown> };

function fail(code: MigrationStreamError['code'], message: string): MigrationStreamError {
  return new MigrationStreamError(code, message);
}

/**
 * Loads a stream written by {@link MigrationStreamWriter} into a machine of
 * the given shape. Every section is checked against its integrity record
 * before it is used: RAM chunks are then written to guest memory (the guest
 * is not running), device states are only staged, and they are applied —
 * in stream order, through each description's hooks — only after the
 * stream-end record, EOF and the vmdesc JSON have been verified. On any
 * failure it throws {@link MigrationStreamError} with no device touched;
 * `ramTouched` tells whether guest RAM was written. The caller must then
 * never run this VM.
 */
export async function loadVmState(opts: StreamLoadOptions): Promise<LoadResult> {
  validateShape(opts);
  const r = new StreamReader(opts.source);
  const counters: RamCounters = { normalPages: 0, zeroPages: 0 };
  let ramTouched = false;
  try {
    const result = await loadInner(opts, r, counters, () => {
      ramTouched = true;
    });
    return result;
  } catch (err) {
    if (err instanceof MigrationStreamError) err.ramTouched = ramTouched;
    throw err;
  }
}

async function loadInner(
  opts: StreamLoadOptions,
  r: StreamReader,
  counters: RamCounters,
  touchRam: () => void,
): Promise<LoadResult> {
  await readHeader(r, opts.machineType, opts.mappedRam ?? false);
  const mappedRam = opts.mappedRam ?? false;
  let mappedBlocks: MappedRamBlockEntry[] | undefined;

  const devices = new Map<string, DeviceSection>();
  for (const d of opts.devices) devices.set(`${d.idstr}#${d.instanceId}`, d);
  const verified: { device: DeviceSection; staged: StagedVMState<unknown> }[] = [];
  const loaded = new Set<string>();
  const hasRam = opts.ram.blocks.length > 0;
  let pending: Pending | undefined;
  let sections = 0;
  let ramId: number | undefined;
  let ramPhase: 'none' | 'started' | 'ended' = 'none';
  let machineSeen = false;
  // One staging area for the RAM section being verified, reused.
  const stage = new RamStage();
  const committer = new RamCommitter(opts.ramIsZeroed ?? false);

  for (;;) {
    const cp = r.checkpoint();
    r.context = `the section header at byte ${cp.offset}`;
    let p = r.need(1);
    if (p) await p;
    const type = r.u8();
    if (type === QEMU_VM_EOF) {
      throw fail(
        'MIGRATION_MALFORMED',
        `QEMU_VM_EOF at byte ${cp.offset} before the stream-end record`,
      );
    }
    let id: number;
    let idstr: string;
    let instance = 0;
    let version = 0;
    if (type === QEMU_VM_SECTION_START || type === QEMU_VM_SECTION_FULL) {
      p = r.need(4);
      if (p) await p;
      id = r.u32();
      idstr = await r.str8();
      p = r.need(8);
      if (p) await p;
      instance = r.u32();
      version = r.u32();
    } else if (type === QEMU_VM_SECTION_PART || type === QEMU_VM_SECTION_END) {
      p = r.need(4);
      if (p) await p;
      id = r.u32();
      if (ramId === undefined || id !== ramId || ramPhase !== 'started') {
        throw fail('MIGRATION_MALFORMED', `section type ${type} for unknown section id ${id}`);
      }
      idstr = 'ram';
    } else {
      throw fail(
        'MIGRATION_MALFORMED',
        `unknown section type 0x${type.toString(16)} at byte ${cp.offset}`,
      );
    }
    r.context = `section '${idstr}' (id ${id})`;

    if (sections === 0 && !pending && idstr !== MACHINE_IDSTR) {
      throw fail(
        'MIGRATION_FOREIGN',
        `this QEVM stream was not written by tsvmm: its first section is '${idstr}', not ` +
          `'${MACHINE_IDSTR}'; tsvmm loads only streams it wrote (with their integrity records)`,
      );
    }
    if (pending && idstr !== INTEGRITY_IDSTR) {
      throw fail(
        'MIGRATION_MALFORMED',
        `section id ${pending.id} is not followed by its integrity record (found '${idstr}')`,
      );
    }
    if (type === QEMU_VM_SECTION_FULL && RESERVED.has(idstr) && (instance !== 0 || version !== 1)) {
      throw fail(
        'MIGRATION_VERSION',
        `section '${idstr}' instance ${instance} version ${version} is not one this build writes`,
      );
    }

    if (idstr === INTEGRITY_IDSTR) {
      if (!pending)
        throw fail(
          'MIGRATION_MALFORMED',
          `an integrity record at byte ${cp.offset} covers nothing`,
        );
      const rec: IntegrityRecord = { sectionId: 0, offset: 0n, crc: 0 };
      applyVMState(await loadVMState(r, integrityVmsd, version), rec);
      await readFooter(r, id);
      if (rec.sectionId !== pending.id || rec.offset !== BigInt(cp.offset) || rec.crc !== cp.crc) {
        throw fail(
          'MIGRATION_CHECKSUM',
          `checksum mismatch for the stream up to byte ${cp.offset} (section id ${pending.id}): ` +
            'the stream was damaged or modified after it was written; nothing was loaded from it',
        );
      }
      const done = pending;
      pending = undefined;
      if (done.kind === 'machine') {
        checkMachine(done.record, opts);
        machineSeen = true;
      } else if (done.kind === 'ram') {
        if (done.blockList) checkRamShape(done.blockList, opts.ram);
        // mapped-ram: kept until the whole stream is verified, then mapped.
        if (done.mapped) mappedBlocks = done.mapped;
        if (stage.pages > 0) touchRam();
        committer.commit(stage);
        counters.normalPages += stage.normalPages;
        counters.zeroPages += stage.zeroPages;
        stage.reset();
        opts.onProgress?.({ bytes: r.offset, ...counters });
      } else {
        verified.push({ device: done.device, staged: done.staged });
      }
      continue;
    }

    sections++;
    if (idstr === STREAM_END_IDSTR) {
      const rec: StreamEndRecord = {
        offset: 0n,
        crc: 0,
        sections: 0,
        vmdescLength: 0,
        vmdescCrc: 0,
      };
      applyVMState(await loadVMState(r, streamEndVmsd, version), rec);
      await readFooter(r, id);
      if (rec.offset !== BigInt(cp.offset) || rec.crc !== cp.crc || rec.sections !== sections - 1) {
        throw fail(
          'MIGRATION_CHECKSUM',
          `the whole-stream checksum does not match at byte ${cp.offset}: the stream was damaged ` +
            'or modified after it was written; nothing was loaded from it',
        );
      }
      if (ramPhase !== 'ended' && hasRam) {
        throw fail('MIGRATION_MALFORMED', "the stream ends without the 'ram' END section");
      }
      const vmdesc = await readTail(r, rec);
      checkAllDevices(opts.devices, loaded);
      let how: LoadResult['mappedRam'];
      if (mappedBlocks) {
        touchRam();
        how = await applyMappedRam(mappedBlocks, opts.ram, opts.source, {
          ...(opts.mapRam ? { map: opts.mapRam } : {}),
          ramIsZeroed: opts.ramIsZeroed ?? false,
          counters,
        });
      }
      for (const v of verified) {
        try {
          applyVMState(v.staged, v.device.state);
        } catch (err) {
          throw new MigrationStreamError(
            'MIGRATION_DEVICE_FAILED',
            `device '${v.device.idstr}' instance ${v.device.instanceId} refused its state: ` +
              `${err instanceof Error ? err.message : String(err)}`,
            { cause: err },
          );
        }
      }
      return {
        bytes: r.offset,
        ...counters,
        sections: sections - 1,
        vmdesc,
        ...(how ? { mappedRam: how } : {}),
      };
    }

    if (idstr === MACHINE_IDSTR) {
      if (machineSeen || type !== QEMU_VM_SECTION_FULL) {
        throw fail('MIGRATION_MALFORMED', `a second '${MACHINE_IDSTR}' section`);
      }
      const record: MachineRecord = { cpus: 0, ramSize: 0n, ramBlocks: 0, pageSize: 0 };
      applyVMState(await loadVMState(r, machineVmsd, version), record);
      await readFooter(r, id);
      pending = { kind: 'machine', id, record };
      continue;
    }

    if (idstr === 'ram') {
      const isStart = type === QEMU_VM_SECTION_START;
      if (isStart) {
        if (ramPhase !== 'none' || instance !== 0) {
          throw fail('MIGRATION_MALFORMED', "a second 'ram' START section");
        }
        if (version !== RAM_SECTION_VERSION) {
          throw fail(
            'MIGRATION_VERSION',
            `the 'ram' section has version ${version}; this build reads version ${RAM_SECTION_VERSION}`,
          );
        }
        ramId = id;
        ramPhase = 'started';
      } else if (type === QEMU_VM_SECTION_FULL) {
        throw fail('MIGRATION_MALFORMED', "a FULL 'ram' section");
      }
      if (mappedRam && isStart) {
        if (!opts.source.skip) {
          throw fail(
            'MIGRATION_MALFORMED',
            'the mapped-ram layout needs a seekable source (a file: URI)',
          );
        }
        const mapped = await loadMappedRamSection(r, opts.fileOffset ?? 0);
        await readFooter(r, id);
        const blockList = mapped.map((m) => ({ id: m.id, size: m.size }));
        pending = { kind: 'ram', id, blockList, mapped };
        continue;
      }
      const blockList = await loadRamSection(r, opts.ram, isStart, stage);
      if (isStart && !blockList && hasRam) {
        throw fail('MIGRATION_MALFORMED', "the 'ram' START section has no block list");
      }
      if (mappedRam && stage.pages > 0) {
        throw fail(
          'MIGRATION_MALFORMED',
          "a mapped-ram stream has pages outside its 'ram' START section",
        );
      }
      await readFooter(r, id);
      if (type === QEMU_VM_SECTION_END) ramPhase = 'ended';
      pending = { kind: 'ram', id, blockList };
      continue;
    }

    if (type !== QEMU_VM_SECTION_FULL) {
      throw fail('MIGRATION_MALFORMED', `section '${idstr}' is not a FULL section`);
    }
    const key = `${idstr}#${instance}`;
    const device = devices.get(key);
    if (!device) throw unknownDevice(idstr, instance, opts.devices);
    if (loaded.has(key)) {
      throw fail('MIGRATION_MALFORMED', `device '${idstr}' instance ${instance} appears twice`);
    }
    loaded.add(key);
    const staged = await loadVMState(r, device.vmsd, version);
    await readFooter(r, id);
    pending = { kind: 'device', id, device, staged };
  }
}

async function readHeader(r: StreamReader, machineType: string, mappedRam: boolean): Promise<void> {
  let p = r.need(4);
  if (p) await p;
  const magic = r.u32();
  if (magic !== QEMU_VM_FILE_MAGIC) {
    throw fail(
      'MIGRATION_BAD_MAGIC',
      `not a migration stream: it starts with 0x${magic.toString(16).padStart(8, '0')}, ` +
        "not QEMU's 'QEVM' magic 0x5145564d; check the file or URI",
    );
  }
  p = r.need(4);
  if (p) await p;
  const version = r.u32();
  if (version !== QEMU_VM_FILE_VERSION) {
    throw fail(
      'MIGRATION_VERSION',
      `QEVM stream version ${version} is not supported; tsvmm reads version ${QEMU_VM_FILE_VERSION}` +
        (version === 2 ? ' (version 2 is the pre-0.13 QEMU format)' : ''),
    );
  }
  r.context = 'the configuration section';
  p = r.need(5);
  if (p) await p;
  if (r.u8() !== QEMU_VM_CONFIGURATION) {
    throw fail(
      'MIGRATION_FOREIGN',
      'the stream has no configuration section after its header; tsvmm loads only streams it wrote',
    );
  }
  const len = r.u32();
  if (len > 255) {
    throw fail('MIGRATION_MALFORMED', `a machine type name of ${len} bytes in the configuration`);
  }
  const name = Buffer.from(await r.read(len)).toString('utf8');
  if (name !== machineType) {
    throw fail(
      'MIGRATION_SHAPE_MISMATCH',
      `machine type mismatch: the stream is for '${name}', this machine is '${machineType}'`,
    );
  }
  const received = await readCapabilities(r);
  // QEMU's configuration_validate_capabilities: each end's own setting wins.
  const streamMapped = received.includes(MAPPED_RAM_CAPABILITY);
  if (streamMapped !== mappedRam) {
    const on = (b: boolean) => (b ? 'on' : 'off');
    throw fail(
      'MIGRATION_CAPABILITY_MISMATCH',
      `Capability ${MAPPED_RAM_CAPABILITY} is ${on(mappedRam)}, but received capability is ` +
        `${on(streamMapped)}: ${
          streamMapped
            ? 'the file was saved with mapped-ram; turn it on here with migrate-set-capabilities before migrate-incoming (start with -incoming defer)'
            : 'the file was saved without mapped-ram; turn it off here'
        }`,
    );
  }
}

/** The configuration/capabilities subsection, if the stream has one: the capability names. */
async function readCapabilities(r: StreamReader): Promise<string[]> {
  let p = r.need(1);
  if (p) await p;
  if (r.peekU8() !== QEMU_VM_SUBSECTION) return [];
  r.u8();
  const sub = await r.str8();
  p = r.need(8);
  if (p) await p;
  const version = r.u32();
  if (sub !== CAPABILITIES_SUBSECTION || version !== 1) {
    throw fail(
      'MIGRATION_MALFORMED',
      `the configuration has subsection '${sub}' version ${version}; tsvmm writes only '${CAPABILITIES_SUBSECTION}' version 1`,
    );
  }
  const count = r.u32();
  if (count > 64) throw fail('MIGRATION_MALFORMED', `${count} capabilities in the configuration`);
  const names: string[] = [];
  for (let i = 0; i < count; i++) names.push(await r.str8());
  const unknown = names.filter((n) => n !== MAPPED_RAM_CAPABILITY);
  if (unknown.length > 0) {
    throw fail(
      'MIGRATION_CAPABILITY_MISMATCH',
      `Received unknown capability ${unknown.join(', ')}: tsvmm validates only ${MAPPED_RAM_CAPABILITY}`,
    );
  }
  return names;
}

async function readFooter(r: StreamReader, id: number): Promise<void> {
  const p = r.need(5);
  if (p) await p;
  const marker = r.u8();
  const footId = r.u32();
  if (marker !== QEMU_VM_SECTION_FOOTER || footId !== id) {
    throw fail(
      'MIGRATION_MALFORMED',
      `section id ${id} does not end with its footer (found 0x${marker.toString(16)} id ${footId}) ` +
        `at byte ${r.offset - 5}: its contents do not match its description`,
    );
  }
}

async function readTail(r: StreamReader, rec: StreamEndRecord): Promise<VMDesc> {
  r.context = 'the end of the stream';
  let p = r.need(6);
  if (p) await p;
  const eof = r.u8();
  const marker = r.u8();
  if (eof !== QEMU_VM_EOF || marker !== QEMU_VM_VMDESCRIPTION) {
    throw fail(
      'MIGRATION_MALFORMED',
      'the stream-end record is not followed by EOF and the VM description',
    );
  }
  p = r.need(4);
  if (p) await p;
  const len = r.u32();
  if (len !== rec.vmdescLength) {
    throw fail(
      'MIGRATION_CHECKSUM',
      `the VM description is ${len} bytes, the stream-end record says ${rec.vmdescLength}`,
    );
  }
  r.context = 'the VM description JSON';
  const bytes = await r.read(len);
  if (crc32(bytes) !== rec.vmdescCrc) {
    throw fail('MIGRATION_CHECKSUM', 'the VM description JSON does not match its checksum');
  }
  try {
    return JSON.parse(Buffer.from(bytes).toString('utf8')) as VMDesc;
  } catch (err) {
    throw new MigrationStreamError('MIGRATION_MALFORMED', 'the VM description is not JSON', {
      cause: err,
    });
  }
}

function checkMachine(rec: MachineRecord, shape: MachineShape): void {
  const mismatch = (msg: string) => fail('MIGRATION_SHAPE_MISMATCH', msg);
  if (rec.cpus !== shape.vcpus) {
    throw mismatch(
      `vCPU count mismatch: the stream has ${rec.cpus} vCPU(s), this machine has ${shape.vcpus}: ` +
        `start the destination with -smp ${rec.cpus}`,
    );
  }
  const local = ramTotal(shape.ram);
  if (rec.ramSize !== BigInt(local)) {
    throw mismatch(
      `RAM size mismatch: the stream has ${rec.ramSize} bytes of RAM, this machine has ${local}: ` +
        'start the destination with the same memory size',
    );
  }
  if (rec.ramBlocks !== shape.ram.blocks.length) {
    throw mismatch(
      `RAM block count mismatch: the stream has ${rec.ramBlocks}, this machine has ${shape.ram.blocks.length}`,
    );
  }
  if (rec.pageSize !== PAGE_SIZE) {
    throw mismatch(`page size mismatch: the stream uses ${rec.pageSize}, this build ${PAGE_SIZE}`);
  }
}

function unknownDevice(
  idstr: string,
  instance: number,
  devices: readonly DeviceSection[],
): MigrationStreamError {
  const same = devices.filter((d) => d.idstr === idstr).length;
  const detail =
    same > 0
      ? `; this machine has ${same} instance(s) of '${idstr}' (0 to ${same - 1})`
      : `; this machine has no '${idstr}' device`;
  return fail(
    'MIGRATION_SHAPE_MISMATCH',
    `the stream has section '${idstr}' instance ${instance}, unknown here${detail}`,
  );
}

function checkAllDevices(devices: readonly DeviceSection[], loaded: ReadonlySet<string>): void {
  const missing = devices.filter((d) => !loaded.has(`${d.idstr}#${d.instanceId}`));
  if (missing.length > 0) {
    throw fail(
      'MIGRATION_SHAPE_MISMATCH',
      `the stream has no state for ${missing
        .map((d) => `'${d.idstr}' instance ${d.instanceId}`)
        .join(', ')}: it was saved from a machine without that device`,
    );
  }
}
