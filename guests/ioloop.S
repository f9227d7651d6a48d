/*
 * tsvmm port-I/O loop guest, for bench/exit-rate: every iteration is one
 * `out` to port 0x500, i.e. one KVM_EXIT_IO handled by the VMM. Started in
 * 64-bit mode like the probe guest; rdi = vCPU index (sent as the data).
 */
        .intel_syntax noprefix
        .code64
        .text
        .globl ioloop_entry
ioloop_entry:
        mov     eax, edi
        mov     dx, 0x500
1:      out     dx, al
        jmp     1b
