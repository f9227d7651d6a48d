// Real native calls that need no KVM: failed ioctls, device opening errors,
// memory mapping, signal masks and thread-directed signals.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { test } from 'node:test';
import { Errno, errnoName } from './errno.js';
import { KvmIoctlError, KvmUnavailableError, SyscallError } from './errors.js';
import {
  getpid,
  gettid,
  ignoreSignal,
  lastErrno,
  MAP_ANONYMOUS,
  MAP_FAILED,
  MAP_PRIVATE,
  MAX_NATIVE_VIEW_BYTES,
  O_CLOEXEC,
  O_RDWR,
  PROT_READ,
  PROT_WRITE,
  pthreadSigmask,
  SIG_BLOCK,
  SIG_SETMASK,
  SIGUSR2,
  sigsetAdd,
  sigsetDel,
  sigsetEmpty,
  sigsetHas,
  sigtimedwait,
  sysClose,
  sysMmap,
  sysMunmap,
  sysOpen,
  tgkill,
  viewNative,
} from './ffi.js';
import { closeFd, kvmIoctlInt, kvmIoctlPtr } from './kvm-fd.js';
import { Kvm } from './system.js';
import { KvmVcpu } from './vcpu.js';

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Runs `body` and asserts it left no file descriptor open. */
function withoutFdLeak(body: () => void): void {
  const before = openFds();
  body();
  assert.equal(openFds(), before, 'file descriptors leaked');
}

function openDevNull(): number {
  const fd = sysOpen('/dev/null', O_RDWR | O_CLOEXEC);
  assert.ok(fd >= 0, `open /dev/null: ${errnoName(lastErrno())}`);
  return fd;
}

test('a KVM ioctl on a non-KVM fd throws KvmIoctlError naming the ioctl and ENOTTY', () => {
  withoutFdLeak(() => {
    const fd = openDevNull();
    try {
      assert.throws(
        () => kvmIoctlInt(fd, 'KVM_GET_API_VERSION'),
        (e: unknown) => {
          assert.ok(e instanceof KvmIoctlError);
          assert.equal(e.code, 'KVM_IOCTL_FAILED');
          assert.equal(e.ioctl, 'KVM_GET_API_VERSION');
          assert.equal(e.errno, Errno.ENOTTY);
          assert.equal(e.errnoName, 'ENOTTY');
          assert.equal(e.message, 'KVM_GET_API_VERSION failed: ENOTTY');
          return true;
        },
      );
      const clock = Buffer.alloc(48);
      assert.throws(() => kvmIoctlPtr(fd, 'KVM_GET_CLOCK', clock), {
        message: 'KVM_GET_CLOCK failed: ENOTTY',
      });
    } finally {
      closeFd(fd, '/dev/null');
    }
  });
});

test('an ioctl on a closed fd fails with EBADF', () => {
  const fd = openDevNull();
  closeFd(fd, '/dev/null');
  assert.throws(() => kvmIoctlInt(fd, 'KVM_CHECK_EXTENSION', 0), {
    name: 'KvmIoctlError',
    message: 'KVM_CHECK_EXTENSION failed: EBADF',
  });
});

test('opening a file that is not a KVM device fails on the API version check and closes it', () => {
  withoutFdLeak(() => {
    assert.throws(() => Kvm.open({ path: '/dev/null' }), {
      name: 'KvmIoctlError',
      message: 'KVM_GET_API_VERSION failed: ENOTTY',
    });
  });
});

test('opening a missing KVM device says why and what to do', () => {
  withoutFdLeak(() => {
    assert.throws(
      () => Kvm.open({ path: '/nonexistent/tsvmm/kvm' }),
      (e: unknown) => {
        assert.ok(e instanceof KvmUnavailableError);
        assert.equal(e.code, 'KVM_UNAVAILABLE');
        assert.equal(e.errno, Errno.ENOENT);
        assert.equal(e.path, '/nonexistent/tsvmm/kvm');
        assert.match(e.message, /^cannot open \/nonexistent\/tsvmm\/kvm \(ENOENT\): /);
        // The reason comes from the host probe: either "no KVM device" or how to create the node.
        assert.match(e.message, /no guest can run here|mknod/);
        return true;
      },
    );
  });
});

