import { MigrationStreamError } from './errors.js';
import type { StreamReader, StreamWriter } from './qemu-file.js';

/** QEMU_VM_SUBSECTION: the marker before each subsection in a device's state. */
export const QEMU_VM_SUBSECTION = 0x05;

/** Scalar wire types, named as QEMU's VMStateInfo names them in the vmdesc JSON. */
export type ScalarType = 'bool' | 'uint8' | 'uint16' | 'uint32' | 'int32' | 'uint64' | 'int64';

/** The JavaScript value of each scalar type: 64-bit ones are bigint. */
export interface ScalarValue {
  bool: boolean;
  uint8: number;
  uint16: number;
  uint32: number;
  int32: number;
  uint64: bigint;
  int64: bigint;
}

interface FieldBase {
  readonly name: string;
  /** The field is in the stream only from this description version on (QEMU's _V fields). */
  readonly sinceVersion?: number;
}

/** One scalar, read and written through the device's state object. */
export interface ScalarField<S, T extends ScalarType> extends FieldBase {
  readonly kind: 'scalar';
  readonly type: T;
  get(state: S): ScalarValue[T];
  set(state: S, value: ScalarValue[T]): void;
}

/** A fixed-length array of scalars (QEMU's VMSTATE_*_ARRAY). */
export interface ArrayField<S, T extends ScalarType> extends FieldBase {
  readonly kind: 'array';
  readonly type: T;
  readonly length: number;
  get(state: S): readonly ScalarValue[T][];
  set(state: S, value: ScalarValue[T][]): void;
}

/** Raw bytes of a fixed size (QEMU's VMSTATE_BUFFER). */
export interface BufferField<S> extends FieldBase {
  readonly kind: 'buffer';
  readonly type: 'buffer';
  readonly size: number;
  get(state: S): Uint8Array;
  set(state: S, value: Uint8Array): void;
}

/** Any field of a device's state. */
export type VMStateField<S> =
  | { [T in ScalarType]: ScalarField<S, T> | ArrayField<S, T> }[ScalarType]
  | BufferField<S>;

/**
 * How a device describes its migration state, like QEMU's
 * VMStateDescription: a name, a version and the oldest version it still
 * loads, its fields in wire order, optional subsections, and hooks.
 *
 * @example
 * const vmstateKvmclock: VMStateDescription<KvmClockState> = {
 *   name: 'kvmclock', version: 1, minimumVersion: 1,
 *   fields: [vmsField.uint64('clock', (s) => s.clock, (s, v) => { s.clock = v; })],
 *   subsections: [{
 *     name: 'kvmclock/clock_is_reliable', version: 1, needed: (s) => s.sendReliable,
 *     fields: [vmsField.bool('clock_is_reliable', (s) => s.reliable, (s, v) => { s.reliable = v; })],
 *   }],
 *   preLoad: (s) => { s.reliable = false; },
 * };
 */
export interface VMStateDescription<S> {
  readonly name: string;
  readonly version: number;
  /** Oldest stream version this description loads; defaults to `version`. */
  readonly minimumVersion?: number;
  readonly fields: readonly VMStateField<S>[];
  readonly subsections?: readonly VMStateSubsection<S>[];
  /** Runs before the fields are read for saving (refresh the state object). */
  preSave?(state: S): void;
  /** Runs before staged values are applied on load. */
  preLoad?(state: S): void;
  /** Runs after this description's fields and subsections were applied. */
  postLoad?(state: S, versionId: number): void;
}

/** An optional part of a device's state, sent only when `needed` says so. */
export interface VMStateSubsection<S> extends VMStateDescription<S> {
  /** Its name must be "<parent name>/<something>", as QEMU requires. */
  needed(state: S): boolean;
}

type AnyScalar = ScalarValue[ScalarType];
/** A decoded field value, staged until the whole stream is verified. */
export type FieldValue = AnyScalar | AnyScalar[] | Uint8Array;

type Getter<S, V> = (state: S) => V;
type Setter<S, V> = (state: S, value: V) => void;

function scalar<T extends ScalarType>(type: T) {
  return <S>(
    name: string,
    get: Getter<S, ScalarValue[T]>,
    set: Setter<S, ScalarValue[T]>,
    opts: { sinceVersion?: number } = {},
  ): ScalarField<S, T> => ({ kind: 'scalar', type, name, get, set, ...opts });
}

