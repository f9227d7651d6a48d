import { UsageError } from './usage-error.js';

/** One `key=value` list as QEMU's QemuOpts parses it; `implied` is the bare first item. */
export interface QemuOptsList {
  /** The first item when it has no `=` (`-machine q35,...` gives "q35"). */
  implied?: string;
  /** The `key=value` items in order; a bare `key` later in the list is `key=on`. */
  props: Map<string, string>;
}

/**
 * Splits a QEMU option value like `q35,accel=kvm` into items, with QEMU's
 * escape: `,,` stands for a literal comma (so paths with commas still work).
 * `impliedKey`: the name of the first item when it is bare; if given, a bare
 * first item is returned as `implied`.
 */
export function parseQemuOpts(option: string, value: string, impliedKey?: string): QemuOptsList {
  const items: string[] = [];
  let current = '';
  for (let i = 0; i < value.length; i++) {
    const c = value[i];
    if (c === ',') {
      if (value[i + 1] === ',') {
        current += ',';
        i++;
      } else {
        items.push(current);
        current = '';
      }
    } else {
      current += c;
    }
  }
  items.push(current);
  const result: QemuOptsList = { props: new Map() };
  items.forEach((item, index) => {
    const eq = item.indexOf('=');
    if (eq < 0) {
      if (index === 0 && impliedKey !== undefined) {
        result.implied = item;
        return;
      }
      if (item === '') throw new UsageError(`${option} ${value}: empty item in the list`);
      result.props.set(item, 'on');
      return;
    }
    const key = item.slice(0, eq);
    if (key === '') throw new UsageError(`${option} ${value}: '${item}' has no name before '='`);
    if (result.props.has(key)) {
      throw new UsageError(`${option} ${value}: '${key}' is given twice`);
    }
    result.props.set(key, item.slice(eq + 1));
  });
  return result;
}

/** QEMU's boolean spellings: on/yes/true/y and off/no/false/n. */
export function parseQemuBool(option: string, key: string, value: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new UsageError(`${option}: ${key}=${value}: expected 'on' or 'off'`);
}

/** Refuses any property not in `allowed`, naming it. */
export function onlyProps(option: string, opts: QemuOptsList, allowed: readonly string[]): void {
  for (const key of opts.props.keys()) {
    if (!allowed.includes(key)) {
      const known = allowed.length > 0 ? `; tsvmm accepts: ${allowed.join(', ')}` : '';
      throw new UsageError(`${option}: property '${key}' is not supported${known}`);
    }
  }
}