test('KvmVcpu refuses an fd whose kvm_run cannot be mapped and leaves the fd to its owner', () => {
  withoutFdLeak(() => {
    const fd = openDevNull();
    try {
      assert.throws(
        () => new KvmVcpu(fd, 12288),
        (e: unknown) => e instanceof SyscallError && e.syscall === 'mmap(kvm_run)',
      );
      assert.throws(() => new KvmVcpu(fd, 100), RangeError);
    } finally {
      assert.equal(sysClose(fd), 0, 'the fd was still open');
    }
  });
});

test('mmap, a native view and munmap work on anonymous memory', () => {
  const ptr = sysMmap(null, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  assert.notEqual(ptr, MAP_FAILED);
  const a = viewNative(ptr, 8192);
  const b = viewNative(ptr + 4096n, 4096);
  a[4096] = 0x5a;
  assert.equal(b[0], 0x5a, 'both views see the same memory');
  assert.equal(sysMunmap(ptr, 8192), 0);
});

test('mmap failure comes back as MAP_FAILED with errno', () => {
  const ptr = sysMmap(null, 1n << 60n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  assert.equal(ptr, MAP_FAILED);
  assert.equal(lastErrno(), Errno.ENOMEM);
});

test('viewNative refuses what would abort the process', () => {
  assert.throws(() => viewNative(0n, 16), RangeError);
  assert.throws(() => viewNative(MAP_FAILED, 16), RangeError);
  assert.throws(() => viewNative(0x1000n, MAX_NATIVE_VIEW_BYTES + 1), /in pieces/);
  assert.throws(() => viewNative(0x1000n, 0), RangeError);
});

test('sigset helpers set bit n-1 for signal n', () => {
  const set = sigsetEmpty();
  assert.equal(set.byteLength, 128);
  sigsetAdd(set, 1);
  sigsetAdd(set, SIGUSR2);
  sigsetAdd(set, 64);
  assert.equal(set[0], 0x01);
  assert.equal(set[1], 0x08);
  assert.equal(set[7], 0x80);
  assert.ok(sigsetHas(set, SIGUSR2));
  sigsetDel(set, SIGUSR2);
  assert.ok(!sigsetHas(set, SIGUSR2));
  assert.throws(() => sigsetAdd(set, 0), RangeError);
  assert.throws(() => sigsetAdd(set, 1025), RangeError);
});

test('a blocked, ignored signal sent with tgkill stays pending until sigtimedwait takes it', () => {
  // The vCPU kick scheme: SIG_IGN process-wide, blocked on the thread,
  // sent to the thread, eaten with a zero-timeout sigtimedwait.
  assert.equal(gettid(), getpid(), 'the test runs on the main thread');
  assert.ok(ignoreSignal(SIGUSR2));
  const set = sigsetEmpty();
  sigsetAdd(set, SIGUSR2);
  const old = sigsetEmpty();
  assert.equal(pthreadSigmask(SIG_BLOCK, set, old), 0);
  try {
    assert.equal(sigtimedwait(set, 0), -1, 'nothing pending yet');
    assert.equal(lastErrno(), Errno.EAGAIN);
    assert.equal(tgkill(getpid(), gettid(), SIGUSR2), 0);
    assert.equal(sigtimedwait(set, 0), SIGUSR2);
    assert.equal(sigtimedwait(set, 0), -1, 'taken once');
  } finally {
    assert.equal(pthreadSigmask(SIG_SETMASK, old, null), 0);
  }
  const now = sigsetEmpty();
  assert.equal(pthreadSigmask(SIG_BLOCK, null, now), 0);
  assert.equal(sigsetHas(now, SIGUSR2), sigsetHas(old, SIGUSR2), 'mask restored');
});

test('errno names are symbolic, with a readable fallback', () => {
  assert.equal(errnoName(22), 'EINVAL');
  assert.equal(errnoName(4), 'EINTR');
  assert.equal(errnoName(100000), 'errno 100000');
});