/** Builders for fields, so a description reads like QEMU's VMSTATE_* macros. */
export const vmsField = {
  bool: scalar('bool'),
  uint8: scalar('uint8'),
  uint16: scalar('uint16'),
  uint32: scalar('uint32'),
  int32: scalar('int32'),
  uint64: scalar('uint64'),
  int64: scalar('int64'),
  array<S, T extends ScalarType>(
    type: T,
    name: string,
    length: number,
    get: Getter<S, readonly ScalarValue[T][]>,
    set: Setter<S, ScalarValue[T][]>,
    opts: { sinceVersion?: number } = {},
  ): ArrayField<S, T> {
    return { kind: 'array', type, name, length, get, set, ...opts };
  },
  buffer<S>(
    name: string,
    size: number,
    get: Getter<S, Uint8Array>,
    set: Setter<S, Uint8Array>,
    opts: { sinceVersion?: number } = {},
  ): BufferField<S> {
    return { kind: 'buffer', type: 'buffer', name, size, get, set, ...opts };
  },
};

const SIZES: Record<ScalarType, number> = {
  bool: 1,
  uint8: 1,
  uint16: 2,
  uint32: 4,
  int32: 4,
  uint64: 8,
  int64: 8,
};

/** Bytes one element of a field takes on the wire. */
export function elementSize<S>(f: VMStateField<S>): number {
  return f.kind === 'buffer' ? f.size : SIZES[f.type];
}

/**
 * Checks a description once, at registration, so mistakes show up when the
 * device is created rather than in the middle of a migration.
 */
export function validateVMState<S>(desc: VMStateDescription<S>, parent?: string): void {
  const where = `vmstate '${desc.name}'`;
  if (!desc.name || Buffer.byteLength(desc.name) > 255) {
    throw new RangeError(`${where}: the name must be 1 to 255 bytes long`);
  }
  if (parent !== undefined && !desc.name.startsWith(`${parent}/`)) {
    throw new RangeError(`${where}: a subsection of '${parent}' must be named '${parent}/...'`);
  }
  const min = desc.minimumVersion ?? desc.version;
  if (!Number.isInteger(desc.version) || desc.version < 0 || min > desc.version || min < 0) {
    throw new RangeError(`${where}: version ${desc.version} / minimum ${min} is not a valid range`);
  }
  const seen = new Set<string>();
  for (const f of desc.fields) {
    if (seen.has(f.name)) throw new RangeError(`${where}: field '${f.name}' appears twice`);
    seen.add(f.name);
    if (f.kind === 'buffer' && !(Number.isInteger(f.size) && f.size > 0)) {
      throw new RangeError(`${where}: buffer '${f.name}' needs a positive integer size`);
    }
    if (f.kind === 'array' && !(Number.isInteger(f.length) && f.length > 0)) {
      throw new RangeError(`${where}: array '${f.name}' needs a positive integer length`);
    }
  }
  const subs = new Set<string>();
  for (const sub of desc.subsections ?? []) {
    if (subs.has(sub.name)) throw new RangeError(`${where}: subsection '${sub.name}' twice`);
    subs.add(sub.name);
    validateVMState(sub, desc.name);
  }
}

// ---------------------------------------------------------------- saving

/** One field in the vmdesc JSON, as QEMU's vmsd_desc_field_start/end write it. */
export interface VMDescField {
  name: string;
  array_len?: number;
  type: string;
  size: number;
}

/** One description (device or subsection) in the vmdesc JSON. */
export interface VMDescState {
  vmsd_name: string;
  version: number;
  fields: VMDescField[];
  subsections?: VMDescState[];
}

function putScalar(w: StreamWriter, type: ScalarType, v: unknown, what: string): void {
  const bad = (): never => {
    throw new RangeError(`${what}: value ${String(v)} does not fit ${type}`);
  };
  switch (type) {
    case 'bool':
      if (typeof v !== 'boolean') bad();
      w.u8(v ? 1 : 0);
      return;
    case 'uint8':
    case 'uint16':
    case 'uint32': {
      const max = type === 'uint8' ? 0xff : type === 'uint16' ? 0xffff : 0xffff_ffff;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) bad();
      const n = v as number;
      if (type === 'uint8') w.u8(n);
      else if (type === 'uint16') w.u16(n);
      else w.u32(n);
      return;
    }
    case 'int32':
      if (typeof v !== 'number' || !Number.isInteger(v) || v < -0x8000_0000 || v > 0x7fff_ffff) {
        bad();
      }
      w.i32(v as number);
      return;
    case 'uint64':
      if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn) bad();
      w.u64(v as bigint);
      return;
    case 'int64':
      if (typeof v !== 'bigint' || v < -(1n << 63n) || v >= 1n << 63n) bad();
      w.i64(v as bigint);
      return;
  }
}

