import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationStreamError } from './errors.js';
import { BufferSink, bufferSource, StreamReader, StreamWriter } from './qemu-file.js';
import { allTypes, type ClockState, vmstateAllTypes, vmstateClock } from './test-fixtures.js';
import {
  applyVMState,
  loadVMState,
  saveVMState,
  type VMStateDescription,
  validateVMState,
  vmsField,
} from './vmstate.js';

async function encode<S>(desc: VMStateDescription<S>, state: S): Promise<Buffer> {
  const sink = new BufferSink();
  const w = new StreamWriter(sink);
  saveVMState(w, desc, state);
  w.u8(0x7e); // what follows a device's state in a stream: the section footer
  await w.flush();
  return sink.bytes();
}

describe('vmstate', () => {
  test('kvmclock encodes as QEMU does: be64 clock, then the subsection marker, name, be32 version, bool', async () => {
    const bytes = await encode(vmstateClock, {
      clock: 0x0102030405060708n,
      reliable: true,
      sendReliable: true,
    });
    const name = 'kvmclock/clock_is_reliable';
    const expected = Buffer.concat([
      Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]),
      Buffer.from([0x05, name.length]),
      Buffer.from(name),
      Buffer.from([0, 0, 0, 1]),
      Buffer.from([1]),
      Buffer.from([0x7e]),
    ]);
    assert.deepEqual(bytes, expected);
  });

  test("a subsection whose needed() is false is not on the wire, and loading keeps preLoad's value", async () => {
    const bytes = await encode(vmstateClock, { clock: 5n, reliable: true, sendReliable: false });
    assert.deepEqual(bytes, Buffer.from([0, 0, 0, 0, 0, 0, 0, 5, 0x7e]));
    const r = new StreamReader(bufferSource(bytes));
    const staged = await loadVMState(r, vmstateClock, 1);
    const dst: ClockState = { clock: 0n, reliable: true, sendReliable: true };
    applyVMState(staged, dst);
    assert.deepEqual(dst, { clock: 5n, reliable: false, sendReliable: true });
  });

  test('every field type is big-endian with the sizes QEMU uses', async () => {
    const desc: VMStateDescription<{ v: number[] }> = {
      name: 'le-check',
      version: 1,
      fields: [
        vmsField.array(
          'uint16',
          'v',
          2,
          (s: { v: number[] }) => s.v,
          (s, v) => {
            s.v = v;
          },
        ),
      ],
    };
    assert.deepEqual(
      await encode(desc, { v: [0x0102, 0xa0b0] }),
      Buffer.from([1, 2, 0xa0, 0xb0, 0x7e]),
    );
    const bytes = await encode(vmstateAllTypes, allTypes(true));
    // bool 1, u8 fe, u16 beef, u32 deadbeef, i32 -123456789, ...
    assert.deepEqual(
      [...bytes.subarray(0, 12)],
      [1, 0xfe, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef, 0xf8, 0xa4, 0x32, 0xeb],
    );
    assert.equal(bytes.readBigUInt64BE(12), 0xffff_ffff_ffff_fffen);
    assert.equal(bytes.readBigInt64BE(20), -(1n << 62n));
  });

  test('staged values touch nothing until applied; apply runs preLoad, fields, subsections, postLoad', async () => {
    const bytes = await encode(vmstateAllTypes, allTypes(true));
    const staged = await loadVMState(new StreamReader(bufferSource(bytes)), vmstateAllTypes, 2);
    const dst = allTypes(false);
    assert.deepEqual(dst, allTypes(false));
    applyVMState(staged, dst);
    assert.deepEqual({ ...dst, log: [] }, { ...allTypes(true), absent: 7, log: [] });
    assert.deepEqual(dst.log, ['preLoad', 'extra.preLoad', 'extra.postLoad', 'postLoad v2']);
  });

  test('a version-1 stream loads without the fields added in version 2', async () => {
    // Version 1 of test-all-types has no 'deltas': build such a stream by hand.
    const v1: VMStateDescription<ReturnType<typeof allTypes>> = {
      ...vmstateAllTypes,
      version: 1,
      fields: vmstateAllTypes.fields.filter((f) => f.name !== 'deltas'),
    };
    const bytes = await encode(v1, allTypes(true));
    const dst = allTypes(false);
    applyVMState(await loadVMState(new StreamReader(bufferSource(bytes)), vmstateAllTypes, 1), dst);
    assert.deepEqual(dst.deltas, [0n, 0n, 0n]);
    assert.equal(dst.u32, 0xdeadbeef);
    assert.equal(dst.log.at(-1), 'postLoad v1');
  });

  test('a version outside [minimum, version] is refused with MIGRATION_VERSION', async () => {
    const r = new StreamReader(bufferSource(Buffer.alloc(100)));
    await assert.rejects(loadVMState(r, vmstateAllTypes, 3), (e: unknown) => {
      return (
        e instanceof MigrationStreamError &&
        e.code === 'MIGRATION_VERSION' &&
        /versions 1 to 2/.test(e.message)
      );
    });
  });

  test('an unknown subsection is refused naming it', async () => {
    const bytes = Buffer.concat([
      Buffer.alloc(8),
      Buffer.from([5, 14]),
      Buffer.from('kvmclock/other'),
      Buffer.from([0, 0, 0, 1]),
    ]);
    await assert.rejects(
      loadVMState(new StreamReader(bufferSource(bytes)), vmstateClock, 1),
      /kvmclock\/other/,
    );
  });

  test('values that do not fit their type and bad descriptions are programming errors', async () => {
    const w = new StreamWriter(new BufferSink());
    assert.throws(
      () => saveVMState(w, vmstateClock, { clock: -1n, reliable: false, sendReliable: false }),
      RangeError,
    );
    const bad = allTypes(true);
    bad.u8 = 256;
    assert.throws(() => saveVMState(w, vmstateAllTypes, bad), /does not fit uint8/);
    bad.u8 = 1;
    bad.regs = [1, 2];
    assert.throws(() => saveVMState(w, vmstateAllTypes, bad), /expected 4/);
    assert.throws(
      () =>
        validateVMState({
          name: 'a',
          version: 1,
          fields: [],
          subsections: [{ name: 'b/x', version: 1, needed: () => true, fields: [] }],
        }),
      /must be named 'a\/...'/,
    );
    assert.throws(
      () => validateVMState({ name: 'a', version: 1, minimumVersion: 2, fields: [] }),
      /not a valid range/,
    );
    validateVMState(vmstateAllTypes);
    validateVMState(vmstateClock);
  });

  test('sibling subsections sent together load, and a nested one too (a subsection stops at a name not its own)', async () => {
    interface S {
      a: number;
      b: number;
      c: number;
      d: number;
    }
    const field = (k: keyof S) =>
      vmsField.uint8(
        k,
        (s: S) => s[k],
        (s, v) => {
          s[k] = v;
        },
      );
    const desc: VMStateDescription<S> = {
      name: 'dev',
      version: 1,
      fields: [field('a')],
      subsections: [
        {
          name: 'dev/one',
          version: 1,
          needed: () => true,
          fields: [field('b')],
          subsections: [
            { name: 'dev/one/inner', version: 1, needed: () => true, fields: [field('c')] },
          ],
        },
        { name: 'dev/two', version: 1, needed: () => true, fields: [field('d')] },
      ],
    };
    validateVMState(desc);
    const bytes = await encode(desc, { a: 1, b: 2, c: 3, d: 4 });
    const staged = await loadVMState(new StreamReader(bufferSource(bytes)), desc, 1);
    const out: S = { a: 0, b: 0, c: 0, d: 0 };
    applyVMState(staged, out);
    assert.deepEqual(out, { a: 1, b: 2, c: 3, d: 4 });
  });
});
