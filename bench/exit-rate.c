/*
 * Reference for bench/exit-rate: the same port-I/O guest (guests/ioloop.bin)
 * run by a minimal C VMM, to measure what KVM itself allows on this host.
 * Usage: exit-rate-ref GUEST_IMAGE SECONDS  -> prints "exits=N seconds=S".
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define LOAD_ADDR 0x10000

static void die(const char *what) { perror(what); exit(1); }

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s GUEST SECONDS\n", argv[0]); return 2; }
  double seconds = atof(argv[2]);
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("/dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) die("mmap");
  struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem };
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
  FILE *f = fopen(argv[1], "rb");
  if (!f) die(argv[1]);
  fread(mem + LOAD_ADDR, 1, MEM_SIZE - LOAD_ADDR, f);
  fclose(f);
  /* Identity map of the first 1 GiB with 2 MiB pages, and a GDT, as tsvmm lays them out. */
  uint64_t *gdt = (uint64_t *)(mem + 0x500), *pml4 = (uint64_t *)(mem + 0x9000);
  uint64_t *pdpt = (uint64_t *)(mem + 0xa000), *pd = (uint64_t *)(mem + 0xb000);
  gdt[1] = 0x00af9b000000ffffull; gdt[2] = 0x00cf93000000ffffull;
  pml4[0] = 0xa000 | 3; pdpt[0] = 0xb000 | 3;
  for (int i = 0; i < 512; i++) pd[i] = ((uint64_t)i << 21) | 0x83;
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");
  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
  struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 16, .type = 3, .present = 1, .s = 1, .db = 1, .g = 1 };
  sregs.cs = code; sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.gdt.base = 0x500; sregs.gdt.limit = 23;
  sregs.cr0 = 0x80050033; sregs.cr3 = 0x9000; sregs.cr4 = 0x20; sregs.efer = 0x500;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = { .rip = LOAD_ADDR, .rsp = 0x8000, .rflags = 2 };
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
  uint64_t exits = 0;
  double start = now(), end = start + seconds;
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "unexpected exit %u\n", run->exit_reason); return 1; }
    if (++exits % 1024 == 0 && now() >= end) break;
  }
  printf("exits=%llu seconds=%.6f\n", (unsigned long long)exits, now() - start);
  return 0;
}