/**
 * Writes a device's state in QEMU's wire format (fields big-endian in
 * order, then each needed subsection behind a QEMU_VM_SUBSECTION marker)
 * and returns its vmdesc JSON description.
 */
export function saveVMState<S>(
  w: StreamWriter,
  desc: VMStateDescription<S>,
  state: S,
  options: { preSave?: boolean } = {},
): VMDescState {
  if (options.preSave !== false) desc.preSave?.(state);
  const json: VMDescState = { vmsd_name: desc.name, version: desc.version, fields: [] };
  for (const f of desc.fields) {
    const what = `vmstate '${desc.name}' field '${f.name}'`;
    const start = w.offset;
    if (f.kind === 'buffer') {
      const b = f.get(state);
      if (b.length !== f.size) {
        throw new RangeError(
          `${what}: buffer is ${b.length} bytes, the description says ${f.size}`,
        );
      }
      w.bytes(b);
      json.fields.push({ name: f.name, type: 'buffer', size: f.size });
    } else if (f.kind === 'array') {
      const values: readonly unknown[] = f.get(state);
      if (values.length !== f.length) {
        throw new RangeError(`${what}: array has ${values.length} elements, expected ${f.length}`);
      }
      for (const v of values) putScalar(w, f.type, v, what);
      const entry: VMDescField = { name: f.name, type: f.type, size: SIZES[f.type] };
      // QEMU compresses a scalar array into one entry with array_len; the
      // size it records is that of one element.
      if (f.length > 1) {
        json.fields.push({
          name: entry.name,
          array_len: f.length,
          type: entry.type,
          size: entry.size,
        });
      } else json.fields.push(entry);
    } else {
      putScalar(w, f.type, f.get(state), what);
      json.fields.push({ name: f.name, type: f.type, size: w.offset - start });
    }
  }
  for (const sub of desc.subsections ?? []) {
    if (!sub.needed(state)) continue;
    w.u8(QEMU_VM_SUBSECTION);
    w.str8(sub.name);
    w.u32(sub.version);
    json.subsections ??= [];
    json.subsections.push(saveVMState(w, sub, state, options));
  }
  return json;
}

/** The vmdesc JSON of a description as it would be saved with every subsection. */
export function describeVMState<S>(desc: VMStateDescription<S>): VMDescState {
  const fields: VMDescField[] = desc.fields.map((f) =>
    f.kind === 'array' && f.length > 1
      ? { name: f.name, array_len: f.length, type: f.type, size: SIZES[f.type] }
      : { name: f.name, type: f.type, size: elementSize(f) },
  );
  const json: VMDescState = { vmsd_name: desc.name, version: desc.version, fields };
  if (desc.subsections?.length) json.subsections = desc.subsections.map((s) => describeVMState(s));
  return json;
}

// --------------------------------------------------------------- loading

/**
 * A device's state decoded from a stream but not yet applied: values are
 * in `values` (index = field index; undefined when the stream's version
 * predates the field), subsections in stream order.
 */
export interface StagedVMState<S> {
  readonly desc: VMStateDescription<S>;
  readonly versionId: number;
  readonly values: (FieldValue | undefined)[];
  readonly subsections: StagedVMState<S>[];
}

function getScalar(r: StreamReader, type: ScalarType, what: string): AnyScalar {
  switch (type) {
    case 'bool': {
      const b = r.u8();
      if (b > 1) {
        throw new MigrationStreamError(
          'MIGRATION_MALFORMED',
          `${what}: a bool holds ${b} (only 0 or 1 are valid) at byte ${r.offset - 1}`,
        );
      }
      return b === 1;
    }
    case 'uint8':
      return r.u8();
    case 'uint16':
      return r.u16();
    case 'uint32':
      return r.u32();
    case 'int32':
      return r.i32();
    case 'uint64':
      return r.u64();
    case 'int64':
      return r.i64();
  }
}

