/**
 * How much longer a test may wait for a guest here than on a host with KVM.
 * The test runner sets TSVMM_TEST_TIME_SCALE for the tests it runs inside
 * ../shared/tools/kvm-vm, where everything runs under QEMU's emulator and is
 * 10-50 times slower. Every deadline a KVM test waits on goes through
 * {@link scaled}, so the same test holds on both, and a hang still fails,
 * only later.
 */
export const TIME_SCALE = parseTimeScale(process.env.TSVMM_TEST_TIME_SCALE);

function parseTimeScale(text: string | undefined): number {
  if (text === undefined || text === '') return 1;
  const n = Number(text);
  if (!Number.isFinite(n) || n < 1) {
    throw new Error(`TSVMM_TEST_TIME_SCALE must be a number >= 1, not '${text}'`);
  }
  return n;
}

/** `ms` stretched by the {@link TIME_SCALE} of where the tests run. */
export function scaled(ms: number): number {
  return Math.round(ms * TIME_SCALE);
}
