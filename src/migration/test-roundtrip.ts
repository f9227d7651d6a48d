import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openIncoming, openOutgoing } from './channels.js';
import { createBufferRam } from './ram.js';
import { type DeviceSection, type LoadResult, loadVmState, saveVmState } from './stream.js';

/**
 * For device vmstate tests: saves `save` through the real stream into a
 * real file (file: channel, temp name, fsync, rename), loads it back into
 * `load`, and removes the file. RAM is one small blank block.
 */
export async function roundTripThroughFile(
  save: readonly DeviceSection[],
  load: readonly DeviceSection[],
  opts: { vcpus?: number } = {},
): Promise<LoadResult> {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-vmstate-'));
  try {
    const uri = `file:${join(dir, 'state')}`;
    const shape = { machineType: 'pc', vcpus: opts.vcpus ?? 1 };
    const out = await openOutgoing(uri);
    await saveVmState({
      ...shape,
      sink: out.sink,
      ram: createBufferRam([{ id: 'pc.ram', size: 4 * 4096 }]),
      devices: save,
    });
    await out.close();
    const inc = await openIncoming(uri);
    try {
      return await loadVmState({
        ...shape,
        source: inc.source,
        ram: createBufferRam([{ id: 'pc.ram', size: 4 * 4096 }]),
        devices: load,
      });
    } finally {
      await inc.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
