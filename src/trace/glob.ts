/**
 * Glob matching for trace event patterns, as QEMU's -trace accepts them:
 * `*` matches any run of characters (also none), `?` exactly one, every other
 * character itself.
 */
export function globMatch(pattern: string, name: string): boolean {
  return globToRegExp(pattern).test(name);
}

/** Whether a string uses a wildcard, so that finding nothing is not an error by itself. */
export function isGlobPattern(pattern: string): boolean {
  return pattern.includes('*') || pattern.includes('?');
}

const cache = new Map<string, RegExp>();

function globToRegExp(pattern: string): RegExp {
  let re = cache.get(pattern);
  if (re) return re;
  let source = '^';
  for (const ch of pattern) {
    if (ch === '*') source += '.*';
    else if (ch === '?') source += '.';
    else source += ch.replace(/[\\^$.|+()[\]{}]/g, '\\$&');
  }
  re = new RegExp(`${source}$`, 's');
  cache.set(pattern, re);
  return re;
}
