import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BUILD_GUEST_USAGE, defaultGuestCacheDir, main, parseBuildGuestArgs } from './main.js';

test('--out and --script are parsed in both spellings', () => {
  assert.deepEqual(parseBuildGuestArgs([]), { help: false });
  assert.deepEqual(parseBuildGuestArgs(['--out', '/c', '--script=/s.sh']), {
    help: false,
    out: '/c',
    script: '/s.sh',
  });
  assert.equal(parseBuildGuestArgs(['-h']).help, true);
});

test('unknown options and missing values are usage errors', () => {
  assert.throws(() => parseBuildGuestArgs(['--bogus']), { code: 'GUEST_IMAGE_USAGE' });
  assert.throws(() => parseBuildGuestArgs(['--out']), { code: 'GUEST_IMAGE_USAGE' });
});

test('the cache folder is $TSVMM_GUEST_CACHE, else ~/.cache/tsvmm/guest', () => {
  assert.equal(defaultGuestCacheDir({ TSVMM_GUEST_CACHE: '/x/y' }, '/home/u'), '/x/y');
  assert.equal(defaultGuestCacheDir({}, '/home/u'), '/home/u/.cache/tsvmm/guest');
});

test('main prints the usage for --help and exits 1 with a reason on errors', async () => {
  const out: string[] = [];
  const err: string[] = [];
  assert.equal(
    await main(
      ['--help'],
      (l) => out.push(l),
      (l) => err.push(l),
    ),
    0,
  );
  assert.equal(out.join('\n'), BUILD_GUEST_USAGE);
  assert.equal(
    await main(
      ['--frobnicate'],
      (l) => out.push(l),
      (l) => err.push(l),
    ),
    1,
  );
  assert.match(err.join('\n'), /^build-guest: unknown option --frobnicate/);
  err.length = 0;
  assert.equal(
    await main(
      ['--script', '/nonexistent/tsvmm.sh'],
      (l) => out.push(l),
      (l) => err.push(l),
    ),
    1,
  );
  assert.match(err.join('\n'), /cannot read the --script file \/nonexistent\/tsvmm\.sh \(ENOENT\)/);
});