function checkVersion<S>(desc: VMStateDescription<S>, versionId: number, where: string): void {
  const min = desc.minimumVersion ?? desc.version;
  if (versionId > desc.version || versionId < min) {
    throw new MigrationStreamError(
      'MIGRATION_VERSION',
      `${where} '${desc.name}' has version ${versionId} in the stream; this build loads versions ` +
        `${min} to ${desc.version}: migrate between compatible tsvmm versions`,
    );
  }
}

/**
 * Decodes a device's state (and its subsections) written by
 * {@link saveVMState} at `versionId`, without touching the device.
 */
export async function loadVMState<S>(
  r: StreamReader,
  desc: VMStateDescription<S>,
  versionId: number,
): Promise<StagedVMState<S>> {
  const { staged, next } = await loadWithSubsections(r, desc, versionId);
  if (next !== undefined) throw unknownSubsection(desc, next);
  return staged;
}

function unknownSubsection<S>(desc: VMStateDescription<S>, name: string): MigrationStreamError {
  return new MigrationStreamError(
    'MIGRATION_SHAPE_MISMATCH',
    `vmstate '${desc.name}' has a subsection '${name}' this build does not know: ` +
      'the stream comes from a newer or different tsvmm',
  );
}

/**
 * Loads `desc` and the subsections that follow it. A subsection header
 * whose name is not "<desc.name>/..." belongs to an enclosing description
 * (a sibling of `desc`, when `desc` is itself a subsection), as in QEMU's
 * vmstate_subsection_load: its marker and name are consumed and handed back
 * in `next` for the parent to load.
 */
async function loadWithSubsections<S>(
  r: StreamReader,
  desc: VMStateDescription<S>,
  versionId: number,
): Promise<{ staged: StagedVMState<S>; next: string | undefined }> {
  checkVersion(desc, versionId, 'vmstate');
  const values: (FieldValue | undefined)[] = [];
  for (const f of desc.fields) {
    if (f.sinceVersion !== undefined && f.sinceVersion > versionId) {
      values.push(undefined);
      continue;
    }
    const what = `vmstate '${desc.name}' field '${f.name}'`;
    if (f.kind === 'buffer') {
      // A copy: the staged value must not alias the reader's buffers.
      values.push(new Uint8Array(await r.read(f.size)));
    } else if (f.kind === 'array') {
      const p = r.need(SIZES[f.type] * f.length);
      if (p) await p;
      const arr: AnyScalar[] = [];
      for (let i = 0; i < f.length; i++) arr.push(getScalar(r, f.type, what));
      values.push(arr);
    } else {
      const p = r.need(SIZES[f.type]);
      if (p) await p;
      values.push(getScalar(r, f.type, what));
    }
  }
  const subsections: StagedVMState<S>[] = [];
  const staged = { desc, versionId, values, subsections };
  let name: string | undefined;
  for (;;) {
    if (name === undefined) {
      const p = r.need(1);
      if (p) await p;
      if (r.peekU8() !== QEMU_VM_SUBSECTION) return { staged, next: undefined };
      r.u8();
      name = await r.str8();
    }
    if (!name.startsWith(`${desc.name}/`)) return { staged, next: name };
    const sub = desc.subsections?.find((s) => s.name === name);
    if (!sub) throw unknownSubsection(desc, name);
    if (subsections.some((s) => s.desc === sub)) {
      throw new MigrationStreamError(
        'MIGRATION_MALFORMED',
        `vmstate '${desc.name}' has subsection '${name}' twice`,
      );
    }
    const q = r.need(4);
    if (q) await q;
    const subVersion = r.u32();
    checkVersion(sub, subVersion, 'subsection');
    const loaded = await loadWithSubsections(r, sub, subVersion);
    subsections.push(loaded.staged);
    name = loaded.next;
  }
}

/**
 * Applies staged values to the device: preLoad, every field's setter,
 * each subsection that was in the stream (recursively), then postLoad,
 * the order QEMU's vmstate_load_state follows.
 */
export function applyVMState<S>(staged: StagedVMState<S>, state: S): void {
  const { desc } = staged;
  desc.preLoad?.(state);
  desc.fields.forEach((f, i) => {
    const v = staged.values[i];
    if (v === undefined) return;
    // The value was decoded for exactly this field's type.
    (f.set as (s: S, value: FieldValue) => void)(state, v);
  });
  for (const sub of staged.subsections) applyVMState(sub, state);
  desc.postLoad?.(state, staged.versionId);
}
